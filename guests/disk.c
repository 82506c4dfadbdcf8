/*
 * disk: the block workload. Finds a virtio-blk device on a virtio-mmio transport (QEMU microvm's
 * layout: transport i at 0xFEB00000 + 0x200 * i), writes generation-stamped, checksummed 4 KiB
 * blocks over a working set of the disk at a paced rate, keeps the generation last written to
 * each block in a table in its RAM, and re-reads and checks every written block periodically.
 * The driver polls the used ring (the guests take only the timer interrupt) and acknowledges the
 * device's interrupt status after each request.
 */
#include "common/rt.h"
#include "disk_layout.h"

#define MIB (1024ul * 1024)
#define SECTOR 512ul
#define BLOCK (SECTOR * DISK_BLOCK_SECTORS)
#define ALIGN_4K(x) (((x) + 0xFFFul) & ~0xFFFul)
#define LOW_RAM_LIMIT 0xC0000000ul
#define IOBUF_BLOCKS 256 /* 1 MiB: the largest request (a verify read, a fill or dreq write) */
#define PAGE 4096ul
#define QSIZE 8

#define MMIO_BASE 0xFEB00000ul
#define MMIO_STRIDE 0x200ul
#define MMIO_SLOTS 32
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0A0
#define R_CONFIG 0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define F_BLK_RO (1ull << 5)
#define F_BLK_FLUSH (1ull << 9)
#define F_VERSION_1 (1ull << 32)
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define DESC_NEXT 1
#define DESC_WRITE 2

static const char *const known[] = {"dws", "drate", "dreq", "dfill", "ws", "rate", "verify", "runtime", "seed", 0};

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct blk_req {
    u32 type;
    u32 reserved;
    u64 sector;
};

static struct desc descs[QSIZE] __attribute__((aligned(4096)));
static volatile struct {
    u16 flags, idx, ring[QSIZE];
} avail __attribute__((aligned(4096)));
static volatile struct {
    u16 flags, idx;
    struct {
        u32 id, len;
    } ring[QSIZE];
} used __attribute__((aligned(4096)));
static struct blk_req req;
static volatile u8 req_status;
static u64 iobuf[IOBUF_BLOCKS * BLOCK / 8] __attribute__((aligned(4096)));

static u64 base;
static u16 last_used;
static u32 *table;
static u64 nblocks, gen, rng, requests;
static u64 ram_gpa, ram_pages, ram_writes;

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* TSC ticks per millisecond, measured against the PIT: the stopwatch for stalls (as in dirty). */
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

static inline u32 rd32(u64 off) { return *(volatile u32 *)(base + off); }
static inline void wr32(u64 off, u32 v) { *(volatile u32 *)(base + off) = v; }

static u64 rnd(void) /* xorshift64* */
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1Dull;
}

/* One request, waited for: header, optional data buffer, status byte. Returns the status. */
static u8 blk_request(u32 type, u64 sector, void *buf, u32 len)
{
    req.type = type;
    req.reserved = 0;
    req.sector = sector;
    req_status = 0xFF;
    descs[0] = (struct desc){(u64)&req, sizeof(req), DESC_NEXT, 1};
    u16 d = 1;
    if (len) {
        descs[1] = (struct desc){(u64)buf, len, (u16)(DESC_NEXT | (type == T_OUT ? 0 : DESC_WRITE)), 2};
        d = 2;
    } else {
        descs[0].next = 1;
    }
    descs[d] = (struct desc){(u64)&req_status, 1, DESC_WRITE, 0};
    avail.ring[avail.idx % QSIZE] = 0;
    barrier();
    avail.idx = avail.idx + 1;
    barrier();
    wr32(R_QUEUE_NOTIFY, 0);
    u64 spins = 0;
    while (used.idx == last_used) {
        if (++spins > 2000)
            rt_idle(); /* a slow device: wait a tick at a time */
        else
            __asm__ volatile("pause");
    }
    barrier();
    last_used++;
    u32 isr = rd32(R_INTERRUPT_STATUS);
    if (isr)
        wr32(R_INTERRUPT_ACK, isr);
    requests++;
    return req_status;
}

static u64 fnv(const u64 *w, int n)
{
    u64 h = DISK_FNV_OFFSET;
    for (int i = 0; i < n; i++)
        h = (h ^ w[i]) * DISK_FNV_PRIME;
    return h;
}

