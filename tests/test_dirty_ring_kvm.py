"""KVM's dirty ring on real KVM (`--accel kvm,dirty-ring-size=N`): the ring producer catches the
guest's writes, a full ring is harvested and the vCPU runs on, a migration of a dirtying guest
verifies, the dirty limit slows the writing vCPU and not the computing one, and the QMP names
(dirty-limit, set/cancel/query-vcpu-dirty-limit, calc-dirty-rate's dirty-ring mode) work with the
ring and are refused by name without it.

No assertion depends on timing: waits poll with generous deadlines; what is compared is what the
guest recorded against what the log caught, or counters that are zero for one vCPU by design.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from polling import wait_for
from vmferry.devices.state import MachineDeviceState
from vmferry.errors import VmferryError
from vmferry.machine.machine import Machine
from vmferry.machine.machine_type import MACHINE_TYPES
from vmferry.migration.params import MigrationParameters
from vmferry.migration.source import OutgoingMigration
from vmferry.migration.state import MigrationState, MigrationStatus
from vmferry.transport.channel import Channel
from vmferry.transport.connect import connect_outgoing
from vmferry.vmm import guest_image
from vmproc import QmpReplyError, VmProcess

pytestmark = [pytest.mark.kvm]

MiB = 1 << 20
PAGE = 4096
HEADER = 0x9000  # the dirty guest's header (guests/dirty_layout.h)
COMPUTE = 0x9080  # compute=1: the second vCPU's loop counter
NO_RING = "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'"


def _u64(m: Machine, gpa: int) -> int:
    return int.from_bytes(m.read_gpa(gpa, 8), "little")


def _boot(m: Machine, cmdline: str) -> None:
    """Start the dirty guest and wait until its initial fill is done."""
    m.load_kernel(guest_image("dirty"), cmdline)
    m.start()
    wait_for(lambda: _u64(m, HEADER + 0x18) and _u64(m, HEADER + 0x40) == _u64(m, HEADER + 0x18),
             "the guest's initial fill", 120)


def _table(m: Machine) -> np.ndarray:
    npages, table = _u64(m, HEADER + 0x18), _u64(m, HEADER + 0x20)
    return np.frombuffer(m.read_gpa(table, npages * 4), dtype=np.uint32).copy()


def test_ring_producer_catches_every_guest_write_and_full_rings_are_harvested() -> None:
    with Machine(memory=64 * MiB, dirty_ring_size=1024) as m:
        assert m.dirty_ring is not None and m.vm.dirty_ring_entries == 1024
        _boot(m, "ws=8 rate=100000 verify=0")
        block = m.ram_blocks[0]
        block.add_dirty_consumer("test")
        block.start_dirty_log()
        before = _table(m)  # after the log started: a page changed from here on is logged
        writes0 = _u64(m, HEADER + 0x48)
        # Far more page writes than the ring holds: it fills again and again, and each time the
        # vCPU's thread harvests it and the guest goes on writing.
        wait_for(lambda: _u64(m, HEADER + 0x48) > writes0 + 8 * 1024, "the guest to write on", 120)
        assert m.dirty_ring.counters[0].full_exits > 0
        m.pause()
        block.sync_dirty()
        changed = np.flatnonzero(_table(m) != before)
        assert changed.size > 0
        ws_page, table_gpa = _u64(m, HEADER + 0x10) // PAGE, _u64(m, HEADER + 0x20)
        logged = set(block.dirty_pages("test").tolist())
        missed = [int(p) for p in ws_page + changed if int(p) not in logged]
        assert not missed, f"{len(missed)} of {changed.size} rewritten pages not in the dirty log"
        missed_table = {int(t) for t in (table_gpa + changed * 4) // PAGE} - logged
        assert not missed_table
        block.release_dirty_consumer("test")
        assert not block.dirty_log_active


def test_dirty_ring_size_is_checked_by_name() -> None:
    for bad in (1000, 512, 1 << 30):
        with pytest.raises(VmferryError, match=f"dirty-ring-size={bad}"):
            Machine(memory=16 * MiB, dirty_ring_size=bad)


@pytest.mark.parametrize("machine_type", sorted(MACHINE_TYPES))
def test_precopy_with_the_ring_on_verifies(procs: list[VmProcess], tmp_path: Path, machine_type: str) -> None:
    """Both machines with the ring, every machine type; the source dirties while migrating; the
    destination's guest checks every page (in the guest and from the host)."""
    src = VmProcess(tmp_path, "src", "-m", "128M", "-M", machine_type, "--accel", "kvm,dirty-ring-size=1024",
                    "--guest", "dirty", "--append", "ws=32 rate=40 verify=1")
    procs.append(src)
    dst = VmProcess(tmp_path, "dst", "-m", "128M", "-M", machine_type, "--accel", "kvm,dirty-ring-size=1024",
                    "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    src.wait_serial(r"verify ok")
    src.cmd("migrate", uri=dst.incoming_uri())
    info = src.wait_migration(timeout=240)
    assert info["status"] == "completed", info
    assert info["ram"]["dirty-sync-count"] >= 2
    assert dst.wait_migration()["status"] == "completed"
    start = len(dst.serial())
    dst.wait_serial(r"verify ok", after=start, timeout=60)
    assert "FAIL" not in dst.serial()
    assert dst.cmd("x-verify-dirty-guest")["ok"]


def _writes_and_loops(m: Machine, secs: float) -> tuple[int, int]:
    """The writer's page writes and the computing vCPU's loops over about `secs` seconds."""
    w0, c0 = _u64(m, HEADER + 0x48), _u64(m, COMPUTE)
    time.sleep(secs)
    return _u64(m, HEADER + 0x48) - w0, _u64(m, COMPUTE) - c0


def test_ring_full_sleep_slows_only_the_writer() -> None:
    """The mechanism: both vCPUs are told to sleep 3 s after each ring-full exit; only the
    writer fills its ring, so only the writer sleeps. With the dirty log on and nothing else
    harvesting, the writer gets at most one ring's worth of new pages per 3 s, so its writes per
    computing loop drop several-fold whatever the host's load (both vCPUs share it alike)."""
    with Machine(memory=128 * MiB, smp=2, dirty_ring_size=1024) as m:
        _boot(m, "ws=48 rate=100000 verify=0 compute=1")
        for b in m.ram_blocks:
            b.add_dirty_consumer("test")
            b.start_dirty_log()
        free_writes, free_loops = _writes_and_loops(m, 6.0)
        for i in range(2):
            m.set_dirty_limit_sleep(i, 3_000_000)
        wait_for(lambda: m._runners[0].dirty_limit_sleeps >= 1, "the writer's first ring-full sleep", 120)
        writes, loops = _writes_and_loops(m, 6.0)
        assert m._runners[1].dirty_limit_sleeps == 0  # never filled its ring
        assert loops > 0 and free_loops > 0 and free_writes > 0
        assert writes / loops < free_writes / free_loops / 3, (writes, loops, free_writes, free_loops)
        for i in range(2):
            m.set_dirty_limit_sleep(i, 0)  # ends a sleep under way
        slept = m._runners[0].dirty_limit_sleeps
        w0 = _u64(m, HEADER + 0x48)
        wait_for(lambda: _u64(m, HEADER + 0x48) > w0 + 4096, "the writer to run free again", 120)
        assert m._runners[0].dirty_limit_sleeps == slept


def test_dirty_limiter_throttles_the_writer_and_not_the_computing_vcpu() -> None:
    """The algorithm: with every vCPU limited to 1 MB/s, the writer gets a sleep per ring-full
    exit and sleeps; the computing vCPU dirties one page (its counter), gets no sleep and never
    sleeps, and keeps computing. Cancelling lifts it all and stops the limiter's dirty log."""
    with Machine(memory=128 * MiB, smp=2, dirty_ring_size=4096) as m:
        _boot(m, "ws=48 rate=100000 verify=0 compute=1")
        limiter = m.dirty_limiter
        assert limiter is not None
        limiter.set(None, 1)
        # The first period measures, the next ones throttle: wait for the writer's sleeps.
        wait_for(lambda: m._runners[0].dirty_limit_sleeps >= 2 and limiter.periods >= 3,
                 "the writer to sleep for its dirty limit", 120)
        _, computed = _writes_and_loops(m, 1.0)
        rates = {q["cpu-index"]: q for q in limiter.query()}
        assert rates[0]["limit-rate"] == rates[1]["limit-rate"] == 1
        assert m._runners[1].dirty_limit_sleeps == 0 and m._runners[1].dirty_limit_slept_ns == 0
        assert limiter.vcpus[1].throttle_us == 0
        assert computed > 0
        assert limiter.vcpus[0].throttle_us > 0 and m._runners[0].dirty_limit_slept_ns > 0
        assert limiter.throttle_time_per_round() == limiter.vcpus[0].throttle_us
        limiter.cancel(None)
        assert limiter.query() == [] and not limiter.in_service
        assert m._runners[0].dirty_limit_us == 0
        assert not m.ram_blocks[0].dirty_log_active  # the limiter's dirty-log consumer is gone
        slept = m._runners[0].dirty_limit_sleeps
        w0 = _u64(m, HEADER + 0x48)
        wait_for(lambda: _u64(m, HEADER + 0x48) > w0 + 1024, "the writer to run free again", 120)
        assert m._runners[0].dirty_limit_sleeps == slept


# Over QMP: a source whose guest cannot converge at the capped bandwidth unthrottled (see
# test_throttle_kvm.py), with dirty-limit instead of auto-converge.
DIRTY_LIMIT_PARAMS = {"max-bandwidth": 32 * MiB, "downtime-limit": 15, "throttle-trigger-threshold": 1,
                      "vcpu-dirty-limit": 1, "x-vcpu-dirty-limit-period": 500}


def test_dirty_limit_migration_over_qmp(procs: list[VmProcess], tmp_path: Path) -> None:
    src = VmProcess(tmp_path, "src", "-m", "128M", "--smp", "2", "--accel", "kvm,dirty-ring-size=4096",
                    "--guest", "dirty", "--append", "ws=48 rate=100000 verify=1 compute=1")
    procs.append(src)
    dst = VmProcess(tmp_path, "dst", "-m", "128M", "--smp", "2", "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    src.wait_serial(r"verify ok")
    with pytest.raises(QmpReplyError, match="dirty-limit conflicts with auto-converge"):
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "auto-converge", "state": True},
                                                          {"capability": "dirty-limit", "state": True}])
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "dirty-limit", "state": True}])
    src.cmd("migrate-set-parameters", **DIRTY_LIMIT_PARAMS)
    params = src.cmd("query-migrate-parameters")
    assert params["vcpu-dirty-limit"] == 1 and params["x-vcpu-dirty-limit-period"] == 500
    src.cmd("migrate", uri=dst.incoming_uri())
    deadline = time.monotonic() + 240
    while True:
        info = src.cmd("query-migrate")
        if "dirty-limit-throttle-time-per-round" in info:
            break
        assert info["status"] in ("setup", "active"), info
        assert time.monotonic() < deadline, "dirty-limit never set in"
        time.sleep(0.05)
    assert "cpu-throttle-percentage" not in info
    assert isinstance(info["dirty-limit-ring-full-time"], int)
    limits = src.cmd("query-vcpu-dirty-limit")
    if limits:  # (unless the migration completed in between)
        assert [q["limit-rate"] for q in limits] == [1, 1]
        with pytest.raises(QmpReplyError, match="can't set dirty page limit while migration is running"):
            src.cmd("set-vcpu-dirty-limit", **{"dirty-rate": 5})
    info = src.wait_migration(timeout=240)
    assert info["status"] == "completed", info
    assert "dirty-limit-throttle-time-per-round" not in info
    assert src.cmd("query-vcpu-dirty-limit") == []  # lifted with the migration
    assert dst.wait_migration()["status"] == "completed"
    start = len(dst.serial())
    dst.wait_serial(r"verify ok", after=start, timeout=60)
    assert "FAIL" not in dst.serial()


