"""Live migration between two real `vmferry run` processes on real KVM.

The proof that nothing was lost is the `dirty` guest's own full-memory check after switchover
(`verify ok` printed by the destination's guest), plus the source surviving every failure.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import BlockDevices, BlockZero, DiskInfo
from vmproc import QmpReplyError, VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "256M"
DIRTY = "ws=32 rate=20 verify=1 check=full"


def _source(tmp: Path, procs: list[VmProcess], append: str = DIRTY) -> VmProcess:
    src = VmProcess(tmp, "src", "-m", MEM, "--guest", "dirty", "--append", append)
    procs.append(src)
    src.wait_serial(r"verify ok")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    return src


def _dest(tmp: Path, procs: list[VmProcess], incoming: str) -> VmProcess:
    dst = VmProcess(tmp, "dst", "-m", MEM, "--incoming", incoming)
    procs.append(dst)
    return dst


def _assert_destination_runs_verified(dst: VmProcess) -> None:
    info = dst.wait_migration()
    assert info["status"] == "completed", info
    assert dst.status() == "running"
    start = len(dst.serial())
    dst.wait_serial(r"verify ok gen=\d+", after=start, timeout=30)
    assert "FAIL" not in dst.serial()


def _assert_source_survives(src: VmProcess) -> None:
    assert src.status() == "running"
    start = len(src.serial())
    src.wait_serial(r"verify ok gen=\d+", after=start, timeout=30)
    assert "FAIL" not in src.serial()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_live_migration_completes_and_guest_verifies(
    tmp_path: Path, procs: list[VmProcess], transport: str
) -> None:
    src = _source(tmp_path, procs)
    incoming = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/mig.sock"
    dst = _dest(tmp_path, procs, incoming)
    src.cmd("migrate", uri=dst.incoming_uri())
    info = src.wait_migration()
    assert info["status"] == "completed", info
    assert src.status() == "postmigrate"
    assert info["ram"]["normal"] > 0 and info["ram"]["transferred"] > 0
    assert info["downtime"] >= 0 and info["total-time"] >= info["downtime"]
    assert len(info["passes"]) == info["ram"]["dirty-sync-count"] - 2  # + setup and final syncs
    # The return path's PROGRESS and ACK made it: the source planned with the destination's
    # numbers and says where the pause went, the destination's part as it measured it.
    assert info["expected-downtime-at-switchover"] <= 300  # within the default downtime-limit
    phases = info["downtime-phases"]
    assert {"pause", "stopped-ram", "stopped-devices", "end", "confirm", "destination-apply",
            "destination-start"} <= set(phases), phases
    _assert_destination_runs_verified(dst)
    events = [e["event"] for e in src.qmp.get_events()]
    assert "STOP" in events and "MIGRATION" in events and "MIGRATION_PASS" in events
    with pytest.raises(QmpReplyError, match="paused due to previous migration"):
        src.cmd("migrate", uri=dst.incoming_uri())


def test_snapshot_to_file_and_restore(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs)
    snap = tmp_path / "vm.snap"
    src.cmd("migrate", uri=f"file:{snap}")
    assert src.wait_migration()["status"] == "completed"
    dst = _dest(tmp_path, procs, f"file:{snap}")
    _assert_destination_runs_verified(dst)


def test_migration_over_inherited_fds(tmp_path: Path, procs: list[VmProcess]) -> None:
    """fd:N — a management tool hands both processes the ends of a socket pair."""
    a, b = socket.socketpair()
    afd, bfd = a.fileno(), b.fileno()
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY, pass_fds=(afd,))
    procs.append(src)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", f"fd:{bfd}", pass_fds=(bfd,))
    procs.append(dst)
    a.close()
    b.close()
    src.wait_serial(r"verify ok")
    src.cmd("migrate", uri=f"fd:{afd}")
    assert src.wait_migration()["status"] == "completed"
    _assert_destination_runs_verified(dst)


def _slow_migration(tmp: Path, procs: list[VmProcess]) -> tuple[VmProcess, VmProcess]:
    src = _source(tmp, procs)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})
    dst = _dest(tmp, procs, "tcp:127.0.0.1:0")
    src.cmd("migrate", uri=dst.incoming_uri())
    src.wait_migration(("active",), timeout=10)
    time.sleep(0.5)
    return src, dst


def test_cancel_on_source_keeps_source_running(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst = _slow_migration(tmp_path, procs)
    src.cmd("migrate_cancel")
    assert src.wait_migration()["status"] == "cancelled"
    _assert_source_survives(src)
    assert dst.wait_migration()["status"] == "failed"
    assert dst.status() == "inmigrate"


def test_cancel_on_destination_keeps_source_running(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst = _slow_migration(tmp_path, procs)
    dst.cmd("migrate_cancel")
    info = src.wait_migration()
    assert info["status"] == "failed"
    assert "cancelled on the destination" in info["error-desc"]
    _assert_source_survives(src)


def test_killed_destination_leaves_source_running(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst = _slow_migration(tmp_path, procs)
    dst.proc.kill()
    dst.proc.wait()
    info = src.wait_migration()
    assert info["status"] == "failed"
    _assert_source_survives(src)


class _CorruptingProxy:
    """A TCP relay that flips one bit of the byte at `offset` of the source's stream."""

    def __init__(self, target: tuple[str, int], offset: int) -> None:
        self.offset = offset
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, corrupt: bool) -> None:
        seen = 0
        try:
            while data := a.recv(1 << 16):
                if corrupt and seen <= self.offset < seen + len(data):
                    buf = bytearray(data)
                    buf[self.offset - seen] ^= 0x10
                    data = bytes(buf)
                seen += len(data)
                b.sendall(data)
        except OSError:
            pass
        finally:
            # Close only this direction: the other one may still be relaying the destination's
            # SHUT (its reason) to the source; cutting both would race it.
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                a.shutdown(socket.SHUT_RD)

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
        self._pipe(server, client, False)


