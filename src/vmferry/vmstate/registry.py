"""Which VMState sections each machine type carries, and at which version.

A `Registry` is filled from a table (vmferry's own machine types: `machine_type.section_registry()`
builds one from each type's device table; tests build their own):

```python
reg.register(("vmferry-1.0", "vmferry-1.1"), SerialState, version=2)  # 1.0/1.1 send v2
reg.register("vmferry-1.2", SerialState)                               # newest version
reg.register("vmferry-1.2", OldThingState, load_only=True)            # reads old streams
```

Pinning `version` per machine type is how a newer build "boots a device as version foo": started
with `-M vmferry-1.0` it emits what a 1.0 destination reads. A `load_only` section is never sent;
it lets this machine type accept a section an older build sent (a device since split or renamed).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from vmferry.errors import VmferryError
from vmferry.vmstate.state import VMState


@dataclasses.dataclass(frozen=True)
class Entry:
    """One section of a machine type: its class, the version it sends, whether it only loads."""

    cls: type[VMState]
    version: int
    load_only: bool = False

    def describe(self) -> dict[str, Any]:
        d = self.cls.to_description(self.version)
        if self.load_only:
            d["load_only"] = True  # never sent by this machine type; check_compat must know
        return d


class Registry:
    """Machine type -> section name -> Entry."""

    def __init__(self) -> None:
        self._machines: dict[str, dict[str, Entry]] = {}

    def register(self, machine_types: str | Iterable[str], cls: type[VMState], *,
                 version: int | None = None, load_only: bool = False) -> None:
        v = cls.version if version is None else version
        if not cls.name or not cls.minimum_version <= v <= cls.version:
            raise ValueError(f"{cls.__name__}: needs a name and a version within its range")
        for machine in [machine_types] if isinstance(machine_types, str) else machine_types:
            sections = self._machines.setdefault(machine, {})
            old = sections.get(cls.name)
            if old is not None and old.cls is not cls:
                raise ValueError(f"{machine}: section '{cls.name}' registered twice ({old.cls.__name__})")
            sections[cls.name] = Entry(cls, v, load_only)

    def unregister(self, machine: str, name: str | None = None) -> None:
        """Drop one section, or the whole machine type when `name` is None (tests clean up)."""
        if name is None:
            self._machines.pop(machine, None)
        else:
            self._machines.get(machine, {}).pop(name, None)

    def machine_types(self) -> list[str]:
        """Registered machine types, oldest first (`vmferry-1.10` after `vmferry-1.9`)."""
        return sorted(self._machines, key=_version_key)

    def newest(self) -> str:
        types = self.machine_types()
        if not types:
            raise VmferryError("no machine types are registered")
        return types[-1]

    def entries(self, machine: str) -> list[Entry]:
        """The machine type's sections, sorted by name (a stable order for saving and printing)."""
        if machine not in self._machines:
            known = ", ".join(self.machine_types()) or "none"
            raise VmferryError(f"unknown machine type '{machine}' (known: {known})")
        return [self._machines[machine][n] for n in sorted(self._machines[machine])]

    def lookup(self, machine: str, name: str) -> Entry | None:
        """The entry that loads section `name` on this machine type, if any."""
        return self._machines.get(machine, {}).get(name)

    def describe(self, machine: str) -> dict[str, Any]:
        """The machine type's description in `-dump-vmstate` shape, keyed by section name."""
        result: dict[str, Any] = {"vmschkmachine": {"Name": machine}}
        for entry in self.entries(machine):
            result[entry.cls.name] = entry.describe()
        return result


def _version_key(machine: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", machine))
