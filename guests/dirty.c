/*
 * dirty: the migration workload. Fills a working set, then rewrites pages at a steady rate,
 * stamping each page with its index and a generation and recording the generation in a table
 * in guest RAM, so a lost or stale page after migration is detectable, in the guest and on the
 * host (dirty_layout.h describes what the host sees).
 *
 * fill= says what a page holds besides its stamp: the stamp in every u64 (`stamp`), text that
 * changes with every write (`text`: what compression is for), or text written once and then only
 * the two stamp words rewritten (`sparse`: 16 bytes per write, what XBZRLE is for), or
 * incompressible words that change with every write (`random`: what compression cannot help).
 * The text is a hash of (page, generation, word) picking one of 32 word tokens; `random` is that
 * hash itself (vmferry.guests.verify restates both).
 */
#include "common/rt.h"
#include "dirty_layout.h"

#define PAGE_SIZE 4096ul
#define PAGE_U64S (PAGE_SIZE / 8)
#define MIB (1024ul * 1024)
#define ALIGN_2M(x) (((x) + 0x1FFFFFul) & ~0x1FFFFFul)
/* The guests use RAM below 3 GiB only: above it is the PCI hole. */
#define LOW_RAM_LIMIT 0xC0000000ul
/* Writes between looks at the clock: small enough to keep pacing and progress lines prompt. */
#define BATCH_PAGES 64

static const char *const known[] = {
    "ws", "rate", "pattern", "hot", "hotw", "verify", "seed", "runtime", "check", "fill", "compute", 0,
};

/* Text pages: u64 j (1..510) of page i at generation g is the token hash(i, g', j) % 32, g' = g
 * for fill=text and 0 for fill=sparse; a token is a vocabulary word cut to 7 letters and padded
 * with spaces to 8 bytes. Each page is fresh text (no corpus repeats across pages): it compresses
 * like a text of 32 words, not like one page copied many times. fill=random: u64 j is the hash
 * itself (g' = g), which neither lz4, zlib nor zstd can shrink. */
#define TOKENS 32
static const char *const vocab[TOKENS] = {
    "the", "migration", "of", "a", "guest", "page", "is", "sent", "and", "memory", "to", "dirty",
    "log", "while", "vCPU", "runs", "in", "destination", "source", "with", "bytes", "that",
    "switchover", "on", "each", "pass", "for", "device", "state", "stream", "record", "host",
};
static u64 tokens[TOKENS];
/* compute=1: the second vCPU's loop count (it only ever counts); the first prints its rate. At a
 * fixed address (dirty_layout.h) so a host can read it too. */
#define compute_loops (*(volatile u64 *)DIRTY_COMPUTE_GPA)
static int fill;

static volatile struct dirty_header *const hdr = (volatile struct dirty_header *)DIRTY_HEADER_GPA;
static volatile u32 *table;
static u64 ws_gpa, npages;
static u32 gen;
static u64 rng;
static int check_full;

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* TSC ticks per millisecond, measured against the PIT: the guest's stopwatch for stalls. */
static u64 tsc_per_ms(void)
{
    u64 start = rt_ticks;
    while (rt_ticks == start)
        rt_idle();
    u64 t0 = rdtsc(), from = rt_ticks;
    while (rt_ticks < from + 50)
        rt_idle();
    return (rdtsc() - t0) / 50 + 1;
}

static u64 xorshift(u64 *state) /* xorshift64*: a deterministic sequence for a given seed */
{
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return *state * 0x2545F4914F6CDD1Dull;
}

static u64 rnd(void)
{
    return xorshift(&rng);
}

