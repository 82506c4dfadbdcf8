"""Several channels (capability multifd) between two real `vmferry run` processes on real KVM.

The proof is the `dirty` guest's own full-memory check on the destination after switchover; the
`multifd-bytes` of query-migrate, on both sides, shows the pages did travel on the data channels.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relays import CuttingRelay, StallingRelay, migrate_through
from vmproc import QmpReplyError, VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "256M"
DIRTY = "ws=32 rate=20 verify=1 check=full"


def _source(tmp: Path, procs: list[VmProcess], channels: int, compression: str = "none",
            dirty: str = DIRTY) -> VmProcess:
    src = VmProcess(tmp, "src", "-m", MEM, "--guest", "dirty", "--append", dirty)
    procs.append(src)
    src.wait_serial(r"verify ok")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    src.cmd("migrate-set-parameters", **{"multifd-channels": channels, "multifd-compression": compression})
    return src


def _dest(tmp: Path, procs: list[VmProcess], incoming: str) -> VmProcess:
    dst = VmProcess(tmp, "dst", "-m", MEM, "--incoming", incoming)
    procs.append(dst)
    return dst


def _assert_verified(dst: VmProcess) -> None:
    start = len(dst.serial())
    dst.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
    assert "FAIL" not in dst.serial()


def _assert_source_survives(src: VmProcess) -> None:
    assert src.status() == "running"
    start = len(src.serial())
    src.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
    assert "FAIL" not in src.serial()


@pytest.mark.parametrize(("transport", "channels", "compression"),
                         [("tcp", 2, "none"), ("unix", 2, "zstd"), ("tcp", 3, "auto")])
def test_multifd_migrates_a_dirtying_guest_and_it_verifies(
    tmp_path: Path, procs: list[VmProcess], transport: str, channels: int, compression: str
) -> None:
    src = _source(tmp_path, procs, channels, compression)
    incoming = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/mig.sock"
    dst = _dest(tmp_path, procs, incoming)
    src.cmd("migrate", uri=dst.incoming_uri())
    info = src.wait_migration(timeout=120)
    assert info["status"] == "completed", info
    assert info["ram"]["transferred"] > 0
    dinfo = dst.wait_migration(timeout=120)
    assert dinfo["status"] == "completed", dinfo
    assert dst.status() == "running"
    # The pages went on the data channels: nearly all bytes, on both sides.
    assert info["ram"]["multifd-bytes"] > info["ram"]["transferred"] // 2, info
    assert dinfo["ram"]["multifd-bytes"] > dinfo["ram"]["transferred"] // 2, dinfo
    _assert_verified(dst)


def test_multifd_with_a_file_uri_is_refused_by_name(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs, 2)
    with pytest.raises(QmpReplyError, match="multifd needs a tcp: or unix: URI"):
        src.cmd("migrate", uri=f"file:{tmp_path}/vm.snap")
    _assert_source_survives(src)


def _cut_migration(tmp: Path, procs: list[VmProcess], channels: int) -> tuple[VmProcess, VmProcess, dict]:
    """Migrate through a relay that resets the first data channel 2 MiB into it; max-bandwidth
    holds precopy back until then, so the cut falls mid-precopy; then it is lifted so the
    dirtying guest converges."""
    src = _source(tmp, procs, channels)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
    dst = _dest(tmp, procs, "tcp:127.0.0.1:0")
    info = migrate_through(src, CuttingRelay(dst.incoming_address(), cut_after=2 << 20))
    return src, dst, info


def test_a_lost_data_channel_is_re_sent_on_the_others(tmp_path: Path, procs: list[VmProcess]) -> None:
    """One of two data channels is cut mid-precopy: every page it carried is sent again on the
    other, the destination keeps the newest copies, and the guest verifies there."""
    src, dst, info = _cut_migration(tmp_path, procs, 2)
    assert info["status"] == "completed", info
    assert len(info["multifd-lost-channels"]) == 1, info
    assert info["multifd-lost-channels"][0].startswith("channel 0: "), info
    dinfo = dst.wait_migration(timeout=60)
    assert dinfo["status"] == "completed", dinfo
    assert dst.status() == "running"
    _assert_verified(dst)


def test_losing_the_only_data_channel_fails_cleanly_and_the_source_keeps_running(
    tmp_path: Path, procs: list[VmProcess]
) -> None:
    """Nothing left to re-send on: the migration fails naming the lost channel, the guest never
    starts on the destination and the source runs on."""
    src, dst, info = _cut_migration(tmp_path, procs, 1)
    assert info["status"] == "failed", info
    assert "every multifd data channel was lost (channel 0: " in info["error-desc"], info
    dinfo = dst.wait_migration(timeout=60)
    assert dinfo["status"] == "failed", dinfo
    assert dst.status() == "inmigrate"  # the guest never started there
    _assert_source_survives(src)


def test_heartbeats_keep_a_slow_multifd_migration_alive(tmp_path: Path, procs: list[VmProcess]) -> None:
    """With multifd the main stream carries almost nothing while the data channels send pages:
    the source must still beat on it, or the destination's watchdog (3 intervals of a silent
    main stream) gives up on a healthy migration. Short heartbeats on both sides and a slow
    max-bandwidth make a pass last many intervals; the guest writes its working set once, so the
    migration converges whatever the host's load."""
    src = _source(tmp_path, procs, 2, dirty="ws=32 rate=0 verify=1 check=full")
    dst = _dest(tmp_path, procs, "tcp:127.0.0.1:0")
    for side in (src, dst):
        side.cmd("migrate-set-parameters", **{"x-heartbeat-ms": 200})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
    src.cmd("migrate", uri=dst.incoming_uri())
    info = src.wait_migration(timeout=180)
    assert info["status"] == "completed", info
    assert info["total-time"] > 2000, info  # many heartbeat intervals long: the case under test
    dinfo = dst.wait_migration(timeout=120)
    assert dinfo["status"] == "completed", dinfo
    _assert_verified(dst)


