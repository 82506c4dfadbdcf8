"""Machine types as data: per named type, its RAM layout and a table of the devices it builds —
with which properties, which section version each sends, and in which order the destination
applies them.

A newer vmferry started with `-M vmferry-0.1` must build exactly what 0.1 built and emit device
state 0.1 can read (DESIGN.md: backward migration at the device level). So every choice that
shapes the guest-visible machine or its migration stream lives here, keyed by the type's name,
and a new release adds a new entry instead of changing an old one. `Machine` builds its devices
from the table, `devices/state.py` takes section versions and the apply order from it, and
`vmferry describe` prints the sections it names.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from vmferry.devices.cpu import VcpuDevice
from vmferry.devices.debug_exit import DebugExit
from vmferry.devices.irqchip import InKernelIrqchip
from vmferry.devices.pit import InKernelPit, KvmClock
from vmferry.devices.serial import COM1_IRQ, COM1_PORT, Serial16550
from vmferry.devices.virtio_blk import VirtioBlk
from vmferry.errors import VmferryError
from vmferry.vmstate.registry import Registry

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@dataclass(frozen=True)
class RamRegion:
    name: str
    gpa: int
    nbytes: int
    # Whether the multiboot memory map reports it as RAM (vga.vram is not).
    system_ram: bool = True


@dataclass(frozen=True)
class DeviceSpec:
    """One device of a machine type.

    `device` is the device class: its `vmstate` names the section, and `create(machine,
    properties)` builds and wires it. `version` is the section version this machine type sends
    (a newer build pins an older one here), `order` the destination's apply order (lower first;
    KVM-FACTS.md, "State that must move": vCPUs, irqchip, PIT, then the clock). A `per_vcpu`
    device has one instance per vCPU, built with the vCPUs instead of by `create`."""

    id: str  # the key in Machine.devices
    device: type
    version: int
    order: int
    properties: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    per_vcpu: bool = False

    @property
    def section(self) -> Any:
        """The VMState class of the device's section."""
        return self.device.vmstate


def _props(**values: Any) -> Mapping[str, Any]:
    return MappingProxyType({k.replace("_", "-"): v for k, v in values.items()})


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
    # The devices, in build order (the irqchip first: the PIT and each vCPU's LAPIC need it).
    devices: tuple[DeviceSpec, ...] = ()
    # virtio-mmio transports (drives): transport i at base + 0x200 * i on GSI irq_base + i,
    # QEMU microvm's base address; `slots` bounds how many drives a machine takes.
    virtio_mmio_base: int = 0xFEB0_0000
    virtio_mmio_irq_base: int = 16
    virtio_mmio_slots: int = 8
    # Changes to the migration stream itself that this machine type makes (docs/stream-format.md
    # names each): a type never gains one after its release, so an older build reads its streams.
    # "device-properties": a DEVICE_PROPERTIES command after the DESCRIPTION.
    stream_features: frozenset[str] = frozenset()
    # Lifetime (docs/machine-types.md): a deprecated type still runs and migrates, and says so.
    deprecated: bool = False
    # The vmferry release that introduced it.
    since: str = ""
    # The most vCPUs (`--smp`) a machine of this type takes.
    cpu_max: int = 64
    # The device each --drive adds (virtio-blk on transport i): one section instance per drive,
    # after the fixed devices. A machine without drives sends none of it, so a type's stream
    # without drives is what it was before drives migrated. Every type shares this default.
    drive_device: DeviceSpec = field(
        default_factory=lambda: DeviceSpec("drive", VirtioBlk, version=1, order=100))

    def spec(self, device_id: str) -> DeviceSpec:
        return next(s for s in self.devices if s.id == device_id)

    def device_properties(self) -> dict[str, dict[str, Any]]:
        """Each device's full property set (its defaults overridden by this table), by device id:
        what a DEVICE_PROPERTIES command carries."""
        return {s.id: {**getattr(s.device, "default_properties", {}), **s.properties}
                for s in self.devices if not s.per_vcpu}

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
    since="0.1.0",
    devices=(
        DeviceSpec("irqchip", InKernelIrqchip, version=1, order=1),
        DeviceSpec("pit", InKernelPit, version=1, order=2),
        DeviceSpec("clock", KvmClock, version=1, order=3),
        DeviceSpec("cpu", VcpuDevice, version=1, order=0, per_vcpu=True),
        DeviceSpec("serial0", Serial16550, version=1, order=4,
                   properties=_props(iobase=COM1_PORT, irq=COM1_IRQ, migrate_rx_fifo=True,
                                     lsr_overrun=False)),
        DeviceSpec("debug-exit", DebugExit, version=1, order=5),
    ),
)

