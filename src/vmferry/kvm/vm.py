"""`Vm`: the VM-level fd: memory slots and their dirty logs, vCPU creation, the in-kernel
irqchip and PIT, the clock, IRQ lines.

State getters return ctypes structs from `vmferry.kvm.structs`; each setter takes the same
struct back, so `set_x(get_x())` round-trips and `bytes(struct)` / `from_buffer_copy` is the
serialized form.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import numpy as np

from vmferry.kvm import ioctls as nr
from vmferry.kvm import structs as s
from vmferry.kvm.fd import KvmFd
from vmferry.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from vmferry.kvm.system import Kvm

# Intel VMX needs three pages for the real-mode TSS and one for the identity map below 4 GiB,
# out of the guest's way: QEMU's addresses, just under the BIOS area.
TSS_ADDR = 0xFFFBD000
DIRTY_GFN_SIZE = ctypes.sizeof(s.KvmDirtyGfn)
IDENTITY_MAP_ADDR = 0xFFFBC000


class Vm(KvmFd):
    def __init__(self, kvm: Kvm, fd: int) -> None:
        super().__init__(fd)
        self.kvm = kvm
        self.manual_dirty_protect = False
        self.dirty_ring_entries = 0  # per vCPU; 0 = the ring is off (slot bitmaps are used)

    def check_extension(self, cap: nr.Cap | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (some answers, e.g. XSAVE2's size, are per VM)."""
        return self.ioctl(nr.CHECK_EXTENSION, int(cap))

    def enable_cap(self, cap: nr.Cap | int, *args: int) -> None:
        ec = s.KvmEnableCap(cap=int(cap))
        for i, a in enumerate(args):
            ec.args[i] = a
        self.ioctl(nr.ENABLE_CAP, ec)

    def enable_manual_dirty_protect(self) -> bool:
        """Turn on KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (GET_DIRTY_LOG stops resetting; the VMM
        clears with KVM_CLEAR_DIRTY_LOG) if offered. Must precede dirty logging on any slot.
        Returns whether it is on."""
        if self.check_extension(nr.Cap.MANUAL_DIRTY_LOG_PROTECT2):
            self.enable_cap(
                nr.Cap.MANUAL_DIRTY_LOG_PROTECT2,
                nr.DIRTY_LOG_MANUAL_PROTECT_ENABLE | nr.DIRTY_LOG_INITIALLY_SET,
            )
            self.manual_dirty_protect = True
        return self.manual_dirty_protect

    def dirty_ring_cap(self) -> tuple[nr.Cap, int] | None:
        """The dirty-ring capability this KVM offers and its largest ring in entries, or None.
        KVM_CAP_DIRTY_LOG_RING first (x86's), else the _ACQ_REL variant (QEMU's order)."""
        for cap in (nr.Cap.DIRTY_LOG_RING, nr.Cap.DIRTY_LOG_RING_ACQ_REL):
            max_bytes = self.check_extension(cap)
            if max_bytes > 0:
                return cap, max_bytes // DIRTY_GFN_SIZE
        return None

    def enable_dirty_ring(self, entries: int) -> None:
        """Turn on KVM's dirty ring with `entries` entries per vCPU (a power of two within the
        capability's bounds: the caller checks). Must precede every vCPU; with it on
        KVM_GET_DIRTY_LOG fails (ENXIO) and dirty pages come through the vCPUs' rings."""
        found = self.dirty_ring_cap()
        assert found is not None, "the caller checks dirty_ring_cap() first"
        self.enable_cap(found[0], entries * DIRTY_GFN_SIZE)
        self.dirty_ring_entries = entries

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: recycle every entry marked harvested (RESET) in any vCPU's
        ring, write-protecting its page again. Returns how many entries KVM reset."""
        return self.ioctl(nr.RESET_DIRTY_RINGS)

    def set_tss_addr(self, gpa: int = TSS_ADDR) -> None:
        # The address is passed by value; through fd.ioctl it is a full 64-bit register.
        self.ioctl(nr.SET_TSS_ADDR, gpa)

    def set_identity_map_addr(self, gpa: int = IDENTITY_MAP_ADDR) -> None:
        self.ioctl(nr.SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(gpa))

    # --- memory slots and dirty logs ---

    def set_user_memory_region(self, slot: int, gpa: int, nbytes: int, hva: int, flags: int = 0) -> None:
        """Map host range [hva, hva+nbytes) at guest physical gpa. nbytes=0 deletes the slot.
        Re-registering the same slot with other `flags` turns dirty logging on/off."""
        self.ioctl(
            nr.SET_USER_MEMORY_REGION,
            s.KvmUserspaceMemoryRegion(
                slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=nbytes, userspace_addr=hva
            ),
        )

    def get_dirty_log(self, slot: int, bitmap: np.ndarray) -> None:
        """KVM_GET_DIRTY_LOG into `bitmap` (u64 array, one bit per page of the slot:
        bit i of little-endian u64 word j = page 64*j+i). Without manual protect KVM also
        resets its log and write-protects the pages again."""
        assert bitmap.dtype == np.uint64 and bitmap.flags.c_contiguous
        # bitmap is owned by the caller and outlives this synchronous call.
        self.ioctl(nr.GET_DIRTY_LOG, s.KvmDirtyLog(slot=slot, dirty_bitmap=bitmap.ctypes.data))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: np.ndarray) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear (and write-protect again) the pages set in `bitmap`, whose
        bit 0 is `first_page`. first_page must be a multiple of 64 (else EINVAL)."""
        assert bitmap.dtype == np.uint64 and bitmap.flags.c_contiguous
        self.ioctl(
            nr.CLEAR_DIRTY_LOG,
            s.KvmClearDirtyLog(
                slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=bitmap.ctypes.data
            ),
        )

    # --- vCPUs ---

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        return Vcpu(self, vcpu_id, self.ioctl(nr.CREATE_VCPU, vcpu_id), self.kvm.vcpu_mmap_size)

    # --- in-kernel irqchip (PIC master/slave + IOAPIC + per-vCPU LAPIC), PIT, clock ---

    def create_irqchip(self) -> None:
        """Must come before any vCPU is created."""
        self.ioctl(nr.CREATE_IRQCHIP)

    def get_irqchip(self, chip_id: int) -> s.KvmIrqchip:
        """chip_id: 0 PIC master, 1 PIC slave, 2 IOAPIC."""
        chip = s.KvmIrqchip(chip_id=chip_id)
        self.ioctl(nr.GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.KvmIrqchip) -> None:
        self.ioctl(nr.SET_IRQCHIP, chip)

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive GSI `irq` (PIC 0-15 and IOAPIC 0-23) to `level`."""
        self.ioctl(nr.IRQ_LINE, s.KvmIrqLevel(irq=irq, level=level))

    def create_pit2(self) -> None:
        self.ioctl(nr.CREATE_PIT2, s.KvmPitConfig(flags=0))

    def get_pit2(self) -> s.KvmPitState2:
        st = s.KvmPitState2()
        self.ioctl(nr.GET_PIT2, st)
        return st

    def set_pit2(self, st: s.KvmPitState2) -> None:
        self.ioctl(nr.SET_PIT2, st)

    def get_clock(self) -> s.KvmClockData:
        st = s.KvmClockData()
        self.ioctl(nr.GET_CLOCK, st)
        return st

    def set_clock(self, st: s.KvmClockData) -> None:
        # Only `clock` (and `realtime` with its flag) are inputs; KVM rejects unknown flags.
        self.ioctl(nr.SET_CLOCK, s.KvmClockData(clock=st.clock))