def _stalled_migration(tmp: Path, procs: list[VmProcess], mode: str, dirty: str = DIRTY,
                       stall_after: int = 2 << 20) -> tuple[VmProcess, VmProcess, dict]:
    """As _cut_migration, through a StallingRelay, with heartbeats on (every second: the
    default, said on both sides) ."""
    src = _source(tmp, procs, 2, dirty=dirty)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20, "x-heartbeat-ms": 1000})
    dst = _dest(tmp, procs, "tcp:127.0.0.1:0")
    dst.cmd("migrate-set-parameters", **{"x-heartbeat-ms": 1000})
    info = migrate_through(src, StallingRelay(dst.incoming_address(), stall_after, mode))
    return src, dst, info


def test_a_stalled_data_channel_is_lost_and_re_sent(tmp_path: Path, procs: list[VmProcess]) -> None:
    """The relay stops reading one data channel mid-precopy: with heartbeats on, the source sees
    its send queue stand still for their limit, gives the channel up and re-sends its pages on
    the other; the guest verifies on the destination (not a wait for DATA_ACCEPT_S)."""
    src, dst, info = _stalled_migration(tmp_path, procs, "stop")
    assert info["status"] == "completed", info
    assert len(info["multifd-lost-channels"]) == 1, info
    assert info["multifd-lost-channels"][0].startswith("channel 0: stalled: "), info
    dinfo = dst.wait_migration(timeout=60)
    assert dinfo["status"] == "completed", dinfo
    _assert_verified(dst)


def test_a_data_channel_whose_end_never_arrives_fails_by_name(tmp_path: Path, procs: list[VmProcess]) -> None:
    """The relay holds back the last bytes of one data channel: the source saw them leave, so
    only the destination, waiting for that channel's END after the main stream's, can tell; with
    heartbeats on it names the stall (not "did not end" after DATA_ACCEPT_S); the guest never
    starts there. The source had sent its END, so it stays paused until `cont` (source.py), and
    then runs on."""
    src, dst, info = _stalled_migration(tmp_path, procs, "hold", dirty="ws=32 rate=0 verify=1 check=full",
                                        stall_after=64 << 10)
    assert info["status"] == "failed", info
    dinfo = dst.wait_migration(timeout=60)
    assert dinfo["status"] == "failed", dinfo
    assert "multifd: data channel 0 stalled: nothing arrived" in dinfo["error-desc"], (info, dinfo)
    assert "multifd: data channel 0 stalled: nothing arrived" in info["error-desc"], (info, dinfo)
    assert dst.status() == "inmigrate"
    assert src.status() == "paused"
    src.cmd("cont")
    _assert_source_survives(src)
