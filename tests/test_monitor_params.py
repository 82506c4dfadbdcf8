"""Migration parameters and capabilities: QMP names, 7.2 defaults, validation, atomic updates."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from vmferry.errors import QmpError
from vmferry.migration.params import (
    CAPABILITIES,
    CAPABILITY_DOCS,
    EFFECTIVE_CAPABILITIES,
    EFFECTIVE_PARAMETERS,
    PARAMETER_SPECS,
    MigrationCapabilities,
    MigrationParameters,
    ParamSpec,
    _check_caps,
)

# What vmferry honours, listed here by hand so that making a name effective is a deliberate act
# with its own test of the effect: max-bandwidth (test_migration.py::test_max_bandwidth_holds),
# downtime-limit and events (test_monitor_migration.py), the TLS strings (test_monitor_objects.py,
# test_monitor_migration.py), return-path (always on; the source waits for the destination's ACK:
# test_migration.py's killed/refusing destination tests), x-trace-file (test_trace_migration.py),
# x-heartbeat-ms (test_fault_matrix.py: silent peers detected; heartbeats off),
# x-block-drives and x-block-compression (test_disk_migration.py, test_disk.py), auto-converge and
# its parameters (test_throttle.py: each parameter as pure logic; test_throttle_kvm.py: real runs),
# multifd and its parameters (test_multifd*.py), postcopy (test_postcopy*.py), xbzrle and xbzrle-cache-size
# (test_migration_xbzrle.py), dirty-limit and its parameters (test_throttle.py: the trigger and the
# limiter's arithmetic; test_dirty_ring_kvm.py: the limit set by a migration, the period and quota
# read over QMP).
EFFECTIVE = {"max-bandwidth", "downtime-limit", "tls-creds", "tls-hostname", "tls-authz", "x-trace-file",
             "x-heartbeat-ms", "x-block-drives", "x-block-compression", "throttle-trigger-threshold",
             "cpu-throttle-initial",
             "cpu-throttle-increment", "cpu-throttle-tailslow", "max-cpu-throttle", "multifd-channels",
             "multifd-compression", "multifd-zlib-level", "multifd-zstd-level", "max-postcopy-bandwidth",
             "x-postcopy-after-ms", "x-postcopy-reconnect", "xbzrle-cache-size", "vcpu-dirty-limit",
             "x-vcpu-dirty-limit-period"}
EFFECTIVE_CAPS = {"events", "return-path", "auto-converge", "multifd", "postcopy-ram", "postcopy-blocktime",
                  "postcopy-preempt", "xbzrle", "dirty-limit"}
UNSUPPORTED = [s for s in PARAMETER_SPECS if s.qmp_name not in EFFECTIVE]
UNSUPPORTED_CAPS = [c for c in CAPABILITIES if c not in EFFECTIVE_CAPS]
DEFAULTS = {f.name: f.default for f in dataclasses.fields(MigrationParameters) if f.init}


def other_value(spec: ParamSpec) -> object:
    """A valid value of `spec` that is not its default."""
    default = DEFAULTS[spec.py_name]
    if spec.qapi_type == "bool":
        return not default
    if spec.choices:
        return next(c for c in spec.choices if c != default)
    if spec.qmp_name == "xbzrle-cache-size":
        return 2 * default
    assert spec.lo is not None and spec.hi is not None
    return spec.lo if default != spec.lo else spec.lo + 1


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
        {"max-bandwidth": 10, "tls-creds": "tls0", "downtime-limit": 7}
    )
    assert (p.max_bandwidth, p.tls_creds, p.downtime_limit) == (10, "tls0", 7)
    assert MigrationParameters.from_qmp(p.to_qmp()) == p  # every default written back is accepted


def test_the_effective_names_are_the_listed_ones() -> None:
    assert set(EFFECTIVE_PARAMETERS) == EFFECTIVE
    assert set(EFFECTIVE_CAPABILITIES) == EFFECTIVE_CAPS
    assert all(EFFECTIVE_PARAMETERS.values()) and all(EFFECTIVE_CAPABILITIES.values())


STRINGS = {"tls-creds", "tls-hostname", "tls-authz", "x-trace-file", "x-block-drives"}


@pytest.mark.parametrize("name", sorted(EFFECTIVE - STRINGS))
def test_effective_numeric_parameter_changes(name: str) -> None:
    spec = next(s for s in PARAMETER_SPECS if s.qmp_name == name)
    p = MigrationParameters()
    p.apply({name: other_value(spec)})
    assert getattr(p, spec.py_name) == other_value(spec)


@pytest.mark.parametrize("spec", UNSUPPORTED, ids=[s.qmp_name for s in UNSUPPORTED])
def test_unsupported_parameter_is_refused_by_name(spec: ParamSpec) -> None:
    p = MigrationParameters()
    with pytest.raises(QmpError, match=f"^Parameter '{spec.qmp_name}' is not supported by vmferry yet$"):
        p.apply({"downtime-limit": 1, spec.qmp_name: other_value(spec)})
    assert p == MigrationParameters()  # all or nothing
    p.apply({spec.qmp_name: DEFAULTS[spec.py_name]})  # its default changes nothing: accepted
    assert p == MigrationParameters()


@pytest.mark.parametrize("name", UNSUPPORTED_CAPS)
def test_unsupported_capability_is_refused_by_name(name: str) -> None:
    caps = MigrationCapabilities()
    with pytest.raises(QmpError, match=f"^Capability '{name}' is not supported by vmferry yet$"):
        caps.set([{"capability": "events", "state": True}, {"capability": name, "state": True}])
    assert not caps.enabled(name) and not caps.enabled("events")  # all or nothing
    caps.set([{"capability": name, "state": False}])  # off is what it is: accepted
    assert not caps.enabled(name)


@pytest.mark.parametrize("value", [1, 99, 600_001, -1])
def test_heartbeat_interval_out_of_range_is_refused_by_name(value: int) -> None:
    p = MigrationParameters()
    with pytest.raises(QmpError, match=r"^Parameter 'x-heartbeat-ms' expects 0 \(off\) or an integer"):
        p.apply({"x-heartbeat-ms": value})
    assert p.x_heartbeat_ms == 1000


@pytest.mark.parametrize("value", [0, 100, 600_000])
def test_heartbeat_interval_off_and_bounds_are_accepted(value: int) -> None:
    p = MigrationParameters()
    p.apply({"x-heartbeat-ms": value})
    assert p.x_heartbeat_ms == value


def test_return_path_is_on_and_cannot_be_turned_off() -> None:
    caps = MigrationCapabilities()
    assert caps.enabled("return-path")
    caps.set([{"capability": "return-path", "state": True}])
    with pytest.raises(QmpError, match="^Capability 'return-path' cannot be turned off in vmferry"):
        caps.set([{"capability": "return-path", "state": False}])
    assert caps.enabled("return-path")


@pytest.mark.parametrize("value", ["none", "zlib", "zstd", "lz4", "auto"])
def test_multifd_compression_takes_qemus_names_and_lz4_and_auto(value: str) -> None:
    p = MigrationParameters()
    p.apply({"multifd-compression": value})
    assert p.multifd_compression == value


def test_multifd_capability_turns_on_and_off() -> None:
    caps = MigrationCapabilities()
    caps.set([{"capability": "multifd", "state": True}])
    assert caps.enabled("multifd")
    caps.set([{"capability": "multifd", "state": False}])
    assert not caps.enabled("multifd")


def test_events_capability_turns_on_and_off() -> None:
    caps = MigrationCapabilities()
    caps.set([{"capability": "events", "state": True}])
    assert caps.enabled("events")
    caps.set([{"capability": "events", "state": False}])
    assert not caps.enabled("events")


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


def test_capabilities_default_off_in_qemu_order_but_return_path() -> None:
    caps = MigrationCapabilities()
    assert caps.query() == [{"capability": c, "state": c == "return-path"} for c in CAPABILITIES]
    assert "postcopy-preempt" in CAPABILITIES and "zero-copy-send" in CAPABILITIES


def test_capabilities_set_is_all_or_nothing() -> None:
    caps = MigrationCapabilities()
    with pytest.raises(QmpError, match="does not accept value 'nope'"):
        caps.set([{"capability": "events", "state": True}, {"capability": "nope", "state": True}])
    assert not caps.enabled("events")
    with pytest.raises(KeyError):
        caps.enabled("warp")
    assert caps.to_dict()["events"] is False


def test_qemu_combination_checks_kept_for_when_the_capabilities_land() -> None:
    on = dict.fromkeys(CAPABILITIES, False)
    with pytest.raises(QmpError, match="Postcopy preempt requires postcopy-ram"):
        _check_caps({**on, "postcopy-preempt": True})
    with pytest.raises(QmpError, match="Postcopy is not currently compatible with compression"):
        _check_caps({**on, "postcopy-ram": True, "compress": True})
    _check_caps({**on, "postcopy-ram": True, "postcopy-preempt": True})
    with pytest.raises(QmpError, match="Postcopy is not yet compatible with multifd"):
        _check_caps({**on, "postcopy-ram": True, "multifd": True})
    with pytest.raises(QmpError, match="'xbzrle' cannot be used with 'postcopy-ram'"):
        _check_caps({**on, "postcopy-ram": True, "xbzrle": True})
