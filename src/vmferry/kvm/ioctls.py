"""Every KVM ioctl vmferry issues, in one table, each annotated with the capability it needs.

Numbers are computed the way <asm-generic/ioctl.h> does, from the ctypes structs' sizes, and
checked against the values the C header produces in tests/test_kvm_structs.py. One deliberate
oddity is kept: the header declares KVM_SET_IRQCHIP and KVM_SET_PIT with `_IOR` although they
write to the kernel, so KVM_SET_IRQCHIP is 0x8208AE63 — we must use the header's number.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from enum import IntEnum

from vmferry.kvm import structs as s

KVMIO = 0xAE
_NONE, _WRITE, _READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_NONE, nr, 0)


def _ior(nr: int, t: type) -> int:
    return _ioc(_READ, nr, ctypes.sizeof(t))


def _iow(nr: int, t: type) -> int:
    return _ioc(_WRITE, nr, ctypes.sizeof(t))


def _iowr(nr: int, t: type) -> int:
    return _ioc(_READ | _WRITE, nr, ctypes.sizeof(t))


class Cap(IntEnum):
    """KVM_CAP_* numbers vmferry checks (KVM_CHECK_EXTENSION)."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    MP_STATE = 14
    IRQ_INJECT_STATUS = 26
    PIT2 = 33
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    PIT_STATE2 = 35
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    MAX_VCPUS = 66
    EXCEPTION_PAYLOAD = 164
    IMMEDIATE_EXIT = 136
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    DIRTY_LOG_RING = 192
    XSAVE2 = 208
    DIRTY_LOG_RING_ACQ_REL = 223


@dataclass(frozen=True)
class Ioctl:
    name: str
    number: int
    # The capability that must be present for this ioctl to exist (None: always, API 12).
    cap: Cap | None = None


def _t(name: str, number: int, cap: Cap | None = None) -> Ioctl:
    return Ioctl(name, number, cap)


# system fd (/dev/kvm)
GET_API_VERSION = _t("KVM_GET_API_VERSION", _io(0x00))
CREATE_VM = _t("KVM_CREATE_VM", _io(0x01))
GET_MSR_INDEX_LIST = _t("KVM_GET_MSR_INDEX_LIST", _iowr(0x02, s.msr_list(0)))
CHECK_EXTENSION = _t("KVM_CHECK_EXTENSION", _io(0x03))
GET_VCPU_MMAP_SIZE = _t("KVM_GET_VCPU_MMAP_SIZE", _io(0x04))
GET_SUPPORTED_CPUID = _t("KVM_GET_SUPPORTED_CPUID", _iowr(0x05, s.cpuid2(0)), Cap.EXT_CPUID)

# vm fd
CREATE_VCPU = _t("KVM_CREATE_VCPU", _io(0x41))
GET_DIRTY_LOG = _t("KVM_GET_DIRTY_LOG", _iow(0x42, s.KvmDirtyLog))
SET_USER_MEMORY_REGION = _t(
    "KVM_SET_USER_MEMORY_REGION", _iow(0x46, s.KvmUserspaceMemoryRegion), Cap.USER_MEMORY
)
SET_TSS_ADDR = _t("KVM_SET_TSS_ADDR", _io(0x47), Cap.SET_TSS_ADDR)
SET_IDENTITY_MAP_ADDR = _t(
    "KVM_SET_IDENTITY_MAP_ADDR", _iow(0x48, ctypes.c_uint64), Cap.SET_IDENTITY_MAP_ADDR
)
CREATE_IRQCHIP = _t("KVM_CREATE_IRQCHIP", _io(0x60), Cap.IRQCHIP)
IRQ_LINE = _t("KVM_IRQ_LINE", _iow(0x61, s.KvmIrqLevel), Cap.IRQCHIP)
GET_IRQCHIP = _t("KVM_GET_IRQCHIP", _iowr(0x62, s.KvmIrqchip), Cap.IRQCHIP)
SET_IRQCHIP = _t("KVM_SET_IRQCHIP", _ior(0x63, s.KvmIrqchip), Cap.IRQCHIP)  # sic: _IOR in the header
IRQ_LINE_STATUS = _t("KVM_IRQ_LINE_STATUS", _iowr(0x67, s.KvmIrqLevel), Cap.IRQ_INJECT_STATUS)
CREATE_PIT2 = _t("KVM_CREATE_PIT2", _iow(0x77, s.KvmPitConfig), Cap.PIT2)
SET_CLOCK = _t("KVM_SET_CLOCK", _iow(0x7B, s.KvmClockData), Cap.ADJUST_CLOCK)
GET_CLOCK = _t("KVM_GET_CLOCK", _ior(0x7C, s.KvmClockData), Cap.ADJUST_CLOCK)
GET_PIT2 = _t("KVM_GET_PIT2", _ior(0x9F, s.KvmPitState2), Cap.PIT_STATE2)
SET_PIT2 = _t("KVM_SET_PIT2", _iow(0xA0, s.KvmPitState2), Cap.PIT_STATE2)
ENABLE_CAP = _t("KVM_ENABLE_CAP", _iow(0xA3, s.KvmEnableCap))
CLEAR_DIRTY_LOG = _t("KVM_CLEAR_DIRTY_LOG", _iowr(0xC0, s.KvmClearDirtyLog), Cap.MANUAL_DIRTY_LOG_PROTECT2)
RESET_DIRTY_RINGS = _t("KVM_RESET_DIRTY_RINGS", _io(0xC7), Cap.DIRTY_LOG_RING)

