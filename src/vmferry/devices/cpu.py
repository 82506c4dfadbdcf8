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

from vmferry.errors import StateLoadError
from vmferry.kvm import structs as s
from vmferry.kvm.vcpu import Vcpu

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
