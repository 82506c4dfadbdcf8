"""Decode a device section from its description alone, with no VMState classes.

`vmferry analyze` calls `decode_with_description` with the section entry of a stream's
DESCRIPTION record and a SECTION_FULL payload. This is deliberately a second, independent
implementation of the layout in docs/vmstate.md (and docs/stream-format.md, "Field encoding"):
the tests check it agrees with the class-based decoder, so the documented layout is the real one.

Both inputs are untrusted. Every length and count is checked against the bytes left before
anything is allocated, nesting is bounded, and every failure is a StateLoadError naming the
section and the field.
"""

from __future__ import annotations

import json
from typing import Any

from vmferry.errors import StateLoadError

MAX_NESTING = 16  # docs/stream-format.md: struct/list nesting
_MAX_SUBSECTION_DEPTH = 16
_MAX_EMPTY_ELEMENTS = 1 << 16
_INTS = {f"{s}{b}": (b // 8, s == "i") for s in "ui" for b in (8, 16, 32, 64)}


class _Cursor:
    def __init__(self, data: bytes | memoryview, section: str) -> None:
        self.data = memoryview(data).cast("B")
        self.pos = 0
        self.section = section

    def error(self, reason: str, path: str | None = None) -> StateLoadError:
        return StateLoadError(reason, section=self.section, field=path or None)

    def take(self, nbytes: int, path: str) -> bytes:
        if nbytes > len(self.data) - self.pos:
            raise self.error(f"payload truncated: need {nbytes} bytes at offset {self.pos}", path)
        chunk = bytes(self.data[self.pos : self.pos + nbytes])
        self.pos += nbytes
        return chunk

    def uint(self, nbytes: int, path: str) -> int:
        return int.from_bytes(self.take(nbytes, path), "little")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def decode_with_description(description_json: str | bytes | dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Decode one section payload from its description.

    `description_json` is a DESCRIPTION section entry (docs/stream-format.md: name, version,
    fields, subsections), as JSON text or already parsed; a `-dump-vmstate`-shaped description
    (`vmferry describe` output: version_id, `field`, `Description`) is accepted too and read as a
    stream of its `version_id`. Returns
    `{"name", "version", "fields": {name: value}, "subsections": {name: {...same shape...}}}` with
    integers, booleans, bytes as lowercase hex, arrays and lists as lists, structs and bitfields
    as objects; padding does not appear.
    """
    try:
        described = description_json
        if isinstance(described, str | bytes):
            described = json.loads(described)
        if isinstance(described, dict) and "version_id" in described:
            described = from_qemu_shape(described)
        return _section(described, _Cursor(payload, _name(described)), 0)
    except RecursionError:
        raise StateLoadError("description nests too deeply") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        if isinstance(e, StateLoadError):
            raise
        raise StateLoadError(f"malformed description: {e}") from None


def from_qemu_shape(d: dict[str, Any]) -> dict[str, Any]:
    """A `-dump-vmstate`-shaped section description as a DESCRIPTION entry of its version_id."""

    def field(e: dict[str, Any]) -> dict[str, Any]:
        out = {"name": e["field"], "type": e["type"]}
        for key in ("count", "bits", "pad", "max"):
            if key in e:
                out[key] = e[key]
        if e["type"] == "bytes":
            out["size"] = e["size"]
        if e["type"] in ("struct", "list"):
            out["fields"] = [field(n) for n in e["Description"]["fields"]]
        return out

    return {
        "name": d["name"],
        "version": d["version_id"],
        "fields": [field(e) for e in d["fields"]],
        "subsections": [from_qemu_shape(s) for s in d.get("subsections", [])],
    }


def _name(d: Any) -> str:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise StateLoadError("malformed description: a section needs a string name")
    return d["name"]


def _section(d: dict[str, Any], c: _Cursor, depth: int) -> dict[str, Any]:
    if depth > _MAX_SUBSECTION_DEPTH:
        raise c.error("subsections nest too deeply")
    version = d.get("version")
    fields = d.get("fields")
    subs = d.get("subsections", [])
    if not isinstance(version, int) or not isinstance(fields, list) or not isinstance(subs, list):
        raise c.error("malformed description: needs integer version, fields and subsections lists")
    values = _fields(fields, c, "", 0)
    present: dict[str, Any] = {}
    last = -1
    for _ in range(c.uint(2, "subsection count")):
        index = c.uint(2, "subsection index")
        if index <= last or index >= len(subs):
            raise c.error(f"subsection index {index} is out of order or not in the description")
        last = index
        body = c.take(c.uint(4, "subsection length"), "subsection body")
        sub = subs[index]
        present[_name(sub)] = _section(sub, _Cursor(body, _name(sub)), depth + 1)
    if c.left:
        raise c.error(f"{c.left} bytes left over after the section")
    return {"name": d["name"], "version": version, "fields": values, "subsections": present}


def _fields(entries: list[Any], c: _Cursor, path: str, depth: int) -> dict[str, Any]:
    if depth > MAX_NESTING:
        raise c.error(f"fields nest deeper than {MAX_NESTING}", path)
    values: dict[str, Any] = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise c.error("malformed description: a field entry needs a string name", path)
        where = f"{path}{e['name']}"
        count = e.get("count")
        if count is None:
            value = _one(e, c, where, depth)
        else:
            if e.get("type") == "list" or not isinstance(count, int) or count < 0:
                raise c.error(f"malformed description: bad count {count!r}", where)
            _bound(count, _min_size(e, depth), c, where)
            value = [_one(e, c, f"{where}[{i}]", depth) for i in range(count)]
        if not e.get("pad"):
            values[e["name"]] = value
    return values


def _one(e: dict[str, Any], c: _Cursor, path: str, depth: int) -> Any:
    kind = e.get("type")
    if kind in _INTS:
        nbytes, signed = _INTS[kind]
        value = int.from_bytes(c.take(nbytes, path), "little", signed=signed)
        return _unpack_bits(e["bits"], value, nbytes, c, path) if "bits" in e else value
    if kind == "bool":
        byte = c.take(1, path)[0]
        if byte > 1:
            raise c.error(f"bool byte is {byte}, not 0 or 1", path)
        return byte == 1
    if kind == "bytes":
        size = e.get("size")
        if not isinstance(size, int) or size < 0:
            raise c.error(f"malformed description: bytes needs a size, got {size!r}", path)
        return c.take(size, path).hex()
    if kind in ("vbytes", "str"):
        nbytes = c.uint(4, path)
        if isinstance(e.get("max"), int) and nbytes > e["max"]:
            raise c.error(f"length {nbytes} exceeds the described max {e['max']}", path)
        raw = c.take(nbytes, path)
        if kind == "vbytes":
            return raw.hex()
        try:
            return raw.decode()
        except UnicodeDecodeError as err:
            raise c.error(f"not UTF-8: {err.reason}", path) from None
    if kind == "struct":
        return _fields(_nested(e, c, path), c, f"{path}.", depth + 1)
    if kind == "list":
        nested = _nested(e, c, path)
        count = c.uint(4, path)
        if isinstance(e.get("max"), int) and count > e["max"]:
            raise c.error(f"list count {count} exceeds the described max {e['max']}", path)
        _bound(count, _min_size({"type": "struct", "fields": nested}, depth), c, path)
        return [_fields(nested, c, f"{path}[{i}].", depth + 1) for i in range(count)]
    raise c.error(f"unknown field type {kind!r}", path)


def _bound(count: int, min_size: int, c: _Cursor, path: str) -> None:
    """Refuse a count the bytes left cannot hold, before looping over it. Elements of size 0
    take no bytes, so their count is capped instead (a hostile count would otherwise spin)."""
    if count * min_size > c.left or (min_size == 0 and count > _MAX_EMPTY_ELEMENTS):
        raise c.error(f"{count} elements cannot fit in the {c.left} bytes left", path)


def _nested(e: dict[str, Any], c: _Cursor, path: str) -> list[Any]:
    if not isinstance(e.get("fields"), list):
        raise c.error(f"malformed description: {e.get('type')} needs a fields list", path)
    return e["fields"]


def _unpack_bits(layout: Any, packed: int, nbytes: int, c: _Cursor, path: str) -> dict[str, int]:
    if not isinstance(layout, list):
        raise c.error("malformed description: bits must be a list", path)
    values, shift = {}, 0
    for b in layout:
        if not isinstance(b, dict) or not isinstance(b.get("width"), int) or b["width"] < 1:
            raise c.error("malformed description: a bit needs a name and a width", path)
        if shift + b["width"] > nbytes * 8:
            raise c.error("malformed description: bits wider than their integer", path)
        values[str(b.get("name"))] = (packed >> shift) & ((1 << b["width"]) - 1)
        shift += b["width"]
    if packed >> shift:
        raise c.error(f"reserved bits set in {packed:#x}", path)
    return values


def _min_size(e: Any, depth: int) -> int:
    """Fewest bytes one element of entry `e` takes (0 if the entry is malformed: caught later)."""
    if not isinstance(e, dict) or depth > MAX_NESTING:
        return 0
    kind = e.get("type")
    if kind in _INTS:
        return _INTS[kind][0]
    if kind == "bool":
        return 1
    if kind == "bytes":
        return e["size"] if isinstance(e.get("size"), int) and e["size"] > 0 else 0
    if kind in ("vbytes", "str", "list"):
        return 4
    if kind == "struct" and isinstance(e.get("fields"), list):
        total = 0
        for n in e["fields"]:
            one = _min_size(n, depth + 1)
            count = n.get("count", 1) if isinstance(n, dict) else 1
            total += one * count if isinstance(count, int) and count >= 0 else 0
        return total
    return 0
