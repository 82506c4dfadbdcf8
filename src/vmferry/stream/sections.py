"""The field encoding of a device section's payload, driven by the stream's own description: the
one description-driven codec (docs/stream-format.md, "Field encoding").

`vmferry analyze` decodes every SECTION_FULL payload with `decode_section` and the section's
entry in the stream's DESCRIPTION record, knowing nothing about the devices. The `vmstate/`
package produces and reads the same bytes from its declarations; property tests check that this
decoder agrees with it, so the documented layout is the real one. `encode_section` builds
payloads for tests.

Both inputs of `decode_section` are untrusted: every length and count is checked against the
bytes left before anything is allocated, nesting is bounded, the work is bounded by the payload's
size (a work budget per section, below), and every failure is a StreamError naming the section and
the field.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vmferry.errors import StreamError

_INTS = {t: struct.Struct("<" + c) for t, c in
         (("u8", "B"), ("u16", "H"), ("u32", "I"), ("u64", "Q"),
          ("i8", "b"), ("i16", "h"), ("i32", "i"), ("i64", "q"))}
_U16, _U32 = _INTS["u16"], _INTS["u32"]
MAX_DEPTH = 16  # docs/stream-format.md: struct/list nesting, and subsections
# A fixed "count" or a list's element count beyond this must be backed by that many payload bytes,
# so a corrupt count cannot spin the decoder over zero-sized elements.
_FREE_COUNT = 1 << 16
# Work budget per section: every field entry, value and list element the decoder visits costs one,
# at most max(WORK_FLOOR, WORK_PER_BYTE x payload bytes). A description from the stream can nest
# zero-size elements (structs with no fields, lists of them, counted empty fields) so that a few
# payload bytes would otherwise cost billions of visits. A real section costs a few per byte.
WORK_FLOOR = 4096
WORK_PER_BYTE = 64


@dataclass
class SectionValue:
    """Decoded section (or subsection): fields by name, in order, and the subsections present."""

    fields: dict[str, Any] = field(default_factory=dict)
    subsections: dict[str, SectionValue] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"fields": {k: _jsonable(v) for k, v in self.fields.items()},
                "subsections": {k: v.to_json() for k, v in self.subsections.items()}}


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


class _Budget:
    """The visits one section's decode may still make (shared by its subsections)."""

    def __init__(self, payload_bytes: int) -> None:
        self.limit = max(WORK_FLOOR, WORK_PER_BYTE * payload_bytes)
        self.left = self.limit
        self.payload_bytes = payload_bytes


class _Cursor:
    def __init__(self, data: bytes | memoryview, section: str, budget: _Budget | None = None) -> None:
        self.data = memoryview(data).cast("B")
        self.pos = 0
        self.section = section
        self.budget = budget or _Budget(len(self.data))

    def charge(self, visits: int, path: str | None) -> None:
        self.budget.left -= visits
        if self.budget.left < 0:
            raise self.error(f"the description makes this {self.budget.payload_bytes}-byte payload take more "
                             f"than {self.budget.limit} field visits to decode (empty fields repeated?)",
                             path.rstrip(".") if path else None)

    def error(self, reason: str, path: str | None = None) -> StreamError:
        return StreamError(f"field '{path}': {reason}" if path else reason, section=self.section)

    def take(self, nbytes: int, path: str) -> bytes:
        if nbytes > len(self.data) - self.pos:
            raise self.error(f"payload truncated: need {nbytes} bytes at offset {self.pos}, "
                             f"{len(self.data) - self.pos} left", path)
        chunk = bytes(self.data[self.pos : self.pos + nbytes])
        self.pos += nbytes
        return chunk

    def uint(self, nbytes: int, path: str) -> int:
        return int.from_bytes(self.take(nbytes, path), "little")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def decode_section(schema: Any, data: bytes) -> SectionValue:
    """Decode a SECTION_FULL payload with its description entry (name, version, fields,
    subsections). Fields come back by name with integers, booleans, bytes, arrays and lists as
    lists, structs and bit fields as dicts; padding does not appear. StreamError names the
    section and the field."""
    try:
        return _section(schema, _Cursor(data, _name(schema)), 0)
    except RecursionError:
        raise StreamError("description nests too deeply") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise StreamError(f"malformed description: {e}") from None


