/*
 * The guests' runtime. rt_start runs at CPL0 (set-up; later only interrupt and system-call
 * handlers run there), which KVM on these hosts emulates at a few million instructions a second,
 * then drops to CPL3, which runs natively, to call guest_main. KVM here faults port I/O at CPL3
 * whatever IOPL says, and `int n` there raises #UD, so user code reaches COM1, hlt and the exit
 * port through a system call made of the one trap every platform delivers: `ud2` (#UD, vector 6)
 * at CPL3 with the call number in rax. The handler steps over the ud2 and returns:
 *   rax = SYS_IDLE                       sleep until the next interrupt
 *   rax = SYS_WRITE, rdi = buf, rsi = n  write n bytes to COM1
 *   rax = SYS_EXIT, rdi = value          write value to the isa-debug-exit port, then halt
 */
#include "rt.h"

#define COM1 0x3F8
#define PIC1 0x20
#define PIC2 0xA0
#define PIT_CH0 0x40
#define PIT_CMD 0x43
#define PIT_HZ 1193182u
#define DEBUG_EXIT_PORT 0xF4
#define LAPIC_BASE 0xFEE00000ul

#define MB_BOOT_MAGIC 0x2BADB002u
#define MBI_FLAG_MEM (1u << 0)
#define MBI_FLAG_CMDLINE (1u << 2)

struct multiboot_info {
    u32 flags;
    u32 mem_lower; /* KiB below 640 KiB */
    u32 mem_upper; /* KiB of contiguous RAM from 1 MiB */
    u32 boot_device;
    u32 cmdline; /* physical address of a NUL-terminated string */
} __attribute__((packed));

struct idt_gate {
    u16 offset0;
    u16 selector;
    u8 ist;
    u8 type;
    u16 offset1;
    u32 offset2;
    u32 reserved;
} __attribute__((packed));

struct tss64 {
    u32 reserved0;
    u64 rsp0; /* the stack an interrupt from CPL3 switches to */
    u64 rsp1, rsp2, reserved1, ist[7], reserved2;
    u16 reserved3;
    u16 iomap_base; /* past the limit: no I/O bitmap, so no port I/O at CPL3 */
} __attribute__((packed));

struct isr_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rdi, rsi, rbp, rbx, rdx, rcx, rax;
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

volatile u64 rt_ticks;
u64 rt_mem_top;

/* Copied out of the boot loader's memory first thing: QEMU puts its multiboot info right after
 * our image, in RAM the guests then use. */
static char cmdline[1024];
static struct idt_gate idt[256];

static struct tss64 tss;
static u8 user_stack[16384] __attribute__((aligned(16)));

extern void timer_isr(void);
extern char isr_stubs[];
extern u64 gdt64[];
extern char boot_stack_top[];

#define KERNEL_CS 0x08
#define USER_DS 0x18
#define USER_CS 0x20
#define TSS_SEL 0x28
#define UD_VECTOR 6

enum { SYS_IDLE = 0, SYS_WRITE = 1, SYS_EXIT = 2 };

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline int at_cpl0(void)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return (cs & 3) == 0;
}

static inline u64 syscall2(u64 nr, u64 a, u64 b)
{
    __asm__ volatile("ud2" : "+a"(nr) : "D"(a), "S"(b) : "memory");
    return nr;
}

void *memset(void *dst, int c, unsigned long n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, unsigned long n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

/* ---- COM1 ---------------------------------------------------------------------------------- */

static void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* IER: no interrupts, we poll */
    outb(COM1 + 3, 0x80); /* LCR: DLAB */
    outb(COM1 + 0, 0x01); /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0x07); /* FIFO on and cleared */
    outb(COM1 + 4, 0x03); /* DTR | RTS */
}

static void serial_write(const char *buf, u64 n)
{
    for (u64 i = 0; i < n; i++) {
        while (!(inb(COM1 + 5) & 0x20)) /* LSR.THRE */
            ;
        outb(COM1, (u8)buf[i]);
    }
}

static void rt_write(const char *buf, u64 n)
{
    if (at_cpl0())
        serial_write(buf, n);
    else
        syscall2(SYS_WRITE, (u64)buf, n);
}

/* rt_printf formats into this, so a line costs one system call (two traps), not one per byte. */
struct outbuf {
    char buf[160];
    u32 n;
};

