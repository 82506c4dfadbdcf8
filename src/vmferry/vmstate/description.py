"""The two JSON descriptions of a VMState, and the check that a sender's layout is ours.

- `stream_entry`: the section entry of a stream's DESCRIPTION record (docs/stream-format.md,
  "The description"): exactly the fields a stream of one version carries. A generic reader
  (`stream.sections.decode_section`) decodes a payload from it alone.
- `qemu_description`: the shape of QEMU's `-dump-vmstate` (name, version_id, minimum_version_id,
  fields with field / version_id / field_exists / size, nested `Description`, subsections), which
  `vmferry describe` prints and `compat.check_compat` compares.
"""

from __future__ import annotations

from typing import Any

from vmferry.vmstate.compound import Array, List, Struct
from vmferry.vmstate.fields import Field

# Entry keys that decide the bytes on the wire; any other key (max, since, ...) is advisory.
_LAYOUT_KEYS = ("name", "type", "size", "count", "bits", "pad")
_INT_SIZES = {f"{s}{b}": b // 8 for s in "ui" for b in (8, 16, 32, 64)} | {"bool": 1}


def stream_entry(cls: Any, version: int | None = None) -> dict[str, Any]:
    """The DESCRIPTION entry for `cls` at `version` (default: its newest), without the `id` and
    `instance` keys the stream layer assigns."""
    v = cls.version if version is None else version
    return {
        "name": cls.name,
        "version": v,
        "minimum_version": cls.minimum_version,
        "fields": [
            {"name": f.name, **f.type.stream_entry(v), **({"since": f.since} if f.since else {})}
            for f in cls.fields
            if f.since <= v
        ],
        "subsections": [stream_entry(sub) for sub in cls.subsections_at(v)],
    }


def qemu_description(cls: Any, version: int | None = None) -> dict[str, Any]:
    """`-dump-vmstate`-shaped description of `cls` as it is sent at `version` (default: newest)."""
    v = cls.version if version is None else version
    return {
        "name": cls.name,
        "version_id": v,
        "minimum_version_id": min(cls.minimum_version, v),
        "fields": [_qemu_field(f, v) for f in cls.fields if f.since <= v],
        "subsections": [qemu_description(sub) for sub in cls.subsections_at(v)],
    }


def _qemu_field(f: Field, version: int) -> dict[str, Any]:
    t = f.type
    entry: dict[str, Any] = {"field": f.name, "version_id": f.since, "field_exists": False}
    count = None
    if isinstance(t, Array):
        count, t = t.count, t.elem
    # QEMU's `size` is one element's size; ours is None (JSON null) for variable-size kinds.
    entry["size"] = t.size()
    wire = t.stream_entry(version)
    wire.pop("fields", None)
    entry.update(wire)
    if count is not None:
        entry["count"] = count
    if isinstance(t, Struct | List):
        nested = t.cls
        # A nested structure has no version of its own: its fields count in the section's versions.
        entry["Description"] = {
            "name": getattr(nested, "name", "") or nested.__name__,
            "version_id": version,
            "minimum_version_id": version,
            "fields": [_qemu_field(nf, version) for nf in nested.fields if nf.since <= version],
            "subsections": [],
        }
    return entry


def entry_fixed_size(entry: Any) -> int | None:
    """Bytes a stream-description field entry takes when that is fixed, else None."""
    if not isinstance(entry, dict):
        return None
    kind = entry.get("type")
    if kind in _INT_SIZES:
        one: int | None = _INT_SIZES[kind]
    elif kind == "bytes" and isinstance(entry.get("size"), int):
        one = entry["size"]
    elif kind == "struct" and isinstance(entry.get("fields"), list):
        sizes = [entry_fixed_size(e) for e in entry["fields"]]
        one = None if None in sizes else sum(s for s in sizes if s is not None)
    else:
        one = None
    count = entry.get("count", 1)
    return None if one is None or not isinstance(count, int) else one * count


def layout_mismatch(ours: list[dict[str, Any]], theirs: Any, path: str = "") -> tuple[str | None, str] | None:
    """Compare our field entries at some version with a sender's for the same version.

    Returns (field path, reason) for the first difference that changes the bytes, or None. Names
    count too: the same bytes under another name would load into the wrong field. One leniency:
    a Pad of ours stands for any sender field of the same fixed size (a retired field).
    """
    if not isinstance(theirs, list):
        return None, "the sender's description has no field list"
    for i, mine in enumerate(ours):
        if i >= len(theirs):
            return f"{path}{mine['name']}", "the sender's description does not carry this field"
        other = theirs[i]
        where = f"{path}{mine['name']}"
        if not isinstance(other, dict):
            return where, f"the sender's field entry {i} is not an object"
        if mine.get("pad") and entry_fixed_size(other) == mine["size"]:
            continue
        for key in _LAYOUT_KEYS:
            if mine.get(key) != other.get(key):
                return where, (
                    f"this build's layout differs from the sender's: {key} is "
                    f"{mine.get(key)!r} here, {other.get(key)!r} in the stream"
                )
        if "fields" in mine:
            found = layout_mismatch(mine["fields"], other.get("fields"), f"{where}.")
            if found:
                return found
    if len(theirs) > len(ours):
        extra = theirs[len(ours)]
        name = extra.get("name") if isinstance(extra, dict) else None
        return f"{path}{name}", "the sender carries a field this build does not read at this version"
    return None