def test_vcpu_dirty_limit_commands_and_dirty_ring_rate(procs: list[VmProcess], tmp_path: Path) -> None:
    vm = VmProcess(tmp_path, "vm", "-m", "64M", "--smp", "2", "--accel", "kvm,dirty-ring-size=2048",
                   "--guest", "dirty", "--append", "ws=8 rate=20 verify=0 compute=1")
    procs.append(vm)
    vm.wait_serial(r"compute: t=")
    assert vm.cmd("query-vcpu-dirty-limit") == []
    with pytest.raises(QmpReplyError, match="incorrect cpu index specified"):
        vm.cmd("set-vcpu-dirty-limit", **{"cpu-index": 2, "dirty-rate": 100})
    vm.cmd("set-vcpu-dirty-limit", **{"cpu-index": 1, "dirty-rate": 100})
    assert [(q["cpu-index"], q["limit-rate"]) for q in vm.cmd("query-vcpu-dirty-limit")] == [(1, 100)]
    vm.cmd("set-vcpu-dirty-limit", **{"dirty-rate": 300})
    limits = vm.cmd("query-vcpu-dirty-limit")
    assert [(q["cpu-index"], q["limit-rate"]) for q in limits] == [(0, 300), (1, 300)]
    vm.cmd("cancel-vcpu-dirty-limit", **{"cpu-index": 0})
    assert [q["cpu-index"] for q in vm.cmd("query-vcpu-dirty-limit")] == [1]
    vm.cmd("set-vcpu-dirty-limit", **{"cpu-index": 1, "dirty-rate": 0})  # 0 cancels
    assert vm.cmd("query-vcpu-dirty-limit") == []

    vm.cmd("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-ring"})
    info = wait_for(lambda: (q := vm.cmd("query-dirty-rate"))["status"] == "measured" and q,
                    "the dirty-ring measurement", 60)
    assert info["mode"] == "dirty-ring"
    vcpus = info["vcpu-dirty-rate"]
    assert [v["id"] for v in vcpus] == [0, 1]
    assert info["dirty-rate"] == sum(v["dirty-rate"] for v in vcpus)
    assert info["x-dirty-bytes"] > 0  # the writer wrote, so its ring delivered pages
    vm.cmd("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-bitmap"})  # the bitmap mode still works
    info = wait_for(lambda: (q := vm.cmd("query-dirty-rate"))["status"] == "measured" and q,
                    "the dirty-bitmap measurement", 60)
    assert info["x-dirty-bytes"] > 0 and "vcpu-dirty-rate" not in info