def test_corrupted_byte_is_refused_naming_the_record(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs)
    dst = _dest(tmp_path, procs, "tcp:127.0.0.1:0")
    proxy = _CorruptingProxy(dst.incoming_address(), offset=3 << 20)  # inside the RAM pages
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
    dinfo = dst.wait_migration()
    assert dinfo["status"] == "failed"
    assert re.search(r"record \d+", dinfo["error-desc"]), dinfo
    assert "checksum" in dinfo["error-desc"]
    assert dst.status() == "inmigrate"  # the guest never started
    sinfo = src.wait_migration()
    assert sinfo["status"] == "failed"
    assert "record" in sinfo["error-desc"]
    _assert_source_survives(src)


def test_disk_state_for_a_destination_without_disks_is_refused_by_name(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    """A stream carrying disk records into a destination without disks: refused, naming the
    drive, never silently dropped."""
    enc = StreamEncoder()  # no machine type: any destination reads on
    stream = tmp_path / "disk.stream"
    stream.write_bytes(enc.header() + enc.encode(BlockDevices((DiskInfo(1, "vda", 1 << 20),)))
                       + enc.encode(BlockZero(1, 0, 8)) + enc.end())
    dst = _dest(tmp_path, procs, f"file:{stream}")
    info = dst.wait_migration()
    assert info["status"] == "failed", info
    assert "the source copies drive 'vda', but this destination has no such drive (drives: none)" \
        in info["error-desc"], info
    assert dst.status() == "inmigrate"  # the guest never started


def test_max_bandwidth_holds(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs, "ws=32 rate=0 verify=1")
    limit = 16 << 20
    src.cmd("migrate-set-parameters", **{"max-bandwidth": limit})
    dst = _dest(tmp_path, procs, "tcp:127.0.0.1:0")
    src.cmd("migrate", uri=dst.incoming_uri())
    info = src.wait_migration()
    assert info["status"] == "completed"
    # Bytes on the wire over the wall time they took: never above the limit (+5% for the
    # final record that may straddle a pacing slice).
    rate = info["ram"]["transferred"] / (info["total-time"] / 1000)
    assert info["ram"]["transferred"] > 32 << 20
    assert rate <= limit * 1.05, (rate, limit)
    _assert_destination_runs_verified(dst)


def test_bad_uri_is_an_error_and_vm_keeps_running(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs)
    for uri, msg in [("nope:1", "unknown migration URI scheme"), ("tcp:127.0.0.1", "port"),
                     ("tcp:127.0.0.1:1", "Connection refused"), ("unix:/nonexistent/x", "No such file")]:
        with pytest.raises(QmpReplyError, match=msg):
            src.cmd("migrate", uri=uri)
    _assert_source_survives(src)


@pytest.mark.parametrize(("dest_args", "message"), [
    (("-m", "128M"), "RAM block 'pc.ram' is 256 MiB"),
    (("-m", MEM, "--smp", "2"), "the source has 1 vCPUs but this destination has 2"),
    (("-m", MEM, "-M", "vmferry-9.9"), "unknown machine type"),
])
def test_mismatched_destination_is_refused_clearly(
    tmp_path: Path, procs: list[VmProcess], dest_args: tuple[str, ...], message: str
) -> None:
    src = _source(tmp_path, procs)
    try:
        dst = VmProcess(tmp_path, "dst", *dest_args, "--incoming", "tcp:127.0.0.1:0")
    except RuntimeError as e:  # refused before it could listen: the message is on its stderr
        assert message in str(e)
        return
    procs.append(dst)
    src.cmd("migrate", uri=dst.incoming_uri())
    dinfo = dst.wait_migration()
    assert dinfo["status"] == "failed" and message in dinfo["error-desc"], dinfo
    sinfo = src.wait_migration()
    assert sinfo["status"] == "failed" and message in sinfo["error-desc"], sinfo
    _assert_source_survives(src)
