/* The guests' tiny runtime: COM1 output, the command line, the PIT tick, idling, exit. */
#ifndef VMFERRY_GUEST_RT_H
#define VMFERRY_GUEST_RT_H

#include <stdarg.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* The PIT runs at this rate for every guest; guests derive their own rates from it. */
#define RT_TICK_HZ 1000u

/* Exit values written to the isa-debug-exit port (QEMU exits with (v << 1) | 1). */
#define EXIT_OK 0
#define EXIT_FAILED 1
#define EXIT_BAD_PARAM 2
#define EXIT_FAULT 3

/* PIT ticks since the timer started; written only by the IRQ0 handler. */
extern volatile u64 rt_ticks;
/* First byte past the contiguous RAM that starts at 1 MiB, from the multiboot mem_upper. */
extern u64 rt_mem_top;
/* First byte past this image (loaded data and .bss): guests own RAM from here upward. */
extern char _end[];

/* Keeps the compiler from moving memory accesses across it; x86 stores are already ordered. */
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }

void rt_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void rt_vprintf(const char *fmt, va_list ap);
_Noreturn void rt_exit(u8 value);

/* `key=value` words of the command line; words without '=' (QEMU puts the image path first)
 * are ignored. Returns def when the key is absent; exits with EXIT_BAD_PARAM when malformed. */
u64 param_u64(const char *key, u64 def);
/* Copies the value (NUL-terminated, at most cap-1 bytes) into buf; returns 0 when absent. */
int param_str(const char *key, char *buf, u32 cap);
/* Reports words naming no key in known[] (a NULL-terminated list) and exits EXIT_BAD_PARAM. */
void param_check(const char *guest, const char *const known[]);

/* Sleeps until the next interrupt (a system call: hlt is privileged). An interrupt between the
 * caller's check and the call costs one tick of sleep, no more. */
void rt_idle(void);

/* Each guest's entry, called at CPL3 with the timer running and interrupts enabled. */
void guest_main(void);

static inline int str_eq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

/* Starts the second vCPU (APIC ID 1) with INIT and SIPI and has it call fn at CPL3 with
 * interrupts off, on a stack of its own, forever; it gets no interrupts, takes no exceptions
 * (there is no TSS for it) and makes no system calls. Returns 1 once the AP runs, 0 if it did not
 * start within 100 ms (a machine with one vCPU). Call once, from guest_main. */
int rt_start_ap(void (*fn)(void));

void *memset(void *dst, int c, unsigned long n);
void *memcpy(void *dst, const void *src, unsigned long n);

#endif