def test_without_the_ring_every_dirty_ring_name_is_refused(procs: list[VmProcess], tmp_path: Path) -> None:
    vm = VmProcess(tmp_path, "vm", "-m", "32M", "--guest", "heartbeat")
    procs.append(vm)
    with pytest.raises(QmpReplyError, match="dirty-limit requires KVM with accelerator property "
                                            "'dirty-ring-size' set"):
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "dirty-limit", "state": True}])
    assert not {c["capability"]: c["state"] for c in vm.cmd("query-migrate-capabilities")}["dirty-limit"]
    with pytest.raises(QmpReplyError, match="requires KVM with accelerator property 'dirty-ring-size'"):
        vm.cmd("set-vcpu-dirty-limit", **{"dirty-rate": 10})
    with pytest.raises(QmpReplyError, match="mode dirty-ring is not enabled"):
        vm.cmd("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-ring"})
    assert vm.cmd("cancel-vcpu-dirty-limit") == {}  # nothing to cancel: QEMU answers success
    assert vm.cmd("query-vcpu-dirty-limit") == []


def test_outgoing_migration_refuses_dirty_limit_without_the_ring() -> None:
    with Machine(memory=16 * MiB) as m:
        channel: Future[Channel] = Future()
        with pytest.raises(VmferryError, match="dirty-limit requires KVM with accelerator property"):
            OutgoingMigration(m, MachineDeviceState(m), channel, MigrationParameters(), MigrationState(),
                              dirty_limit=True)


