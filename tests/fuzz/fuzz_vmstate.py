"""Coverage-guided fuzzing of the vmstate section decoders. Not collected by pytest;
run by tests/fuzz/fuzz.py.

    python tests/fuzz/fuzz.py vmstate -max_total_time=60 tests/fuzz/corpus/vmstate

Two decoders turn a section payload into values: `VMState.decode` (the destination's, driven by
the class and checked against the stream's description) and `stream.sections.decode_section` (the
analyzer's, from the description alone: the stream format's one description-driven codec).
Payload and description both come from the stream, so both are fuzzed.

Contract: `VMState.decode` raises only StateLoadError, `decode_section` only StreamError — never
another exception, never a hang; and with the class's own description, a payload the class decoder
accepts, decode_section decodes to the same values (the class decoder may refuse more: it also
checks values against this machine).

Input: byte 0 picks the mode, byte 1 the class. Mode % 4 == 0 or 2: the class's own description
(at a version byte 0 picks) and the rest is the payload. Mode % 4 == 1: the rest is a description's
JSON text, a NUL byte, then the payload. Mode % 4 == 3: the description is grown from the bytes by
a small grammar of description-shaped values (`grow_description`) — byte mutations of JSON text
rarely stay JSON, so this is what reaches the decoders with hostile field lists — and the bytes
it did not use are the payload.
"""

from __future__ import annotations

import json
from typing import Any

from vmferry.errors import StateLoadError, StreamError
from vmferry.machine.machine_type import section_registry
from vmferry.stream.sections import decode_section
from vmferry.vmstate import (
    I16,
    I64,
    U8,
    U16,
    U32,
    Array,
    Bits,
    Bool,
    Bytes,
    List,
    Pad,
    Str,
    Struct,
    VarBytes,
    VMState,
    field,
)
from vmferry.vmstate.testdev import TestDevBackState, TestDevFrontState, TestDevV1State


class _Entry(VMState):
    name = "fuzz/entry"
    key: U16
    value: I64
    on: Bool


class _Tail(VMState):
    name = "fuzz/tail"
    version = 2
    note: Str(max=32)
    extra: U32 = field(since=2, default=0)


class _Every(VMState):
    """Every field type the vmstate package has, so the class-based decoder is covered whole."""

    name = "fuzz-every"
    version = 3
    minimum_version = 1
    flags: Bits(U8, {"a": 1, "b": 3})
    small: I16
    fixed: Bytes(4)
    blob: VarBytes(max=64)
    grid: Array(U8, 3)
    pair: Struct(_Entry)
    entries: List(_Entry, max=8)
    _hole: Pad(2)
    later: U32 = field(since=2, default=7)
    subsections = (_Tail,)


def _classes() -> list[type[VMState]]:
    reg = section_registry()
    found = [e.cls for e in reg.entries(reg.newest())]
    return [*found, TestDevV1State, TestDevFrontState, TestDevBackState, _Every]


CLASSES = _classes()


def decode_all(cls: type[VMState], description: Any, payload: bytes, *, compare: bool) -> None:
    """Run both decoders on one (description, payload) and check the contract. `compare`: the
    description is the class's own, so the two must agree. (On a fuzzed one they need not: a Pad
    of the class stands for any sender field of its size, named or not, where the description-only
    decoder refuses an entry without a name.)"""
    try:
        ours = cls.decode(payload, description=description).to_json()
    except StateLoadError:
        ours = None
    try:
        generic = decode_section(description, payload).to_json()
    except StreamError as e:
        assert ours is None or not compare, f"the class decoder accepted what decode_section refused: {e}"
        return
    # The class decoder may refuse what decode_section accepts: it also checks values against
    # this machine (a device's I/O port, a list's max), which the layout alone cannot.
    if compare and ours is not None:
        assert _agree(ours, generic), f"decoders disagree: {ours} != {generic}"


