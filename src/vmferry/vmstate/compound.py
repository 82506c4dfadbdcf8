"""Compound field types: fixed arrays, nested structures, counted lists and bitfields.

A nested structure (`Struct`, `List` element) is part of the section that contains it: it has no
version of its own on the wire, so the `since` of its fields counts in the *containing section's*
versions, and it cannot have subsections (docs/vmstate.md, "Nested structures").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmferry.vmstate.fields import (
    MAX_NESTING,
    Field,
    FieldType,
    Int,
    Pad,
    Reader,
    decode_fields,
    encode_fields,
    fields_min_size,
)


def _fields_of(cls: Any) -> tuple[Field, ...]:
    return cls.fields


def _entries(cls: Any, version: int) -> list[dict[str, Any]]:
    return [{"name": f.name, **f.type.stream_entry(version)} for f in _fields_of(cls) if f.since <= version]


class Array(FieldType):
    """`count` values of one type back to back: `Array(U32, 8)`. Value: a list of that length."""

    def __init__(self, elem: FieldType, count: int) -> None:
        # The stream format expresses an array as `"count": N` on an element entry, which cannot
        # nest, and a list cannot carry a count.
        if isinstance(elem, Array | List | Pad):
            raise TypeError(f"Array of {elem!r} is not expressible on the wire; use a Struct")
        if count < 0:
            raise ValueError("Array count must be >= 0")
        self.elem = elem
        self.count = count

    def __repr__(self) -> str:
        return f"Array({self.elem!r}, {self.count})"

    def default(self) -> list[Any]:
        return [self.elem.default() for _ in range(self.count)]

    def check(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list | tuple) or len(value) != self.count:
            raise ValueError(f"field '{path}': needs a list of {self.count} elements")
        return [self.elem.check(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def encode(self, value: list[Any], out: bytearray, version: int) -> None:
        for v in value:
            self.elem.encode(v, out, version)

    def decode(self, r: Reader, version: int, path: str) -> list[Any]:
        return [self.elem.decode(r, version, f"{path}[{i}]") for i in range(self.count)]

    def stream_entry(self, version: int) -> dict[str, Any]:
        return {**self.elem.stream_entry(version), "count": self.count}

    def size(self) -> int | None:
        elem = self.elem.size()
        return None if elem is None else elem * self.count

    def min_size(self, version: int) -> int:
        return self.elem.min_size(version) * self.count

    def depth(self) -> int:
        return self.elem.depth()


class Struct(FieldType):
    """Another VMState's fields, inline with no prefix. Value: a dict of its fields."""

    def __init__(self, cls: Any) -> None:
        if getattr(cls, "subsections", ()):
            raise TypeError(f"Struct({cls.__name__}): a nested structure cannot have subsections")
        self.cls = cls
        if self.depth() > MAX_NESTING:
            raise TypeError(f"Struct({cls.__name__}) nests deeper than {MAX_NESTING}")

    def __repr__(self) -> str:
        return f"Struct({self.cls.__name__})"

    def default(self) -> dict[str, Any]:
        return {f.name: f.default_value() for f in _fields_of(self.cls) if f.type.carries_value}

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError(f"field '{path}': a struct needs a dict, got {type(value).__name__}")
        return value  # its fields are checked one by one as they are encoded

    def encode(self, value: Mapping[str, Any], out: bytearray, version: int) -> None:
        encode_fields(_fields_of(self.cls), dict(value), out, version)

    def decode(self, r: Reader, version: int, path: str) -> dict[str, Any]:
        return decode_fields(_fields_of(self.cls), r, version, f"{path}.")

    def stream_entry(self, version: int) -> dict[str, Any]:
        return {"type": "struct", "fields": _entries(self.cls, version)}

    def size(self) -> int | None:
        sizes = [f.type.size() for f in _fields_of(self.cls)]
        return None if None in sizes else sum(s for s in sizes if s is not None)

    def min_size(self, version: int) -> int:
        return fields_min_size(_fields_of(self.cls), version)

    def depth(self) -> int:
        return 1 + max((f.type.depth() for f in _fields_of(self.cls)), default=0)