def _name(d: Any) -> str:
    if not isinstance(d, Mapping) or not isinstance(d.get("name"), str):
        raise StreamError("malformed description: a section needs a string name")
    return d["name"]


def _section(d: Mapping[str, Any], c: _Cursor, depth: int) -> SectionValue:
    if depth > MAX_DEPTH:
        raise c.error("subsections nest too deeply")
    fields = d.get("fields")
    subs = d.get("subsections", [])
    if not isinstance(fields, list) or not isinstance(subs, list):
        raise c.error("malformed description: needs fields and subsections lists")
    out = SectionValue(_fields(fields, c, "", 0))
    last = -1
    for _ in range(c.uint(2, "subsection count")):
        index = c.uint(2, "subsection index")
        if index <= last or index >= len(subs):
            raise c.error(f"subsection index {index} is out of order or not in the description")
        last = index
        body = c.take(c.uint(4, "subsection length"), "subsection body")
        sub = subs[index]
        out.subsections[_name(sub)] = _section(sub, _Cursor(body, _name(sub), c.budget), depth + 1)
    if c.left:
        raise c.error(f"{c.left} bytes left over after the section")
    return out


def _fields(entries: list[Any], c: _Cursor, path: str, depth: int) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise c.error(f"fields nest deeper than {MAX_DEPTH}", path)
    c.charge(1 + len(entries), path or None)
    values: dict[str, Any] = {}
    for e in entries:
        if not isinstance(e, Mapping) or not isinstance(e.get("name"), str):
            raise c.error("malformed description: a field entry needs a string name", path or None)
        where = f"{path}{e['name']}"
        count = e.get("count")
        if count is None:
            value = _one(e, c, where, depth)
        else:
            if e.get("type") == "list" or not isinstance(count, int) or count < 0:
                raise c.error(f"malformed description: bad count {count!r}", where)
            _bound(count, e, c, where, depth)
            value = [_one(e, c, f"{where}[{i}]", depth) for i in range(count)]
        if not e.get("pad"):
            values[e["name"]] = value
    return values


def _one(e: Mapping[str, Any], c: _Cursor, path: str, depth: int) -> Any:
    c.charge(1, path)
    kind = e.get("type")
    if kind in _INTS:
        s = _INTS[kind]
        value = s.unpack(c.take(s.size, path))[0]
        return _unpack_bits(e["bits"], value, s.size, c, path) if "bits" in e else value
    if kind == "bool":
        byte = c.take(1, path)[0]
        if byte > 1:
            raise c.error(f"bool byte is {byte}, not 0 or 1", path)
        return byte == 1
    if kind == "bytes":
        size = e.get("size")
        if not isinstance(size, int) or size < 0:
            raise c.error(f"malformed description: bytes needs a size, got {size!r}", path)
        return c.take(size, path)
    if kind in ("vbytes", "str"):
        nbytes = c.uint(4, path)
        if isinstance(e.get("max"), int) and nbytes > e["max"]:
            raise c.error(f"length {nbytes} exceeds the described max {e['max']}", path)
        raw = c.take(nbytes, path)
        if kind == "vbytes":
            return raw
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
        _bound(count, {"type": "struct", "fields": nested}, c, path, depth)
        return [_fields(nested, c, f"{path}[{i}].", depth + 1) for i in range(count)]
    raise c.error(f"unknown field type {kind!r}", path)


def _bound(count: int, e: Mapping[str, Any], c: _Cursor, path: str, depth: int) -> None:
    """Refuse a count of entry `e` the bytes left cannot hold, before looping over it. Elements
    of size 0 take no bytes, so their count is capped instead (a hostile count would otherwise
    spin); the work budget bounds the rest."""
    if count == 0:
        return  # nothing to hold, and no need to walk the entry for its size
    min_size = _min_size(e, depth, c)
    if count * min_size > c.left or (min_size == 0 and count > _FREE_COUNT):
        raise c.error(f"{count} elements cannot fit in the {c.left} bytes left", path)


