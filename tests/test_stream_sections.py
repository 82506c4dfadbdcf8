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
    with pytest.raises(StreamError, match=r"field 'serial\.regs\[1\]': needs 4 bytes, 2 left"):
        decode_section(SERIAL, payload[:9])


def test_leftover_bytes_are_an_error() -> None:
    with pytest.raises(StreamError, match="1 bytes left over after the section's fields"):
        decode_section(SERIAL, encode_section(SERIAL, SERIAL_VALUE) + b"\0")


def test_bad_bool() -> None:
    schema = {"name": "x", "fields": [{"name": "on", "type": "bool"}], "subsections": []}
    with pytest.raises(StreamError, match="field 'x.on': bool is 2, not 0 or 1"):
        decode_section(schema, b"\x02\x00\x00")


def test_huge_list_count_is_refused_without_looping() -> None:
    schema = {"name": "x", "fields": [{"name": "l", "type": "list", "fields": []}], "subsections": []}
    with pytest.raises(StreamError, match="field 'x.l': bad count 4294967295"):
        decode_section(schema, b"\xff\xff\xff\xff\x00\x00")


def test_unknown_subsection_index() -> None:
    payload = encode_section(SERIAL, SectionValue(dict(SERIAL_VALUE.fields)))[:-2] + b"\x01\x00\x05\x00"
    with pytest.raises(StreamError, match="subsection index 5 out of order or not in the description"):
        decode_section(SERIAL, payload)


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
    with pytest.raises(StreamError, match="is not a list of named entries"):
        decode_section(schema, b"\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00")
