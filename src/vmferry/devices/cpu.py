"""The vCPU's architectural state, as migration moves it: every KVM get/set pair, as bytes of the
kernel's structs, in the restore order that was measured to work (KVM-FACTS.md): CPUID2 first,
then SREGS, REGS, XSAVE, XCRS, MSRS, VCPU_EVENTS, MP_STATE, DEBUGREGS, LAPIC.

XSAVE, not FPU: on this host KVM_GET_FPU returns zeros and KVM_SET_FPU does not reach the guest.
The guest TSC cannot be set here (KVM_SET_MSRS(IA32_TSC) is accepted and ignored); it is saved
anyway because on a real host it matters.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from vmferry.devices import kstruct
from vmferry.errors import StateLoadError
from vmferry.kvm import structs as s
from vmferry.kvm.vcpu import Vcpu
from vmferry.vmstate import U8, U16, U32, U64, Array, Bytes, List, Struct, VMState

# Restore order. Each name is a Vcpu get_<name>/set_<name> pair.
VCPU_STATE_ORDER = (
    "cpuid2", "sregs", "regs", "xsave", "xcrs", "msrs", "vcpu_events", "mp_state", "debugregs", "lapic",
)

_FIXED = {
    "sregs": s.KvmSregs,
    "regs": s.KvmRegs,
    "xsave": s.KvmXsave,
    "xcrs": s.KvmXcrs,
    "vcpu_events": s.KvmVcpuEvents,
    "mp_state": s.KvmMpState,
    "debugregs": s.KvmDebugregs,
    "lapic": s.KvmLapicState,
}


def save_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> dict[str, bytes]:
    """Every piece of the vCPU's state, name -> bytes of its struct. The vCPU must be out of
    KVM_RUN (paused): vCPU ioctls from another thread wait for KVM_RUN to return."""
    out: dict[str, bytes] = {}
    for name in VCPU_STATE_ORDER:
        if name == "msrs":
            out[name] = bytes(vcpu.get_msrs(msr_indices))
        else:
            out[name] = bytes(getattr(vcpu, f"get_{name}")())
    return out


def _variable(name: str, data: bytes) -> ctypes.Structure:
    # kvm_msrs and kvm_cpuid2 both start with a u32 count followed by a u32 pad.
    (count,) = struct.unpack_from("<I", data)
    factory = s.msrs if name == "msrs" else s.cpuid2
    st = factory(count)
    if len(data) != ctypes.sizeof(st):
        raise StateLoadError(f"{len(data)} bytes for {count} entries", section="cpu", field=name)
    return st.from_buffer_copy(data)


def restore_vcpu(vcpu: Vcpu, state: dict[str, bytes]) -> None:
    """Load a `save_vcpu` result into a (not running) vCPU, in VCPU_STATE_ORDER."""
    for name in VCPU_STATE_ORDER:
        if name not in state:
            raise StateLoadError("missing", section="cpu", field=name)
        data = state[name]
        if name in ("msrs", "cpuid2"):
            st = _variable(name, data)
        else:
            cls = _FIXED[name]
            if len(data) != ctypes.sizeof(cls):
                reason = f"{len(data)} bytes, expected {ctypes.sizeof(cls)}"
                raise StateLoadError(reason, section="cpu", field=name)
            st = cls.from_buffer_copy(data)
        getattr(vcpu, f"set_{name}")(st)


# --- the vCPU's state description -----------------------------------------------------------
#
# One section "cpu" per vCPU, instance = the vCPU's index. Field names are the kernel header's
# member names (so devices/kstruct.py copies them across); the header's pad/reserved words are
# not migrated. Each KVM struct is a nested Struct (not opaque bytes) so `vmferry describe` and
# `vmferry analyze` show every register by name — except XSAVE and the LAPIC page, which are
# architectural formats (the XSAVE area layout of the SDM; the APIC's MMIO register page) that
# no one reads field by field outside the guest.


class CpuRegs(VMState):
    name = "cpu/regs"
    rax: U64
    rbx: U64
    rcx: U64
    rdx: U64
    rsi: U64
    rdi: U64
    rsp: U64
    rbp: U64
    r8: U64
    r9: U64
    r10: U64
    r11: U64
    r12: U64
    r13: U64
    r14: U64
    r15: U64
    rip: U64
    rflags: U64


class CpuSegment(VMState):
    name = "cpu/segment"
    base: U64
    limit: U32
    selector: U16
    type: U8
    present: U8
    dpl: U8
    db: U8
    s: U8
    l: U8
    g: U8
    avl: U8
    unusable: U8  # not in every hypervisor's list, but KVM_SET_SREGS reads it: a null SS/LDT


class CpuDtable(VMState):
    name = "cpu/dtable"
    base: U64
    limit: U16


class CpuSregs(VMState):
    name = "cpu/sregs"
    cs: Struct(CpuSegment)
    ds: Struct(CpuSegment)
    es: Struct(CpuSegment)
    fs: Struct(CpuSegment)
    gs: Struct(CpuSegment)
    ss: Struct(CpuSegment)
    tr: Struct(CpuSegment)
    ldt: Struct(CpuSegment)
    gdt: Struct(CpuDtable)
    idt: Struct(CpuDtable)
    cr0: U64
    cr2: U64
    cr3: U64
    cr4: U64
    cr8: U64
    efer: U64
    apic_base: U64
    # bit i of word j = interrupt vector 64*j+i pending injection (KVM_GET_SREGS layout).
    interrupt_bitmap: Array(U64, 4)


class CpuXcr(VMState):
    name = "cpu/xcr"
    xcr: U32
    value: U64


class CpuMsr(VMState):
    name = "cpu/msr"
    index: U32
    data: U64


class CpuExceptionEvent(VMState):
    name = "cpu/events/exception"
    injected: U8
    nr: U8
    has_error_code: U8
    pending: U8
    error_code: U32


class CpuInterruptEvent(VMState):
    name = "cpu/events/interrupt"
    injected: U8
    nr: U8
    soft: U8
    shadow: U8


class CpuNmiEvent(VMState):
    name = "cpu/events/nmi"
    injected: U8
    pending: U8
    masked: U8


class CpuSmiEvent(VMState):
    name = "cpu/events/smi"
    smm: U8
    pending: U8
    smm_inside_nmi: U8
    latched_init: U8


class CpuEvents(VMState):
    """struct kvm_vcpu_events: what is pending or being injected at the instant the vCPU stopped.
    A Struct, not bytes: a destination must see (and `analyze` must show) an exception half-way
    through delivery. `flags` says which of the other members KVM_SET_VCPU_EVENTS should take."""

    name = "cpu/events"
    exception: Struct(CpuExceptionEvent)
    interrupt: Struct(CpuInterruptEvent)
    nmi: Struct(CpuNmiEvent)
    sipi_vector: U32
    flags: U32
    smi: Struct(CpuSmiEvent)
    triple_fault_pending: U8
    exception_has_payload: U8
    exception_payload: U64


class CpuDebugregs(VMState):
    name = "cpu/debugregs"
    db: Array(U64, 4)
    dr6: U64
    dr7: U64
    flags: U64


class CpuidEntry(VMState):
    name = "cpu/cpuid"
    function: U32
    index: U32
    flags: U32
    eax: U32
    ebx: U32
    ecx: U32
    edx: U32


# KVM_GET/SET_MSRS refuse 256 or more entries in one call (MAX_IO_MSRS in arch/x86/kvm/x86.c).
MAX_MSRS = 255
# Our Vcpu.get_cpuid2 asks for at most 256 entries.
MAX_CPUID_ENTRIES = 256


_SEGMENT_FLAGS = ("present", "db", "s", "l", "g", "avl", "unusable")


class CpuState(VMState):
    """One vCPU. Bound to a `VcpuDevice`; captured and applied through save_vcpu/restore_vcpu,
    so the restore order is VCPU_STATE_ORDER whatever order the fields are declared in."""

    name = "cpu"
    version = 1
    cpuid: List(CpuidEntry, max=MAX_CPUID_ENTRIES)
    regs: Struct(CpuRegs)
    sregs: Struct(CpuSregs)
    xsave: Bytes(ctypes.sizeof(s.KvmXsave))  # the XSAVE area as the CPU lays it out (SDM vol. 1, 13.4)
    xcrs_flags: U32
    xcrs: List(CpuXcr, max=s.KVM_MAX_XCRS)
    msrs: List(CpuMsr, max=MAX_MSRS)
    vcpu_events: Struct(CpuEvents)
    mp_state: U32  # KVM_MP_STATE_*: RUNNABLE 0, UNINITIALIZED 1, INIT_RECEIVED 2, HALTED 3, ...
    debugregs: Struct(CpuDebugregs)
    lapic: Bytes(ctypes.sizeof(s.KvmLapicState))  # the APIC's 1 KiB register page (SDM vol. 3, 11.4.1)

    @classmethod
    def validate(cls, values: dict[str, Any], version: int) -> None:
        # What KVM_SET_SREGS would refuse half-way through a restore (after CPUID is already
        # set), refused before anything is applied: kvm_segment's flag bytes are booleans, the
        # type is 4 bits and the DPL 2 (SDM vol. 3, 3.4.5).
        for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
            v = values["sregs"][seg]
            for name, limit in (("type", 15), ("dpl", 3), *((b, 1) for b in _SEGMENT_FLAGS)):
                if v[name] > limit:
                    raise StateLoadError(f"{v[name]} is out of range 0..{limit}", section=cls.name,
                                         field=f"sregs.{seg}.{name}")

    @classmethod
    def warm(cls, version: int | None = None) -> None:
        super().warm(version)
        for ctype, state in ((s.KvmRegs, CpuRegs), (s.KvmSregs, CpuSregs), (s.KvmVcpuEvents, CpuEvents),
                             (s.KvmDebugregs, CpuDebugregs), (type(s.cpuid2(1)().entries[0]), CpuidEntry),
                             (type(s.msrs(1)().entries[0]), CpuMsr), (type(s.KvmXcrs().xcrs[0]), CpuXcr)):
            kstruct.warm(ctype, state)

    @classmethod
    def capture(cls, obj: Any) -> dict[str, Any]:
        raw = save_vcpu(obj.vcpu, obj.msr_indices)
        return state_values(raw)

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        restore_vcpu(obj.vcpu, state_bytes(values))


def state_values(raw: dict[str, bytes]) -> dict[str, Any]:
    """A save_vcpu() result as CpuState values."""
    cpuid = _variable("cpuid2", raw["cpuid2"])
    msrs = _variable("msrs", raw["msrs"])
    xcrs = s.KvmXcrs.from_buffer_copy(raw["xcrs"])
    return {
        "cpuid": [kstruct.to_values(e, CpuidEntry) for e in cpuid.entries[: cpuid.nent]],
        "regs": kstruct.to_values(s.KvmRegs.from_buffer_copy(raw["regs"]), CpuRegs),
        "sregs": kstruct.to_values(s.KvmSregs.from_buffer_copy(raw["sregs"]), CpuSregs),
        "xsave": raw["xsave"],
        "xcrs_flags": xcrs.flags,
        "xcrs": [kstruct.to_values(x, CpuXcr) for x in xcrs.xcrs[: xcrs.nr_xcrs]],
        "msrs": [kstruct.to_values(m, CpuMsr) for m in msrs.entries[: msrs.nmsrs]],
        "vcpu_events": kstruct.to_values(s.KvmVcpuEvents.from_buffer_copy(raw["vcpu_events"]), CpuEvents),
        "mp_state": s.KvmMpState.from_buffer_copy(raw["mp_state"]).mp_state,
        "debugregs": kstruct.to_values(s.KvmDebugregs.from_buffer_copy(raw["debugregs"]), CpuDebugregs),
        "lapic": raw["lapic"],
    }


def state_bytes(values: dict[str, Any]) -> dict[str, bytes]:
    """CpuState values as the struct bytes restore_vcpu() takes."""
    cpuid = s.cpuid2(len(values["cpuid"]))()
    cpuid.nent = len(values["cpuid"])
    for entry, v in zip(cpuid.entries, values["cpuid"], strict=True):
        kstruct.fill(entry, CpuidEntry, v)
    msrs = s.msrs(len(values["msrs"]))()
    msrs.nmsrs = len(values["msrs"])
    for entry, v in zip(msrs.entries, values["msrs"], strict=True):
        kstruct.fill(entry, CpuMsr, v)
    xcrs = s.KvmXcrs(nr_xcrs=len(values["xcrs"]), flags=values["xcrs_flags"])
    for i, v in enumerate(values["xcrs"]):
        kstruct.fill(xcrs.xcrs[i], CpuXcr, v)
    regs, sregs, events, dregs = s.KvmRegs(), s.KvmSregs(), s.KvmVcpuEvents(), s.KvmDebugregs()
    kstruct.fill(regs, CpuRegs, values["regs"])
    kstruct.fill(sregs, CpuSregs, values["sregs"])
    kstruct.fill(events, CpuEvents, values["vcpu_events"])
    kstruct.fill(dregs, CpuDebugregs, values["debugregs"])
    return {
        "cpuid2": bytes(cpuid),
        "sregs": bytes(sregs),
        "regs": bytes(regs),
        "xsave": values["xsave"],
        "xcrs": bytes(xcrs),
        "msrs": bytes(msrs),
        "vcpu_events": bytes(events),
        "mp_state": bytes(s.KvmMpState(values["mp_state"])),
        "debugregs": bytes(dregs),
        "lapic": values["lapic"],
    }


class VcpuDevice:
    """A vCPU as migration sees it: its KVM fd, and the MSRs this host saves (the machine's
    KVM_GET_MSR_INDEX_LIST). The fd is a constructor argument, never state."""

    vmstate = CpuState

    def __init__(self, vcpu: Vcpu, msr_indices: list[int]) -> None:
        self.vcpu = vcpu
        self.msr_indices = msr_indices

    def check_loadable(self, values: dict[str, Any]) -> None:
        """Refuse, before anything is applied, state this host's KVM would not take: an MSR it
        does not list would make KVM_SET_MSRS stop short, silently dropping the MSRs after it."""
        known = set(self.msr_indices)
        for i, msr in enumerate(values["msrs"]):
            if msr["index"] not in known:
                raise StateLoadError(
                    f"MSR {msr['index']:#x} is not one this host's KVM saves and restores",
                    section=CpuState.name, field=f"msrs[{i}].index",
                )
