"""KVM's in-kernel interrupt controllers: PIC master + slave, IOAPIC (VM-wide) and one LAPIC
per vCPU (saved with the vCPU, see devices/cpu.py). Created at machine build, before any vCPU.

`get_state`/`set_state` move the kernel's own structs as bytes, keyed by chip name; the section
"irqchip" (`IrqchipState`) describes the same state field by field for migration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmferry.devices import kstruct
from vmferry.kvm import structs as s
from vmferry.kvm.vm import Vm
from vmferry.vmstate import U8, U32, U64, Array, Struct, VMState

CHIPS = {
    "pic-master": s.KVM_IRQCHIP_PIC_MASTER,
    "pic-slave": s.KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": s.KVM_IRQCHIP_IOAPIC,
}


class PicState(VMState):
    """struct kvm_pic_state: one i8259A as KVM models it (arch/x86/kvm/i8259.c)."""

    name = "irqchip/pic"
    last_irr: U8  # the IRR at the last edge check: edge-triggered lines fire on 0 -> 1
    irr: U8
    imr: U8
    isr: U8
    priority_add: U8  # the rotation: the highest-priority line
    irq_base: U8  # the vector of IRQ 0 (ICW2)
    read_reg_select: U8  # OCW3: a read of the command port returns ISR (1) or IRR (0)
    poll: U8
    special_mask: U8
    init_state: U8  # which ICW the chip expects next (0: initialised)
    auto_eoi: U8
    rotate_on_auto_eoi: U8
    special_fully_nested_mode: U8
    init4: U8  # ICW4 expected
    elcr: U8  # edge/level control register: bit i set = IRQ i level-triggered
    elcr_mask: U8


class IoapicState(VMState):
    """struct kvm_ioapic_state (the header's pad word is not migrated)."""

    name = "irqchip/ioapic"
    base_address: U64
    ioregsel: U32
    id: U32
    irr: U32
    # One 64-bit redirection entry per pin, the raw `bits` of the header's union: vector,
    # delivery mode, dest mode, polarity, remote IRR, trigger mode, mask, destination.
    redirtbl: Array(U64, s.KVM_IOAPIC_NUM_PINS)


class IrqchipState(VMState):
    """The VM-wide in-kernel interrupt controllers. The LAPICs travel with their vCPUs."""

    name = "irqchip"
    version = 1
    pic_master: Struct(PicState)
    pic_slave: Struct(PicState)
    ioapic: Struct(IoapicState)

    @classmethod
    def warm(cls, version: int | None = None) -> None:
        super().warm(version)
        kstruct.warm(s.KvmPicState, PicState)
        kstruct.warm(s.KvmIoapicState, IoapicState)

    @classmethod
    def capture(cls, obj: Any) -> dict[str, Any]:
        raw = obj.get_state()
        chips = {name: s.KvmIrqchip.from_buffer_copy(raw[name]).chip for name in CHIPS}
        return {
            "pic_master": kstruct.to_values(chips["pic-master"].pic, PicState),
            "pic_slave": kstruct.to_values(chips["pic-slave"].pic, PicState),
            "ioapic": kstruct.to_values(chips["ioapic"].ioapic, IoapicState),
        }

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        obj.set_state({
            "pic-master": _chip_bytes(PicState, "pic", values["pic_master"]),
            "pic-slave": _chip_bytes(PicState, "pic", values["pic_slave"]),
            "ioapic": _chip_bytes(IoapicState, "ioapic", values["ioapic"]),
        })


def _chip_bytes(state: type[VMState], member: str, values: dict[str, Any]) -> bytes:
    chip = s.KvmIrqchip()  # chip_id is set by set_state from the name
    kstruct.fill(getattr(chip.chip, member), state, values)
    return bytes(chip)


class InKernelIrqchip:
    vmstate = IrqchipState

    @classmethod
    def create(cls, machine: Any, properties: Mapping[str, Any]) -> InKernelIrqchip:
        return cls(machine.vm)

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        vm.create_irqchip()

    def set_irq(self, irq: int, level: int) -> None:
        """Drive ISA IRQ `irq` (PIC pin and IOAPIC pin of the same number) to `level`."""
        self.vm.irq_line(irq, level)

    def get_state(self) -> dict[str, bytes]:
        """{"pic-master", "pic-slave", "ioapic"} -> bytes of struct kvm_irqchip (520 B each)."""
        return {name: bytes(self.vm.get_irqchip(chip_id)) for name, chip_id in CHIPS.items()}

    def set_state(self, state: dict[str, bytes]) -> None:
        for name, chip_id in CHIPS.items():
            chip = s.KvmIrqchip.from_buffer_copy(state[name])
            chip.chip_id = chip_id
            self.vm.set_irqchip(chip)
