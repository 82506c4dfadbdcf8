"""Scalar field types, the `Field` spec and the field-sequence codec.

A field type knows four things about one value: its default, how to check a value the device
hands over for saving, how to write it, and how to read it back from untrusted bytes. Compound
types (arrays, structs, lists, bitfields) live in `compound.py` and build on these.

The wire layout is the one docs/stream-format.md ("Field encoding") fixes for SECTION_FULL
payloads; docs/vmstate.md restates it from a VMState's point of view.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any

from vmferry.errors import StateLoadError

# docs/stream-format.md: "Nesting of struct/list is at most 16 deep".
MAX_NESTING = 16


class Reader:
    """A cursor over one untrusted section payload. Every read is bounds-checked first, so a
    corrupt length can never make us slice past the end or allocate more than the payload holds."""

    def __init__(self, data: bytes | bytearray | memoryview, section: str) -> None:
        self.data = memoryview(data).cast("B")
        self.pos = 0
        self.section = section

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def fail(self, reason: str, path: str | None) -> StateLoadError:
        return StateLoadError(reason, section=self.section, field=path or None)

    def take(self, nbytes: int, path: str) -> bytes:
        if nbytes > self.remaining:
            raise self.fail(
                f"payload truncated: need {nbytes} bytes at offset {self.pos}, {self.remaining} left", path
            )
        chunk = bytes(self.data[self.pos : self.pos + nbytes])
        self.pos += nbytes
        return chunk

    def uint(self, nbytes: int, path: str) -> int:
        return int.from_bytes(self.take(nbytes, path), "little")


class FieldType(ABC):
    """One kind of value on the wire. Instances are immutable and shared (`U8` is one object)."""

    @abstractmethod
    def default(self) -> Any:
        """The value a field gets when the stream does not carry it."""

    @abstractmethod
    def check(self, value: Any, path: str) -> Any:
        """Validate a value about to be saved; return it normalised. Raises ValueError."""

    @abstractmethod
    def encode(self, value: Any, out: bytearray, version: int) -> None:
        """Append the wire form of an already-checked value."""

    @abstractmethod
    def decode(self, r: Reader, version: int, path: str) -> Any:
        """Read one value; raise StateLoadError (via r.fail) on anything malformed."""

    @abstractmethod
    def stream_entry(self, version: int) -> dict[str, Any]:
        """The docs/stream-format.md description keys of this type (everything but the name)."""

    def size(self) -> int | None:
        """Encoded bytes of one value when fixed, else None (QEMU's `size`)."""
        return None

    def min_size(self, version: int) -> int:
        """Fewest bytes one value can take: bounds a list count against the bytes left."""
        return self.size() or 0

    def depth(self) -> int:
        return 0

    @property
    def carries_value(self) -> bool:
        """False only for padding, which is written as zeros and never surfaces as a value."""
        return True


class Int(FieldType):
    """A little-endian integer of 8, 16, 32 or 64 bits; signed ones are two's complement."""

    def __init__(self, bits: int, signed: bool) -> None:
        assert bits in (8, 16, 32, 64)
        self.bits = bits
        self.signed = signed
        self.nbytes = bits // 8
        self.lo = -(1 << (bits - 1)) if signed else 0
        self.hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        self.type_name = f"{'i' if signed else 'u'}{bits}"

    def __repr__(self) -> str:
        return self.type_name.upper()

    def default(self) -> int:
        return 0

    def check(self, value: Any, path: str) -> int:
        if not isinstance(value, int):
            raise ValueError(f"field '{path}': {self.type_name} needs an int, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise ValueError(f"field '{path}': {value} does not fit in {self.type_name}")
        return int(value)

    def encode(self, value: int, out: bytearray, version: int) -> None:
        out += value.to_bytes(self.nbytes, "little", signed=self.signed)

    def decode(self, r: Reader, version: int, path: str) -> int:
        return int.from_bytes(r.take(self.nbytes, path), "little", signed=self.signed)

    def stream_entry(self, version: int) -> dict[str, Any]:
        return {"type": self.type_name}

    def size(self) -> int:
        return self.nbytes


U8, U16, U32, U64 = (Int(b, False) for b in (8, 16, 32, 64))
I8, I16, I32, I64 = (Int(b, True) for b in (8, 16, 32, 64))


class _Bool(FieldType):
    """One byte, 0 or 1; any other byte is corruption, not `True`."""

    def __repr__(self) -> str:
        return "Bool"

    def default(self) -> bool:
        return False

    def check(self, value: Any, path: str) -> bool:
        if value not in (0, 1):  # True/False compare equal to 1/0
            raise ValueError(f"field '{path}': bool needs True or False, got {value!r}")
        return bool(value)

    def encode(self, value: bool, out: bytearray, version: int) -> None:
        out.append(1 if value else 0)

    def decode(self, r: Reader, version: int, path: str) -> bool:
        byte = r.take(1, path)[0]
        if byte > 1:
            raise r.fail(f"bool byte is {byte}, not 0 or 1", path)
        return byte == 1

    def stream_entry(self, version: int) -> dict[str, Any]:
        return {"type": "bool"}

    def size(self) -> int:
        return 1


Bool = _Bool()


def _as_bytes(value: Any, path: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValueError(f"field '{path}': needs bytes, got {type(value).__name__}")
    return bytes(value)


class Bytes(FieldType):
    """Exactly `nbytes` bytes (a register file, a MAC address)."""

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError("Bytes(n) needs n >= 0")
        self.nbytes = nbytes

    def __repr__(self) -> str:
        return f"Bytes({self.nbytes})"

    def default(self) -> bytes:
        return bytes(self.nbytes)

    def check(self, value: Any, path: str) -> bytes:
        data = _as_bytes(value, path)
        if len(data) != self.nbytes:
            raise ValueError(f"field '{path}': needs exactly {self.nbytes} bytes, got {len(data)}")
        return data

    def encode(self, value: bytes, out: bytearray, version: int) -> None:
        out += value

    def decode(self, r: Reader, version: int, path: str) -> bytes:
        return r.take(self.nbytes, path)

    def stream_entry(self, version: int) -> dict[str, Any]:
        return {"type": "bytes", "size": self.nbytes}

    def size(self) -> int:
        return self.nbytes


class VarBytes(FieldType):
    """Up to `max` bytes; the u32 length travels in front. `max` bounds what a destination will
    accept, so a corrupt length is refused before anything is allocated."""

    type_name = "vbytes"

    def __init__(self, max: int) -> None:  # noqa: A002 - the spec's word
        if not 0 <= max < 1 << 32:
            raise ValueError(f"{type(self).__name__}(max) needs 0 <= max < 2**32")
        self.max = max

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max={self.max})"

    def default(self) -> Any:
        return b""

    def check(self, value: Any, path: str) -> Any:
        data = _as_bytes(value, path)
        if len(data) > self.max:
            raise ValueError(f"field '{path}': {len(data)} bytes exceed max {self.max}")
        return data

    def encode(self, value: Any, out: bytearray, version: int) -> None:
        out += len(value).to_bytes(4, "little") + value

    def decode(self, r: Reader, version: int, path: str) -> Any:
        nbytes = r.uint(4, path)
        if nbytes > self.max:
            raise r.fail(f"length {nbytes} exceeds the field's max {self.max}", path)
        return r.take(nbytes, path)

    def stream_entry(self, version: int) -> dict[str, Any]:
        return {"type": self.type_name, "max": self.max}

    def min_size(self, version: int) -> int:
        return 4


class Str(VarBytes):
    """UTF-8 text of at most `max` bytes, length-prefixed like VarBytes."""

    type_name = "str"

    def default(self) -> str:
        return ""

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise ValueError(f"field '{path}': needs str, got {type(value).__name__}")
        if len(value.encode()) > self.max:
            raise ValueError(f"field '{path}': {len(value.encode())} UTF-8 bytes exceed max {self.max}")
        return value

    def encode(self, value: str, out: bytearray, version: int) -> None:
        super().encode(value.encode(), out, version)

    def decode(self, r: Reader, version: int, path: str) -> str:
        raw = super().decode(r, version, path)
        try:
            return raw.decode()
        except UnicodeDecodeError as e:
            raise r.fail(f"not UTF-8: {e.reason} at byte {e.start}", path) from None


class Pad(FieldType):
    """`nbytes` bytes of nothing: written as zeros, skipped on load. Keeps a layout when a field
    is retired (replace it by a Pad of its size) or when two versions differ in size."""

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError("Pad(n) needs n >= 0")
        self.nbytes = nbytes

    def __repr__(self) -> str:
        return f"Pad({self.nbytes})"

    @property
    def carries_value(self) -> bool:
        return False

    def default(self) -> None:
        return None

    def check(self, value: Any, path: str) -> None:
        return None

    def encode(self, value: Any, out: bytearray, version: int) -> None:
        out += bytes(self.nbytes)

    def decode(self, r: Reader, version: int, path: str) -> None:
        r.take(self.nbytes, path)  # content ignored on purpose: padding carries no state

    def stream_entry(self, version: int) -> dict[str, Any]:
        return {"type": "bytes", "size": self.nbytes, "pad": True}

    def size(self) -> int:
        return self.nbytes


_MISSING: Any = object()


@dataclasses.dataclass(frozen=True)
class Field:
    """One declared field: its wire name, type, the first section version that carries it
    (0 = every version), the value it gets from older streams, and the device attribute it binds to."""

    name: str
    type: FieldType
    since: int = 0
    default: Any = _MISSING
    attr: str = ""

    def default_value(self) -> Any:
        # A fresh copy every time: defaults of lists/dicts must not be shared between devices.
        return self.type.default() if self.default is _MISSING else _copy(self.default)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class FieldOptions:
    """What `field(...)` returns; the VMState class turns it into a `Field` once it knows the type."""

    since: int = 0
    default: Any = _MISSING
    attr: str = ""


def field(*, since: int = 0, default: Any = _MISSING, attr: str = "") -> Any:
    """Per-field options: `fcr: U8 = field(since=3, default=0)`; `attr` binds the field to a
    differently named device attribute (default: the field's own name)."""
    return FieldOptions(since=since, default=default, attr=attr)


def encode_fields(fields: tuple[Field, ...], values: dict[str, Any], out: bytearray, version: int,
                  path: str = "") -> None:
    """Append the fields a stream of `version` carries, in declaration order, from `values`."""
    for f in fields:
        if f.since > version:
            continue
        sub = f"{path}{f.name}"
        if not f.type.carries_value:
            f.type.encode(None, out, version)
            continue
        if f.name not in values:
            raise ValueError(f"field '{sub}': missing from the values to save")
        f.type.encode(f.type.check(values[f.name], sub), out, version)


def decode_fields(fields: tuple[Field, ...], r: Reader, version: int, path: str = "") -> dict[str, Any]:
    """Read the fields a stream of `version` carries; fields it does not carry get their default."""
    values: dict[str, Any] = {}
    for f in fields:
        if f.since > version:
            if f.type.carries_value:
                values[f.name] = f.default_value()
            continue
        value = f.type.decode(r, version, f"{path}{f.name}")
        if f.type.carries_value:
            values[f.name] = value
    return values


def fields_min_size(fields: tuple[Field, ...], version: int) -> int:
    return sum(f.type.min_size(version) for f in fields if f.since <= version)
