"""KVM's in-kernel interrupt controllers: PIC master + slave, IOAPIC (VM-wide) and one LAPIC
per vCPU (saved with the vCPU, see devices/cpu.py). Created at machine build, before any vCPU.

State is the kernel's own structs as bytes, keyed by chip name, so it can be described by the
vmstate layer later without this module knowing about it.
"""

from __future__ import annotations

from vmferry.kvm import structs as s
from vmferry.kvm.vm import Vm

CHIPS = {
    "pic-master": s.KVM_IRQCHIP_PIC_MASTER,
    "pic-slave": s.KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": s.KVM_IRQCHIP_IOAPIC,
}


class InKernelIrqchip:
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
