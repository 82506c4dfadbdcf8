/*
 * Multiboot v1 entry, the switch to 64-bit long mode, and the interrupt stubs.
 *
 * The image is linked as ELF64 and converted to ELF32 (QEMU's -kernel refuses ELF64 multiboot
 * images), so the entry runs as 32-bit protected-mode code and switches to long mode itself:
 * interrupts must be taken in long mode, because KVM's emulator here fails the first 32-bit iret.
 *
 * The guests' main loops run at CPL3 (see rt.c): on these hosts KVM emulates CPL0 code
 * instruction by instruction, even each iteration of a rep stosq, while CPL3 code runs natively.
 * So every mapping is user-accessible, and the kernel part is only boot, interrupts and the
 * system calls in rt.c.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* bit 0: page-align modules, bit 1: we need mem_* */

#define PTE_P 0x001
#define PTE_RW 0x002
#define PTE_US 0x004
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS 0x080 /* 2 MiB page in a page directory */

        .section .multiboot, "a"
        .balign 4
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .section .text.boot, "ax"
        .code32
        .globl _start
_start:
        cli
        cld
        /* The loader's stack is unknown (multiboot leaves ESP undefined). */
        movl $boot_stack_top, %esp
        movl %eax, boot_magic
        movl %ebx, boot_info

        /* Zero the tables ourselves instead of trusting every loader to clear .bss first. */
        movl $pml4, %edi
        movl $(6 * 4096 / 4), %ecx
        xorl %eax, %eax
        rep stosl

        movl $(pdpt + PTE_P + PTE_RW + PTE_US), pml4
        movl $(pd + 0 * 4096 + PTE_P + PTE_RW + PTE_US), pdpt + 0
        movl $(pd + 1 * 4096 + PTE_P + PTE_RW + PTE_US), pdpt + 8
        movl $(pd + 2 * 4096 + PTE_P + PTE_RW + PTE_US), pdpt + 16
        movl $(pd + 3 * 4096 + PTE_P + PTE_RW + PTE_US), pdpt + 24

        /* Identity-map 0-4 GiB with 2048 2 MiB pages; the top GiB (LAPIC, IOAPIC, other MMIO)
         * uncached, as on real hardware. */
        movl $pd, %edi
        movl $(PTE_P + PTE_RW + PTE_US + PTE_PS), %eax
        movl $2048, %ecx
1:      cmpl $1536, %ecx
        jne 2f
        orl $(PTE_PCD + PTE_PWT), %eax
2:      movl %eax, (%edi)
        addl $0x200000, %eax
        addl $8, %edi
        decl %ecx
        jnz 1b

        movl %cr4, %eax
        orl $0x20, %eax                 /* CR4.PAE */
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx          /* IA32_EFER */
        rdmsr
        orl $0x100, %eax                /* EFER.LME */
        wrmsr
        movl %cr0, %eax
        orl $0x80000001, %eax           /* CR0.PG (| PE, already set) */
        movl %eax, %cr0
        lgdt gdt64_desc
        ljmp $0x08, $long_mode

        .code64
long_mode:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        xorl %eax, %eax
        movw %ax, %fs
        movw %ax, %gs
        movq $boot_stack_top, %rsp
        movl boot_magic(%rip), %edi
        movl boot_info(%rip), %esi
        call rt_start
3:      cli
        hlt
        jmp 3b

/*
 * A second vCPU (an application processor) starts here. rt_start_ap copies ap_trampoline to
 * AP_TRAMPOLINE (0x7000, below 1 MiB as a SIPI needs) and sends INIT and SIPI: the AP starts in
 * real mode at CS = 0x0700, IP = 0, loads the trampoline's flat GDT, enters protected mode, then
 * long mode on the boot vCPU's page tables and GDT, and calls rt_ap_start on its own stack.
 */
#define AP_TRAMPOLINE 0x7000
        .code16
        .globl ap_trampoline, ap_trampoline_end
