"""Device state as a saver and a loader (the contract of migration/saver.py).

What migration needs from the devices is two small protocols: save everything on the source,
and on the destination stage everything, then apply it all at once (nothing half-loaded).
`vmferry.devices.state.MachineDeviceState` implements both for a Machine with the vmstate
descriptions of its devices. `DeviceSaver` and `DeviceLoader` plug them into the engine: the
DESCRIPTION at setup, every section as SECTION_FULL with the vCPUs paused, and all of it applied
after END, before the guest starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from vmferry.errors import MigrationError
from vmferry.migration.saver import Handler, Loader, Saver, SaverOutput
from vmferry.stream.records import Command, CommandCode, Description, DeviceSection, SectionPhase

# What one section is expected to cost on the wire before it was ever saved (a vCPU's XSAVE
# area is 4 KiB; the other devices are far smaller). Only the expected downtime uses it.
SECTION_ESTIMATE_BYTES = 4096


class DeviceStateSaver(Protocol):
    def description(self) -> Description:
        """The DESCRIPTION record: every section that will follow, with its id."""
        ...

    def stream_records(self) -> list[Command]:
        """Records the machine type adds right after the DESCRIPTION (its stream features)."""
        ...

    def save(self) -> list[tuple[int, bytes]]:
        """(section id, SECTION_FULL payload) for every section; the vCPUs are paused."""
        ...


class DeviceStateLoader(Protocol):
    def check_description(self, description: Description) -> None:
        """Refuse (StateLoadError / MigrationError naming the section) a description this
        machine cannot load: an unknown section, a version outside what we accept."""
        ...

    def check_properties(self, data: bytes) -> None:
        """Refuse a DEVICE_PROPERTIES command whose device properties differ from ours."""
        ...

    def stage(self, section_id: int, payload: bytes) -> None:
        """Decode and validate one section; nothing is applied yet."""
        ...

    def apply(self) -> None:
        """Apply every staged section; all sections must have arrived."""
        ...

    def summary(self) -> dict[str, Any]:
        ...


class DeviceSaver(Saver):
    """Device state: described at setup, sent whole with the vCPUs paused."""

    name = "devices"

    def __init__(self, state: DeviceStateSaver) -> None:
        self.state = state
        self._estimate = 0
        self._done = False

    def setup(self, out: SaverOutput) -> None:
        description = self.state.description()
        self._estimate = SECTION_ESTIMATE_BYTES * len(description.sections)
        out.send([out.encoder.encode(r) for r in (description, *self.state.stream_records())])

    def pending(self) -> int:
        return 0 if self._done else self._estimate

    def complete(self, out: SaverOutput) -> None:
        enc = out.encoder
        out.send([enc.encode(DeviceSection(sid, SectionPhase.FULL, payload))
                  for sid, payload in self.state.save()])
        self._done = True


class DeviceLoader(Loader):
    """Checks the DESCRIPTION, stages each section as it arrives, applies them all at the end."""

    name = "devices"

    def __init__(self, state: DeviceStateLoader) -> None:
        self.state = state

    def handlers(self) -> Mapping[type | CommandCode, Handler]:
        return {Description: self.state.check_description, DeviceSection: self._stage,
                CommandCode.DEVICE_PROPERTIES: self._check_properties}

    def _check_properties(self, rec: Command) -> None:
        self.state.check_properties(rec.data)

    def _stage(self, rec: DeviceSection) -> None:
        if rec.phase != SectionPhase.FULL:
            raise MigrationError(f"device section phase SECTION_{rec.phase.name} is not supported "
                                 f"by this destination (section id {rec.section_id})")
        self.state.stage(rec.section_id, rec.data)

    def complete(self) -> None:
        self.state.apply()