static void make_tokens(void)
{
    for (int k = 0; k < TOKENS; k++) {
        char t[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
        for (int i = 0; i < 7 && vocab[k][i]; i++)
            t[i] = vocab[k][i];
        memcpy(&tokens[k], t, 8);
    }
}

/* What u64 `j` of page `page` holds at generation `g` (the stamp fill: every u64 is the stamp). */
static inline u64 page_word(u64 page, u32 g, u64 j)
{
    if (fill == FILL_STAMP || j == 0 || j == PAGE_U64S - 1)
        return ((u64)g << 32) | page;
    u64 x = ((page << 32) | (fill == FILL_SPARSE ? 0 : g)) * 0x9E3779B97F4A7C15ull + j * 0xD1B54A32D192ED03ull;
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 32;
    return fill == FILL_RANDOM ? x : tokens[x % TOKENS];
}

/*
 * The in-flight protocol: a paused guest (paused anywhere, even inside rep stosq) has at most
 * one page whose contents disagree with the table, and the header names it. Stores reach RAM in
 * program order on x86, and a pause lands on an instruction (or rep iteration) boundary.
 */
static void write_page(u64 page)
{
    hdr->inflight = page;
    barrier();
    if (++gen == 0) /* 32-bit generations wrap to 1: 0 means "never written" */
        gen = 1;
    u64 value = ((u64)gen << 32) | page;
    void *dst = (void *)(ws_gpa + page * PAGE_SIZE);
    if (fill == FILL_STAMP) {
        u64 n = PAGE_U64S;
        __asm__ volatile("rep stosq" : "+D"(dst), "+c"(n) : "a"(value) : "memory");
    } else {
        volatile u64 *w = (volatile u64 *)dst;
        w[0] = value;
        /* sparse: the text once, at the page's first write; then only the stamps. */
        if (fill != FILL_SPARSE || table[page] == 0)
            for (u64 j = 1; j < PAGE_U64S - 1; j++)
                w[j] = page_word(page, gen, j);
        w[PAGE_U64S - 1] = value;
    }
    /* The sum first, then the entry: a verifier that finds them disagreeing by exactly this
     * page's change knows the guest stopped between the two stores. */
    hdr->table_sum = hdr->table_sum + gen - table[page];
    barrier();
    table[page] = gen;
    hdr->generation = gen;
    hdr->writes = hdr->writes + 1;
    barrier();
    hdr->inflight = DIRTY_NO_PAGE;
}

/* The second vCPU, at CPL3 with interrupts off: a loop of integer work that touches no memory
 * but its counter, so only what the host takes from it (a throttle) changes its rate. */
static void compute_main(void)
{
    u64 x = 1;
    for (;;) {
        for (int i = 0; i < 64; i++)
            x = x * 6364136223846793005ull + 1442695040888963407ull;
        __asm__ volatile("" : "+r"(x));
        compute_loops = compute_loops + 1;
    }
}

/* Returns 1 if the page holds generation `g`'s content in every checked u64; *found gets the
 * first mismatch. */
static int page_ok(u64 page, u32 g, u64 *found)
{
    u64 value = ((u64)g << 32) | page;
    const u64 *p = (const u64 *)(ws_gpa + page * PAGE_SIZE);
    if (!check_full) {
        *found = p[0] != value ? p[0] : p[PAGE_U64S - 1];
        return p[0] == value && p[PAGE_U64S - 1] == value;
    }
    if (fill != FILL_STAMP) {
        for (u64 j = 0; j < PAGE_U64S; j++) {
            if (p[j] != page_word(page, g, j)) {
                *found = p[j];
                return 0;
            }
        }
        return 1;
    }
    const u64 *cur = p;
    u64 n = PAGE_U64S;
    u8 equal;
    __asm__ volatile("repe scasq" : "+D"(cur), "+c"(n), "=@ccz"(equal) : "a"(value) : "memory");
    *found = cur[-1];
    return equal;
}

static int verify_all(void)
{
    u64 bad = 0, first_bad = 0, found = 0;
    u32 first_gen = 0;
    for (u64 page = 0; page < npages; page++) {
        u32 g = table[page];
        u64 f;
        if (g == 0 || !page_ok(page, g, &f)) {
            if (!bad++) {
                first_bad = page;
                first_gen = g;
                found = f;
            }
        }
    }
    if (bad) {
        hdr->verify_fails = hdr->verify_fails + 1;
        rt_printf("verify FAIL page=%lu: table gen=%u, page holds %016lx (%lu bad pages)\n", first_bad,
                  first_gen, found, bad);
        return 0;
    }
    hdr->verify_passes = hdr->verify_passes + 1;
    rt_printf("verify ok gen=%u pages=%lu\n", gen, npages);
    return 1;
}

void guest_main(void)
{
    param_check("dirty", known);
    u64 ws_mib = param_u64("ws", 64);
    u64 rate = param_u64("rate", 8);
    u64 hot = param_u64("hot", 10);
    u64 hotw = param_u64("hotw", 90);
    u64 verify_s = param_u64("verify", 5);
    u64 seed = param_u64("seed", 1);
    u64 runtime = param_u64("runtime", 0);
    u64 compute = param_u64("compute", 0);
    char pattern_s[16] = "uniform", check_s[8] = "full", fill_s[8] = "stamp";
    param_str("pattern", pattern_s, sizeof(pattern_s));
    param_str("check", check_s, sizeof(check_s));
    param_str("fill", fill_s, sizeof(fill_s));
    fill = str_eq(fill_s, "stamp") ? FILL_STAMP : str_eq(fill_s, "text") ? FILL_TEXT
         : str_eq(fill_s, "sparse") ? FILL_SPARSE : str_eq(fill_s, "random") ? FILL_RANDOM : -1;

    int pattern = 0;
    if (str_eq(pattern_s, "uniform"))
        pattern = PATTERN_UNIFORM;
    else if (str_eq(pattern_s, "hot"))
        pattern = PATTERN_HOT;
    check_full = str_eq(check_s, "full");
    if (!pattern || (!check_full && !str_eq(check_s, "ends")) || hot < 1 || hot > 100 ||
        hotw > 100 || rate > 1000000 || fill < 0 || compute > 1) {
        rt_printf("dirty: bad parameter: pattern=uniform|hot, check=full|ends, fill=stamp|text|sparse|random, "
                  "compute=0|1, hot=1..100, hotw=0..100\n");
        rt_exit(EXIT_BAD_PARAM);
    }

    npages = ws_mib * (MIB / PAGE_SIZE);
    u64 table_gpa = ALIGN_2M((u64)_end);
    ws_gpa = ALIGN_2M(table_gpa + npages * 4);
    u64 top = rt_mem_top < LOW_RAM_LIMIT ? rt_mem_top : LOW_RAM_LIMIT;
    if (ws_mib < 1 || ws_mib > LOW_RAM_LIMIT / MIB || ws_gpa + npages * PAGE_SIZE > top) {
        rt_printf("dirty: ws=%lu MiB does not fit: %lu MiB of RAM usable from 0x%lx\n", ws_mib,
                  top > ws_gpa ? (top - ws_gpa) / MIB : 0, ws_gpa);
        rt_exit(EXIT_BAD_PARAM);
    }
    table = (volatile u32 *)table_gpa;
    if (fill != FILL_STAMP)
        make_tokens();
    rng = seed * 0x9E3779B97F4A7C15ull ^ 0xD1B54A32D192ED03ull;
    if (!rng)
        rng = 1;

    /* The table must start all-zero ("never written"); RAM from the VMM is, but don't rely on it. */
    memset((void *)table_gpa, 0, npages * 4);
    hdr->magic = 0;
    barrier();
    *hdr = (struct dirty_header){
        /* Version 1 readers know only the stamp fill: other fills say version 2. */
        .version = fill == FILL_STAMP ? 1 : DIRTY_LAYOUT_VERSION,
        .header_size = sizeof(struct dirty_header),
        .ws_gpa = ws_gpa,
        .npages = npages,
        .table_gpa = table_gpa,
        .entry_size = 4,
        .page_size = PAGE_SIZE,
        .inflight = DIRTY_NO_PAGE,
        .rate_mib_s = (u32)rate,
        .pattern = (u16)pattern,
        .fill = (u16)fill,
        .hot_percent = (u32)hot,
        .hot_writes = (u32)hotw,
        .seed = seed,
    };
    barrier();
    hdr->magic = DIRTY_MAGIC;

    rt_printf("dirty: ws=%lu MiB pages=%lu rate=%lu MiB/s pattern=%s hot=%lu hotw=%lu verify=%lu "
              "check=%s seed=%lu runtime=%lu%s%s\n",
              ws_mib, npages, rate, pattern_s, hot, hotw, verify_s, check_s, seed, runtime,
              fill == FILL_STAMP ? "" : " fill=", fill == FILL_STAMP ? "" : fill_s);
    rt_printf("dirty: header=0x%lx table=0x%lx ws=0x%lx\n", DIRTY_HEADER_GPA, table_gpa, ws_gpa);

    u64 hot_pages = npages * hot / 100;
    if (hot_pages < 1)
        hot_pages = 1;
    u64 pages_per_s = rate * (MIB / PAGE_SIZE);
    /* Writes owed when the guest fell behind (a verify pass, a migration pause, a slow CPU) are
     * forgiven beyond 100 ms worth, so the rate never bursts to catch up. */
    u64 max_debt = pages_per_s / 10 + 1;
    u64 last_sec = 0, pace_start = 0, paced = 0, failures = 0;
    /* stall: the longest time between two turns of this loop since the last progress line, by
     * the TSC. A VM paused for migration shows its downtime here, as the guest saw it (the TSC
     * keeps counting through the pause; the PIT's ticks move with the saved state).
     * stalled: the sum of those gaps longer than 20 us since the last progress line, idling
     * between paced batches left out: the time the host held the guest (a postcopy fault's
     * wait, a pause), comparable with the VMM's blocktime. */
    u64 tpm = tsc_per_ms(), last_tsc = rdtsc(), stall = 0, stalled = 0;
    u64 stall_min = tpm / 50;
    if (compute) {
        compute_loops = 0;
        if (!rt_start_ap(compute_main)) {
            rt_printf("dirty: compute=1 needs a second vCPU, and it did not start\n");
            rt_exit(EXIT_BAD_PARAM);
        }
        rt_printf("dirty: compute vCPU started\n");
    }
    u64 compute_last = compute_loops, compute_tick = rt_ticks;

    for (;;) {
        u64 t = rdtsc();
        if (t - last_tsc > stall)
            stall = t - last_tsc;
        if (t - last_tsc > stall_min)
            stalled += t - last_tsc;
        last_tsc = t;
        u64 now = rt_ticks;
        u64 sec = now / RT_TICK_HZ;
        if (sec != last_sec) {
            last_sec = sec;
            rt_printf("dirty: t=%lu gen=%u written=%lu MiB stalled=%lu us stall=%lu us\n", sec,
                      gen, hdr->writes / (MIB / PAGE_SIZE), stalled * 1000 / tpm,
                      stall * 1000 / tpm);
            if (compute) {
                /* The second vCPU's loops over PIT time since the last line. */
                u64 loops = compute_loops, ticks = now - compute_tick;
                rt_printf("compute: t=%lu rate=%lu loops/s\n", sec,
                          ticks ? (loops - compute_last) * RT_TICK_HZ / ticks : 0);
                compute_last = loops;
                compute_tick = now;
            }
            stall = 0;
            stalled = 0;
            if (verify_s && sec % verify_s == 0 && hdr->filled == npages)
                failures += !verify_all();
            last_tsc = rdtsc(); /* our own printing and checking are not stalls */
            if (runtime && sec >= runtime) {
                rt_printf("dirty: done t=%lu gen=%u written=%lu MiB verify_passes=%lu verify_fails=%lu\n",
                          sec, gen, hdr->writes / (MIB / PAGE_SIZE), hdr->verify_passes,
                          hdr->verify_fails);
                rt_exit(failures ? EXIT_FAILED : EXIT_OK);
            }
            continue;
        }
        if (hdr->filled < npages) {
            /* The initial fill runs flat out: every page non-zero before any rate applies. */
            u64 page = hdr->filled;
            for (int i = 0; i < BATCH_PAGES && page < npages; i++, page++) {
                write_page(page);
                hdr->filled = page + 1;
            }
            if (page == npages) {
                rt_printf("dirty: filled %lu pages gen=%u\n", npages, gen);
                pace_start = rt_ticks;
            }
            continue;
        }
        u64 due = (now - pace_start) * pages_per_s / RT_TICK_HZ;
        if (due > paced + max_debt)
            paced = due - max_debt;
        if (due == paced) {
            rt_idle();
            last_tsc = rdtsc(); /* waiting for the next batch is not a stall */
            continue;
        }
        for (int i = 0; i < BATCH_PAGES && paced < due; i++, paced++) {
            u64 r = rnd();
            u64 page;
            if (pattern == PATTERN_HOT && hot_pages < npages)
                page = (r % 100 < hotw) ? (r >> 8) % hot_pages
                                        : hot_pages + (r >> 8) % (npages - hot_pages);
            else
                page = r % npages;
            write_page(page);
        }
    }
}