# What 0.2 changes, and why each is a change of the stream: serial section version 2 (the
# rx_dropped counter, the "serial/overrun" subsection), the "lsr-overrun" feature on (guest-
# visible), and DEVICE_PROPERTIES in the stream.
_V0_2 = MachineType(
    name="vmferry-0.2",
    description="vmferry 0.2 PC: as 0.1, the UART reports overruns (LSR.OE) and migrates its drop count",
    since="0.2.0",
    stream_features=frozenset({"device-properties"}),
    devices=tuple(
        dataclasses.replace(spec, version=2, properties=_props(iobase=COM1_PORT, irq=COM1_IRQ,
                                                               migrate_rx_fifo=True, lsr_overrun=True))
        if spec.id == "serial0" else spec
        for spec in _V0_1.devices
    ),
)

# name -> MachineType, oldest first. Add new versions here; never change a released entry.
MACHINE_TYPES: dict[str, MachineType] = {mt.name: mt for mt in (_V0_1, _V0_2)}
DEFAULT_MACHINE_TYPE = _V0_2.name
# QEMU's `pc` -> the newest pc-i440fx-X.Y: an alias follows the newest type from release to
# release, so a stream always names the versioned type, never the alias.
MACHINE_ALIASES: dict[str, str] = {"vmferry": DEFAULT_MACHINE_TYPE}


def get_machine_type(name: str | None = None) -> MachineType:
    """The named machine type (or alias), or the default (the newest) for None."""
    name = name or DEFAULT_MACHINE_TYPE
    name = MACHINE_ALIASES.get(name, name)
    try:
        return MACHINE_TYPES[name]
    except KeyError:
        aliases = (f"{a} (alias of {t})" for a, t in MACHINE_ALIASES.items())
        known = ", ".join([*sorted(MACHINE_TYPES), *aliases])
        raise VmferryError(f"unknown machine type {name!r} (known: {known})") from None


def query_machines() -> list[dict[str, Any]]:
    """QMP `query-machines`: one MachineInfo per machine type, oldest first."""
    aliases = {target: alias for alias, target in MACHINE_ALIASES.items()}
    out = []
    for mt in MACHINE_TYPES.values():
        info: dict[str, Any] = {"name": mt.name}
        if mt.name in aliases:
            info["alias"] = aliases[mt.name]
        if mt.name == DEFAULT_MACHINE_TYPE:
            info["is-default"] = True
        info.update({"cpu-max": mt.cpu_max, "hotpluggable-cpus": False, "numa-mem-supported": False,
                     "deprecated": mt.deprecated, "default-ram-id": "pc.ram", "acpi": False})
        out.append(info)
    return out


@functools.cache
def section_registry() -> Registry:
    """Every machine type's sections, at the versions its table pins (what `vmferry describe`
    prints and what the committed schemas/ pin)."""
    reg = Registry()
    for mt in MACHINE_TYPES.values():
        # `drive_device` is left out: the committed schemas (vmferry-0.1, vmferry-0.2) predate
        # migrating drives and are frozen; a stream that has drives carries their description
        # itself (analyze shows it). A new machine type's schema may list it.
        for spec in mt.devices:
            reg.register(mt.name, spec.section, version=spec.version)
    return reg


def main_describe(args: argparse.Namespace) -> int:
    """`vmferry describe [-M TYPE]`: the machine type's device-state description as JSON."""
    from vmferry.vmstate.describe import dumps

    reg = section_registry()
    print(dumps(reg.describe(get_machine_type(args.machine).name)), end="")
    return 0


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