static void out_flush(struct outbuf *o)
{
    rt_write(o->buf, o->n);
    o->n = 0;
}

static void out_putc(struct outbuf *o, char c)
{
    if (o->n == sizeof(o->buf))
        out_flush(o);
    o->buf[o->n++] = c;
}

static void put_u64(struct outbuf *o, u64 v, unsigned base, int width)
{
    char buf[24];
    int n = 0;
    do {
        buf[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (width-- > n)
        out_putc(o, '0');
    while (n)
        out_putc(o, buf[--n]);
}

/* Supports %s %c %u %x %lu %lx %d %% and a zero-padded width, e.g. %08lx. */
void rt_vprintf(const char *fmt, va_list ap)
{
    struct outbuf out = {.n = 0}, *o = &out;
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            out_putc(o, *fmt);
            continue;
        }
        fmt++;
        int width = 0, is_long = 0;
        if (*fmt == '0')
            fmt++;
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        if (*fmt == 'l') {
            is_long = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's':
            for (const char *s = va_arg(ap, const char *); *s; s++)
                out_putc(o, *s);
            break;
        case 'c':
            out_putc(o, (char)va_arg(ap, int));
            break;
        case 'd': {
            long v = is_long ? va_arg(ap, long) : va_arg(ap, int);
            if (v < 0) {
                out_putc(o, '-');
                v = -v;
            }
            put_u64(o, (u64)v, 10, width);
            break;
        }
        case 'u':
        case 'x':
            put_u64(o, is_long ? va_arg(ap, u64) : va_arg(ap, u32), *fmt == 'u' ? 10 : 16, width);
            break;
        case '%':
            out_putc(o, '%');
            break;
        default:
            out_putc(o, '?');
            break;
        }
    }
    out_flush(o);
}

void rt_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    rt_vprintf(fmt, ap);
    va_end(ap);
}

static _Noreturn void kernel_exit(u8 value)
{
    __asm__ volatile("cli");
    outb(DEBUG_EXIT_PORT, value);
    for (;;) /* no isa-debug-exit device: stop here */
        __asm__ volatile("hlt");
}

_Noreturn void rt_exit(u8 value)
{
    if (at_cpl0())
        kernel_exit(value);
    syscall2(SYS_EXIT, value, 0);
    __builtin_unreachable();
}

void rt_idle(void)
{
    syscall2(SYS_IDLE, 0, 0);
}

/* ---- command line -------------------------------------------------------------------------- */