def test_in_process_dirty_limit_migration_lifts_the_limit(procs: list[VmProcess], tmp_path: Path) -> None:
    """The source in this process: the limit is set after the trigger, its pass is recorded, and
    it is gone (runners included) once the migration completed."""
    dst = VmProcess(tmp_path, "dst", "-m", "128M", "--smp", "2", "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    with Machine(memory=128 * MiB, smp=2, dirty_ring_size=4096) as src:
        _boot(src, "ws=48 rate=100000 verify=0 compute=1")
        channel: Future[Channel] = Future()
        channel.set_result(connect_outgoing(dst.incoming_uri()))
        state = MigrationState()
        out = OutgoingMigration(src, MachineDeviceState(src), channel,
                                MigrationParameters.from_qmp(DIRTY_LIMIT_PARAMS), state, dirty_limit=True)
        out.start()
        out.join(300)
        assert not out._thread.is_alive(), "the migration did not finish"
        assert state.status == MigrationStatus.COMPLETED, out.stats.error
        assert out.dirty_limit is not None and out.dirty_limit.history == [1]
        assert out.dirty_limit_pass is not None
        assert src.dirty_limiter is not None and not src.dirty_limiter.in_service
        assert all(r.dirty_limit_us == 0 for r in src._runners)
        # (Whether the writer's ring filled while limited depends on how long the migration ran
        # after the trigger: test_dirty_limit_slows_the_writer_... checks the sleeping.)
        assert src._runners[1].dirty_limit_sleeps == 0  # the computing vCPU never slept
        src.shutdown()
    assert dst.wait_migration()["status"] == "completed"
