"""`MachineDeviceState`: a Machine's device state as migration moves it — the saver on the source
and the loader on the destination (the protocols of vmferry.migration.device_state).

Sections, in the one order used for ids, saving and applying — the machine type's table
(`DeviceSpec.order`; KVM-FACTS.md, "State that must move": the vCPUs, then the irqchip, the
PIT, and the clock last of the kernel state). For vmferry-0.1:

    id 1..n    "cpu"         instance = vCPU index          devices/cpu.py
    n+1        "irqchip"     PIC master, PIC slave, IOAPIC  devices/irqchip.py
    n+2        "pit"                                        devices/pit.py
    n+3        "clock"       kvmclock base                  devices/pit.py
    n+4        "serial"      instance 0 = COM1              devices/serial.py
    n+5        "debug-exit"                                 devices/debug_exit.py
    n+6..      "virtio-blk"  instance = drive index (--drive order) devices/virtio_blk.py

The drives' sections come from the type's `drive_device` entry, one instance per drive, and only
when the machine has drives.

Each device object names its own description (`vmstate = SerialState`); the machine type's
table gives the version it is sent at. A device of the machine that is not in its machine type's
table, or has no description, is an error at construction: state never silently stays behind.

The destination is all-or-nothing: `stage` decodes and validates each section against the
*stream's* description (so an older stream version loads) and keeps the decoded values;
nothing touches a device until `apply`, after every section has arrived.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from vmferry.errors import KvmError, MigrationError, StateLoadError, VmferryError
from vmferry.stream.records import Command, CommandCode, Description, SectionInfo
from vmferry.vmstate import Section, VMState
from vmferry.vmstate.description import layout_mismatch

log = logging.getLogger("vmferry.migration")


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One section instance of this machine: the device it binds to, and its class and version."""

    id: int
    name: str
    instance: int
    cls: type[VMState]
    version: int
    target: Any


