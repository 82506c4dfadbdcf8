"""The description-driven field encoding of device sections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmferry.devices.serial import SerialState
from vmferry.errors import StateLoadError, StreamError
from vmferry.stream.sections import SectionValue, decode_section, encode_section
from vmferry.stream.testing import SERIAL, SERIAL_VALUE


def test_round_trip_with_subsection_list_and_arrays() -> None:
    payload = encode_section(SERIAL, SERIAL_VALUE)
    assert decode_section(SERIAL, payload) == SERIAL_VALUE


def test_absent_subsection_costs_two_bytes_and_is_stated_not_guessed() -> None:
    value = SectionValue(dict(SERIAL_VALUE.fields))
    payload = encode_section(SERIAL, value)
    assert payload.endswith(b"\x00\x00")
    assert decode_section(SERIAL, payload).subsections == {}


def test_short_payload_names_the_field() -> None:
    payload = encode_section(SERIAL, SERIAL_VALUE)
    with pytest.raises(StreamError, match="field 'regs': 4 elements cannot fit in the 6 bytes left"):
        decode_section(SERIAL, payload[:9])


def test_leftover_bytes_are_an_error() -> None:
    with pytest.raises(StreamError, match="1 bytes left over after the section"):
        decode_section(SERIAL, encode_section(SERIAL, SERIAL_VALUE) + b"\0")


def test_bad_bool() -> None:
    schema = {"name": "x", "fields": [{"name": "on", "type": "bool"}], "subsections": []}
    with pytest.raises(StreamError, match="field 'on': bool byte is 2, not 0 or 1"):
        decode_section(schema, b"\x02\x00\x00")


def test_huge_list_count_is_refused_without_looping() -> None:
    schema = {"name": "x", "fields": [{"name": "l", "type": "list", "fields": []}], "subsections": []}
    with pytest.raises(StreamError, match="field 'l': 4294967295 elements cannot fit"):
        decode_section(schema, b"\xff\xff\xff\xff\x00\x00")


def test_unknown_subsection_index() -> None:
    payload = encode_section(SERIAL, SectionValue(dict(SERIAL_VALUE.fields)))[:-2] + b"\x01\x00\x05\x00"
    with pytest.raises(StreamError, match="subsection index 5 is out of order or not in the description"):
        decode_section(SERIAL, payload)


def test_bit_fields_and_padding_round_trip() -> None:
    schema = {"name": "x", "subsections": [], "fields": [
        {"name": "flags", "type": "u8", "bits": [{"name": "a", "width": 1}, {"name": "b", "width": 3}]},
        {"name": "gap", "type": "bytes", "size": 2, "pad": True},
        {"name": "n", "type": "u16"}]}
    value = SectionValue({"flags": {"a": 1, "b": 5}, "n": 7})
    payload = encode_section(schema, value)
    assert payload == b"\x0b\x00\x00\x07\x00\x00\x00"
    assert decode_section(schema, payload) == value  # padding is not a value


def test_reserved_bits_are_refused() -> None:
    schema = {"name": "x", "subsections": [],
              "fields": [{"name": "flags", "type": "u8", "bits": [{"name": "a", "width": 1}]}]}
    with pytest.raises(StreamError, match="field 'flags': reserved bits set in 0x2"):
        decode_section(schema, b"\x02\x00\x00")


@pytest.mark.parametrize("schema", [
    {"name": "x", "fields": 0, "subsections": []},
    {"name": "x", "fields": [1], "subsections": []},
    {"name": "x", "fields": [{"type": "u8"}], "subsections": []},
    {"name": "x", "fields": [{"name": ["a"], "type": "u8"}], "subsections": []},
    {"name": "x", "fields": [{"name": "s", "type": "struct", "fields": 5}], "subsections": []},
    {"name": "x", "fields": [{"name": "l", "type": "list", "fields": [None]}], "subsections": []},
    {"name": "x", "fields": [], "subsections": None},
    {"name": "x", "fields": [], "subsections": [7]},
    {"name": "x", "fields": [], "subsections": [{"fields": []}]},
])
def test_a_malformed_description_is_a_stream_error(schema: dict) -> None:
    # Found by tests/fuzz/fuzz_vmstate.py: the description comes from the stream too, and a
    # wrongly shaped one raised TypeError/AttributeError instead of a StreamError.
    with pytest.raises(StreamError, match="malformed description"):
        decode_section(schema, b"\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00")


AMPLIFYING = Path(__file__).parent / "fuzz" / "regressions" / "vmstate" / "empty-struct-list-amplification"


def _regression_input() -> tuple[dict, bytes]:
    # A fuzz_vmstate.py input in its JSON mode: two mode bytes, the description, NUL, the payload.
    text, _, payload = AMPLIFYING.read_bytes()[2:].partition(b"\0")
    return json.loads(text), payload


@pytest.mark.parametrize(("schema", "payload"), [
    # Found by tests/fuzz/fuzz_vmstate.py: a list whose elements are 8 nested structs without
    # fields takes no payload bytes per element: 12 bytes asked for ~28,000 x 9 field visits.
    _regression_input(),
    # Counted empty structs inside counted structs: 2 payload bytes, 65536 x 65536 visits.
    ({"name": "x", "subsections": [], "fields": [{"name": "a", "type": "struct", "count": 65536, "fields": [
        {"name": "b", "type": "struct", "count": 65536, "fields": []}]}]}, b"\0\0"),
    # Lists of lists of empty structs: each 4-byte inner count buys 65536 elements.
    ({"name": "x", "subsections": [], "fields": [{"name": "l", "type": "list", "fields": [
        {"name": "m", "type": "list", "fields": []}]}]},
     (100).to_bytes(4, "little") + (65536).to_bytes(4, "little") * 100 + b"\0\0"),
])
def test_a_description_cannot_make_a_few_bytes_cost_unbounded_work(schema: dict, payload: bytes) -> None:
    # Before the work budget these took from seconds to hours; now each stops at the budget
    # (max(4096, 64 x payload bytes) visits), a StreamError naming the section and the field.
    with pytest.raises(StreamError, match=r"field visits to decode .*\(at section '") as e:
        decode_section(schema, payload)
    assert f"this {len(payload)}-byte payload" in str(e.value)


def test_the_work_budget_leaves_dense_real_sections_alone() -> None:
    # The densest real layouts cost about 3 visits per payload byte: a long list of one-byte
    # structs and a long array of bytes each decode in full.
    schema = {"name": "x", "subsections": [], "fields": [
        {"name": "l", "type": "list", "fields": [{"name": "b", "type": "bool"}]},
        {"name": "a", "type": "u8", "count": 50_000},
        {"name": "e", "type": "struct", "count": 1000, "fields": []}]}
    value = SectionValue({"l": [{"b": True}] * 50_000, "a": [7] * 50_000, "e": [{}] * 1000})
    assert decode_section(schema, encode_section(schema, value)) == value


def test_the_class_decoder_is_not_driven_by_the_description() -> None:
    # VMState.decode walks its class's fields (lists bounded by the class's max), and refuses a
    # description that does not match its layout before reading anything: the amplifying
    # description is a layout mismatch, not work.
    schema, payload = _regression_input()
    with pytest.raises(StateLoadError, match=f"section '{SerialState.name}'"):
        SerialState.decode(payload, description={**schema, "name": SerialState.name})
