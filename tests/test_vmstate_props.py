"""Property tests: random VMState classes × random values round-trip, the description-driven decoder
(stream/sections.py) agrees with the class-based one, and corrupt or truncated payloads only ever
raise StateLoadError (StreamError from the stream's decoder)."""

from __future__ import annotations

import contextlib
import itertools
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmferry.errors import StateLoadError, StreamError
from vmferry.stream.sections import decode_section
from vmferry.vmstate import (
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Array,
    Bits,
    Bool,
    Bytes,
    FieldType,
    List,
    Pad,
    Section,
    Str,
    Struct,
    VarBytes,
    VMState,
    field,
)
from vmferry.vmstate.state import jsonable

_names = itertools.count()
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def bits_types(draw) -> Bits:
    base = draw(st.sampled_from([U8, U16, U32, U64]))
    widths = draw(st.lists(st.integers(1, 8), min_size=1, max_size=4))
    widths = [w for w in widths if w <= base.bits][: base.bits // 8]
    return Bits(base, {f"b{i}": w for i, w in enumerate(widths or [1])})


LEAVES = st.one_of(
    st.sampled_from([U8, U16, U32, U64, I8, I16, I32, I64, Bool]),
    st.integers(0, 6).map(Bytes),
    st.integers(0, 12).map(lambda m: VarBytes(max=m)),
    st.integers(0, 12).map(lambda m: Str(max=m)),
    bits_types(),
)


@st.composite
def field_types(draw, version: int, depth: int) -> FieldType:
    kinds = ["leaf", "leaf", "pad", "array", "struct", "list"] if depth < 2 else ["leaf"]
    kind = draw(st.sampled_from(kinds))
    if kind == "leaf":
        return draw(LEAVES)
    if kind == "pad":
        return Pad(draw(st.integers(0, 4)))
    if kind == "array":
        elem = draw(st.one_of(LEAVES, st.builds(Struct, classes(version=version, depth=depth + 1))))
        return Array(elem, draw(st.integers(0, 3)))
    nested = draw(classes(version=version, depth=depth + 1))
    return Struct(nested) if kind == "struct" else List(nested, max=draw(st.integers(0, 3)))


@st.composite
def classes(draw, version: int | None = None, depth: int = 0, subsections: bool = False) -> type[VMState]:
    """A random VMState class. Nested ones share their section's version numbering."""
    v = version or draw(st.integers(1, 4))
    ns: dict[str, Any] = {
        "name": f"s{next(_names)}",
        "version": v,
        "minimum_version": draw(st.integers(1, v)),
        "__annotations__": {},
        "__module__": __name__,
    }
    for i in range(draw(st.integers(0, 5))):
        ns["__annotations__"][f"f{i}"] = draw(field_types(v, depth))
        ns[f"f{i}"] = field(since=draw(st.integers(0, v)))
    if subsections:
        ns["subsections"] = tuple(draw(st.lists(classes(depth=depth + 1), max_size=2)))
    return type(ns["name"], (VMState,), ns)


def values_for(t: FieldType) -> st.SearchStrategy[Any]:
    if isinstance(t, Bits):
        return st.fixed_dictionaries({n: st.integers(0, (1 << w) - 1) for n, w in t.layout.items()})
    if hasattr(t, "lo"):
        return st.integers(t.lo, t.hi)
    if t is Bool:
        return st.booleans()
    if isinstance(t, Pad):
        return st.none()
    if isinstance(t, Bytes):
        return st.binary(min_size=t.nbytes, max_size=t.nbytes)
    if isinstance(t, Str):
        return st.text(max_size=t.max).filter(lambda s: len(s.encode()) <= t.max)
    if isinstance(t, VarBytes):
        return st.binary(max_size=t.max)
    if isinstance(t, Array):
        return st.lists(values_for(t.elem), min_size=t.count, max_size=t.count)
    if isinstance(t, Struct):
        return fields_of(t.cls)
    assert isinstance(t, List)
    return st.lists(fields_of(t.cls), max_size=t.max)


def fields_of(cls: type[VMState]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({f.name: values_for(f.type) for f in cls.fields if f.type.carries_value})


@st.composite
def sections(draw, cls: type[VMState], version: int | None = None) -> Section:
    v = version or draw(st.integers(cls.minimum_version, cls.version))
    subs = {s.name: draw(sections(s, s.version)) for s in cls.subsections if draw(st.booleans())}
    return Section(cls.name, v, draw(fields_of(cls)), subs)


@st.composite
def class_and_section(draw):
    cls = draw(classes(subsections=True))
    return cls, draw(sections(cls))


def expected(fields, values: dict[str, Any], v: int, carried_only: bool) -> dict[str, Any]:
    """What decoding a stream of version `v` yields: fields the stream does not carry get their
    default (class decoder) or are absent (generic decoder, `carried_only`)."""
    out = {}
    for f in fields:
        if not f.type.carries_value or (carried_only and f.since > v):
            continue
        out[f.name] = f.default_value() if f.since > v else project(f.type, values[f.name], v, carried_only)
    return out


def project(t: FieldType, value: Any, v: int, carried_only: bool) -> Any:
    if isinstance(t, Struct):
        return expected(t.cls.fields, value, v, carried_only)
    if isinstance(t, List):
        return [expected(t.cls.fields, x, v, carried_only) for x in value]
    if isinstance(t, Array):
        return [project(t.elem, x, v, carried_only) for x in value]
    return bytes(value) if isinstance(value, bytes | bytearray) else value


def expected_section(cls, sec: Section, carried_only: bool) -> dict[str, Any]:
    subs = {s.name: expected_section(s, sec.subsections[s.name], carried_only)
            for s in cls.subsections if s.name in sec.subsections}
    return {"name": sec.name, "version": sec.version,
            "fields": expected(cls.fields, sec.fields, sec.version, carried_only), "subsections": subs}


def by_description(description: Any, payload: bytes) -> dict[str, Any]:
    """What the description-driven decoder (stream/sections.py) reads, as JSON."""
    return decode_section(description, payload).to_json()


def unnamed(section: dict[str, Any]) -> dict[str, Any]:
    """A vmstate Section's JSON without name and version (the description carries those)."""
    return {"fields": section["fields"],
            "subsections": {n: unnamed(s) for n, s in section["subsections"].items()}}


def as_plain(sec: Section) -> dict[str, Any]:
    return {"name": sec.name, "version": sec.version, "fields": sec.fields,
            "subsections": {n: as_plain(s) for n, s in sec.subsections.items()}}


@SETTINGS
@given(class_and_section())
def test_round_trip_random_classes_and_values(case):
    cls, sec = case
    payload = cls.encode(sec)
    decoded = cls.decode(payload, version=sec.version)
    assert as_plain(decoded) == expected_section(cls, sec, carried_only=False)
    # Deterministic: re-encoding the decoded values gives the same bytes.
    assert cls.encode(decoded) == payload


@SETTINGS
@given(class_and_section())
def test_the_description_driven_decoder_agrees_with_the_class(case):
    cls, sec = case
    payload = cls.encode(sec)
    description = json.loads(json.dumps(cls.stream_description(sec.version)))  # as the stream carries it
    generic = by_description(description, payload)
    assert generic == unnamed(jsonable(expected_section(cls, sec, carried_only=True)))
    if sec.version == cls.version:
        assert generic == unnamed(cls.decode(payload).to_json())


@SETTINGS
@given(class_and_section(), st.data())
def test_truncated_payloads_are_refused(case, data):
    cls, sec = case
    payload = cls.encode(sec)
    cut = data.draw(st.integers(0, len(payload) - 1))
    for decode in (lambda p: cls.decode(p, version=sec.version),
                   lambda p: decode_section(cls.stream_description(sec.version), p)):
        try:
            decode(payload[:cut])
        except (StateLoadError, StreamError):
            continue
        raise AssertionError(f"a payload truncated to {cut} of {len(payload)} bytes decoded")


@SETTINGS
@given(class_and_section(), st.data())
def test_corrupt_payloads_raise_only_state_load_error(case, data):
    cls, sec = case
    payload = bytearray(cls.encode(sec))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(payload)))
        if op == "insert":
            payload[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif pos < len(payload):
            if op == "flip":
                payload[pos] ^= data.draw(st.integers(1, 255))
            else:
                del payload[pos]
    with contextlib.suppress(StateLoadError):  # decoding is fine too: a flip can be valid
        cls.decode(bytes(payload), version=sec.version)
    with contextlib.suppress(StreamError):  # the stream's decoder raises the stream's error
        decode_section(cls.stream_description(sec.version), bytes(payload))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 70) | st.sampled_from(
        ["u8", "i64", "bool", "bytes", "vbytes", "str", "struct", "list", "name", "x"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "version", "fields", "subsections", "type", "size", "count", "bits",
                         "width", "max", "pad", "version_id", "field", "Description"]), inner, max_size=6),
    max_leaves=30,
)


@SETTINGS
@given(JSON, st.binary(max_size=64))
def test_the_description_driven_decoder_survives_hostile_descriptions(description, payload):
    try:
        result = decode_section(description, payload)
    except StreamError:
        return
    assert isinstance(result.fields, dict)