class MachineDeviceState:
    """Both sides of device-state migration for one Machine (DeviceStateSaver and
    DeviceStateLoader). Call `save` with the vCPUs paused, and `apply` before they start."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.machine_type = machine.machine_type.name
        self._slots = _slots(machine)
        self._by_key = {(s.name, s.instance): s for s in self._slots}
        self._classes = {s.name: s.cls for s in self._slots}
        self._incoming: dict[int, SectionInfo] = {}  # section id -> the stream's entry
        self._staged: dict[tuple[str, int], Section] = {}
        self._applied = False

    # --- source ----------------------------------------------------------------------------------

    def description(self) -> Description:
        """One entry per section instance, ids 1..N in the apply order."""
        return Description(tuple(
            SectionInfo(s.id, s.name, s.instance, s.version,
                        {"id": s.id, "instance": s.instance, **s.cls.stream_description(s.version)})
            for s in self._slots
        ))

    def stream_records(self) -> list[Command]:
        """What the machine type's stream features add after the DESCRIPTION: with
        "device-properties", one DEVICE_PROPERTIES command (docs/stream-format.md). vmferry-0.1
        has none, so its stream is what release 0.1.0 sent."""
        if "device-properties" not in self.machine.machine_type.stream_features:
            return []
        doc = json.dumps(self.machine.machine_type.device_properties(), sort_keys=True, separators=(",", ":"))
        return [Command(CommandCode.DEVICE_PROPERTIES, data=doc.encode())]

    def save(self) -> list[tuple[int, bytes]]:
        """(section id, SECTION_FULL payload) for every section. The vCPUs must be paused: vCPU
        ioctls wait for KVM_RUN to return, and the devices must not change under the capture."""
        return [(s.id, s.cls.save(s.target, version=s.version)) for s in self._slots]

    # --- destination -----------------------------------------------------------------------------

    def check_description(self, description: Description) -> None:
        """Refuse a description this machine cannot load, before any of its data arrives: an
        unknown section or instance, a version outside what this build reads, a field layout
        that differs from ours at that version, an id or instance described twice."""
        seen = {(i.name, i.instance) for i in self._incoming.values()}
        for info in description.sections:
            if info.id in self._incoming:
                raise StateLoadError(f"section id {info.id} is described twice", section=info.name)
            cls = self._classes.get(info.name)
            if cls is None:
                raise StateLoadError(
                    f"unknown section: machine type '{self.machine_type}' has no such device state"
                    f" (it has {', '.join(sorted({s.name for s in self._slots}))})",
                    section=info.name,
                )
            if not cls.minimum_version <= info.version <= cls.version:
                raise StateLoadError(
                    f"the stream has version {info.version}; this build reads versions "
                    f"{cls.minimum_version}..{cls.version}",
                    section=info.name,
                )
            key = (info.name, info.instance)
            if key not in self._by_key:
                have = sorted(s.instance for s in self._slots if s.name == info.name)
                raise StateLoadError(
                    f"instance {info.instance} does not exist on this machine (instances {have})",
                    section=info.name,
                )
            if key in seen:
                raise StateLoadError(f"instance {info.instance} is described twice", section=info.name)
            found = layout_mismatch(cls.stream_description(info.version)["fields"], info.schema.get("fields"))
            if found:
                raise StateLoadError(found[1], section=info.name, field=found[0])
            seen.add(key)
        self._incoming.update({info.id: info for info in description.sections})

    def check_properties(self, data: bytes) -> None:
        """Refuse a source whose devices are set differently from ours (a DEVICE_PROPERTIES
        command): same machine type name, different table — a build that changed a released
        type, or a device property the two builds disagree on. Names device, property, values."""
        mt = self.machine.machine_type.name
        try:
            theirs = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise MigrationError(f"DEVICE_PROPERTIES is not JSON: {e}") from None
        if not isinstance(theirs, dict) or not all(isinstance(v, dict) for v in theirs.values()):
            raise MigrationError("DEVICE_PROPERTIES is not an object of device -> properties")
        ours = self.machine.machine_type.device_properties()
        for dev in sorted(set(ours) | set(theirs)):
            if dev not in ours or dev not in theirs:
                side = "source" if dev in theirs else "destination"
                raise MigrationError(f"machine type '{mt}': device '{dev}' exists only on the {side}")
            for prop in sorted(set(ours[dev]) | set(theirs[dev])):
                a, b = theirs[dev].get(prop, "<unset>"), ours[dev].get(prop, "<unset>")
                if a != b:
                    raise MigrationError(
                        f"machine type '{mt}': device '{dev}' property '{prop}' is {json.dumps(a)} on "
                        f"the source but {json.dumps(b)} here; the two builds disagree on the machine type")

    def stage(self, section_id: int, payload: bytes) -> None:
        """Decode and validate one section against the stream's description; apply nothing."""
        info = self._incoming.get(section_id)
        if info is None:
            raise StateLoadError(f"section id {section_id} was not described before its data")
        key = (info.name, info.instance)
        if key in self._staged:
            raise StateLoadError(f"instance {info.instance} was sent twice", section=info.name)
        slot = self._by_key[key]
        sec = slot.cls.decode(payload, description=dict(info.schema))
        check = getattr(slot.target, "check_loadable", None)
        if check is not None:
            check(sec.fields)  # what only this machine knows (its host's MSR list, ...)
        self._staged[key] = sec

    def apply(self) -> None:
        """Apply every staged section, vCPUs first in index order, then the VM-wide devices.
        Refuses, before touching anything, when a section this machine has did not arrive."""
        missing = [s for s in self._slots if (s.name, s.instance) not in self._staged]
        if missing:
            names = ", ".join(f"{s.name}[{s.instance}]" for s in missing)
            raise StateLoadError(f"the stream ended without it (missing: {names})", section=missing[0].name)
        for s in self._slots:
            try:
                s.cls.apply_section(s.target, self._staged[(s.name, s.instance)])
            except KvmError as e:
                # Decoded and valid, yet the kernel refused it (a host difference validate
                # cannot see). Earlier sections are applied: the machine must not be started.
                raise StateLoadError(f"KVM refused the state: {e}", section=s.name) from e
        self._applied = True
        log.info("device state applied: %d sections", len(self._slots))

    def summary(self) -> dict[str, Any]:
        """What this side sends or has loaded: section name, instance, version (and id)."""
        if self._incoming:
            sections = [{"id": i.id, "name": i.name, "instance": i.instance, "version": i.version,
                         "staged": (i.name, i.instance) in self._staged}
                        for i in self._incoming.values()]
        else:
            sections = [{"id": s.id, "name": s.name, "instance": s.instance, "version": s.version}
                        for s in self._slots]
        return {"machine_type": self.machine_type, "sections": sections, "applied": self._applied}


def _slots(machine: Any) -> list[_Slot]:
    """One slot per section instance, in the table's apply order (instances of one section in
    vCPU index / device order)."""
    mt = machine.machine_type
    found: list[tuple[int, str, int, Any, Any]] = []  # (order, name, instance, spec, target)
    for spec in mt.devices:
        if spec.per_vcpu:
            targets = [spec.device(v, machine.msr_indices) for v in machine.vcpus]
        else:
            targets = [machine.devices[spec.id]]
        for target in targets:
            found.append((spec.order, spec.section.name, 0, spec, target))
    for target in getattr(machine, "block_devices", ()):
        found.append((mt.drive_device.order, mt.drive_device.section.name, 0, mt.drive_device, target))
    unlisted = set(machine.devices) - {spec.id for spec in mt.devices}
    if unlisted:
        raise VmferryError(f"machine type '{mt.name}' has no table entry for device(s) {sorted(unlisted)}")
    counts: dict[str, int] = {}
    slots = []
    # sorted() is stable: instances of one section keep their order (vCPU index, device order).
    for i, (_, name, _, spec, target) in enumerate(sorted(found, key=lambda f: f[0]), start=1):
        cls = getattr(target, "vmstate", None)
        if cls is not spec.section:
            raise VmferryError(f"device '{spec.id}' ({type(target).__name__}) has no state description")
        instance = counts.get(name, 0)
        counts[name] = instance + 1
        slots.append(_Slot(i, name, instance, cls, spec.version, target))
    return slots