class List(FieldType):
    """A counted list of structures (a device's request queue): u32 count, then each element's
    fields inline. Value: a list of dicts. `max` bounds the count a destination accepts."""

    def __init__(self, cls: Any, max: int) -> None:  # noqa: A002 - the spec's word
        if not 0 <= max < 1 << 32:
            raise ValueError("List max needs 0 <= max < 2**32")
        self.item = Struct(cls)
        self.cls = cls
        self.max = max
        if self.depth() > MAX_NESTING:
            raise TypeError(f"List({cls.__name__}) nests deeper than {MAX_NESTING}")

    def __repr__(self) -> str:
        return f"List({self.cls.__name__}, max={self.max})"

    def default(self) -> list[Any]:
        return []

    def check(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list | tuple):
            raise ValueError(f"field '{path}': a list field needs a list, got {type(value).__name__}")
        if len(value) > self.max:
            raise ValueError(f"field '{path}': {len(value)} elements exceed max {self.max}")
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def encode(self, value: list[Any], out: bytearray, version: int) -> None:
        out += len(value).to_bytes(4, "little")
        for v in value:
            self.item.encode(v, out, version)

    def decode(self, r: Reader, version: int, path: str) -> list[Any]:
        count = r.uint(4, path)
        if count > self.max:
            raise r.fail(f"list count {count} exceeds the field's max {self.max}", path)
        if count * self.item.min_size(version) > r.remaining:
            raise r.fail(f"list count {count} cannot fit in the {r.remaining} bytes left", path)
        return [self.item.decode(r, version, f"{path}[{i}]") for i in range(count)]

    def stream_entry(self, version: int) -> dict[str, Any]:
        return {"type": "list", "max": self.max, "fields": _entries(self.cls, version)}

    def min_size(self, version: int) -> int:
        return 4

    def depth(self) -> int:
        return self.item.depth()


class Bits(FieldType):
    """Named bitfields packed into one unsigned integer, first name in the lowest bits:
    `Bits(U8, {"enable": 1, "mode": 3})` puts enable in bit 0 and mode in bits 1-3. Value: a dict
    name -> int. Bits above the last field must be zero on the wire (corruption otherwise)."""

    def __init__(self, base: Int, layout: Mapping[str, int]) -> None:
        if not isinstance(base, Int) or base.signed:
            raise TypeError("Bits needs an unsigned integer base (U8..U64)")
        if any(w < 1 for w in layout.values()) or sum(layout.values()) > base.bits:
            raise ValueError(f"Bits layout {dict(layout)} does not fit in {base.type_name}")
        self.base = base
        self.layout = dict(layout)
        self.used_mask = (1 << sum(layout.values())) - 1

    def __repr__(self) -> str:
        return f"Bits({self.base!r}, {self.layout})"

    def default(self) -> dict[str, int]:
        return dict.fromkeys(self.layout, 0)

    def check(self, value: Any, path: str) -> dict[str, int]:
        if not isinstance(value, Mapping) or set(value) != set(self.layout):
            raise ValueError(f"field '{path}': bitfield needs exactly the keys {list(self.layout)}")
        for name, width in self.layout.items():
            v = value[name]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << width:
                raise ValueError(f"field '{path}.{name}': {v!r} does not fit in {width} bits")
        return {name: int(value[name]) for name in self.layout}

    def encode(self, value: dict[str, int], out: bytearray, version: int) -> None:
        packed, shift = 0, 0
        for name, width in self.layout.items():
            packed |= value[name] << shift
            shift += width
        self.base.encode(packed, out, version)

    def decode(self, r: Reader, version: int, path: str) -> dict[str, int]:
        packed = self.base.decode(r, version, path)
        if packed & ~self.used_mask:
            raise r.fail(f"reserved bits set in {packed:#x} (used mask {self.used_mask:#x})", path)
        values, shift = {}, 0
        for name, width in self.layout.items():
            values[name] = (packed >> shift) & ((1 << width) - 1)
            shift += width
        return values

    def stream_entry(self, version: int) -> dict[str, Any]:
        bits = [{"name": n, "width": w} for n, w in self.layout.items()]
        return {**self.base.stream_entry(version), "bits": bits}

    def size(self) -> int:
        return self.base.nbytes
