"""A device split in two: a release-1 stream (committed fixture) loads onto release 2's two devices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmferry.errors import StateLoadError
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
