"""Compiled field codecs: one VMState class's fields at one version, encoded and decoded by a few
`struct` calls instead of a Python call per field.

The interpreted codec (`fields.encode_fields` / `decode_fields`, each type's `check`, `encode`,
`decode`) is the definition of the wire format and of every error message. This module turns a
class's field list, once per (class, version), into generated Python source: each run of
fixed-size fields (integers, bools, fixed bytes, padding, bitfields, and structs and arrays made
only of those) becomes one precomputed `struct.Struct`, so saving a vCPU is a handful of `pack`
calls. Counted lists, length-prefixed bytes and text stay per-field helpers between the runs.

The compiled codec only ever takes the fast path for input it can prove well-formed with cheap
checks (types of containers, lengths, bool bytes, reserved bits, struct's own range checks);
anything else — a missing key, a value out of range, a truncated payload — raises inside, and
the caller reruns the interpreted codec, which gives the same bytes or the same error naming the
field. So the output is byte-identical to the interpreted one, and tests/test_vmstate_compiled.py checks
that property over every device class. One leniency: an integer field takes what `struct` takes,
so an object with `__index__` (a numpy integer) encodes as its value where the interpreted check
wants an `int`; the bytes are the same.

Building a codec costs about a millisecond; `warm()` builds a class's codecs (its subsections'
and nested structures' included) ahead of time, so migration does it at setup and never inside
the downtime.
"""

from __future__ import annotations

import struct
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from vmferry.vmstate.compound import Array, Bits, List, Struct
from vmferry.vmstate.fields import (
    Bytes,
    Field,
    FieldType,
    Int,
    Pad,
    Reader,
    Str,
    VarBytes,
    _Bool,
)
from vmferry.vmstate.fields import decode_fields as _decode_interpreted
from vmferry.vmstate.fields import encode_fields as _encode_interpreted

Encoder = Callable[[Any], bytes]
Decoder = Callable[[Reader], dict[str, Any]]


class _NotFast(Exception):
    """Raised inside a compiled codec: this input needs the interpreted codec (which then gives
    the bytes or the error)."""


_INT_FORMAT = {8: "b", 16: "h", 32: "i", 64: "q"}
_BOOL_BYTE = {0: 0, 1: 1}  # True/False hash as 1/0; anything else is not a bool field's value


def _fmt(t: Int) -> str:
    c = _INT_FORMAT[t.bits]
    return c if t.signed else c.upper()


class _Gen:
    """Accumulates generated source and the objects it refers to."""

    def __init__(self) -> None:
        self.env: dict[str, Any] = {"_NotFast": _NotFast, "_Mapping": Mapping, "_BOOL": _BOOL_BYTE}
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def bind(self, prefix: str, obj: Any) -> str:
        key = self.name(prefix)
        self.env[key] = obj
        return key


def _is_fixed(t: FieldType) -> bool:
    if isinstance(t, Int | _Bool | Pad | Bits) or type(t) is Bytes:
        return True
    if isinstance(t, Array):
        return _is_fixed(t.elem)
    if isinstance(t, Struct):
        return all(_is_fixed(f.type) for f in t.cls.fields)
    return False


# --- encoding ------------------------------------------------------------------------------------

class _EncRun:
    """The body of an encoder: guard statements, then pack calls for runs and helper calls for
    variable-size fields, in wire order."""

    def __init__(self, gen: _Gen) -> None:
        self.gen = gen
        self.lines: list[str] = []
        self.fmt = ""
        self.exprs: list[str] = []

    def flush(self) -> None:
        if self.fmt:
            s = self.gen.bind("_S", struct.Struct("<" + self.fmt))
            self.lines.append(f"parts.append({s}.pack({', '.join(self.exprs)}))")
            self.fmt, self.exprs = "", []

    def fields(self, fields: tuple[Field, ...], src: str, version: int) -> None:
        for f in fields:
            if f.since > version:
                continue
            self.value(f.type, f"{src}[{f.name!r}]" if f.type.carries_value else "", version)

    def value(self, t: FieldType, expr: str, version: int) -> None:
        g = self.gen
        if isinstance(t, Int):
            self.fmt += _fmt(t)
            self.exprs.append(expr)
        elif isinstance(t, _Bool):
            self.fmt += "B"
            self.exprs.append(f"_BOOL[{expr}]")
        elif isinstance(t, Pad):
            if t.nbytes:
                self.fmt += f"{t.nbytes}x"
        elif type(t) is Bytes:
            helper = g.bind("_bytes", _exact_bytes(t.nbytes))
            self.fmt += f"{t.nbytes}s"
            self.exprs.append(f"{helper}({expr})")
        elif isinstance(t, Bits):
            helper = g.bind("_bits", _bits_packer(t))
            self.fmt += _fmt(t.base)
            self.exprs.append(f"{helper}({expr})")
        elif isinstance(t, Struct):
            local = g.name("s")
            self.lines.append(f"{local} = {expr}")
            self.lines.append(f"if not isinstance({local}, _Mapping): raise _NotFast")
            self.fields(t.cls.fields, local, version)
        elif isinstance(t, Array):
            local = g.name("a")
            self.lines.append(f"{local} = {expr}")
            self.lines.append(f"if not isinstance({local}, (list, tuple)) or len({local}) != {t.count}:"
                              " raise _NotFast")
            for i in range(t.count):
                self.value(t.elem, f"{local}[{i}]", version)
        else:
            # Variable size (List, VarBytes, Str): a helper of its own between two runs.
            self.flush()
            helper = g.bind("_var", _var_encoder(t, version))
            self.lines.append(f"parts.append({helper}({expr}))")


