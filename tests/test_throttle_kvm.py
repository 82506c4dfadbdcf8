"""auto-converge on real KVM: a guest dirtying faster than a capped max-bandwidth gets throttled,
the migration completes, and the throttle is gone once it ends (completed or cancelled); the same
over QMP between two `vmferry run` processes (the capability, the parameters, query-migrate's
cpu-throttle-percentage).

The source is a Machine in this process (its vCPU runners can be inspected: what they slept, and
that no throttle timer is left), running the `dirty` guest flat out at CPL3; the destination is
a `vmferry run --incoming` process over real TCP. No assertion depends on timing: the guest
dirties its whole working set in far less than a pass at the capped bandwidth, on any load.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from polling import ticks, wait_for
from vmferry.devices.state import MachineDeviceState
from vmferry.machine.machine import Machine
from vmferry.migration.params import MigrationParameters
from vmferry.migration.source import OutgoingMigration
from vmferry.migration.state import MigrationState, MigrationStatus
from vmferry.transport.channel import Channel
from vmferry.transport.connect import connect_outgoing
from vmferry.vmm import guest_image
from vmproc import VmProcess

pytestmark = [pytest.mark.kvm]

MiB = 1 << 20
HEADER = 0x9000  # the dirty guest's header (guests/dirty_layout.h)
# Flat out (rate far above what the CPU reaches), no in-guest checks to slow it.
GUEST = "ws=48 rate=100000 verify=0"
# Non-default values, so a run that only ever shows these proves each one was read.
# The switchover sends at full speed (max-bandwidth caps precopy only), so a small downtime-limit
# is what keeps a 48 MiB working set, much of it dirty after every pass, from converging
# unthrottled. A trigger threshold of 1 % makes every period high even when a loaded host starves
# the guest: throttling never depends on how fast the guest gets to run.
PARAMS = {"max-bandwidth": 32 * MiB, "downtime-limit": 15, "cpu-throttle-initial": 60,
          "cpu-throttle-increment": 30, "max-cpu-throttle": 95, "throttle-trigger-threshold": 1}


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[VmProcess]:
    dst = VmProcess(tmp_path, "dst", "-m", "128M", "--incoming", "tcp:127.0.0.1:0")
    try:
        yield dst
    finally:
        dst.close()


def _boot(src: Machine) -> None:
    """Start the guest and wait until its initial fill is done (steady rewriting from then on)."""
    src.load_kernel(guest_image("dirty"), GUEST)
    src.start()
    deadline = time.monotonic() + 120
    while True:
        npages, filled = (int.from_bytes(src.read_gpa(HEADER + off, 8), "little") for off in (0x18, 0x40))
        if npages and filled == npages:
            return
        assert time.monotonic() < deadline, "the guest never finished its initial fill"
        time.sleep(0.05)


def _start(src: Machine, dst: VmProcess) -> tuple[OutgoingMigration, MigrationState, list[int]]:
    """Start a migration with auto-converge; query-migrate's throttle is recorded at each pass's
    start (on the migration thread) and by a watcher thread."""
    channel: Future[Channel] = Future()
    channel.set_result(connect_outgoing(dst.incoming_uri()))
    state = MigrationState()
    seen: list[int] = []

    def record() -> None:
        pct = out.stats.query(state.status).get("cpu-throttle-percentage")
        if pct is not None and (not seen or seen[-1] != pct):
            seen.append(pct)

    out = OutgoingMigration(src, MachineDeviceState(src), channel, MigrationParameters.from_qmp(PARAMS),
                            state, on_pass=lambda _: record(), auto_converge=True)

    def watch() -> None:
        while True:
            record()
            if not out._thread.is_alive():
                return
            time.sleep(0.02)

    out.start()
    threading.Thread(target=watch, daemon=True).start()
    return out, state, seen


def _assert_unthrottled(src: Machine, out: OutgoingMigration, state: MigrationState) -> None:
    assert "cpu-throttle-percentage" not in out.stats.query(state.status)
    assert src.cpu_throttle_percentage == 0
    for r in src._runners:
        assert r.throttle_percentage == 0 and r._throttle_timer is None


def test_auto_converge_throttles_and_the_migration_completes(destination: VmProcess) -> None:
    with Machine(memory=128 * MiB) as src:
        _boot(src)
        out, state, seen = _start(src, destination)
        out.join(300)
        assert not out._thread.is_alive(), "the migration did not finish"
        assert state.status == MigrationStatus.COMPLETED, out.stats.error
        # The throttle rose, first to cpu-throttle-initial, then by cpu-throttle-increment up to
        # max-cpu-throttle: 60, 90, 95 (as far as the migration needed), and query-migrate said so.
        assert out.auto_converge is not None
        history = out.auto_converge.history
        assert history and history == [60, 90, 95][: len(history)], (history, out.stats.query(state.status))
        assert seen and set(seen) <= set(history), (seen, history)
        # The vCPU slept for the throttle (what it slept is accounted; its accuracy: bench_throttle.py).
        runner = src._runners[0]
        assert runner.throttle_sleeps > 0 and runner.throttle_slept_ns > 0
        _assert_unthrottled(src, out, state)
        assert destination.wait_migration()["status"] == "completed"
        start = len(destination.serial())
        src.shutdown()
    # The destination's guest runs on, unthrottled (nothing of the throttle migrates).
    destination.wait_serial(r"dirty: t=\d+", after=start, timeout=60)


def test_cancel_removes_the_throttle_and_the_source_runs_on(destination: VmProcess) -> None:
    with Machine(memory=128 * MiB) as src:
        _boot(src)
        out, state, seen = _start(src, destination)
        deadline = time.monotonic() + 240
        while src.cpu_throttle_percentage == 0:
            assert out._thread.is_alive(), f"finished before throttling: {state.status} {out.stats.error}"
            assert time.monotonic() < deadline, "never throttled"
            time.sleep(0.05)
        out.cancel()
        out.join(60)
        assert state.status == MigrationStatus.CANCELLED
        _assert_unthrottled(src, out, state)
        assert src.running
        slept = src._runners[0].throttle_sleeps
        hdr = src.read_gpa(HEADER + 0x48, 8)  # the guest's page-write counter (dirty_layout.h)
        deadline = time.monotonic() + 60
        while src.read_gpa(HEADER + 0x48, 8) == hdr:  # the guest still writes
            assert time.monotonic() < deadline, "the guest stopped writing after the cancel"
            time.sleep(0.05)
        assert src._runners[0].throttle_sleeps == slept  # and never sleeps for the throttle again
        src.shutdown()


# Over QMP: throttle at 60 % and no further (max-cpu-throttle), so with the bandwidth capped the
# throttle holds until the test lifts the cap: nothing depends on catching a short state.
QMP_PARAMS = {**PARAMS, "max-cpu-throttle": 60}


def _throttled_over_qmp(tmp: Path, procs: list[VmProcess]) -> tuple[VmProcess, VmProcess]:
    src = VmProcess(tmp, "src", "-m", "128M", "--guest", "dirty", "--append", "ws=48 rate=100000 verify=1")
    procs.append(src)
    dst = VmProcess(tmp, "dst", "-m", "128M", "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    src.wait_serial(r"verify ok")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "auto-converge", "state": True}])
    src.cmd("migrate-set-parameters", **QMP_PARAMS)
    src.cmd("migrate", uri=dst.incoming_uri())
    deadline = time.monotonic() + 240
    while True:
        info = src.cmd("query-migrate")
        if info.get("cpu-throttle-percentage") == 60:
            return src, dst
        assert info["status"] in ("setup", "active"), info
        assert time.monotonic() < deadline, "never throttled"
        time.sleep(0.05)


def test_over_qmp_query_migrate_reports_the_throttle_until_completion(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst = _throttled_over_qmp(tmp_path, procs)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 300})
    info = src.wait_migration(timeout=240)
    assert info["status"] == "completed", info
    assert "cpu-throttle-percentage" not in info
    assert dst.wait_migration()["status"] == "completed"
    start = len(dst.serial())
    dst.wait_serial(r"verify ok", after=start, timeout=60)
    assert "FAIL" not in dst.serial()


def test_over_qmp_cancel_removes_the_throttle(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, _ = _throttled_over_qmp(tmp_path, procs)
    src.cmd("migrate_cancel")
    info = src.wait_migration(timeout=120)
    assert info["status"] == "cancelled" and "cpu-throttle-percentage" not in info, info
    assert src.status() == "running"
    start = len(src.serial())
    src.wait_serial(r"verify ok", after=start, timeout=60)
    assert "FAIL" not in src.serial()


def test_a_kick_whose_sleep_was_dropped_does_not_stop_the_vcpu(tmp_path: Path) -> None:
    """A throttle kick whose sleep set_throttle(0) dropped leaves only immediate_exit set: the
    runner must consume it, or every KVM_RUN returns EINTR at once (the cancel test found this)."""
    out = tmp_path / "serial"
    with Machine(memory=32 * MiB, serial=f"file:{out}") as m:
        m.load_kernel(guest_image("heartbeat"), "hz=100")
        m.start()
        wait_for(lambda: len(ticks(out)) >= 3, "ticks")
        m.set_cpu_throttle(50)
        m.set_cpu_throttle(0)
        runner = m._runners[0]
        runner._kick()  # what the timer does; nothing is owed now
        seen = len(ticks(out))
        wait_for(lambda: len(ticks(out)) >= seen + 5, "ticks after the kick")
        assert runner._throttle_timer is None and runner.throttle_percentage == 0
        m.shutdown()