/* Finds `key=` at the start of a word; returns the value's first byte or 0. */
static const char *param_find(const char *key)
{
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *k = key, *w = p;
        while (*k && *w == *k) {
            k++;
            w++;
        }
        if (!*k && *w == '=')
            return w + 1;
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

u64 param_u64(const char *key, u64 def)
{
    const char *v = param_find(key);
    if (!v)
        return def;
    u64 n = 0;
    const char *d = v;
    for (; *d >= '0' && *d <= '9'; d++) {
        if (n > (~0ull - 9) / 10)
            break;
        n = n * 10 + (u64)(*d - '0');
    }
    if (d == v || (*d && *d != ' ')) {
        rt_printf("bad parameter %s: not a decimal number\n", key);
        rt_exit(EXIT_BAD_PARAM);
    }
    return n;
}

int param_str(const char *key, char *buf, u32 cap)
{
    const char *v = param_find(key);
    if (!v)
        return 0;
    u32 n = 0;
    while (v[n] && v[n] != ' ' && n + 1 < cap) {
        buf[n] = v[n];
        n++;
    }
    buf[n] = 0;
    return 1;
}

void param_check(const char *guest, const char *const known[])
{
    int bad = 0;
    for (const char *p = cmdline; *p;) {
        while (*p == ' ')
            p++;
        const char *w = p, *eq = 0;
        while (*p && *p != ' ') {
            if (*p == '=' && !eq)
                eq = p;
            p++;
        }
        if (!eq)
            continue;
        int found = 0;
        for (const char *const *k = known; *k && !found; k++) {
            const char *a = *k, *b = w;
            while (*a && b < eq && *a == *b) {
                a++;
                b++;
            }
            found = !*a && b == eq;
        }
        if (!found) {
            rt_printf("%s: unknown parameter ", guest);
            for (const char *c = w; c < eq; c++)
                rt_printf("%c", *c);
            rt_printf("\n");
            bad = 1;
        }
    }
    if (bad)
        rt_exit(EXIT_BAD_PARAM);
}

/* ---- interrupts and the timer -------------------------------------------------------------- */

static void idt_set(unsigned vector, void *handler)
{
    u64 a = (u64)handler;
    idt[vector] = (struct idt_gate){
        .offset0 = (u16)a,
        .selector = KERNEL_CS,
        .type = 0x8E, /* present, DPL0, 64-bit interrupt gate (IF cleared on entry) */
        .offset1 = (u16)(a >> 16),
        .offset2 = (u32)(a >> 32),
    };
}

void isr_dispatch(struct isr_frame *f);
void isr_dispatch(struct isr_frame *f)
{
    /* Spurious IRQ7/IRQ15 from the 8259s and the LAPIC's spurious vector: not acknowledged. */
    if (f->vector == 39 || f->vector == 47 || f->vector == 0xFF)
        return;
    if (f->vector == UD_VECTOR && (f->cs & 3) && *(const u16 *)f->rip == 0x0B0F) {
        f->rip += 2;
        switch (f->rax) {
        case SYS_IDLE:
            /* The waking interrupt nests here, on this stack; the caller's IF comes back with
             * iretq. */
            __asm__ volatile("sti; hlt; cli" : : : "memory");
            return;
        case SYS_WRITE:
            serial_write((const char *)f->rdi, f->rsi);
            return;
        case SYS_EXIT:
            kernel_exit((u8)f->rdi);
        }
        f->rax = ~0ull;
        return;
    }
    rt_printf("guest fault: vector=%lu error=%lx rip=%lx rsp=%lx\n", f->vector, f->error, f->rip, f->rsp);
    kernel_exit(EXIT_FAULT);
}

static void idt_init(void)
{
    for (unsigned v = 0; v < 256; v++)
        idt_set(v, isr_stubs + 16 * v);
    idt_set(32, timer_isr);
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) desc = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(desc));
}

/* 8259 pair remapped to vectors 32-47, everything masked except IRQ0 (the PIT). */
static void pic_init(void)
{
    outb(PIC1, 0x11); /* ICW1: edge, cascade, ICW4 follows */
    outb(PIC2, 0x11);
    outb(PIC1 + 1, 32); /* ICW2: vector base */
    outb(PIC2 + 1, 40);
    outb(PIC1 + 1, 0x04); /* ICW3: slave on IRQ2 */
    outb(PIC2 + 1, 0x02);
    outb(PIC1 + 1, 0x01); /* ICW4: 8086 mode */
    outb(PIC2 + 1, 0x01);
    outb(PIC1 + 1, 0xFE);
    outb(PIC2 + 1, 0xFF);
}

/* The 8259 reaches the CPU through LAPIC LINT0 in ExtINT mode. Reset state already says so on
 * the BSP (QEMU and KVM alike), but a VMM that restores a zeroed LAPIC would silently drop the
 * timer, so set it explicitly. LVT writes are ignored while the APIC is software-disabled,
 * hence the spurious-vector register first. */
static void lapic_init(void)
{
    volatile u32 *lapic = (volatile u32 *)LAPIC_BASE;
    lapic[0xF0 / 4] = 0x100 | 0xFF; /* SVR: APIC enabled, spurious vector 0xFF */
    lapic[0x350 / 4] = 0x700;       /* LVT LINT0: ExtINT, unmasked */
    lapic[0x320 / 4] = 0x10000;     /* LVT timer: masked */
}

static void pit_init(void)
{
    u32 divisor = (PIT_HZ + RT_TICK_HZ / 2) / RT_TICK_HZ;
    outb(PIT_CMD, 0x34); /* channel 0, lobyte/hibyte, mode 2 (rate generator) */
    outb(PIT_CH0, (u8)divisor);
    outb(PIT_CH0, (u8)(divisor >> 8));
}

