"""The canonical text of a machine type's device-state description (what `vmferry describe`
prints), and the helpers the committed `schemas/` test uses to pin released machine types."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vmferry.vmstate import registry
from vmferry.vmstate.compat import check_compat


def dumps(description: dict[str, Any]) -> str:
    """The one canonical text form: sorted keys, two-space indent, trailing newline; so a
    committed schema diffs cleanly and the same code always prints the same bytes."""
    return json.dumps(description, indent=2, sort_keys=True) + "\n"


def write_schema(machine: str, path: str | Path, reg: registry.Registry) -> None:
    """Freeze a machine type's description (when it is released)."""
    Path(path).write_text(dumps(reg.describe(machine)))


def schema_problems(machine: str, path: str | Path, reg: registry.Registry,
                    newest: str | None = None) -> list[str]:
    """What the schemas test asserts is empty, for one released machine type:

    1. the code still describes `machine` exactly as the committed file does (a released
       machine type is frozen: any change is a change to what old destinations receive), and
    2. a stream from that release loads into the newest machine type (`check_compat`).
    """
    frozen = json.loads(Path(path).read_text())
    current = reg.describe(machine)
    problems = [f"{machine}: {d}" for d in json_differences(frozen, current)]
    target = newest or reg.newest()
    problems += [f"{machine} -> {target}: {p}" for p in check_compat(frozen, reg.describe(target))]
    return problems


def json_differences(old: Any, new: Any, path: str = "$") -> list[str]:
    """Every place two JSON documents differ, as `path: old -> new` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if key not in new:
                out.append(f"{path}.{key}: removed")
            elif key not in old:
                out.append(f"{path}.{key}: added")
            else:
                out += json_differences(old[key], new[key], f"{path}.{key}")
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = [d for i, (a, b) in enumerate(zip(old, new, strict=False))
               for d in json_differences(a, b, f"{path}[{i}]")]
        if len(old) != len(new):
            out.append(f"{path}: length {len(old)} -> {len(new)}")
        return out
    return [] if old == new and type(old) is type(new) else [f"{path}: {old!r} -> {new!r}"]
