"""A device split in two: a release-1 stream (committed fixture) loads onto release 2's two devices,
and release 2 on the old machine type sends what release 1 sent (backward migration), both also
through the stream codec. No vmferry release's machine type carries this device, so it cannot go
through the release matrix (docs/vmstate.md, "The split device and the releases")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmferry.errors import StateLoadError
from vmferry.stream import StreamDecoder, StreamEncoder
from vmferry.stream.records import Description, DeviceSection, SectionPhase
from vmferry.stream.sections import decode_section
from vmferry.vmstate import registry, testdev

FIXTURES = Path(__file__).parent / "fixtures"
PAYLOAD = (FIXTURES / "testdev-v1.bin").read_bytes()
DESCRIPTION = json.loads((FIXTURES / "testdev-v1.description.json").read_text())


def release2() -> tuple[registry.Registry, dict[str, object]]:
    reg = registry.Registry()
    testdev.register_testdev(reg)
    return reg, {"testdev-front": testdev.TestDevFront(), "testdev-back": testdev.TestDevBack()}


def test_release1_stream_loads_onto_the_split_devices():
    reg, devices = release2()
    entry = reg.lookup("testdev-2", DESCRIPTION["name"])  # as the destination's loader finds it
    assert entry is not None and entry.load_only
    entry.cls.load(devices, PAYLOAD, description=DESCRIPTION)
    front, back = devices["testdev-front"], devices["testdev-back"]
    assert (front.a, front.b, front.ready) == (0xDEADBEEF, 0x1234, True)  # ready: front's post_load ran
    assert (back.c, back.d) == ([1, 2, 3, 4], b"vmferry!")


def test_release2_sections_round_trip_on_their_own():
    _, devices = release2()
    front = devices["testdev-front"]
    front.a, front.b = 5, 6
    dst = testdev.TestDevFront()
    testdev.TestDevFrontState.load(dst, testdev.TestDevFrontState.save(front))
    assert (dst.a, dst.b, dst.ready) == (5, 6, True)


def test_a_bad_release1_stream_touches_neither_device():
    _, devices = release2()
    with pytest.raises(StateLoadError) as e:
        testdev.TestDevV1State.load(devices, PAYLOAD[:-1], description=DESCRIPTION)
    assert e.value.section == "testdev"
    assert vars(devices["testdev-front"]) == vars(testdev.TestDevFront())
    assert vars(devices["testdev-back"]) == vars(testdev.TestDevBack())


def test_the_retired_declaration_still_produces_the_fixture():
    # The fixture was written once by release 1; if this fails, the retired class drifted from
    # what release 1 sent (fix the class, never regenerate the fixture).
    old = testdev.TestDev(a=0xDEADBEEF, b=0x1234, c=[1, 2, 3, 4], d=b"vmferry!")
    assert testdev.TestDevV1State.save(old) == PAYLOAD
    assert testdev.TestDevV1State.stream_description() == DESCRIPTION


def test_the_fixture_reads_without_classes():
    assert decode_section(DESCRIPTION, PAYLOAD).fields == {
        "a": 0xDEADBEEF, "b": 0x1234, "c": [1, 2, 3, 4], "d": b"vmferry!"}


def _fixture_values_on_split_devices() -> dict[str, object]:
    _, devices = release2()
    front, back = devices["testdev-front"], devices["testdev-back"]
    front.a, front.b = 0xDEADBEEF, 0x1234  # type: ignore[attr-defined]
    back.c, back.d = [1, 2, 3, 4], b"vmferry!"  # type: ignore[attr-defined]
    return devices


def test_release2_on_the_old_machine_type_sends_what_release1_sent():
    # Backward: the split devices, on machine type testdev-1, send the single old section, byte
    # for byte the committed release-1 payload, under release 1's description.
    reg, _ = release2()
    entry = reg.lookup("testdev-1", "testdev")
    assert entry is not None and not entry.load_only
    devices = _fixture_values_on_split_devices()
    assert entry.cls.save(devices, version=entry.version) == PAYLOAD
    assert entry.cls.stream_description(entry.version) == DESCRIPTION


def _through_a_stream(payload: bytes, machine: str) -> tuple[dict, bytes]:
    """One section in a whole vmferry stream (header, DESCRIPTION, SECTION_FULL, END), then
    decoded back by the stream decoder: -> (its description entry, its payload)."""
    enc = StreamEncoder(machine_type=machine)
    desc = Description.from_schemas([{"id": 1, "instance": 0, **DESCRIPTION}])
    head = enc.header() + enc.encode(desc)  # in stream order: each record extends the running digest
    data = head + enc.encode(DeviceSection(1, SectionPhase.FULL, payload)) + enc.end()
    dec = StreamDecoder()
    dec.feed(data)
    dec.feed_eof()
    records = list(dec.records())
    (got_desc,) = [r for r in records if isinstance(r, Description)]
    (section,) = [r for r in records if isinstance(r, DeviceSection)]
    return dict(got_desc.sections[0].schema), section.data


def test_the_split_migrates_both_ways_through_the_stream():
    # Release 1 -> release 2: the old device's stream loads onto the two new devices.
    old = testdev.TestDev(a=7, b=8, c=[9, 10, 11, 12], d=b"12345678")
    schema, payload = _through_a_stream(testdev.TestDevV1State.save(old), "testdev-1")
    _, devices = release2()
    testdev.TestDevV1State.load(devices, payload, description=schema)
    front, back = devices["testdev-front"], devices["testdev-back"]
    assert (front.a, front.b, front.ready, back.c, back.d) == (7, 8, True, [9, 10, 11, 12], b"12345678")
    # Release 2 (old machine type) -> release 1: the two devices' state loads onto the old device.
    front.a, back.d = 70, b"87654321"
    schema, payload = _through_a_stream(testdev.TestDevV1State.save(devices), "testdev-1")
    back_in_release1 = testdev.TestDev()
    testdev.TestDevV1State.load(back_in_release1, payload, description=schema)
    assert vars(back_in_release1) == {"a": 70, "b": 8, "c": [9, 10, 11, 12], "d": b"87654321"}