static void stamp_sector(u64 *w, u64 lba, u64 g)
{
    w[0] = DISK_SECTOR_MAGIC;
    w[1] = lba;
    w[2] = g;
    for (u64 i = 3; i < DISK_SECTOR_WORDS - 1; i++)
        w[i] = disk_fill(lba, g, i);
    w[DISK_SECTOR_WORDS - 1] = fnv(w, DISK_SECTOR_WORDS - 1);
}

/* 0 if the sector holds generation g for lba, intact; else nonzero. */
static int sector_bad(const u64 *w, u64 lba, u64 g)
{
    if (w[0] != DISK_SECTOR_MAGIC || w[1] != lba || w[2] != g)
        return 1;
    for (u64 i = 3; i < DISK_SECTOR_WORDS - 1; i++)
        if (w[i] != disk_fill(lba, g, i))
            return 1;
    return w[DISK_SECTOR_WORDS - 1] != fnv(w, DISK_SECTOR_WORDS - 1);
}

/* Blocks [first, first + n) in one request, each block with the next generation. */
static int write_blocks(u64 first, u64 n)
{
    u64 lba = first * DISK_BLOCK_SECTORS;
    for (u64 b = 0; b < n; b++)
        for (u64 s = 0; s < DISK_BLOCK_SECTORS; s++)
            stamp_sector(iobuf + (b * DISK_BLOCK_SECTORS + s) * DISK_SECTOR_WORDS, lba + b * DISK_BLOCK_SECTORS + s,
                         gen + 1 + b);
    u8 st = blk_request(T_OUT, lba, iobuf, (u32)(n * BLOCK));
    if (st) {
        rt_printf("disk: write lba=%lu failed: status %u\n", lba, st);
        return 0;
    }
    for (u64 b = 0; b < n; b++)
        table[first + b] = (u32)(gen + 1 + b);
    gen += n;
    return 1;
}

/* One RAM page of the ws= working set rewritten: its index and the write count in every u64. */
static void dirty_page(u64 page)
{
    volatile u64 *w = (volatile u64 *)(ram_gpa + page * PAGE);
    u64 v = (++ram_writes << 32) | page;
    for (u64 i = 0; i < PAGE / 8; i++)
        w[i] = v;
}

static int verify_all(void)
{
    u64 checked = 0;
    for (u64 b = 0; b < nblocks; b += IOBUF_BLOCKS) {
        u64 n = nblocks - b < IOBUF_BLOCKS ? nblocks - b : IOBUF_BLOCKS;
        u8 st = blk_request(T_IN, b * DISK_BLOCK_SECTORS, iobuf, (u32)(n * BLOCK));
        if (st) {
            rt_printf("disk verify FAIL lba=%lu: read status %u\n", b * DISK_BLOCK_SECTORS, st);
            return 0;
        }
        for (u64 i = 0; i < n; i++) {
            u32 g = table[b + i];
            if (!g)
                continue;
            for (u64 s = 0; s < DISK_BLOCK_SECTORS; s++) {
                u64 lba = (b + i) * DISK_BLOCK_SECTORS + s;
                if (sector_bad(iobuf + (i * DISK_BLOCK_SECTORS + s) * DISK_SECTOR_WORDS, lba, g)) {
                    rt_printf("disk verify FAIL lba=%lu gen=%u\n", lba, g);
                    return 0;
                }
            }
            checked++;
        }
    }
    rt_printf("disk verify ok gen=%lu blocks=%lu\n", gen, checked);
    return 1;
}

static int find_device(void)
{
    for (u64 i = 0; i < MMIO_SLOTS; i++) {
        base = MMIO_BASE + i * MMIO_STRIDE;
        if (rd32(R_MAGIC) != 0x74726976 || rd32(R_DEVICE_ID) != 2)
            continue;
        if (rd32(R_VERSION) != 2) {
            rt_printf("disk: virtio-mmio@0x%lx is legacy (version %u); need version 2\n", base,
                      rd32(R_VERSION));
            return 0;
        }
        return 1;
    }
    return 0;
}

