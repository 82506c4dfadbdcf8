"""Migration parameters and capabilities: QMP names, 7.2 defaults, validation, atomic updates."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from vmferry.errors import QmpError
from vmferry.migration.params import (
    CAPABILITIES,
    CAPABILITY_DOCS,
    PARAMETER_SPECS,
    MigrationCapabilities,
    MigrationParameters,
)


def test_every_field_has_a_spec_and_back() -> None:
    fields = [f.name for f in dataclasses.fields(MigrationParameters) if f.init]
    assert fields == [s.py_name for s in PARAMETER_SPECS]
    assert set(CAPABILITY_DOCS) == set(CAPABILITIES)


def test_qemu_7_2_defaults_but_unlimited_bandwidth() -> None:
    q = MigrationParameters().to_qmp()
    expected = {
        "max-bandwidth": 0,
        "downtime-limit": 300,
        "multifd-channels": 2,
        "multifd-compression": "none",
        "multifd-zstd-level": 1,
        "xbzrle-cache-size": 67108864,
        "cpu-throttle-initial": 20,
        "cpu-throttle-increment": 10,
        "max-cpu-throttle": 99,
        "throttle-trigger-threshold": 50,
        "cpu-throttle-tailslow": False,
        "max-postcopy-bandwidth": 0,
        "tls-creds": "",
        "tls-hostname": "",
        "tls-authz": "",
        "x-checkpoint-delay": 20000,
        "announce-initial": 50,
        "announce-max": 550,
        "announce-rounds": 5,
        "announce-step": 100,
    }
    assert {k: q[k] for k in expected} == expected


def test_round_trip_through_qmp_names() -> None:
    p = MigrationParameters.from_qmp(
        {"max-bandwidth": 10, "tls-creds": "tls0", "multifd-compression": "zlib"}
    )
    assert (p.max_bandwidth, p.tls_creds, p.multifd_compression) == (10, "tls0", "zlib")
    assert MigrationParameters.from_qmp(p.to_qmp()) == p


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"downtime-limit": 2_000_001},
            "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 ms",
        ),
        ({"max-bandwidth": -1}, "Parameter 'max-bandwidth' expects an integer in the range of 0 to"),
        ({"max-postcopy-bandwidth": -5}, "Parameter 'max-postcopy-bandwidth' expects"),
        ({"multifd-channels": 0}, "Parameter 'multifd-channels' expects a value between 1 and 255"),
        (
            {"cpu-throttle-initial": 100},
            "Parameter 'cpu-throttle-initial' expects an integer in the range of 1 to 99",
        ),
        ({"multifd-zstd-level": 21}, "Parameter 'multifd-zstd-level' expects a value between 0 and 20"),
        ({"xbzrle-cache-size": 65536 + 1}, "Parameter 'xbzrle-cache-size' expects a power of two"),
        ({"multifd-compression": "lzma"}, "Parameter 'multifd-compression' does not accept value 'lzma'"),
        ({"downtime-limit": True}, "Invalid parameter type for 'downtime-limit', expected: integer"),
        (
            {"cpu-throttle-tailslow": 1},
            "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean",
        ),
        ({"warp-speed": 9}, "Parameter 'warp-speed' is unexpected"),
    ],
)
def test_invalid_values_are_refused_naming_the_parameter(changes: dict, message: str) -> None:
    p = MigrationParameters()
    with pytest.raises(QmpError, match="^" + message.replace("(", r"\(")) as info:
        p.apply({"downtime-limit": 1000, **changes} if "downtime-limit" not in changes else changes)
    assert info.value.qmp_class == "GenericError"
    assert p == MigrationParameters()  # all or nothing: the valid change was not applied either


def test_null_tls_string_means_off() -> None:
    p = MigrationParameters.from_qmp({"tls-creds": "x"})
    p.apply({"tls-creds": None})
    assert p.tls_creds == ""


def test_readers_never_see_half_an_update() -> None:
    p = MigrationParameters()
    a = {"max-bandwidth": 1, "downtime-limit": 1}
    b = {"max-bandwidth": 2, "downtime-limit": 2}
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            p.apply(a)
            p.apply(b)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(2000):
            s = p.snapshot()
            assert s.max_bandwidth == s.downtime_limit
            q = p.to_qmp()
            assert q["max-bandwidth"] == q["downtime-limit"]
    finally:
        stop.set()
        t.join()


def test_capabilities_default_off_in_qemu_order() -> None:
    caps = MigrationCapabilities()
    assert caps.query() == [{"capability": c, "state": False} for c in CAPABILITIES]
    assert "postcopy-preempt" in CAPABILITIES and "zero-copy-send" in CAPABILITIES


def test_capabilities_set_is_all_or_nothing() -> None:
    caps = MigrationCapabilities()
    caps.set([{"capability": "events", "state": True}, {"capability": "multifd", "state": True}])
    assert caps.enabled("events") and caps.enabled("multifd")
    with pytest.raises(QmpError, match="does not accept value 'nope'"):
        caps.set([{"capability": "xbzrle", "state": True}, {"capability": "nope", "state": True}])
    assert not caps.enabled("xbzrle")
    with pytest.raises(QmpError, match="Postcopy preempt requires postcopy-ram"):
        caps.set([{"capability": "postcopy-preempt", "state": True}])
    caps.set(
        [{"capability": "postcopy-ram", "state": True}, {"capability": "postcopy-preempt", "state": True}]
    )
    with pytest.raises(QmpError, match="Postcopy is not currently compatible with compression"):
        caps.set([{"capability": "compress", "state": True}])
    with pytest.raises(KeyError):
        caps.enabled("warp")
    assert caps.to_dict()["postcopy-preempt"] is True