# vcpu fd
RUN = _t("KVM_RUN", _io(0x80))
GET_REGS = _t("KVM_GET_REGS", _ior(0x81, s.KvmRegs))
SET_REGS = _t("KVM_SET_REGS", _iow(0x82, s.KvmRegs))
GET_SREGS = _t("KVM_GET_SREGS", _ior(0x83, s.KvmSregs))
SET_SREGS = _t("KVM_SET_SREGS", _iow(0x84, s.KvmSregs))
GET_MSRS = _t("KVM_GET_MSRS", _iowr(0x88, s.msrs(0)))
SET_MSRS = _t("KVM_SET_MSRS", _iow(0x89, s.msrs(0)))
GET_FPU = _t("KVM_GET_FPU", _ior(0x8C, s.KvmFpu))
SET_FPU = _t("KVM_SET_FPU", _iow(0x8D, s.KvmFpu))
GET_LAPIC = _t("KVM_GET_LAPIC", _ior(0x8E, s.KvmLapicState), Cap.IRQCHIP)
SET_LAPIC = _t("KVM_SET_LAPIC", _iow(0x8F, s.KvmLapicState), Cap.IRQCHIP)
SET_CPUID2 = _t("KVM_SET_CPUID2", _iow(0x90, s.cpuid2(0)), Cap.EXT_CPUID)
GET_CPUID2 = _t("KVM_GET_CPUID2", _iowr(0x91, s.cpuid2(0)), Cap.EXT_CPUID)
GET_MP_STATE = _t("KVM_GET_MP_STATE", _ior(0x98, s.KvmMpState), Cap.MP_STATE)
SET_MP_STATE = _t("KVM_SET_MP_STATE", _iow(0x99, s.KvmMpState), Cap.MP_STATE)
GET_VCPU_EVENTS = _t("KVM_GET_VCPU_EVENTS", _ior(0x9F, s.KvmVcpuEvents), Cap.VCPU_EVENTS)
SET_VCPU_EVENTS = _t("KVM_SET_VCPU_EVENTS", _iow(0xA0, s.KvmVcpuEvents), Cap.VCPU_EVENTS)
GET_DEBUGREGS = _t("KVM_GET_DEBUGREGS", _ior(0xA1, s.KvmDebugregs), Cap.DEBUGREGS)
SET_DEBUGREGS = _t("KVM_SET_DEBUGREGS", _iow(0xA2, s.KvmDebugregs), Cap.DEBUGREGS)
GET_XSAVE = _t("KVM_GET_XSAVE", _ior(0xA4, s.KvmXsave), Cap.XSAVE)
SET_XSAVE = _t("KVM_SET_XSAVE", _iow(0xA5, s.KvmXsave), Cap.XSAVE)
GET_XCRS = _t("KVM_GET_XCRS", _ior(0xA6, s.KvmXcrs), Cap.XCRS)
SET_XCRS = _t("KVM_SET_XCRS", _iow(0xA7, s.KvmXcrs), Cap.XCRS)

# KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2) args[0] bits
DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
DIRTY_LOG_INITIALLY_SET = 1 << 1

# The dirty ring (KVM_CAP_DIRTY_LOG_RING): each vCPU's ring of struct kvm_dirty_gfn is mmap'ed
# from the vCPU fd at this page offset (x86); an entry's flags go DIRTY (set by KVM) -> RESET
# (set by the VMM once harvested) -> 0 (KVM_RESET_DIRTY_RINGS recycled it).
DIRTY_LOG_PAGE_OFFSET = 64
DIRTY_GFN_F_DIRTY = 1 << 0
DIRTY_GFN_F_RESET = 1 << 1

# kvm_userspace_memory_region.flags
MEM_LOG_DIRTY_PAGES = 1 << 0
MEM_READONLY = 1 << 1


class Exit(IntEnum):
    """kvm_run.exit_reason values vmferry handles or names in errors."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    DIRTY_RING_FULL = 31


EXIT_IO_IN, EXIT_IO_OUT = 0, 1


class MpState(IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
