"""Machine types: named, versioned choices of RAM layout and device versions.

A newer vmferry started with `-M vmferry-0.1` must build exactly what 0.1 built and emit device
state 0.1 can read (DESIGN.md: backward migration at the device level). So every choice that
shapes the guest-visible machine or its migration stream lives here, keyed by the type's name,
and a new release adds a new entry instead of changing an old one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from vmferry.errors import VmferryError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@dataclass(frozen=True)
class RamRegion:
    name: str
    gpa: int
    nbytes: int
    # Whether the multiboot memory map reports it as RAM (vga.vram is not).
    system_ram: bool = True


@dataclass(frozen=True)
class MachineType:
    name: str
    description: str
    # RAM below 4 GiB ends here at most; the rest goes above 4 GiB (the PCI hole sits between).
    low_ram_max: int = 3 * GiB
    high_ram_gpa: int = 4 * GiB
    # A framebuffer-like second block, so nothing may assume guest RAM is one flat range.
    vram_gpa: int = 0xE000_0000
    vram_nbytes: int = 8 * MiB
    # Device name -> the version of its migration state this machine type emits.
    device_versions: Mapping[str, int] = field(default_factory=dict)
    # virtio-mmio transports (drives): transport i at base + 0x200 * i on GSI irq_base + i,
    # QEMU microvm's base address; `slots` bounds how many drives a machine takes.
    virtio_mmio_base: int = 0xFEB0_0000
    virtio_mmio_irq_base: int = 16
    virtio_mmio_slots: int = 8
    # Free-form compat properties ("device.property" -> value) older types pin.
    compat: Mapping[str, object] = field(default_factory=dict)

    def ram_layout(self, memory: int) -> list[RamRegion]:
        """The RAM blocks of a guest with `memory` bytes: pc.ram at 0 up to low_ram_max,
        pc.ram-high at 4 GiB for the rest, vga.vram."""
        if memory <= 0 or memory % (4 * KiB):
            raise VmferryError(f"memory size {memory} must be a positive multiple of 4 KiB")
        low = min(memory, self.low_ram_max)
        regions = [RamRegion("pc.ram", 0, low)]
        if memory > low:
            regions.append(RamRegion("pc.ram-high", self.high_ram_gpa, memory - low))
        regions.append(RamRegion("vga.vram", self.vram_gpa, self.vram_nbytes, system_ram=False))
        return regions


_V0_1 = MachineType(
    name="vmferry-0.1",
    description="vmferry 0.1 PC: COM1 16550, isa-debug-exit, KVM irqchip + PIT",
    device_versions=MappingProxyType(
        {"serial": 1, "debug-exit": 1, "irqchip": 1, "pit": 1, "clock": 1, "cpu": 1}
    ),
)

# name -> MachineType. Add new versions here; never change a released entry.
MACHINE_TYPES: dict[str, MachineType] = {_V0_1.name: _V0_1}
DEFAULT_MACHINE_TYPE = _V0_1.name


def get_machine_type(name: str | None = None) -> MachineType:
    """The named machine type, or the default (the newest) for None."""
    name = name or DEFAULT_MACHINE_TYPE
    try:
        return MACHINE_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(MACHINE_TYPES))
        raise VmferryError(f"unknown machine type {name!r} (known: {known})") from None


def parse_size(text: str) -> int:
    """'512M', '4G', '65536K', '1073741824' -> bytes (binary units, as QEMU's -m)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t) * MiB if int(t) < 1 << 20 else int(t)  # QEMU: a bare small number is MiB
    except ValueError:
        raise VmferryError(f"cannot parse size {text!r} (use e.g. 512M or 4G)") from None