def _nested(e: Mapping[str, Any], c: _Cursor, path: str) -> list[Any]:
    if not isinstance(e.get("fields"), list):
        raise c.error(f"malformed description: {e.get('type')} needs a fields list", path)
    return e["fields"]


def _unpack_bits(layout: Any, packed: int, nbytes: int, c: _Cursor, path: str) -> dict[str, int]:
    if not isinstance(layout, list):
        raise c.error("malformed description: bits must be a list", path)
    values, shift = {}, 0
    for b in layout:
        if not isinstance(b, Mapping) or not isinstance(b.get("width"), int) or b["width"] < 1:
            raise c.error("malformed description: a bit needs a name and a width", path)
        if shift + b["width"] > nbytes * 8:
            raise c.error("malformed description: bits wider than their integer", path)
        values[str(b.get("name"))] = (packed >> shift) & ((1 << b["width"]) - 1)
        shift += b["width"]
    if packed >> shift:
        raise c.error(f"reserved bits set in {packed:#x}", path)
    return values


def _min_size(e: Any, depth: int, c: _Cursor) -> int:
    """Fewest bytes one element of entry `e` takes (0 if the entry is malformed: caught later).
    Walking the entry is charged to the budget: the elements' visits cost at least as much, so a
    real section pays at most twice, and a huge description cannot be walked for every element."""
    c.charge(1, None)
    if not isinstance(e, Mapping) or depth > MAX_DEPTH:
        return 0
    kind = e.get("type")
    if kind in _INTS:
        return _INTS[kind].size
    if kind == "bool":
        return 1
    if kind == "bytes":
        return e["size"] if isinstance(e.get("size"), int) and e["size"] > 0 else 0
    if kind in ("vbytes", "str", "list"):
        return 4
    if kind == "struct" and isinstance(e.get("fields"), list):
        total = 0
        for n in e["fields"]:
            one = _min_size(n, depth + 1, c)
            count = n.get("count", 1) if isinstance(n, Mapping) else 1
            total += one * count if isinstance(count, int) and count >= 0 else 0
        return total
    return 0


def encode_section(schema: Mapping[str, Any], value: SectionValue) -> bytes:
    """The payload for `value` under `schema`: the inverse of decode_section."""
    out: list[bytes] = []
    _enc_fields(schema.get("fields", []), value.fields, out)
    subs = schema.get("subsections", [])
    present = [(i, s) for i, s in enumerate(subs) if s["name"] in value.subsections]
    out.append(_U16.pack(len(present)))
    for i, s in present:
        body = encode_section(s, value.subsections[s["name"]])
        out += [_U16.pack(i), _U32.pack(len(body)), body]
    return b"".join(out)


def _enc_fields(fields: list, values: Mapping[str, Any], out: list[bytes]) -> None:
    for f in fields:
        if f.get("pad"):
            out.append(bytes(f["size"] * f.get("count", 1)))  # padding carries no value
            continue
        v = values[f["name"]]
        if "count" in f and f["type"] != "list":
            for x in v:
                _enc_value(f, x, out)
        else:
            _enc_value(f, v, out)


def _enc_value(f: Mapping[str, Any], v: Any, out: list[bytes]) -> None:
    t = f["type"]
    if t in _INTS:
        if "bits" in f:
            packed, shift = 0, 0
            for b in f["bits"]:
                packed |= (v[b["name"]] & ((1 << b["width"]) - 1)) << shift
                shift += b["width"]
            v = packed
        out.append(_INTS[t].pack(v))
    elif t == "bool":
        out.append(b"\x01" if v else b"\x00")
    elif t == "bytes":
        if len(v) != f["size"]:
            raise ValueError(f"field {f['name']!r} needs {f['size']} bytes, got {len(v)}")
        out.append(bytes(v))
    elif t in ("vbytes", "str"):
        raw = v.encode() if t == "str" else bytes(v)
        out += [_U32.pack(len(raw)), raw]
    elif t == "struct":
        _enc_fields(f["fields"], v, out)
    elif t == "list":
        out.append(_U32.pack(len(v)))
        for item in v:
            _enc_fields(f["fields"], item, out)
    else:
        raise ValueError(f"unknown field type {t!r}")
