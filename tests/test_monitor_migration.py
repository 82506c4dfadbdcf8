"""What migrate-set-capabilities / -parameters accept has its effect, on two real `vmferry run`
processes on KVM: downtime-limit holds a migration in precopy until raised, `events` decides
whether MIGRATION events are sent, a destination takes capabilities until its stream arrives, and
tls-creds naming no object refuses the migration on either side, nothing sent in plain text."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from vmproc import QmpReplyError, VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "256M"
DIRTY = "ws=32 rate=20 verify=1 check=full"
EVENTS_ON = [{"capability": "events", "state": True}]


def _source(tmp: Path, procs: list[VmProcess]) -> VmProcess:
    src = VmProcess(tmp, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    src.wait_serial(r"verify ok")
    return src


def _dest(tmp: Path, procs: list[VmProcess]) -> tuple[VmProcess, str]:
    dst = VmProcess(tmp, "dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    return dst, dst.incoming_uri()


def _poll(what: str, check, timeout: float = 60) -> dict:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def _migration_events(vm: VmProcess) -> list[str]:
    assert vm.qmp is not None
    return [e["data"]["status"] for e in vm.qmp.get_events() if e["event"] == "MIGRATION"]


def test_downtime_limit_events_and_capabilities_on_a_waiting_destination(
    tmp_path: Path, procs: list[VmProcess]
) -> None:
    src = _source(tmp_path, procs)  # events left off here
    src.cmd("migrate-set-parameters", **{"downtime-limit": 0})  # no pause is ever short enough
    dst, uri = _dest(tmp_path, procs)
    # Listening, stream not yet arrived: QEMU 7.2 takes capabilities and parameters here.
    assert dst.cmd("query-migrate")["status"] == "setup"
    dst.cmd("migrate-set-capabilities", capabilities=EVENTS_ON)
    dst.cmd("migrate-set-parameters", **{"downtime-limit": 300})

    src.cmd("migrate", uri=uri)
    # downtime-limit 0 holds the source in precopy, pass after pass.
    _poll("four passes", lambda: (i := src.cmd("query-migrate"))["ram"]["dirty-sync-count"] >= 4 and i)
    assert src.cmd("query-migrate")["status"] == "active"
    _poll("destination active", lambda: dst.cmd("query-migrate")["status"] == "active")
    with pytest.raises(QmpReplyError, match="^GenericError: There's a migration process in progress$"):
        dst.cmd("migrate-set-capabilities", capabilities=EVENTS_ON)

    src.cmd("migrate-set-parameters", **{"downtime-limit": 300})  # read after the next pass
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    assert dst.status() == "running"
    start = len(dst.serial())
    dst.wait_serial(r"verify ok gen=\d+", after=start, timeout=30)

    assert _migration_events(src) == []  # `events` off: none
    seen = _poll("destination events", lambda: (ev := _migration_events(dst)) and "completed" in ev and ev)
    assert seen[0] == "active" and seen[-1] == "completed"


def test_missing_tls_creds_refuse_the_migration_on_both_sides(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs)
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})

    # Source: refused before anything connects, whatever the channel.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with pytest.raises(QmpReplyError, match="^GenericError: No TLS credentials with id 'tls0'$"):
            src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        listener.settimeout(1.0)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected
    marker = tmp_path / "exec-ran"
    with pytest.raises(QmpReplyError, match="No TLS credentials with id 'tls0'"):
        src.cmd("migrate", uri=f"exec:touch {marker}")
    with pytest.raises(QmpReplyError, match="No TLS credentials with id 'tls0'"):
        src.cmd("migrate", uri=f"file:{tmp_path / 'snap'}")
    assert not marker.exists() and not (tmp_path / "snap").exists()
    assert src.cmd("query-migrate") == {}
    assert src.status() == "running"

    # Destination: tls-creds set after --incoming are read when the stream arrives; a plain-text
    # stream is refused and the guest never starts.
    dst, uri = _dest(tmp_path, procs)
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    src.cmd("migrate-set-parameters", **{"tls-creds": ""})
    src.cmd("migrate", uri=uri)
    dinfo = dst.wait_migration()
    assert dinfo["status"] == "failed" and dinfo["error-desc"] == "No TLS credentials with id 'tls0'", dinfo
    assert dst.status() == "inmigrate"
    assert src.wait_migration()["status"] == "failed"
    assert src.status() == "running"
    start = len(src.serial())
    src.wait_serial(r"verify ok gen=\d+", after=start, timeout=30)
    for vm in (src, dst):
        assert "Traceback" not in vm.log(), vm.log()
