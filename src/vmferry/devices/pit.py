"""KVM's in-kernel i8254 PIT (KVM_CREATE_PIT2) and the VM clock (kvmclock's base), each with its
state description: sections "pit" and "clock"."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmferry.devices import kstruct
from vmferry.kvm import structs as s
from vmferry.kvm.vm import Vm
from vmferry.vmstate import I64, U8, U16, U32, U64, Array, Struct, VMState

PIT_CHANNELS = 3


class PitChannelState(VMState):
    """struct kvm_pit_channel_state: one i8254 counter as KVM models it (arch/x86/kvm/i8254.c)."""

    name = "pit/channel"
    count: U32  # the reload value; 0 means 0x10000
    latched_count: U16
    count_latched: U8  # which byte(s) of a latched count the guest still has to read
    status_latched: U8
    status: U8
    read_state: U8
    write_state: U8
    write_latch: U8
    rw_mode: U8
    mode: U8
    bcd: U8
    gate: U8
    # Host ktime (ns) when the count was loaded. Meaningless on another host; KVM_SET_PIT2
    # reloads each counter "now" instead. Carried so the section is the whole kernel struct.
    count_load_time: I64


class PitState(VMState):
    name = "pit"
    version = 1
    channels: Array(Struct(PitChannelState), PIT_CHANNELS)
    flags: U32  # KVM_PIT_FLAGS_HPET_LEGACY (bit 0): channel 0 routed through the HPET instead

    @classmethod
    def warm(cls, version: int | None = None) -> None:
        super().warm(version)
        kstruct.warm(s.KvmPitState2, cls)

    @classmethod
    def capture(cls, obj: Any) -> dict[str, Any]:
        return kstruct.to_values(s.KvmPitState2.from_buffer_copy(obj.get_state()), cls)

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        st = s.KvmPitState2()
        kstruct.fill(st, cls, values)
        obj.set_state(bytes(st))


class InKernelPit:
    """Needs the in-kernel irqchip first (the PIT drives IRQ 0 through it)."""

    vmstate = PitState

    @classmethod
    def create(cls, machine: Any, properties: Mapping[str, Any]) -> InKernelPit:
        return cls(machine.vm)

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        vm.create_pit2()

    def get_state(self) -> bytes:
        """struct kvm_pit_state2 as bytes (112 B): three channels + flags."""
        return bytes(self.vm.get_pit2())

    def set_state(self, state: bytes) -> None:
        self.vm.set_pit2(s.KvmPitState2.from_buffer_copy(state))


# kvm_clock_data.flags bits (<linux/kvm.h>).
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class ClockState(VMState):
    """The kvmclock base: guest nanoseconds at the instant the source stopped."""

    name = "clock"
    version = 1
    clock: U64
    flags: U32  # as KVM_GET_CLOCK reported them on the source

    @classmethod
    def warm(cls, version: int | None = None) -> None:
        super().warm(version)
        kstruct.warm(s.KvmClockData, cls)

    @classmethod
    def capture(cls, obj: Any) -> dict[str, Any]:
        return kstruct.to_values(s.KvmClockData.from_buffer_copy(obj.get_state()), cls)

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        # Only `clock` is set. REALTIME/HOST_TSC would tell KVM_SET_CLOCK to advance the clock
        # by the wall time since the source's `realtime` reading, which this section does not
        # carry (and which would count the downtime into the guest's clock); TSC_STABLE is
        # output-only. So the guest's clock continues from where the source stopped, as the
        # restore measured in KVM-FACTS.md did.
        obj.set_state(bytes(s.KvmClockData(clock=values["clock"], flags=0)))


class KvmClock:
    """The VM's kvmclock time base (KVM_GET/SET_CLOCK): restored last on the destination so the
    guest's clock continues from where the source stopped."""

    vmstate = ClockState

    @classmethod
    def create(cls, machine: Any, properties: Mapping[str, Any]) -> KvmClock:
        return cls(machine.vm)

    def __init__(self, vm: Vm) -> None:
        self.vm = vm

    def get_state(self) -> bytes:
        """struct kvm_clock_data as bytes (48 B)."""
        return bytes(self.vm.get_clock())

    def set_state(self, state: bytes) -> None:
        self.vm.set_clock(s.KvmClockData.from_buffer_copy(state))
