"""ctypes mirrors of the structs in <linux/kvm.h> and <asm/kvm.h> (x86_64) that vmferry uses.

Field names and order follow the header exactly, so `bytes(s)` is the kernel's own layout and
`Struct.from_buffer_copy(b)` parses it back: that is how vCPU and VM state is serialized for
migration. Sizes are checked against the header in tests/test_kvm_structs.py.

Variable-length structs (kvm_msrs, kvm_msr_list, kvm_cpuid2) are built per length by the
`msrs(n)`, `msr_list(n)` and `cpuid2(n)` factories, because ctypes has no flexible arrays.
"""

from __future__ import annotations

import ctypes
from functools import cache

u8, u16, u32, u64, s64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64


def _same(names: str, ctype: type) -> list[tuple[str, type]]:
    """Fields of one type, named in header order by a space-separated list."""
    return [(name, ctype) for name in names.split()]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class KvmDirtyLog(ctypes.Structure):
    # dirty_bitmap is a pointer (union with u64 padding): the caller keeps the buffer alive
    # for the duration of the ioctl.
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class KvmDirtyGfn(ctypes.Structure):
    # One dirty-ring entry: slot = (address space << 16) | slot id; offset = page in the slot.
    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


class KvmClearDirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class KvmEnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class KvmIrqLevel(ctypes.Structure):
    # `irq` in, `status` out (KVM_IRQ_LINE_STATUS) share the first word.
    _fields_ = [("irq", u32), ("level", u32)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmRegs(ctypes.Structure):
    _fields_ = _same("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags", u64)


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    _fields_ = [
        *_same("cs ds es fs gs ss tr ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *_same("cr0 cr2 cr3 cr4 cr8 efer apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmFpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class KvmXsave(ctypes.Structure):
    # The fixed 4096-byte area of KVM_GET/SET_XSAVE (KVM_CAP_XSAVE2 reports 4096 here).
    _fields_ = [("region", u32 * 1024)]


class KvmXcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class KvmXcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", KvmXcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


@cache
def msrs(n: int) -> type[ctypes.Structure]:
    """struct kvm_msrs with room for n entries."""
    return type(f"KvmMsrs{n}", (ctypes.Structure,), {"_fields_": [
        ("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * n)]})


@cache
def msr_list(n: int) -> type[ctypes.Structure]:
    """struct kvm_msr_list with room for n indices."""
    return type(f"KvmMsrList{n}", (ctypes.Structure,), {"_fields_": [("nmsrs", u32), ("indices", u32 * n)]})


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        *_same("function index flags eax ebx ecx edx", u32),
        ("padding", u32 * 3),
    ]


@cache
def cpuid2(n: int) -> type[ctypes.Structure]:
    """struct kvm_cpuid2 with room for n entries."""
    return type(f"KvmCpuid2_{n}", (ctypes.Structure,), {"_fields_": [
        ("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * n)]})


class KvmLapicState(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * 0x400)]


class _ExceptionEv(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _InterruptEv(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _NmiEv(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _SmiEv(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class KvmVcpuEvents(ctypes.Structure):
    _fields_ = [
        ("exception", _ExceptionEv),
        ("interrupt", _InterruptEv),
        ("nmi", _NmiEv),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _SmiEv),
        ("triple_fault_pending", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class KvmDebugregs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class KvmPicState(ctypes.Structure):
    _fields_ = _same(
        "last_irr irr imr isr priority_add irq_base read_reg_select poll special_mask init_state "
        "auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr elcr_mask",
        u8,
    )


KVM_IOAPIC_NUM_PINS = 24


class KvmIoapicState(ctypes.Structure):
    # redirtbl entries kept as the raw 64-bit `bits` view of the header's union.
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),
    ]


class _IrqchipUnion(ctypes.Union):
    _fields_ = [("dummy", ctypes.c_char * 512), ("pic", KvmPicState), ("ioapic", KvmIoapicState)]


KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2


class KvmIrqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _IrqchipUnion)]


class KvmPitChannelState(ctypes.Structure):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        *_same(
            "count_latched status_latched status read_state write_state write_latch rw_mode mode bcd gate", u8
        ),
        ("count_load_time", s64),
    ]


class KvmPitState2(ctypes.Structure):
    _fields_ = [("channels", KvmPitChannelState * 3), ("flags", u32), ("reserved", u32 * 9)]


class KvmClockData(ctypes.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


# --- struct kvm_run (the vCPU's mmap'ed page 0). Only the union members vmferry reads. ---


class RunIo(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class RunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class RunInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class RunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class RunSystemEvent(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _RunExitUnion(ctypes.Union):
    _fields_ = [
        ("hw_exit_reason", u64),
        ("fail_entry", RunFailEntry),
        ("io", RunIo),
        ("mmio", RunMmio),
        ("internal", RunInternal),
        ("system_event", RunSystemEvent),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", _RunExitUnion),
    ]
