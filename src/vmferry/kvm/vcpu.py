"""`Vcpu`: the vCPU-level fd: KVM_RUN with its mmap'ed `struct kvm_run`, and a get/set pair for
every piece of architectural state migration moves.

Each `get_x()` returns a ctypes struct from `vmferry.kvm.structs` (serialize with `bytes(...)`,
parse with `Struct.from_buffer_copy(b)`); `set_x(struct)` takes the same type back, so
`set_x(get_x())` is a round trip. Use XSAVE, not FPU: on the nested KVM we run on, KVM_GET_FPU
returns zeros (KVM-FACTS.md); the FPU pair exists for completeness.
"""

from __future__ import annotations

import ctypes
import mmap
from errno import EAGAIN
from typing import TYPE_CHECKING

from vmferry.errors import KvmError
from vmferry.kvm import ioctls as nr
from vmferry.kvm import structs as s
from vmferry.kvm.fd import EINTR, KvmFd, ioctl_errno

if TYPE_CHECKING:
    from vmferry.kvm.vm import Vm


class Vcpu(KvmFd):
    def __init__(self, vm: Vm, vcpu_id: int, fd: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.id = vcpu_id
        # The kvm_run page(s) are shared with the kernel for the fd's lifetime; `run` is a
        # ctypes view into this mapping, valid as long as self._map is open.
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = s.KvmRun.from_buffer(self._map)
        # With the VM's dirty ring on: this vCPU's ring, mmap'ed once (map_dirty_ring).
        self.dirty_ring: mmap.mmap | None = None

    def map_dirty_ring(self, entries: int) -> mmap.mmap:
        """Map this vCPU's dirty ring (`entries` struct kvm_dirty_gfn) shared with KVM."""
        if self.dirty_ring is None:
            self.dirty_ring = mmap.mmap(self.fd, entries * ctypes.sizeof(s.KvmDirtyGfn), mmap.MAP_SHARED,
                                        mmap.PROT_READ | mmap.PROT_WRITE,
                                        offset=nr.DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        return self.dirty_ring

    # --- running ---

    def run(self) -> bool:
        """One KVM_RUN. Returns True when the guest exited with a reason in run_struct, False
        when a signal interrupted it (EINTR, e.g. the pause kick; exit_reason is KVM_EXIT_INTR) or
        KVM asks to be called again (EAGAIN: a vCPU waiting for SIPI was woken by INIT or SIPI,
        as a second vCPU is when the guest starts it). Releases the GIL while the guest runs."""
        rc, err = ioctl_errno(self.fd, nr.RUN)
        if rc >= 0:
            return True
        if err in (EINTR, EAGAIN):
            return False
        raise KvmError(nr.RUN.name, err)

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_struct.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        # Read by KVM only on entry to KVM_RUN: makes the next KVM_RUN return EINTR at once.
        self.run_struct.immediate_exit = int(value)

    def io_data(self) -> memoryview:
        """The data buffer of a KVM_EXIT_IO exit (size*count bytes inside the kvm_run mapping)."""
        io = self.run_struct.exit.io
        return memoryview(self._map)[io.data_offset : io.data_offset + io.size * io.count]

    # --- architectural state: one get/set pair each ---

    def _get(self, req: nr.Ioctl, struct: ctypes.Structure) -> ctypes.Structure:
        self.ioctl(req, struct)
        return struct

    def get_regs(self) -> s.KvmRegs:
        return self._get(nr.GET_REGS, s.KvmRegs())

    def set_regs(self, regs: s.KvmRegs) -> None:
        self.ioctl(nr.SET_REGS, regs)

    def get_sregs(self) -> s.KvmSregs:
        return self._get(nr.GET_SREGS, s.KvmSregs())

    def set_sregs(self, sregs: s.KvmSregs) -> None:
        self.ioctl(nr.SET_SREGS, sregs)

    def get_fpu(self) -> s.KvmFpu:
        return self._get(nr.GET_FPU, s.KvmFpu())

    def set_fpu(self, fpu: s.KvmFpu) -> None:
        self.ioctl(nr.SET_FPU, fpu)

    def get_xsave(self) -> s.KvmXsave:
        return self._get(nr.GET_XSAVE, s.KvmXsave())

    def set_xsave(self, xsave: s.KvmXsave) -> None:
        self.ioctl(nr.SET_XSAVE, xsave)

    def get_xcrs(self) -> s.KvmXcrs:
        return self._get(nr.GET_XCRS, s.KvmXcrs())

    def set_xcrs(self, xcrs: s.KvmXcrs) -> None:
        self.ioctl(nr.SET_XCRS, xcrs)

    def get_msrs(self, indices: list[int]) -> ctypes.Structure:
        """KVM_GET_MSRS for `indices` (e.g. Kvm.get_msr_index_list()); returns `structs.msrs(n)`
        with nmsrs = how many KVM read (it stops at the first MSR it cannot read)."""
        buf = s.msrs(len(indices))()
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        buf.nmsrs = self.ioctl(nr.GET_MSRS, buf)
        return buf

    def set_msrs(self, msrs: ctypes.Structure) -> int:
        """KVM_SET_MSRS; returns how many were written (KVM stops at the first it refuses)."""
        return self.ioctl(nr.SET_MSRS, msrs)

    def get_lapic(self) -> s.KvmLapicState:
        return self._get(nr.GET_LAPIC, s.KvmLapicState())

    def set_lapic(self, lapic: s.KvmLapicState) -> None:
        self.ioctl(nr.SET_LAPIC, lapic)

    def get_vcpu_events(self) -> s.KvmVcpuEvents:
        return self._get(nr.GET_VCPU_EVENTS, s.KvmVcpuEvents())

    def set_vcpu_events(self, events: s.KvmVcpuEvents) -> None:
        self.ioctl(nr.SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> s.KvmMpState:
        return self._get(nr.GET_MP_STATE, s.KvmMpState())

    def set_mp_state(self, st: s.KvmMpState) -> None:
        self.ioctl(nr.SET_MP_STATE, st)

    def get_debugregs(self) -> s.KvmDebugregs:
        return self._get(nr.GET_DEBUGREGS, s.KvmDebugregs())

    def set_debugregs(self, dregs: s.KvmDebugregs) -> None:
        self.ioctl(nr.SET_DEBUGREGS, dregs)

    def get_cpuid2(self, max_entries: int = 256) -> ctypes.Structure:
        """KVM_GET_CPUID2: the CPUID table set on this vCPU, as `structs.cpuid2(nent)`."""
        buf = s.cpuid2(max_entries)()
        buf.nent = max_entries
        self.ioctl(nr.GET_CPUID2, buf)
        out = s.cpuid2(buf.nent)()
        ctypes.memmove(ctypes.addressof(out), ctypes.addressof(buf), ctypes.sizeof(out))
        return out

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        """KVM_SET_CPUID2 with a `structs.cpuid2(n)`. Must come before the first KVM_RUN."""
        self.ioctl(nr.SET_CPUID2, cpuid)

    def close(self) -> None:
        ring = getattr(self, "dirty_ring", None)
        if ring is not None:
            ring.close()  # fails (BufferError) while a numpy view is alive: the owner drops it first
            self.dirty_ring = None
        if getattr(self, "_map", None) is not None:
            del self.run_struct
            self._map.close()
            self._map = None  # type: ignore[assignment]
        super().close()
