"""The postcopy failure matrix (docs/migration.md, "Postcopy failure matrix"): a failure injected
at exactly one step of a postcopy migration between real `vmferry run` processes on KVM — kill -9
of either side, or the link down (the destination in a network namespace behind a veth) — and
the outcome the table promises asserted on both sides.

Exactly at a step: the process named in the cell is started with the test-only
VMFERRY_TEST_PAUSE_AT=STEP (migration/testpoint.py) and stops itself (SIGSTOP) right after that
step; the test waits until the kernel shows it stopped, injects the failure, and continues it.
While a process may stop itself the test never talks to its monitor (a reply could be cut off by
the stop). A stopped peer is also a silent one: its peer's heartbeats notice it within 3 s, which
ends in the same state as the failure injected (the table's outcome does not depend on which
comes first). Cells that complete end with the guest's own full-memory check (`verify ok`) and
the host verifier; cells before RUN check that the source runs and its guest still verifies.
Mid-postcopy cells are tests/test_postcopy.py's.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from polling import wait_for
from test_fault_matrix import _dest_failed, _source_survives
from test_postcopy import DIRTY, MEM, NEVER_CONVERGES_MS, SLOW, TRICKLE, _caps, _status, _verified
from vmferry.testing.netns import VethLink
from vmproc import VmProcess

pytestmark = [pytest.mark.kvm]

PORT = 4444
FAULTS = ["kill-source", "kill-destination", "link-down"]
# Generous against load: a heartbeat limit (3 s) plus a busy machine.
PAUSED_WITHIN_S = 60
# A source stopped before RUN must write RUN once continued: its own watchdog, which has seen
# nothing from the destination while it was stopped, must not give up first (it would shut the
# channel and the source, RUN not written, would resume by itself: another cell). 3 s beats give
# it a 9 s limit, beyond the stop on a loaded machine.
SLOW_SOURCE_BEATS_MS = 3000


@pytest.fixture
def netns(netns_link: VethLink) -> VethLink:
    """The shared namespace link (tests/conftest.py), under this file's name for it."""
    return netns_link


def _pair(tmp: Path, procs: list[VmProcess], netns: VethLink, *,
          src_at: str = "", dst_at: str = "", dst_fail: str = "",
          reconnect: bool = False, src_heartbeat_ms: int = 0) -> tuple[VmProcess, VmProcess]:
    """Source on the host, destination in the namespace (tcp over the veth), postcopy-ram on
    both; `src_at` / `dst_at`: the step at which that process stops itself; `dst_fail`: what
    fails on the destination (migration/testpoint.py); `src_heartbeat_ms`: the source's
    x-heartbeat-ms (0: the default)."""
    address = netns.address
    src = VmProcess(tmp, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY,
                    env={"VMFERRY_TEST_PAUSE_AT": src_at})
    procs.append(src)
    dst = VmProcess(tmp, "dst", "-m", MEM, "--incoming", "defer", wrap=netns.exec_prefix,
                    env={"VMFERRY_TEST_PAUSE_AT": dst_at, "VMFERRY_TEST_FAIL_AT": dst_fail})
    procs.append(dst)
    src.wait_serial(r"verify ok")
    for vm in (src, dst):
        _caps(vm, "postcopy-ram")
        if reconnect:
            vm.cmd("migrate-set-parameters", **{"x-postcopy-reconnect": True})
    if src_heartbeat_ms:
        src.cmd("migrate-set-parameters", **{"x-heartbeat-ms": src_heartbeat_ms})
    # Precopy never converges (downtime-limit 1 ms): only the switch ends these migrations.
    src.cmd("migrate-set-parameters", **{"downtime-limit": NEVER_CONVERGES_MS, "max-bandwidth": SLOW,
                                         "max-postcopy-bandwidth": TRICKLE})
    dst.cmd("migrate-incoming", uri=f"tcp:{address}:{PORT}")
    return src, dst


def _migrate(src: VmProcess, netns: VethLink, switch: bool = True) -> None:
    """migrate; with `switch`, migrate-start-postcopy once the first MiB went (the source
    switches at its next step, long after this reply)."""
    src.cmd("migrate", uri=f"tcp:{netns.address}:{PORT}")
    if switch:
        wait_for(lambda: src.cmd("query-migrate").get("ram", {}).get("transferred", 0) >= 1 << 20,
                 "the first MiB of precopy")
        src.cmd("migrate-start-postcopy")


