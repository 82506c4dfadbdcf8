"""The description-driven field encoding of device sections."""

from __future__ import annotations

import pytest

from vmferry.errors import StreamError
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
