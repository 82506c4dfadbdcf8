"""Capability postcopy-preempt between two real `vmferry run` processes on KVM: requested pages on
a second connection (migration/preempt.py). Same method as test_postcopy.py: the push trickles
until the guest faulted on a page still at the source, so requests are always served; the proof
that nothing was lost or placed stale is the guest's own full-memory check plus the host-side
verifier. No assertion on latency values (the machine may be loaded); only that they are there.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from test_postcopy import (  # noqa: F401
    DIRTY,
    MEM,
    NEVER_CONVERGES_MS,
    _caps,
    _pair,
    _paused_both,
    _status,
    _switch_with_a_request,
    _verified,
)
from vmproc import QmpReplyError, VmProcess

pytestmark = [pytest.mark.kvm]

PREEMPT = ("postcopy-ram", "postcopy-blocktime", "postcopy-preempt")


def test_postcopy_with_preempt_completes_and_requested_pages_come_on_the_preempt_channel(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst, uri = _pair(tmp_path, procs, dst_caps=PREEMPT, src_caps=("postcopy-preempt",))
    _switch_with_a_request(src, dst, uri)
    info = dst.wait_migration(timeout=120)
    assert info["status"] == "completed", info
    s = src.wait_migration(timeout=60)
    assert s["status"] == "completed", s
    assert dst.status() == "running"
    _verified(dst)
    # A request sent as the last pages arrive may never be read by the source.
    assert 0 < s["ram"]["postcopy-requests"] <= info["ram"]["postcopy-requests"]
    x = info["x-postcopy"]
    assert x["pages-placed"] == x["pages-to-come"] > 0
    assert x["preempt-page-bytes"] > 0  # requested pages went on the preempt channel
    # Each page went once, on one of the two connections: the destination counts the pages the
    # preempt channel placed as the source counts what it sent, whichever connection carried it.
    assert info["ram"]["normal"] == s["ram"]["normal"] > 0
    latency = x["fault-latency"]
    assert latency["faults"] >= 1 and latency["avg-ms"] > 0 and latency["p99-ms"] >= latency["p50-ms"]
    assert sum(latency["histogram-us"].values()) == latency["faults"]
    assert "Traceback" not in src.log()


@pytest.mark.parametrize("only_on", ["source", "destination"])
def test_preempt_on_one_side_only_is_refused_by_name_and_the_source_keeps_running(
        tmp_path: Path, procs: list[VmProcess], only_on: str) -> None:  # noqa: F811
    if only_on == "source":
        src, dst, uri = _pair(tmp_path, procs, src_caps=("postcopy-preempt",))
        said = "the source has capability 'postcopy-preempt' on but this destination has it off"
    else:
        src, dst, uri = _pair(tmp_path, procs, dst_caps=PREEMPT)
        said = "this destination has capability 'postcopy-preempt' on but the source has it off"
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(timeout=60)
    assert info["status"] == "failed", info
    assert said in info["error-desc"]
    assert src.status() == "running"
    start = len(src.serial())
    src.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
    assert dst.cmd("query-migrate")["status"] == "failed"
    assert "Traceback" not in src.log() and "Traceback" not in dst.log()


def test_preempt_needs_postcopy_ram_and_a_connection_oriented_uri(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    with pytest.raises(QmpReplyError, match="Postcopy preempt requires postcopy-ram"):
        _caps(src, "postcopy-preempt")
    _caps(src, "postcopy-ram", "postcopy-preempt")
    with pytest.raises(QmpReplyError, match="postcopy-preempt needs a tcp: or unix: URI"):
        src.cmd("migrate", uri=f"file:{tmp_path / 'state'}")


def test_recovery_with_preempt_goes_on_without_it_and_completes(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst, uri = _pair(tmp_path, procs, dst_caps=PREEMPT, src_caps=("postcopy-preempt",))
    _switch_with_a_request(src, dst, uri, release=False)
    src.cmd("migrate-pause")
    _paused_both(src, dst)
    again = f"unix:{tmp_path / 'recover.sock'}"
    dst.cmd("migrate-recover", uri=again)
    src.cmd("migrate", uri=again, resume=True)
    _status(dst, "postcopy-active")
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    info = dst.wait_migration(timeout=120)
    assert info["status"] == "completed", info
    assert src.wait_migration(timeout=60)["status"] == "completed"
    x = info["x-postcopy"]
    assert x["pages-placed"] == x["pages-to-come"]
    _verified(dst)
    assert "Traceback" not in src.log()


def test_postcopy_with_preempt_under_tls_psk_completes(tmp_path: Path, procs: list[VmProcess]) -> None:
    """tls-creds set: the preempt channel is opened and accepted under TLS as the main one."""
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "defer")
    procs.append(dst)
    src.wait_serial(r"verify ok")
    (tmp_path / "keys.psk").write_text(f"qemu:{secrets.token_hex(32)}\n")
    for vm, endpoint in ((dst, "server"), (src, "client")):
        vm.cmd("object-add", **{"qom-type": "tls-creds-psk", "id": "tls0", "dir": str(tmp_path),
                                "endpoint": endpoint})
        vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    _caps(src, "postcopy-ram", "events", "postcopy-preempt")
    src.cmd("migrate-set-parameters", **{"downtime-limit": NEVER_CONVERGES_MS})
    _caps(dst, *PREEMPT)
    uri = f"unix:{tmp_path / 'migration.sock'}"
    dst.cmd("migrate-incoming", uri=uri)
    _switch_with_a_request(src, dst, uri)
    info = dst.wait_migration(timeout=120)
    assert info["status"] == "completed", info
    assert src.wait_migration(timeout=60)["status"] == "completed"
    assert info["x-postcopy"]["preempt-page-bytes"] > 0
    _verified(dst)
    assert "Traceback" not in src.log()
