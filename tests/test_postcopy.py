"""Postcopy between two real `vmferry run` processes on KVM, driven through the official
`qemu.qmp` client in QEMU's command order: `postcopy-ram` on both sides (the destination with
`-incoming defer`, then `migrate-incoming`), `migrate`, `migrate-start-postcopy`.

Deterministic without timing assumptions: precopy is slowed by max-bandwidth so the switch
lands inside the first pass, and the postcopy push is slowed by max-postcopy-bandwidth until the
guest (which keeps writing random pages of its working set) has faulted on a page still at the
source, so the request path is always exercised; then the push is let go to finish. The proof
that nothing was lost is the guest's own full-memory check on the destination (`verify ok`)
plus the host-side verifier (`x-verify-dirty-guest`).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from polling import wait_for
from vmferry.migration.trace import read_trace
from vmferry.testing.netns import VethLink
from vmproc import QmpReplyError, VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "256M"
DIRTY = "ws=32 rate=20 verify=1 check=full"
SLOW = 4 << 20  # precopy's max-bandwidth: 32 MiB of working set is ~8 s of first pass
TRICKLE = 256 << 10  # max-postcopy-bandwidth while waiting for a fault to be requested
NEVER_CONVERGES_MS = 1  # downtime-limit
# Heartbeats notice a silent peer in 3 intervals (3 s); bounded generously against load.
DETECTED_WITHIN_S = 20.0
LINK_DOWN_S = 5.0  # each drop of the three-drops test (issue 11: three drops of 5 s)


def _caps(vm: VmProcess, *names: str) -> None:
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": n, "state": True} for n in names])


def _pair(tmp: Path, procs: list[VmProcess], *,
          dst_caps: tuple[str, ...] = ("postcopy-ram", "postcopy-blocktime"),
          src_caps: tuple[str, ...] = (),
          append: str = DIRTY) -> tuple[VmProcess, VmProcess, str]:
    src = VmProcess(tmp, "src", "-m", MEM, "--guest", "dirty", "--append", append)
    procs.append(src)
    dst = VmProcess(tmp, "dst", "-m", MEM, "--incoming", "defer")
    procs.append(dst)
    src.wait_serial(r"verify ok")
    _caps(src, "postcopy-ram", "events", *src_caps)
    # Precopy can never switch over (the fixed part of a pause alone is above 1 ms): postcopy is
    # the only way these migrations finish, so no test races a precopy that converged.
    src.cmd("migrate-set-parameters", **{"downtime-limit": NEVER_CONVERGES_MS})
    if dst_caps:
        _caps(dst, *dst_caps)
    uri = f"unix:{tmp / 'migration.sock'}"
    dst.cmd("migrate-incoming", uri=uri)
    return src, dst, uri


def _status(vm: VmProcess, wanted: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (i := vm.cmd("query-migrate")) and i.get("status") == wanted and i,
                    f"{vm.name} to be {wanted}", timeout)


def _switch_with_a_request(src: VmProcess, dst: VmProcess, uri: str, release: bool = True) -> None:
    """migrate slowly, switch inside the first pass, hold the push back until the guest faulted
    on a page still at the source and the destination requested it; `release`: then let the
    push run at full speed."""
    src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW, "max-postcopy-bandwidth": TRICKLE})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.cmd("query-migrate").get("ram", {}).get("transferred", 0) >= 1 << 20,
             "the first MiB of precopy")
    src.cmd("migrate-start-postcopy")
    info = _status(dst, "postcopy-active")
    assert info["ram"]["remaining"] >= 0
    assert src.cmd("query-migrate")["status"] == "postcopy-active"
    wait_for(lambda: src.cmd("query-migrate")["ram"]["postcopy-requests"] > 0, "a page request", 120)
    if release:
        src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})


def _verified(dst: VmProcess) -> None:
    start = len(dst.serial())
    dst.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
    assert "FAIL" not in dst.serial()
    verdict = dst.cmd("x-verify-dirty-guest")
    assert verdict["ok"], verdict
    assert "Traceback" not in dst.log()


def test_postcopy_completes_and_the_guest_verifies_its_memory(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst, uri = _pair(tmp_path, procs)
    dst.cmd("migrate-set-parameters", **{"x-trace-file": str(tmp_path / "dst.jsonl")})
    _switch_with_a_request(src, dst, uri)
    info = dst.wait_migration(timeout=120)
    assert info["status"] == "completed", info
    s = src.wait_migration(timeout=60)
    assert s["status"] == "completed", s
    assert src.status() == "postmigrate"  # QEMU: the source ends paused
    assert dst.status() == "running"
    _verified(dst)
    # The numbers: requests seen on both sides; every page to come was placed; blocktime in ms,
    # one entry per vCPU; every requested fault has a latency.
    # The destination counts requests it sent, the source those it read: one sent while the
    # push delivered its last pages may never be read by the source (the page came anyway).
    assert 0 < s["ram"]["postcopy-requests"] <= info["ram"]["postcopy-requests"]
    assert s["ram"]["postcopy-bytes"] > 0
    x = info["x-postcopy"]
    assert x["pages-placed"] == x["pages-to-come"] > 0
    assert 0 <= x["pages-discarded"] <= x["pages-to-come"] and x["discard-ms"] >= 0
    # Two discards: the early one (the source's guest still running) and the one at the switch;
    # together no more than the pages to come, and the source's count of each agrees.
    early = s["x-postcopy-early-discard"]
    assert early["pages"] + early["late-pages"] == x["pages-to-come"], (early, x)
    assert x["early-pages-discarded"] + x["pages-discarded"] <= x["pages-to-come"]
    assert x["early-discard-ms"] >= 0 and early["ms"] >= 0
    # The downtime runs to the destination's word that its guest runs, past RUN written.
    phases = s["downtime-phases"]
    assert "postcopy-guest-runs" in phases and s["downtime"] >= phases["postcopy-run"], s
    assert x["fault-latency"]["faults"] >= 1
    assert sum(x["fault-latency"]["histogram-us"].values()) == x["fault-latency"]["faults"]
    assert isinstance(info["postcopy-blocktime"], int)
    assert len(info["postcopy-vcpu-blocktime"]) == 1
    assert "Traceback" not in src.log()
    # The destination's trace has every fault's latency, and the report draws them.
    (pc,) = read_trace(tmp_path / "dst.jsonl").of("postcopy")
    # (The guest may still fault on pages never populated, resolved here with zero pages: the
    # trace, written a moment after query-migrate's figures froze, may count a few more.)
    assert len(pc["fault-latencies-us"]) == pc["fault-latency"]["faults"] >= x["fault-latency"]["faults"]
    assert pc["requests"] == info["ram"]["postcopy-requests"]


def test_postcopy_started_before_the_first_pass_does_anything(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst, uri = _pair(tmp_path, procs)
    src.cmd("migrate", uri=uri)
    src.cmd("migrate-start-postcopy")  # at once: during setup or the first step
    assert dst.wait_migration(timeout=120)["status"] == "completed"
    assert src.wait_migration(timeout=60)["status"] == "completed"
    _verified(dst)


def test_postcopy_refused_by_a_destination_without_the_capability_leaves_the_source_running(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst, uri = _pair(tmp_path, procs, dst_caps=())
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(timeout=60)
    assert info["status"] == "failed", info
    assert "'postcopy-ram' is off on this destination" in info["error-desc"]
    assert src.status() == "running"
    start = len(src.serial())
    src.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
    assert dst.cmd("query-migrate")["status"] == "failed"


def test_start_postcopy_without_a_migration_or_the_capability_is_refused_by_name(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    _caps(src, "postcopy-ram")
    with pytest.raises(QmpReplyError, match="Postcopy must be started after migration has been started"):
        src.cmd("migrate-start-postcopy")
    with pytest.raises(QmpReplyError, match="Postcopy is not yet compatible with multifd"):
        _caps(src, "multifd")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": False}])
    with pytest.raises(QmpReplyError, match="Enable postcopy with migrate_set_capability"):
        src.cmd("migrate-start-postcopy")


def test_killed_source_after_run_leaves_the_destination_paused_alive_and_killable(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst, uri = _pair(tmp_path, procs)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW, "max-postcopy-bandwidth": TRICKLE})
    src.cmd("migrate", uri=uri)
    src.cmd("migrate-start-postcopy")
    _status(dst, "postcopy-active")
    wait_for(lambda: dst.cmd("query-migrate")["ram"]["postcopy-requests"] > 0, "a page request", 120)
    src.proc.kill()
    src.proc.wait(30)
    info = _status(dst, "postcopy-paused")
    assert "postcopy paused" in info["error-desc"]
    time.sleep(1.0)  # paused means paused: no exit of its own
    assert dst.proc.poll() is None
    assert dst.status() == "running"  # the guest keeps what it has; threads on missing pages wait
    with pytest.raises(QmpReplyError, match="cannot be cancelled"):
        dst.cmd("migrate_cancel")
    with pytest.raises(QmpReplyError, match="postcopy is still bringing"):
        dst.cmd("x-verify-dirty-guest")
    dst.proc.send_signal(signal.SIGTERM)  # closes the userfaultfd before the VM: it exits
    assert dst.proc.wait(60) == 130  # as for Ctrl-C: vmferry run's exit status for SIGTERM
    assert "Traceback" not in dst.log()


def test_killed_destination_after_run_leaves_the_source_paused_with_its_state(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst, uri = _pair(tmp_path, procs)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW, "max-postcopy-bandwidth": TRICKLE})
    src.cmd("migrate", uri=uri)
    src.cmd("migrate-start-postcopy")
    _status(dst, "postcopy-active")
    dst.proc.kill()
    dst.proc.wait(30)
    info = _status(src, "postcopy-paused")
    assert "postcopy paused" in info["error-desc"] and info["ram"]["remaining"] > 0
    assert src.status() in ("paused", "postmigrate")  # the guest is nowhere whole: never resumed here
    with pytest.raises(QmpReplyError, match="cannot be cancelled"):
        src.cmd("migrate_cancel")
    with pytest.raises(QmpReplyError, match="the source cannot resume it"):
        src.cmd("cont")
    assert "Traceback" not in src.log()


@pytest.mark.parametrize("silent", ["source", "destination"])
def test_a_silent_peer_after_run_pauses_the_other_side_within_the_heartbeat_limit(
        tmp_path: Path, procs: list[VmProcess], silent: str) -> None:
    src, dst, uri = _pair(tmp_path, procs)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW, "max-postcopy-bandwidth": TRICKLE})
    src.cmd("migrate", uri=uri)
    src.cmd("migrate-start-postcopy")
    _status(dst, "postcopy-active")
    stopped, other = (src, dst) if silent == "source" else (dst, src)
    t0 = time.monotonic()
    stopped.proc.send_signal(signal.SIGSTOP)
    info = _status(other, "postcopy-paused", DETECTED_WITHIN_S + 30)
    took = time.monotonic() - t0
    print(f"\n[postcopy] silent {silent}: {other.name} paused in {took:.2f} s")
    assert took < DETECTED_WITHIN_S
    assert f"no heartbeat from the {silent}" in info["error-desc"]
    stopped.proc.send_signal(signal.SIGCONT)
    _status(stopped, "postcopy-paused", 60)  # the stopped side sees the broken link once it runs
    if silent == "destination":
        assert src.status() in ("paused", "postmigrate")  # the source never runs the guest again


def _paused_both(src: VmProcess, dst: VmProcess) -> None:
    _status(src, "postcopy-paused")
    _status(dst, "postcopy-paused")


def test_recovery_the_qemu_way_after_migrate_pause_completes_with_nothing_lost(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    """migrate-pause, then migrate-recover on the destination and migrate resume on the source;
    a second pause during the recovered push (a double failure) lands back in postcopy-paused
    and a second recovery completes."""
    src, dst, uri = _pair(tmp_path, procs)
    _switch_with_a_request(src, dst, uri, release=False)  # the push trickles: still going below
    src.cmd("migrate-pause")
    _paused_both(src, dst)
    assert "migrate-pause" in src.cmd("query-migrate")["error-desc"]
    assert dst.status() == "running"
    with pytest.raises(QmpReplyError, match="Cannot resume if there is no paused migration"):
        dst.cmd("migrate", uri=uri, resume=True)
    dst.cmd("migrate-recover", uri=f"unix:{tmp_path / 'nobody-comes.sock'}")  # replaced below
    for attempt in (1, 2):
        again = f"unix:{tmp_path / f'recover{attempt}.sock'}"
        dst.cmd("migrate-recover", uri=again)
        assert dst.cmd("query-migrate")["status"] == "postcopy-paused"  # until the source connects
        src.cmd("migrate", uri=again, resume=True)
        _status(src, "postcopy-active")
        _status(dst, "postcopy-active")
        if attempt == 1:
            dst.cmd("migrate-pause")  # the double failure: from the other side this time
            _paused_both(src, dst)
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    info = dst.wait_migration(timeout=120)
    assert info["status"] == "completed", info
    s = src.wait_migration(timeout=60)
    assert s["status"] == "completed" and "error-desc" not in s, s
    x = info["x-postcopy"]
    assert x["pages-placed"] == x["pages-to-come"]
    _verified(dst)
    assert "Traceback" not in src.log()


def test_the_source_switches_by_itself_when_precopy_cannot_converge(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    """x-postcopy-after-ms: after pass 2 the source forecasts precopy (here it can never switch
    over: downtime-limit 1 ms) against the budget, and switches to postcopy without being told.
    (Which of the two reasons it gives depends on measured rates: not asserted.)"""
    src, dst, uri = _pair(tmp_path, procs, append="ws=8 rate=20 verify=1 check=full")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW, "x-postcopy-after-ms": 1})
    src.cmd("migrate", uri=uri)
    info = dst.wait_migration(timeout=180)
    assert info["status"] == "completed", info
    s = src.wait_migration(timeout=60)
    assert s["status"] == "completed", s
    assert s["x-postcopy-auto"].startswith("precopy ")
    assert len(s["passes"]) >= 2
    _verified(dst)


def test_link_down_after_run_pauses_both_sides_and_the_qemu_sequence_recovers(
        tmp_path: Path, procs: list[VmProcess], netns_link: VethLink) -> None:
    """The destination in a network namespace behind a veth: the link goes down mid-postcopy;
    both sides notice within the heartbeat limit and pause; with the link up again,
    migrate-recover + migrate resume finish the migration with nothing lost."""
    address = netns_link.address
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "defer", wrap=netns_link.exec_prefix)
    procs.append(dst)
    src.wait_serial(r"verify ok")
    _caps(src, "postcopy-ram")
    _caps(dst, "postcopy-ram")
    src.cmd("migrate-set-parameters", **{"downtime-limit": NEVER_CONVERGES_MS})
    dst.cmd("migrate-incoming", uri=f"tcp:{address}:4444")
    _switch_with_a_request(src, dst, f"tcp:{address}:4444", release=False)
    t0 = time.monotonic()
    netns_link.down()
    try:
        s = _status(src, "postcopy-paused", DETECTED_WITHIN_S + 30)
        d = _status(dst, "postcopy-paused", DETECTED_WITHIN_S + 30)
        took = time.monotonic() - t0
    finally:
        netns_link.up()
    print(f"\n[postcopy] link down: both sides paused within {took:.2f} s")
    assert took < DETECTED_WITHIN_S
    assert "no heartbeat" in s["error-desc"] and "no heartbeat" in d["error-desc"], (s, d)
    dst.cmd("migrate-recover", uri=f"tcp:{address}:4445")
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    src.cmd("migrate", uri=f"tcp:{address}:4445", resume=True)
    assert dst.wait_migration(timeout=120)["status"] == "completed"
    assert src.wait_migration(timeout=60)["status"] == "completed"
    _verified(dst)


def _active_again(host_if: str, src: VmProcess, dst: VmProcess) -> tuple[float, float]:
    """Right after the link was set up: poll until both sides are postcopy-active; seconds from
    `ip link set up` and from the kernel reporting the link operational (operstate up: the kernel
    applies a carrier change up to 1 s later, rate-limited, and drops what is sent before)."""
    t_up = time.monotonic()
    t_oper: float | None = None
    operstate = Path(f"/sys/class/net/{host_if}/operstate")
    deadline = t_up + 60
    while True:
        now = time.monotonic()
        if t_oper is None and operstate.read_text().strip() == "up":
            t_oper = now
        if all(vm.cmd("query-migrate")["status"] == "postcopy-active" for vm in (src, dst)):
            done = time.monotonic()
            return done - t_up, done - (t_oper if t_oper is not None else done)
        assert now < deadline, "not active again within 60 s of link-up"
        time.sleep(0.01)


def test_link_down_three_times_with_reconnect_on_resumes_by_itself(
        tmp_path: Path, procs: list[VmProcess], netns_link: VethLink) -> None:
    """x-postcopy-reconnect on both sides: three link drops of 5 s in one postcopy
    migration; each time both sides pause (heartbeats) and, once the link is up, reconnect and
    resume with no command; the migration completes with nothing lost. The time from link-up to
    postcopy-active is printed, not asserted (a loaded host)."""
    address = netns_link.address
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "defer", wrap=netns_link.exec_prefix)
    procs.append(dst)
    src.wait_serial(r"verify ok")
    src.cmd("migrate-set-parameters", **{"downtime-limit": NEVER_CONVERGES_MS})
    for vm in (src, dst):
        _caps(vm, "postcopy-ram")
        vm.cmd("migrate-set-parameters", **{"x-postcopy-reconnect": True})
    dst.cmd("migrate-incoming", uri=f"tcp:{address}:4444")
    _switch_with_a_request(src, dst, f"tcp:{address}:4444", release=False)
    for drop in range(3):
        netns_link.down()
        t_down = time.monotonic()
        try:
            _status(src, "postcopy-paused", DETECTED_WITHIN_S + 30)
            _status(dst, "postcopy-paused", DETECTED_WITHIN_S + 30)
            time.sleep(max(0.0, LINK_DOWN_S - (time.monotonic() - t_down)))
        finally:
            netns_link.up()
        from_up, from_oper = _active_again(netns_link.host_if, src, dst)
        print(f"\n[postcopy] drop {drop + 1}: active again {from_up:.2f} s after link-up, "
              f"{from_oper:.2f} s after the kernel reported it up (operstate)")
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    assert dst.wait_migration(timeout=120)["status"] == "completed"
    assert src.wait_migration(timeout=60)["status"] == "completed"
    _verified(dst)