def _exact_bytes(n: int) -> Callable[[Any], bytes]:
    def check(value: Any) -> bytes:
        if type(value) is bytes and len(value) == n:
            return value
        raise _NotFast
    return check


def _bits_packer(t: Bits) -> Callable[[Any], int]:
    def pack(value: Any) -> int:
        try:
            checked = t.check(value, "")
        except ValueError:
            raise _NotFast from None
        packed, shift = 0, 0
        for name, width in t.layout.items():
            packed |= checked[name] << shift
            shift += width
        return packed
    return pack


def _var_encoder(t: FieldType, version: int) -> Encoder:
    if isinstance(t, List):
        item = compile_encoder(t.cls.fields, version, mapping_guard=True)
        count = struct.Struct("<I")
        limit = t.max

        def encode_list(value: Any) -> bytes:
            if not isinstance(value, list | tuple) or len(value) > limit:
                raise _NotFast
            return count.pack(len(value)) + b"".join([item(v) for v in value])
        return encode_list

    def encode_other(value: Any) -> bytes:
        # VarBytes and Str are one value each: their own check and encode are already one call.
        out = bytearray()
        try:
            t.encode(t.check(value, ""), out, version)
        except ValueError:
            raise _NotFast from None
        return bytes(out)
    return encode_other


def compile_encoder(fields: tuple[Field, ...], version: int, *, mapping_guard: bool = False) -> Encoder:
    """`values -> bytes` for `fields` at `version`; raises `_NotFast` (or any error) where the
    interpreted codec must decide."""
    gen = _Gen()
    run = _EncRun(gen)
    if mapping_guard:
        run.lines.append("if not isinstance(v, _Mapping): raise _NotFast")
    run.fields(fields, "v", version)
    run.flush()
    body = "\n    ".join(["parts = []", *run.lines, "return b''.join(parts)"])
    exec(f"def encode(v):\n    {body}\n", gen.env)  # noqa: S102 - source generated above from our own field types
    return gen.env["encode"]  # type: ignore[no-any-return]


# --- decoding ------------------------------------------------------------------------------------

class _DecRun:
    """The body of a decoder: unpack runs into locals, checks, helper calls for variable-size
    fields; the value expression is built from those locals at the end."""

    def __init__(self, gen: _Gen) -> None:
        self.gen = gen
        self.lines: list[str] = []
        self.fmt = ""
        self.targets: list[str] = []
        self.checks: list[str] = []

    def flush(self) -> None:
        if self.fmt:
            s = self.gen.bind("_S", struct.Struct("<" + self.fmt))
            if self.targets:
                self.lines.append(f"({', '.join(self.targets)},) = {s}.unpack_from(data, pos)")
            else:
                self.lines.append(f"{s}.unpack_from(data, pos)")  # bounds check of padding only
            self.lines.append(f"pos += {s}.size")
            self.lines.extend(self.checks)
            self.fmt, self.targets, self.checks = "", [], []

    def fields(self, fields: tuple[Field, ...], version: int) -> str:
        items = []
        for f in fields:
            if f.since > version:
                if f.type.carries_value:
                    items.append(f"{f.name!r}: {self.gen.bind('_default', f.default_value)}()")
                continue
            expr = self.value(f.type, version)
            if f.type.carries_value:
                items.append(f"{f.name!r}: {expr}")
        return "{" + ", ".join(items) + "}"

    def value(self, t: FieldType, version: int) -> str:
        g = self.gen
        if isinstance(t, Int):
            self.fmt += _fmt(t)
            local = g.name("x")
            self.targets.append(local)
            return local
        if isinstance(t, _Bool):
            self.fmt += "B"
            local = g.name("x")
            self.targets.append(local)
            self.checks.append(f"if {local} > 1: raise _NotFast")
            return f"{local} == 1"
        if isinstance(t, Pad):
            if t.nbytes:
                self.fmt += f"{t.nbytes}x"
            return "None"
        if type(t) is Bytes:
            self.fmt += f"{t.nbytes}s"
            local = g.name("x")
            self.targets.append(local)
            return local
        if isinstance(t, Bits):
            self.fmt += _fmt(t.base)
            local = g.name("x")
            self.targets.append(local)
            return f"{g.bind('_bits', _bits_splitter(t))}({local})"
        if isinstance(t, Struct):
            return self.fields(t.cls.fields, version)
        if isinstance(t, Array):
            return "[" + ", ".join(self.value(t.elem, version) for _ in range(t.count)) + "]"
        self.flush()
        local = g.name("v")
        helper = g.bind("_var", _var_decoder(t, version))
        self.lines += ["r.pos = pos", f"{local} = {helper}(r)", "pos = r.pos"]
        return local


