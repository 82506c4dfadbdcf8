"""KVM's in-kernel i8254 PIT (KVM_CREATE_PIT2) and the VM clock (kvmclock's base)."""

from __future__ import annotations

from vmferry.kvm import structs as s
from vmferry.kvm.vm import Vm


class InKernelPit:
    """Needs the in-kernel irqchip first (the PIT drives IRQ 0 through it)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        vm.create_pit2()

    def get_state(self) -> bytes:
        """struct kvm_pit_state2 as bytes (112 B): three channels + flags."""
        return bytes(self.vm.get_pit2())

    def set_state(self, state: bytes) -> None:
        self.vm.set_pit2(s.KvmPitState2.from_buffer_copy(state))


class KvmClock:
    """The VM's kvmclock time base (KVM_GET/SET_CLOCK): restored last on the destination so the
    guest's clock continues from where the source stopped."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm

    def get_state(self) -> bytes:
        """struct kvm_clock_data as bytes (48 B)."""
        return bytes(self.vm.get_clock())

    def set_state(self, state: bytes) -> None:
        self.vm.set_clock(s.KvmClockData.from_buffer_copy(state))