ap_trampoline:
        cli
        cld
        xorw %ax, %ax
        movw %ax, %ds
        lgdtl AP_TRAMPOLINE + (ap_gdt_desc - ap_trampoline)
        movl %cr0, %eax
        orl $1, %eax                    /* CR0.PE */
        movl %eax, %cr0
        ljmpl $0x08, $ap_start32
        .balign 8
ap_gdt:
        .quad 0
        .quad 0x00CF9A000000FFFF        /* 0x08: 32-bit code */
        .quad 0x00CF92000000FFFF        /* 0x10: data */
ap_gdt_desc:
        .word ap_gdt_desc - ap_gdt - 1
        .long AP_TRAMPOLINE + (ap_gdt - ap_trampoline)
ap_trampoline_end:

        .code32
ap_start32:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl %cr4, %eax
        orl $0x20, %eax                 /* CR4.PAE */
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx          /* IA32_EFER */
        rdmsr
        orl $0x100, %eax                /* EFER.LME */
        wrmsr
        movl %cr0, %eax
        orl $0x80000001, %eax           /* CR0.PG | PE */
        movl %eax, %cr0
        lgdt gdt64_desc
        ljmp $0x08, $ap_long_mode

        .code64
ap_long_mode:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        xorl %eax, %eax
        movw %ax, %fs
        movw %ax, %gs
        movq $ap_stack_top, %rsp
        call rt_ap_start
4:      cli
        hlt
        jmp 4b

/*
 * IRQ0 (vector 32) is the only interrupt in steady state: count it and acknowledge the 8259.
 * Kept in assembly and tiny because every instruction here is emulated at ~5 MIPS, 1000 times a
 * second.
 */
        .globl timer_isr
timer_isr:
        incq rt_ticks(%rip)
        pushq %rax
        movb $0x20, %al
        outb %al, $0x20                 /* non-specific EOI to the master PIC */
        popq %rax
        iretq

/*
 * One 16-byte stub per vector, at isr_stubs + 16 * vector. Each pushes a dummy error code when
 * the CPU does not push one, then the vector, so isr_common sees one frame layout.
 */
        .balign 16
        .globl isr_stubs
isr_stubs:
        .set vec, 0
        .rept 256
        .balign 16
        .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq $0
        .endif
        pushq $vec
        jmp isr_common
        .set vec, vec + 1
        .endr

isr_common:
        pushq %rax
        pushq %rcx
        pushq %rdx
        pushq %rbx
        pushq %rbp
        pushq %rsi
        pushq %rdi
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        movq %rsp, %rdi                 /* struct isr_frame * */
        cld
        call isr_dispatch
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rdi
        popq %rsi
        popq %rbp
        popq %rbx
        popq %rdx
        popq %rcx
        popq %rax
        addq $16, %rsp                  /* vector and error code */
        iretq

        /* Writable: ltr marks the TSS descriptor busy. rt.c fills in the TSS descriptor. */
        .section .data
        .balign 16
        .globl gdt64
gdt64:
        .quad 0
        .quad 0x00AF9A000000FFFF        /* 0x08: 64-bit code, DPL0 */
        .quad 0x00CF92000000FFFF        /* 0x10: data, DPL0 */
        .quad 0x00CFF2000000FFFF        /* 0x18: data, DPL3 */
        .quad 0x00AFFA000000FFFF        /* 0x20: 64-bit code, DPL3 */
        .quad 0, 0                      /* 0x28: 64-bit TSS (16 bytes) */
gdt64_end:
gdt64_desc:
        .word gdt64_end - gdt64 - 1
        .quad gdt64

        .section .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4 * 4096
        .balign 16
boot_stack:
        .skip 16384
        .globl boot_stack_top
boot_stack_top:
        .balign 16
ap_stack:
        .skip 4096
ap_stack_top:
boot_magic:
        .skip 4
boot_info:
        .skip 4
