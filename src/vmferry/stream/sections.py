"""The field encoding of a device section's payload, driven by the stream's own description.

Reference codec for "Field encoding" in docs/stream-format.md. The `vmstate/` package produces the
same bytes from its declarations; this module lets a reader that knows nothing about the devices
(the analyzer, a test) turn a SECTION_FULL payload into named values, and build one for tests.
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
MAX_DEPTH = 16
# A fixed "count" or a list's element count beyond this must be backed by that many payload bytes,
# so a corrupt count cannot spin the decoder over zero-sized elements.
_FREE_COUNT = 1 << 16


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


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise StreamError(f"{what}: needs {n} bytes, {len(self.data) - self.pos} left")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def int(self, s: struct.Struct, what: str) -> int:
        return s.unpack(self.take(s.size, what))[0]


def decode_section(schema: Mapping[str, Any], data: bytes) -> SectionValue:
    """Decode a SECTION_FULL payload with its description entry; StreamError names the field.
    The entry comes from the stream too: a malformed one is a StreamError as well."""
    r = _Reader(bytes(data))
    value = _section(schema, r, 0, schema.get("name", "?"))
    if r.pos != len(r.data):
        raise StreamError(f"{len(r.data) - r.pos} bytes left over after the section's fields")
    return value


def _entries(d: Mapping[str, Any], key: str, path: str) -> list[Mapping[str, Any]]:
    """d[key] as a list of JSON objects with string names: the description's shape, checked."""
    entries = d.get(key, [])
    if not isinstance(entries, list) or not all(
            isinstance(e, Mapping) and isinstance(e.get("name"), str) for e in entries):
        raise StreamError(f"{path}: description's '{key}' is not a list of named entries")
    return entries


def _section(schema: Mapping[str, Any], r: _Reader, depth: int, path: str) -> SectionValue:
    out = SectionValue(_fields(_entries(schema, "fields", path), r, depth, path))
    subs = _entries(schema, "subsections", path)
    last = -1
    for _ in range(r.int(_U16, f"{path}: subsection count")):
        idx = r.int(_U16, f"{path}: subsection index")
        if not last < idx < len(subs):
            raise StreamError(f"{path}: subsection index {idx} out of order or not in the description")
        last = idx
        sub = subs[idx]
        name = sub["name"]
        body = _Reader(r.take(r.int(_U32, f"{path}/{name}: length"), f"{path}/{name}: body"))
        out.subsections[name] = _section(sub, body, depth + 1, name)
        if body.pos != len(body.data):
            raise StreamError(f"subsection '{name}': {len(body.data) - body.pos} bytes left over")
    return out


def _fields(fields: list, r: _Reader, depth: int, path: str) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise StreamError(f"{path}: nesting deeper than {MAX_DEPTH}")
    out = {}
    for f in fields:
        name = f"{path}.{f.get('name', '?')}"
        count = f.get("count")
        if count is None or f.get("type") == "list":
            out[f.get("name")] = _value(f, r, depth, name)
        else:
            _check_count(count, r, name)
            out[f.get("name")] = [_value(f, r, depth, f"{name}[{i}]") for i in range(count)]
    return out


def _check_count(count: Any, r: _Reader, name: str) -> None:
    if not isinstance(count, int) or count < 0 or (count > _FREE_COUNT and count > len(r.data) - r.pos):
        raise StreamError(f"field '{name}': bad count {count!r}")


def _value(f: Mapping[str, Any], r: _Reader, depth: int, name: str) -> Any:
    t = f.get("type")
    if t in _INTS:
        return r.int(_INTS[t], f"field '{name}'")
    if t == "bool":
        b = r.int(_INTS["u8"], f"field '{name}'")
        if b > 1:
            raise StreamError(f"field '{name}': bool is {b}, not 0 or 1")
        return bool(b)
    if t == "bytes":
        size = f.get("size")
        if not isinstance(size, int) or size < 0:
            raise StreamError(f"field '{name}': bytes without a valid size")
        return r.take(size, f"field '{name}'")
    if t in ("vbytes", "str"):
        raw = r.take(r.int(_U32, f"field '{name}' length"), f"field '{name}'")
        if t == "vbytes":
            return raw
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise StreamError(f"field '{name}': str is not UTF-8") from None
    if t == "struct":
        return _fields(_entries(f, "fields", name), r, depth + 1, name)
    if t == "list":
        nested = _entries(f, "fields", name)
        n = r.int(_U32, f"field '{name}' count")
        _check_count(n, r, name)
        return [_fields(nested, r, depth + 1, f"{name}[{i}]") for i in range(n)]
    raise StreamError(f"field '{name}': unknown type {t!r}")


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
        v = values[f["name"]]
        if "count" in f and f["type"] != "list":
            for x in v:
                _enc_value(f, x, out)
        else:
            _enc_value(f, v, out)


def _enc_value(f: Mapping[str, Any], v: Any, out: list[bytes]) -> None:
    t = f["type"]
    if t in _INTS:
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