def _state(vm: VmProcess) -> str:
    """The process's state letter in /proc (T: stopped)."""
    try:
        stat = Path(f"/proc/{vm.proc.pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


def _wait_stopped(vm: VmProcess, step: str) -> None:
    wait_for(lambda: _state(vm) == "T" or vm.proc.poll() is not None, f"{vm.name} to stop at {step}", 120)
    assert vm.proc.poll() is None, vm.log()
    assert f"stopping at {step}" in vm.log()


def _wait_listening(dst: VmProcess) -> None:
    """The destination has processed POSTCOPY_LISTEN: its postcopy figures exist from then on."""
    wait_for(lambda: "x-postcopy" in dst.cmd("query-migrate"), "the destination to listen for faults", 60)


def _kill(vm: VmProcess) -> None:
    vm.proc.kill()
    vm.proc.wait(30)


def _cont(vm: VmProcess) -> None:
    vm.proc.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def _link_down(netns: VethLink) -> Iterator[None]:
    netns.down()
    try:
        yield
    finally:
        netns.up()


def _paused(vm: VmProcess) -> dict:
    info = _status(vm, "postcopy-paused", PAUSED_WITHIN_S)
    assert "postcopy paused" in info["error-desc"], info
    assert "Traceback" not in vm.log()
    return info


def _source_paused_holding_the_guest(src: VmProcess) -> None:
    """After RUN with nobody to recover to: the guest is nowhere whole; the source keeps its
    vCPUs stopped and its RAM (a human decides)."""
    info = _paused(src)
    assert info["ram"]["remaining"] > 0, info
    assert src.status() in ("paused", "postmigrate")


def _recover_and_complete(src: VmProcess, dst: VmProcess, address: str, port: int) -> None:
    """QEMU's recovery: migrate-recover on the destination, migrate resume on the source; the
    push at full speed to the end; nothing lost."""
    dst.cmd("migrate-recover", uri=f"tcp:{address}:{port}")
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    src.cmd("migrate", uri=f"tcp:{address}:{port}", resume=True)
    info = dst.wait_migration(timeout=180)
    assert info["status"] == "completed", info
    s = src.wait_migration(timeout=60)
    assert s["status"] == "completed", s
    _verified(dst)
    assert "Traceback" not in src.log()


# --- before RUN: the source is the only owner ---

@pytest.mark.parametrize("fault", FAULTS)
def test_at_advise(tmp_path: Path, procs: list[VmProcess], netns: VethLink,
                   fault: str) -> None:
    """The destination stops right after POSTCOPY_ADVISE (precopy goes on): the source keeps
    running, intact; the destination applies nothing."""
    src, dst = _pair(tmp_path, procs, netns, dst_at="postcopy-advise")
    _migrate(src, netns, switch=False)
    _wait_stopped(dst, "postcopy-advise")
    if fault == "kill-source":
        _kill(src)
        _cont(dst)
    elif fault == "kill-destination":
        _kill(dst)
    else:
        with _link_down(netns):
            _cont(dst)
            assert src.wait_migration(timeout=PAUSED_WITHIN_S)["status"] == "failed"
            assert dst.wait_migration(timeout=PAUSED_WITHIN_S)["status"] == "failed"
    if fault != "kill-source":
        info = src.wait_migration(timeout=PAUSED_WITHIN_S)
        assert info["status"] == "failed", info
        _source_survives(src)
    if fault != "kill-destination":
        _dest_failed(dst)


@pytest.mark.parametrize("fault", ["kill-source", "link-down"])
def test_at_discard(tmp_path: Path, procs: list[VmProcess], netns: VethLink,
                    fault: str) -> None:
    """The source stops right after POSTCOPY_DISCARD and LISTEN (the destination listens for
    faults; RUN not written yet). Killed: the destination never ran the guest and pauses (only
    it knows; nobody is left to ask). The link down: the source then writes the device state and
    RUN into the dead link and pauses, the destination pauses without RUN; once the link is back
    a recovery reaches the destination, which says the guest never ran there: the source resumes
    it, whole, and both say `failed`. (kill -9 of the destination here is not a cell: whether the
    source's RUN write still succeeds races the dying peer's reset; either outcome is the table's.)"""
    src, dst = _pair(tmp_path, procs, netns, src_at="postcopy-discard", src_heartbeat_ms=SLOW_SOURCE_BEATS_MS)
    _migrate(src, netns)
    _wait_stopped(src, "postcopy-discard")
    _wait_listening(dst)
    if fault == "kill-source":
        _kill(src)
        info = _paused(dst)
        assert "the guest never ran here" in info["error-desc"], info
        assert dst.status() == "inmigrate"
        return
    address = netns.address
    with _link_down(netns):
        _cont(src)
        _source_paused_holding_the_guest(src)
        info = _paused(dst)
        assert "the guest never ran here" in info["error-desc"], info
    dst.cmd("migrate-recover", uri=f"tcp:{address}:{PORT + 1}")
    src.cmd("migrate", uri=f"tcp:{address}:{PORT + 1}", resume=True)
    s = src.wait_migration(timeout=PAUSED_WITHIN_S)
    assert s["status"] == "failed" and "POSTCOPY_RUN never arrived" in s["error-desc"], s
    _source_survives(src)
    d = dst.wait_migration(timeout=PAUSED_WITHIN_S)
    assert d["status"] == "failed" and "never arrived" in d["error-desc"], d
    assert dst.status() == "inmigrate"


def test_run_never_received_with_reconnect_the_source_takes_the_guest_back_by_itself(
        tmp_path: Path, procs: list[VmProcess], netns: VethLink) -> None:
    """As the link-down cell at discard, with x-postcopy-reconnect on both sides: no command is
    needed; once the link is back the source resumes its guest."""
    src, dst = _pair(tmp_path, procs, netns, src_at="postcopy-discard", reconnect=True,
                     src_heartbeat_ms=SLOW_SOURCE_BEATS_MS)
    _migrate(src, netns)
    _wait_stopped(src, "postcopy-discard")
    _wait_listening(dst)
    with _link_down(netns):
        _cont(src)
        _paused(src)
        _paused(dst)
    s = src.wait_migration(timeout=PAUSED_WITHIN_S)
    assert s["status"] == "failed" and "POSTCOPY_RUN never arrived" in s["error-desc"], s
    _source_survives(src)
    assert dst.wait_migration(timeout=PAUSED_WITHIN_S)["status"] == "failed"


# --- after RUN: neither side has the whole VM ---

@pytest.mark.parametrize("fault", FAULTS)
def test_at_device_load(tmp_path: Path, procs: list[VmProcess], netns: VethLink,
                        fault: str) -> None:
    """The destination stops after RUN's device state is applied, before the guest starts."""
    src, dst = _pair(tmp_path, procs, netns, dst_at="postcopy-devices")
    _migrate(src, netns)
    _wait_stopped(dst, "postcopy-devices")
    if fault == "kill-source":
        _kill(src)
        _cont(dst)
        _paused(dst)
        assert dst.status() == "running"  # on what arrived; threads on missing pages wait
    elif fault == "kill-destination":
        _kill(dst)
        _source_paused_holding_the_guest(src)
    else:
        with _link_down(netns):
            _cont(dst)
            _source_paused_holding_the_guest(src)
            _paused(dst)
        _recover_and_complete(src, dst, netns.address, PORT + 1)


@pytest.mark.parametrize("fault", FAULTS)
def test_at_run(tmp_path: Path, procs: list[VmProcess], netns: VethLink,
                fault: str) -> None:
    """The source stops right after writing POSTCOPY_RUN (the destination runs the guest)."""
    src, dst = _pair(tmp_path, procs, netns, src_at="postcopy-run")
    _migrate(src, netns)
    _wait_stopped(src, "postcopy-run")
    # RUN arrived: the destination runs the guest (and, the source being silent, may already
    # have paused: its heartbeat limit can pass before a loaded machine runs this poll).
    wait_for(lambda: dst.cmd("query-migrate")["status"] in ("postcopy-active", "postcopy-paused"),
             "the destination to run the guest", PAUSED_WITHIN_S)
    if fault == "kill-source":
        _kill(src)
        _paused(dst)
        assert dst.status() == "running"
    elif fault == "kill-destination":
        _kill(dst)
        _cont(src)
        _source_paused_holding_the_guest(src)
    else:
        with _link_down(netns):
            _cont(src)
            _source_paused_holding_the_guest(src)
            _paused(dst)
        _recover_and_complete(src, dst, netns.address, PORT + 1)


@pytest.mark.parametrize("fault", FAULTS)
def test_during_recovery(tmp_path: Path, procs: list[VmProcess], netns: VethLink,
                         fault: str) -> None:
    """A double failure: paused by migrate-pause, a recovery begins, and the destination stops
    right after it answered the source's POSTCOPY_RESUMED; the fault then lands both (the
    survivors) back in postcopy-paused; with the link back, a second recovery completes."""
    src, dst = _pair(tmp_path, procs, netns, dst_at="postcopy-resumed")
    _migrate(src, netns)
    _status(dst, "postcopy-active", PAUSED_WITHIN_S)
    src.cmd("migrate-pause")
    _paused(src)
    _paused(dst)
    address = netns.address
    dst.cmd("migrate-recover", uri=f"tcp:{address}:{PORT + 1}")
    src.cmd("migrate", uri=f"tcp:{address}:{PORT + 1}", resume=True)
    _wait_stopped(dst, "postcopy-resumed")
    if fault == "kill-source":
        _kill(src)
        _cont(dst)
        _paused(dst)
        assert dst.status() == "running"
    elif fault == "kill-destination":
        _kill(dst)
        _source_paused_holding_the_guest(src)
    else:
        with _link_down(netns):
            _cont(dst)
            _source_paused_holding_the_guest(src)
            _paused(dst)
        _recover_and_complete(src, dst, address, PORT + 2)


def test_a_dying_fault_resolver_pauses_naming_it_and_a_recovery_completes(
        tmp_path: Path, procs: list[VmProcess], netns: VethLink) -> None:
    """The destination's fault resolver thread raises at its first page request (after RUN):
    the guest would hang on its next missing page, so the destination pauses naming the resolver
    and breaks the connection (the source pauses too); a recovery starts the resolver again, asks
    again for the page the guest waits on, and the migration completes with nothing lost."""
    src, dst = _pair(tmp_path, procs, netns, dst_fail="postcopy-resolver")
    _migrate(src, netns)
    info = _paused(dst)
    assert "postcopy fault resolver: test hook" in info["error-desc"], info
    assert dst.status() == "running"
    _source_paused_holding_the_guest(src)
    _recover_and_complete(src, dst, netns.address, PORT + 1)
    assert "the fault resolver runs again" in dst.log()