def _agree(ours: dict[str, Any], generic: dict[str, Any]) -> bool:
    """Same values for every field the stream carried (the class also fills in the defaults of
    fields newer than the stream's version), and the same subsections."""
    fields = ours["fields"]
    return (all(k in fields and fields[k] == v for k, v in generic["fields"].items())
            and ours["subsections"].keys() == generic["subsections"].keys()
            and all(_agree(s, generic["subsections"][n]) for n, s in ours["subsections"].items()))


_KEYS = ("name", "type", "fields", "subsections", "count", "size", "max", "bits", "width", "pad",
         "version", "id", "instance")
_WORDS = ("u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64", "bool", "bytes", "vbytes", "str",
          "struct", "list", "a", "b", "", "\u00e9", "serial", "serial/fifo", "fifo", "cpu")
_NUMBERS = (0, 1, 2, 3, 4, 8, 16, 255, 65535, 1 << 16, (1 << 32) - 1, 1 << 40, -1, -(1 << 63))


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def next(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1] if self.pos <= len(self.data) else 0


def _grow(b: _Bytes, depth: int) -> Any:
    kind = b.next() % 9 if depth < 6 else b.next() % 4
    if kind == 0:
        return _NUMBERS[b.next() % len(_NUMBERS)]
    if kind == 1:
        return _WORDS[b.next() % len(_WORDS)]
    if kind == 2:
        return None if b.next() % 2 else bool(b.next() % 2)
    if kind == 3:
        return [0.5, {}, [], "x"][b.next() % 4]
    if kind in (4, 5):
        return [_grow(b, depth + 1) for _ in range(b.next() % 4)]
    if kind == 6:
        return {_KEYS[b.next() % len(_KEYS)]: _grow(b, depth + 1) for _ in range(b.next() % 5)}
    return _grow_field(b, depth + 1)


def _grow_field(b: _Bytes, depth: int) -> dict[str, Any]:
    """A field entry that is mostly right: a name, a type, and a few of the keys types use."""
    f: dict[str, Any] = {"name": _WORDS[b.next() % len(_WORDS)], "type": _WORDS[b.next() % len(_WORDS)]}
    extra = b.next()
    if f["type"] in ("struct", "list") and depth < 8:
        f["fields"] = [_grow_field(b, depth + 1) for _ in range(b.next() % 3)]
    for bit, key in enumerate(_KEYS[2:]):
        if extra >> bit & 1 and b.next() % 3 == 0:
            f[key] = _grow(b, depth + 1)
    return f


def grow_description(data: bytes) -> tuple[dict[str, Any], bytes]:
    """-> (a description-shaped dict grown from the leading bytes, the bytes left for the payload)."""
    b = _Bytes(data)
    d: dict[str, Any] = {"name": _WORDS[b.next() % len(_WORDS)], "version": b.next() % 4,
                         "fields": [_grow_field(b, 0) for _ in range(b.next() % 5)], "subsections": []}
    for _ in range(b.next() % 3):
        sub = {"name": _WORDS[b.next() % len(_WORDS)], "version": b.next() % 3,
               "fields": [_grow_field(b, 1) for _ in range(b.next() % 3)], "subsections": []}
        d["subsections"].append(sub if b.next() % 8 else _grow(b, 1))
    if b.next() % 8 == 0:  # now and then, a top-level key of the wrong kind
        d[_KEYS[b.next() % len(_KEYS)]] = _grow(b, 1)
    return d, data[b.pos:]


def check(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, cls = data[0], CLASSES[data[1] % len(CLASSES)]
    body = data[2:]
    if mode % 4 == 3:
        decode_all(cls, *grow_description(body), compare=False)
        return
    if mode % 2 == 0:
        versions = cls.version - cls.minimum_version + 1
        version = cls.minimum_version + (mode >> 1) % versions
        decode_all(cls, cls.stream_description(version), body, compare=True)
        return
    text, _, payload = body.partition(b"\0")
    try:
        description = json.loads(text)
    except (ValueError, RecursionError):
        return  # the stream decoder refuses a DESCRIPTION that is not JSON before this point
    decode_all(cls, description, payload, compare=False)


def one_input(data: bytes) -> None:
    check(data)

