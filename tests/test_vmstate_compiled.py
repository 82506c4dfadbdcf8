"""The compiled field codecs (vmstate/compiled.py) against the interpreted one, which defines the
wire format: for every device's state description (sections, subsections, nested structures)
and the test device, at every version each reads, the compiled encoder gives the same bytes and
the compiled decoder the same values; on corrupt payloads and bad values the compiled path
either agrees or steps aside, and the public entry points then raise the interpreted errors.
The ctypes copiers of devices/kstruct.py are checked against their per-field reference too."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmferry.devices.cpu
import vmferry.devices.debug_exit
import vmferry.devices.irqchip
import vmferry.devices.pit
import vmferry.devices.serial
import vmferry.devices.virtio_blk
import vmferry.devices.virtio_mmio
import vmferry.vmstate.testdev  # noqa: F401 - imported for its VMState classes
from vmferry.devices import kstruct
from vmferry.errors import StateLoadError
from vmferry.kvm import structs
from vmferry.vmstate import compiled
from vmferry.vmstate.compound import Array, Bits, List, Struct
from vmferry.vmstate.fields import (
    Bytes,
    FieldType,
    Int,
    Pad,
    Reader,
    Str,
    VarBytes,
    _Bool,
    decode_fields,
    encode_fields,
)
from vmferry.vmstate.state import VMState


def _all_classes() -> list[type[VMState]]:
    found: list[type[VMState]] = []
    todo = list(VMState.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("vmferry.") and cls not in found:
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: (c.__module__, c.__name__))


CLASSES = _all_classes()
CASES = [(cls, v) for cls in CLASSES for v in range(cls.minimum_version, cls.version + 1)]


def test_every_device_module_contributes_classes() -> None:
    modules = {cls.__module__ for cls in CLASSES}
    for name in ("cpu", "irqchip", "pit", "serial", "debug_exit", "virtio_mmio"):
        assert f"vmferry.devices.{name}" in modules
    assert "vmferry.vmstate.testdev" in modules


def values_of(t: FieldType) -> st.SearchStrategy[Any]:
    if isinstance(t, Int):
        return st.integers(t.lo, t.hi)
    if isinstance(t, _Bool):
        return st.booleans()
    if isinstance(t, Str):
        return st.text(max_size=min(t.max, 12)).filter(lambda s: len(s.encode()) <= t.max)
    if isinstance(t, VarBytes):
        return st.binary(max_size=min(t.max, 40))
    if isinstance(t, Bytes):
        return st.binary(min_size=t.nbytes, max_size=t.nbytes)
    if isinstance(t, Bits):
        return st.fixed_dictionaries({n: st.integers(0, (1 << w) - 1) for n, w in t.layout.items()})
    if isinstance(t, Struct):
        return fields_values(t.cls)
    if isinstance(t, Array):
        return st.lists(values_of(t.elem), min_size=t.count, max_size=t.count)
    if isinstance(t, List):
        return st.lists(fields_values(t.cls), max_size=min(t.max, 4))
    assert isinstance(t, Pad)
    return st.none()


def fields_values(cls: Any) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({f.name: values_of(f.type) for f in cls.fields if f.type.carries_value})


def interpreted_bytes(cls: Any, values: dict[str, Any], version: int) -> bytes:
    out = bytearray()
    encode_fields(cls.fields, values, out, version)
    return bytes(out)


SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize(("cls", "version"), CASES, ids=[f"{c.__name__}-v{v}" for c, v in CASES])
@SETTINGS
@given(data=st.data())
def test_compiled_equals_interpreted_both_ways(cls: Any, version: int, data: st.DataObject) -> None:
    values = data.draw(fields_values(cls))
    encoder, decoder = compiled.codec(cls, version)
    wire = interpreted_bytes(cls, values, version)
    # The compiled path itself, not the public entry point that could fall back and hide a miss.
    assert encoder(values) == wire
    r1, r2 = Reader(wire, cls.name), Reader(wire, cls.name)
    assert decoder(r1) == decode_fields(cls.fields, r2, version)
    assert r1.pos == r2.pos == len(wire)


@pytest.mark.parametrize(("cls", "version"), CASES, ids=[f"{c.__name__}-v{v}" for c, v in CASES])
@SETTINGS
@given(data=st.data())
def test_corrupt_payloads_decode_alike_or_fall_back(cls: Any, version: int, data: st.DataObject) -> None:
    wire = bytearray(interpreted_bytes(cls, data.draw(fields_values(cls)), version))
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "random"]))
    if how == "flip" and wire:
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        del wire[data.draw(st.integers(0, len(wire))):]
    elif how == "extend":
        wire += data.draw(st.binary(min_size=1, max_size=8))
    else:
        wire = bytearray(data.draw(st.binary(max_size=len(wire) + 8)))
    try:
        expected: Any = decode_fields(cls.fields, Reader(wire, cls.name), version)
    except StateLoadError as e:
        expected = e
    raw = Reader(wire, cls.name)
    try:
        got = compiled.codec(cls, version)[1](raw)
    except Exception:  # noqa: BLE001 - the compiled path may step aside on anything
        got = None
    if got is not None:
        # When the compiled decoder accepts, the interpreted one must accept the same.
        assert got == expected
    public = Reader(wire, cls.name)
    if isinstance(expected, StateLoadError):
        with pytest.raises(StateLoadError) as caught:
            compiled.decode_fields(cls, public, version)
        assert str(caught.value) == str(expected)
    else:
        assert compiled.decode_fields(cls, public, version) == expected


def _first_value_path(cls: Any, values: dict[str, Any]) -> str | None:
    for f in cls.fields:
        if f.type.carries_value and isinstance(f.type, Int | _Bool | Bytes):
            return f.name
    return None


@pytest.mark.parametrize(("cls", "version"), CASES, ids=[f"{c.__name__}-v{v}" for c, v in CASES])
@SETTINGS
@given(data=st.data())
def test_bad_values_get_the_interpreted_error(cls: Any, version: int, data: st.DataObject) -> None:
    values = data.draw(fields_values(cls))
    carried = [f for f in cls.fields if f.type.carries_value and f.since <= version]
    if not carried:
        return
    f = data.draw(st.sampled_from(carried))
    bad = data.draw(st.sampled_from(["missing", "none", "huge", "text", "two"]))
    if bad == "missing":
        del values[f.name]
    else:
        values[f.name] = {"none": None, "huge": 1 << 70, "text": "x", "two": 2}[bad]
    try:
        expected: Any = interpreted_bytes(cls, values, version)
    except (ValueError, TypeError) as e:
        expected = e
    if isinstance(expected, Exception):
        with pytest.raises(type(expected)) as caught:
            compiled.encode_fields(cls, values, version)
        assert str(caught.value) == str(expected)
    else:
        assert compiled.encode_fields(cls, values, version) == expected


def test_warm_builds_every_version_and_subsection() -> None:
    from vmferry.devices.serial import SerialState

    compiled.warm(SerialState)
    for v in range(SerialState.minimum_version, SerialState.version + 1):
        assert compiled.is_built(SerialState, v)
    for sub in SerialState.subsections:
        assert compiled.is_built(sub, sub.version)


KSTRUCT_PAIRS = [
    (structs.KvmRegs, vmferry.devices.cpu.CpuRegs),
    (structs.KvmSregs, vmferry.devices.cpu.CpuSregs),
]


@pytest.mark.parametrize(("ctype", "state"), KSTRUCT_PAIRS, ids=[p[1].__name__ for p in KSTRUCT_PAIRS])
@SETTINGS
@given(data=st.data())
def test_kstruct_copiers_equal_the_per_field_copy(ctype: Any, state: Any, data: st.DataObject) -> None:
    values = data.draw(fields_values(state))
    a, b = ctype(), ctype()
    kstruct.fill(a, state, values)
    kstruct.write_fields(b, state, values)
    assert ctypes.string_at(ctypes.addressof(a), ctypes.sizeof(a)) == \
        ctypes.string_at(ctypes.addressof(b), ctypes.sizeof(b))
    assert kstruct.to_values(a, state) == kstruct.read_fields(a, state) == values
