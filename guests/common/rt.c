/* The guests' runtime. Everything here runs at CPL0, which KVM on these hosts emulates at a few
 * million instructions a second: keep paths short, do bulk work with rep string instructions. */
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

extern void timer_isr(void);
extern char isr_stubs[];

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

static void serial_putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20)) /* LSR.THRE */
        ;
    outb(COM1, (u8)c);
}

static void put_u64(u64 v, unsigned base, int width)
{
    char buf[24];
    int n = 0;
    do {
        buf[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (width-- > n)
        serial_putc('0');
    while (n)
        serial_putc(buf[--n]);
}

/* Supports %s %c %u %x %lu %lx %d %% and a zero-padded width, e.g. %08lx. */
void rt_vprintf(const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
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
                serial_putc(*s);
            break;
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'd': {
            long v = is_long ? va_arg(ap, long) : va_arg(ap, int);
            if (v < 0) {
                serial_putc('-');
                v = -v;
            }
            put_u64((u64)v, 10, width);
            break;
        }
        case 'u':
        case 'x':
            put_u64(is_long ? va_arg(ap, u64) : va_arg(ap, u32), *fmt == 'u' ? 10 : 16, width);
            break;
        case '%':
            serial_putc('%');
            break;
        default:
            serial_putc('?');
            break;
        }
    }
}

void rt_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    rt_vprintf(fmt, ap);
    va_end(ap);
}

_Noreturn void rt_exit(u8 value)
{
    __asm__ volatile("cli");
    outb(DEBUG_EXIT_PORT, value);
    /* No isa-debug-exit device: stop here with interrupts off. */
    for (;;)
        __asm__ volatile("hlt");
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
        .selector = 0x08,
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
    rt_printf("guest fault: vector=%lu error=%lx rip=%lx rsp=%lx\n", f->vector, f->error, f->rip, f->rsp);
    rt_exit(EXIT_FAULT);
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
    pic_init();
    lapic_init();
    pit_init();
    __asm__ volatile("sti");
    guest_main();
    rt_exit(EXIT_OK);
}
