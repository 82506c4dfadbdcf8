"""What migration needs from device state: save everything on the source, and on the destination
stage everything, then apply it all at once (nothing half-loaded).

`vmferry.devices.state.MachineDeviceState` implements this for a Machine with the vmstate
descriptions of its devices.
"""

from __future__ import annotations

from typing import Any, Protocol

from vmferry.stream.records import Command, Description


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