def _bits_splitter(t: Bits) -> Callable[[int], dict[str, int]]:
    layout = [(name, shift, (1 << width) - 1) for name, shift, width in _shifts(t)]
    reserved = ~t.used_mask

    def split(packed: int) -> dict[str, int]:
        if packed & reserved:
            raise _NotFast
        return {name: (packed >> shift) & mask for name, shift, mask in layout}
    return split


def _shifts(t: Bits) -> list[tuple[str, int, int]]:
    out, shift = [], 0
    for name, width in t.layout.items():
        out.append((name, shift, width))
        shift += width
    return out


def _var_decoder(t: FieldType, version: int) -> Callable[[Reader], Any]:
    if isinstance(t, List):
        item = compile_decoder(t.cls.fields, version)
        limit, min_size = t.max, t.item.min_size(version)

        def decode_list(r: Reader) -> list[Any]:
            count = r.uint(4, "")
            if count > limit or count * min_size > r.remaining:
                raise _NotFast
            return [item(r) for _ in range(count)]
        return decode_list
    if isinstance(t, VarBytes):  # Str included
        limit = t.max

        def decode_bytes(r: Reader) -> Any:
            nbytes = r.uint(4, "")
            if nbytes > limit:
                raise _NotFast
            raw = r.take(nbytes, "")
            return raw.decode() if isinstance(t, Str) else raw
        return decode_bytes

    def decode_other(r: Reader) -> Any:
        # A field type this module does not know: its own decode, one call like any helper.
        return t.decode(r, version, "")
    return decode_other


def compile_decoder(fields: tuple[Field, ...], version: int) -> Decoder:
    """`Reader -> values` for `fields` at `version`, advancing the reader; raises where the
    interpreted codec must decide (the caller rewinds the reader first)."""
    gen = _Gen()
    run = _DecRun(gen)
    result = run.fields(fields, version)
    run.flush()
    body = "\n    ".join(["data = r.data", "pos = r.pos", *run.lines, "r.pos = pos", f"return {result}"])
    exec(f"def decode(r):\n    {body}\n", gen.env)  # noqa: S102 - source generated above from our own field types
    return gen.env["decode"]  # type: ignore[no-any-return]


# --- per class and version -----------------------------------------------------------------------

# Per class (weakly: classes built at run time from descriptions, vmstate/dynamic.py, must not be
# kept alive by their codecs), then per version.
_codecs: weakref.WeakKeyDictionary[type, dict[int, tuple[Encoder, Decoder]]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def codec(cls: Any, version: int) -> tuple[Encoder, Decoder]:
    """The compiled (encoder, decoder) of `cls`'s own fields at `version`, built on first use."""
    per_version = _codecs.get(cls)
    found = per_version.get(version) if per_version is not None else None
    if found is None:
        with _lock:
            per_version = _codecs.setdefault(cls, {})
            found = per_version.get(version)
            if found is None:
                found = (compile_encoder(cls.fields, version), compile_decoder(cls.fields, version))
                per_version[version] = found
    return found


def is_built(cls: Any, version: int) -> bool:
    """Has `codec(cls, version)` been built already?"""
    return version in _codecs.get(cls, {})


def warm(cls: Any, versions: range | None = None) -> None:
    """Build `cls`'s codecs for `versions` (default: every version it reads) and its
    subsections' at their one version, so no codec is built during a downtime."""
    for v in versions if versions is not None else range(cls.minimum_version, cls.version + 1):
        codec(cls, v)
    for sub in getattr(cls, "subsections", ()):
        warm(sub, range(sub.version, sub.version + 1))


def encode_fields(cls: Any, values: Any, version: int) -> bytes:
    """`cls`'s fields of `values` at `version`, exactly as the interpreted codec writes them
    (and, for bad values, the interpreted codec's ValueError)."""
    try:
        return codec(cls, version)[0](values)
    except Exception:  # noqa: BLE001 - any surprise: the interpreted codec decides
        out = bytearray()
        _encode_interpreted(cls.fields, values, out, version)
        return bytes(out)


def decode_fields(cls: Any, r: Reader, version: int) -> dict[str, Any]:
    """`cls`'s fields at `version` from `r`, exactly as the interpreted codec reads them (and,
    for a malformed payload, the interpreted codec's StateLoadError naming the field)."""
    start = r.pos
    try:
        return codec(cls, version)[1](r)
    except Exception:  # noqa: BLE001 - any surprise: the interpreted codec decides
        r.pos = start
        return _decode_interpreted(cls.fields, r, version)