static u64 setup_device(void)
{
    wr32(R_STATUS, 0);
    wr32(R_STATUS, S_ACK);
    wr32(R_STATUS, S_ACK | S_DRIVER);
    wr32(R_DEVICE_FEATURES_SEL, 0);
    u64 offered = rd32(R_DEVICE_FEATURES);
    wr32(R_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)rd32(R_DEVICE_FEATURES) << 32;
    u64 want = offered & (F_VERSION_1 | F_BLK_FLUSH | F_BLK_RO);
    wr32(R_DRIVER_FEATURES_SEL, 0);
    wr32(R_DRIVER_FEATURES, (u32)want);
    wr32(R_DRIVER_FEATURES_SEL, 1);
    wr32(R_DRIVER_FEATURES, (u32)(want >> 32));
    wr32(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(offered & F_VERSION_1) || !(rd32(R_STATUS) & S_FEATURES_OK)) {
        rt_printf("disk: the device refused features 0x%lx (offered 0x%lx)\n", want, offered);
        rt_exit(EXIT_FAILED);
    }
    wr32(R_QUEUE_SEL, 0);
    if (rd32(R_QUEUE_NUM_MAX) < QSIZE) {
        rt_printf("disk: queue 0 max size %u < %u\n", rd32(R_QUEUE_NUM_MAX), QSIZE);
        rt_exit(EXIT_FAILED);
    }
    wr32(R_QUEUE_NUM, QSIZE);
    wr32(R_QUEUE_DESC, (u32)(u64)descs);
    wr32(R_QUEUE_DESC + 4, 0);
    wr32(R_QUEUE_DRIVER, (u32)(u64)&avail);
    wr32(R_QUEUE_DRIVER + 4, 0);
    wr32(R_QUEUE_DEVICE, (u32)(u64)&used);
    wr32(R_QUEUE_DEVICE + 4, 0);
    wr32(R_QUEUE_READY, 1);
    wr32(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return want;
}

void guest_main(void)
{
    param_check("disk", known);
    u64 dws = param_u64("dws", 4);
    u64 drate = param_u64("drate", 1);
    u64 dreq = param_u64("dreq", 4);
    u64 dfill = param_u64("dfill", 0);
    u64 ws = param_u64("ws", 0);
    u64 rate = param_u64("rate", 0);
    u64 verify_s = param_u64("verify", 2);
    u64 runtime = param_u64("runtime", 0);
    u64 seed = param_u64("seed", 1);
    if (dws < 1 || dws > 65536 || drate > 65536 || dreq < 4 || dreq > IOBUF_BLOCKS * BLOCK / 1024 ||
        dreq % 4 || dfill > dws || ws > 65536 || rate > 65536) {
        rt_printf("disk: bad parameter: dws=1..65536 MiB, drate=0..65536 MiB/s, dreq=4..%lu KiB in 4 KiB "
                  "steps, dfill=0..dws MiB, ws=0..65536 MiB, rate=0..65536 MiB/s\n",
                  IOBUF_BLOCKS * BLOCK / 1024);
        rt_exit(EXIT_BAD_PARAM);
    }
    if (!find_device()) {
        rt_printf("disk: no virtio-blk device on virtio-mmio at 0x%lx\n", MMIO_BASE);
        rt_exit(EXIT_FAILED);
    }
    u64 features = setup_device();
    u64 capacity = rd32(R_CONFIG) | (u64)rd32(R_CONFIG + 4) << 32;
    char id[21];
    memset(id, 0, sizeof(id));
    if (blk_request(T_GET_ID, 0, id, 20) != 0)
        id[0] = 0;
    rt_printf("disk: virtio-blk at virtio-mmio@0x%lx id=%s capacity=%lu sectors features=0x%lx\n", base,
              id, capacity, features);
    if (features & F_BLK_RO) {
        rt_printf("disk: the device is read-only\n");
        rt_exit(EXIT_FAILED);
    }
    nblocks = dws * (MIB / BLOCK);
    if (nblocks * DISK_BLOCK_SECTORS > capacity) {
        rt_printf("disk: dws=%lu MiB does not fit on a disk of %lu MiB\n", dws, capacity * SECTOR / MIB);
        rt_exit(EXIT_BAD_PARAM);
    }
    u64 table_gpa = ALIGN_4K((u64)_end);
    u64 top = rt_mem_top < LOW_RAM_LIMIT ? rt_mem_top : LOW_RAM_LIMIT;
    ram_gpa = (table_gpa + nblocks * 4 + 0x1FFFFFul) & ~0x1FFFFFul;
    ram_pages = ws * (MIB / PAGE);
    if (table_gpa + nblocks * 4 > top || ram_gpa + ram_pages * PAGE > top) {
        rt_printf("disk: the table of %lu blocks and ws=%lu MiB do not fit in RAM\n", nblocks, ws);
        rt_exit(EXIT_BAD_PARAM);
    }
    table = (u32 *)table_gpa;
    memset(table, 0, nblocks * 4);
    rng = seed * 0x9E3779B97F4A7C15ull ^ 0xD1B54A32D192ED03ull;
    if (!rng)
        rng = 1;
    rt_printf("disk: dws=%lu MiB blocks=%lu drate=%lu MiB/s verify=%lu runtime=%lu table=0x%lx\n", dws,
              nblocks, drate, verify_s, runtime, table_gpa);
    if (dreq != 4 || dfill || ws)
        rt_printf("disk: dreq=%lu KiB dfill=%lu MiB ws=%lu MiB rate=%lu MiB/s ram=0x%lx\n", dreq, dfill, ws,
                  rate, ram_gpa);
    u64 fails = 0;
    /* dfill: the first dfill MiB of the disk written once, in order, flat out. */
    for (u64 b = 0, end = dfill * (MIB / BLOCK); b < end; b += IOBUF_BLOCKS)
        fails += !write_blocks(b, end - b < IOBUF_BLOCKS ? end - b : IOBUF_BLOCKS);
    if (dfill)
        rt_printf("disk: filled %lu MiB gen=%lu\n", dfill, gen);
    for (u64 p = 0; p < ram_pages; p++)
        dirty_page(p);
    if (ram_pages)
        rt_printf("disk: ram filled %lu MiB\n", ws);

    /* Paced in requests of dreq KiB (at random dreq-aligned places) and in RAM pages; what could
     * not be done in time (a verify pass, a migration pause) is forgiven beyond 100 ms worth. */
    u64 req_blocks = dreq * 1024 / BLOCK;
    u64 req_slots = nblocks / req_blocks;
    u64 reqs_per_s = drate * 1024 / dreq, pages_per_s = ram_pages ? rate * (MIB / PAGE) : 0;
    u64 max_req_debt = reqs_per_s / 10 + 1, max_page_debt = pages_per_s / 10 + 1;
    u64 start = rt_ticks, last_sec = 0, paced = 0, paced_pages = 0, written = 0;
    /* stall: the longest time between two turns of this loop since the last progress line, by the
     * TSC (which keeps counting through a migration's pause); printing, flushing and checking are
     * not counted. */
    u64 tpm = tsc_per_ms(), last_tsc = rdtsc(), stall = 0;
    for (;;) {
        u64 t = rdtsc();
        if (t - last_tsc > stall)
            stall = t - last_tsc;
        last_tsc = t;
        u64 now = rt_ticks - start;
        u64 sec = now / RT_TICK_HZ;
        if (sec != last_sec) {
            last_sec = sec;
            rt_printf("disk: t=%lu gen=%lu written=%lu KiB ram=%lu MiB stall=%lu us\n", sec, gen,
                      written * (BLOCK / 1024), ram_writes / (MIB / PAGE), stall * 1000 / tpm);
            stall = 0;
            if (features & F_BLK_FLUSH && blk_request(T_FLUSH, 0, 0, 0) != 0) {
                rt_printf("disk: flush failed\n");
                fails++;
            }
            if (verify_s && sec % verify_s == 0)
                fails += !verify_all();
            if (runtime && sec >= runtime) {
                rt_printf("disk: done t=%lu gen=%lu written=%lu KiB requests=%lu fails=%lu\n", sec, gen,
                          written * (BLOCK / 1024), requests, fails);
                rt_exit(fails ? EXIT_FAILED : EXIT_OK);
            }
            last_tsc = rdtsc();
            continue;
        }
        int busy = 0;
        u64 due = now * reqs_per_s / RT_TICK_HZ;
        if (due > paced + max_req_debt)
            paced = due - max_req_debt;
        if (due > paced) {
            if (!write_blocks(rnd() % req_slots * req_blocks, req_blocks))
                fails++;
            written += req_blocks;
            paced++;
            busy = 1;
        }
        u64 due_pages = now * pages_per_s / RT_TICK_HZ;
        if (due_pages > paced_pages + max_page_debt)
            paced_pages = due_pages - max_page_debt;
        for (u64 n = 0; due_pages > paced_pages && n < 64; n++, paced_pages++, busy = 1)
            dirty_page(rnd() % ram_pages);
        if (!busy)
            rt_idle();
    }
}