static void tss_init(void)
{
    u64 base = (u64)&tss;
    u64 limit = sizeof(tss) - 1;
    tss.rsp0 = (u64)boot_stack_top;
    tss.iomap_base = sizeof(tss);
    /* 16-byte system descriptor: type 9 (available 64-bit TSS), present, DPL0. */
    gdt64[TSS_SEL / 8] = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0x89ull << 40 |
                         ((limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56;
    gdt64[TSS_SEL / 8 + 1] = base >> 32;
    __asm__ volatile("ltr %w0" : : "r"(TSS_SEL));
}

static void user_main(void)
{
    guest_main();
    rt_exit(EXIT_OK);
}

/* Leaves CPL0 for good: the kernel stack is reused from its top by every later interrupt. */
static _Noreturn void enter_user(void)
{
    u64 rsp = (u64)(user_stack + sizeof(user_stack)) - 8; /* as if user_main had been called */
    __asm__ volatile("pushq %0\n\t"
                     "pushq %1\n\t"
                     "pushq $0x202\n\t" /* IF, IOPL 0 */
                     "pushq %2\n\t"
                     "pushq %3\n\t"
                     "iretq"
                     :
                     : "i"(USER_DS | 3), "r"(rsp), "i"(USER_CS | 3), "r"((u64)user_main)
                     : "memory");
    __builtin_unreachable();
}

/* --- the second vCPU --- */

#define AP_TRAMPOLINE 0x7000ul
extern char ap_trampoline[], ap_trampoline_end[];
static void (*volatile ap_fn)(void);
static volatile u32 ap_running;
static u8 ap_user_stack[4096] __attribute__((aligned(16)));

static void lapic_ipi(u32 apic_id, u32 low)
{
    volatile u32 *lapic = (volatile u32 *)LAPIC_BASE;
    lapic[0x310 / 4] = apic_id << 24; /* ICR high: destination */
    lapic[0x300 / 4] = low;           /* ICR low: the write sends */
}

static void wait_ticks(u64 n)
{
    u64 end = rt_ticks + n;
    while (rt_ticks < end)
        rt_idle();
}

int rt_start_ap(void (*fn)(void))
{
    ap_fn = fn;
    memcpy((void *)AP_TRAMPOLINE, ap_trampoline, (u64)(ap_trampoline_end - ap_trampoline));
    barrier();
    lapic_ipi(1, 0x4500); /* INIT, level assert */
    wait_ticks(10);
    for (int i = 0; i < 2 && !ap_running; i++) {
        lapic_ipi(1, 0x4600 | (u32)(AP_TRAMPOLINE >> 12)); /* STARTUP at vector 0x07 */
        wait_ticks(1);
    }
    for (int i = 0; i < 100 && !ap_running; i++)
        wait_ticks(1);
    return ap_running != 0;
}

/* The AP, in long mode at CPL0 on its own stack (boot.S): the IDT, then CPL3 with IF clear. */
void rt_ap_start(void);
void rt_ap_start(void)
{
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) desc = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(desc));
    ap_running = 1;
    u64 rsp = (u64)(ap_user_stack + sizeof(ap_user_stack)) - 8;
    __asm__ volatile("pushq %0\n\t"
                     "pushq %1\n\t"
                     "pushq $0x002\n\t" /* IF clear: the AP takes no interrupts */
                     "pushq %2\n\t"
                     "pushq %3\n\t"
                     "iretq"
                     :
                     : "i"(USER_DS | 3), "r"(rsp), "i"(USER_CS | 3), "r"((u64)ap_fn)
                     : "memory");
    __builtin_unreachable();
}

void rt_start(u32 magic, u32 info_gpa);
void rt_start(u32 magic, u32 info_gpa)
{
    serial_init();
    if (magic != MB_BOOT_MAGIC) {
        rt_printf("not started by a multiboot v1 loader (eax=%x)\n", magic);
        rt_exit(EXIT_FAULT);
    }
    const struct multiboot_info *mbi = (const struct multiboot_info *)(u64)info_gpa;
    if (mbi->flags & MBI_FLAG_CMDLINE) {
        const char *src = (const char *)(u64)mbi->cmdline;
        u32 n = 0;
        for (; src[n] && n + 1 < sizeof(cmdline); n++)
            cmdline[n] = src[n] == '\t' || src[n] == '\n' ? ' ' : src[n];
        cmdline[n] = 0;
    }
    rt_mem_top = (mbi->flags & MBI_FLAG_MEM) ? 0x100000ull + (u64)mbi->mem_upper * 1024 : 0;
    idt_init();
    tss_init();
    pic_init();
    lapic_init();
    pit_init();
    enter_user();
}
