"""The disk on an NBD drive: a real qemu-storage-daemon serving a real qcow2 image to real
`vmferry run` processes on real KVM. The `disk` guest checks its own writes, the host verifier
checks the image (converted to raw by qemu-img); migration with the export shared by both sides,
and with its contents copied in the stream; bad input named; a server that dies turns into I/O
errors for the guest, not a hung VMM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbdserver import StorageDaemon, create_qcow2, free_port, require_tools, to_raw
from polling import wait_for
from test_disk_migration import QDEV, _ring_settled, _verifies_after
from vmferry.guests.verify_disk import verify_disk_image
from vmproc import REPO, VmProcess

pytestmark = pytest.mark.kvm
MEM = "64M"
DISK = 64 << 20
GUEST = "dws=8 drate=4 verify=1"
_PATH = (str(REPO / "src"), os.environ.get("PYTHONPATH"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in _PATH if p)}


@pytest.fixture
def qsd(tmp_path: Path):  # noqa: ANN201 - a generator fixture
    require_tools()
    server = StorageDaemon(create_qcow2(tmp_path / "disk.qcow2", DISK))
    try:
        yield server
    finally:
        server.stop()


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmferry", "run", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def _verified_image(server: StorageDaemon, tmp: Path, name: str = "check.raw") -> None:
    server.stop()
    verdict = verify_disk_image(to_raw(server.image, tmp / name))
    assert verdict.ok and verdict.sectors > 0, verdict


def test_disk_guest_verifies_on_an_nbd_drive(qsd: StorageDaemon, tmp_path: Path) -> None:
    p = _run("--guest", "disk", "--append", "dws=1 drate=1 verify=1 runtime=2",
             "--drive", f"file={qsd.uri},format=raw,id=disk0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "disk verify ok" in p.stdout and "fails=0" in p.stdout, p.stdout
    assert f"id=disk0 capacity={DISK // 512} sectors" in p.stdout
    _verified_image(qsd, tmp_path)


def test_query_block_of_an_nbd_drive(qsd: StorageDaemon, tmp_path: Path, procs: list[VmProcess]) -> None:
    vm = VmProcess(tmp_path, "vm", "-m", MEM, "--guest", "disk", "--append", GUEST,
                   "--drive", f"file={qsd.uri},format=raw,id=disk0")
    procs.append(vm)
    vm.wait_serial(r"disk verify ok gen=\d+ blocks=[1-9]", timeout=60)
    (block,) = vm.cmd("query-block")
    ins = block["inserted"]
    assert ins["file"] == qsd.uri and ins["drv"] == "raw" and ins["ro"] is False
    assert ins["image"] == {"filename": qsd.uri, "format": "raw", "virtual-size": DISK}
    (stats,) = vm.cmd("query-blockstats")
    assert stats["stats"]["wr_operations"] > 0 and stats["stats"]["failed_wr_operations"] == 0


def test_shared_nbd_export_migrates(qsd: StorageDaemon, tmp_path: Path, procs: list[VmProcess]) -> None:
    """Both sides connect to the one export; the source flushes at switchover, the destination
    connected before it runs the guest, which goes on verifying its writes."""
    drive = f"file={qsd.uri},format=raw,id=disk0"
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "disk", "--append", GUEST, "--drive", drive)
    procs.append(src)
    src.wait_serial(r"disk verify ok gen=\d+", timeout=60)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0", "--drive", drive)
    procs.append(dst)
    src.cmd("migrate", uri=dst.incoming_uri())
    info = src.wait_migration()
    assert info["status"] == "completed", info
    assert "disk" not in info  # shared: nothing of the disk in the stream
    assert dst.wait_migration()["status"] == "completed"
    _verifies_after(dst)
    dst.cmd("stop")
    _ring_settled(dst)
    src.close()
    dst.close()
    _verified_image(qsd, tmp_path)


def test_nbd_source_drive_copied_in_the_stream(qsd: StorageDaemon, tmp_path: Path,
                                               procs: list[VmProcess]) -> None:
    """blk: the source's drive is an NBD export (holes from base:allocation), the destination's
    a raw file; paused on both sides, the destination's image is the export's."""
    dst_img = tmp_path / "dst.img"
    with open(dst_img, "wb") as f:
        f.truncate(DISK)
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "disk", "--append", GUEST,
                    "--drive", f"file={qsd.uri},format=raw,id=disk0")
    procs.append(src)
    src.wait_serial(r"disk verify ok gen=\d+", timeout=60)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0", "-S",
                    "--drive", f"file={dst_img},format=raw,id=disk0")
    procs.append(dst)
    src.cmd("migrate", uri=dst.incoming_uri(), blk=True)
    info = src.wait_migration()
    assert info["status"] == "completed", info
    assert info["disk"]["total"] == DISK and info["disk"]["remaining"] == 0, info["disk"]
    assert info["disk"]["transferred"] > 0
    assert dst.wait_migration()["status"] == "completed"
    src.close()
    qsd.stop()
    assert to_raw(qsd.image, tmp_path / "src.raw").read_bytes() == dst_img.read_bytes()
    with open(dst_img, "rb") as f, pytest.raises(OSError):
        os.lseek(f.fileno(), 16 << 20, os.SEEK_DATA)  # past the guest's working set: all hole
    dst.cmd("cont")
    _verifies_after(dst)
    dst.cmd("stop")
    _ring_settled(dst)
    verdict = verify_disk_image(dst_img)
    assert verdict.ok and verdict.sectors > 0, verdict


def test_server_dying_gives_the_guest_io_errors(qsd: StorageDaemon, tmp_path: Path,
                                                procs: list[VmProcess]) -> None:
    vm = VmProcess(tmp_path, "vm", "-m", MEM, "--guest", "disk", "--append", GUEST,
                   "--drive", f"file={qsd.uri},format=raw,id=disk0")
    procs.append(vm)
    vm.wait_serial(r"disk verify ok gen=\d+", timeout=60)
    qsd.kill()
    # The guest's next request fails with IOERR (virtio status 1); the VMM goes on serving.
    vm.wait_serial(r"disk: write lba=\d+ failed: status 1|disk verify FAIL lba=\d+: read status 1",
                   timeout=60)
    assert vm.status() == "running"
    (stats,) = vm.cmd("query-blockstats")
    s = stats["stats"]
    assert s["failed_wr_operations"] + s["failed_rd_operations"] + s["failed_flush_operations"] > 0, s
    vm.cmd("stop")  # the device quiesces: nothing waits on the dead server
    assert vm.status() == "paused"
    assert "drive disk0" in vm.log() and "broke" in vm.log(), vm.log()[-2000:]


def test_stalled_server_does_not_block_the_monitor(qsd: StorageDaemon, tmp_path: Path,
                                                   procs: list[VmProcess]) -> None:
    """The NBD round trip is the drive's I/O thread's: with the server stopped (SIGSTOP) and a
    request waiting on it, the VM stays running and the monitor answers, query-block included
    (it asks the server nothing); once the server goes on, so does the guest."""
    vm = VmProcess(tmp_path, "vm", "-m", MEM, "--guest", "disk", "--append", GUEST,
                   "--drive", f"file={qsd.uri},format=raw,id=disk0")
    procs.append(vm)
    vm.wait_serial(r"disk verify ok gen=\d+", timeout=60)
    qsd.freeze()
    try:
        wait_for(lambda: vm.cmd("x-query-virtio-queue-status", path=QDEV, queue=0)["inuse"] >= 1,
                 "a request waiting on the stopped server")
        assert vm.status() == "running"
        assert vm.cmd("query-block")[0]["inserted"]["file"] == qsd.uri
        vm.cmd("query-blockstats")
    finally:
        qsd.thaw()
    _verifies_after(vm)


def _refused(p: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    for f in fragments:
        assert f in p.stderr, p.stderr


def test_refused_connection_is_named(tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    _refused(_run("--guest", "heartbeat", "--drive", f"file=nbd://127.0.0.1:{port}/disk0", timeout=60),
             f"drive disk0: Failed to connect to '127.0.0.1:{port}': Connection refused")
    sock = tmp_path / "nope.sock"
    _refused(_run("--guest", "heartbeat", "--drive", f"file=nbd+unix:///d?socket={sock},id=d1", timeout=60),
             f"drive d1: Failed to connect to '{sock}': No such file or directory")


def test_missing_export_is_named(qsd: StorageDaemon) -> None:
    uri = qsd.uri.replace("/disk0?", "/other?")
    _refused(_run("--guest", "heartbeat", "--drive", f"file={uri},id=d0", timeout=60),
             "drive d0: NBD server", "has no export 'other' (NBD_REP_ERR_UNKNOWN")


def test_read_only_export_with_a_writable_drive_is_refused(tmp_path: Path) -> None:
    require_tools()
    server = StorageDaemon(create_qcow2(tmp_path / "ro.qcow2", DISK), writable=False)
    try:
        _refused(_run("--guest", "heartbeat", "--drive", f"file={server.uri},id=d0", timeout=60),
                 "drive d0: NBD export 'disk0'", "is read-only", "add readonly=on")
    finally:
        server.stop()


def test_bad_nbd_uri_is_refused_by_name() -> None:
    _refused(_run("--guest", "heartbeat", "--drive", "file=nbd+unix:///d0,id=d0", timeout=60),
             "nbd+unix:// needs one socket=PATH")


def test_snapshot_of_an_nbd_drive_checks_the_export(qsd: StorageDaemon, tmp_path: Path,
                                                    procs: list[VmProcess]) -> None:
    """migrate file: records the drive and a digest of sampled blocks read through NBD; a
    restore on an export written to since is refused by name, on the same export it runs."""
    drive = f"file={qsd.uri},format=raw,id=disk0"
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "disk", "--append", GUEST, "--drive", drive)
    procs.append(src)
    src.wait_serial(r"disk verify ok gen=\d+", timeout=60)
    snap = tmp_path / "snap.vmf"
    src.cmd("migrate", uri=f"file:{snap}")
    assert src.wait_migration()["status"] == "completed"
    src.close()
    c = qsd.client()
    try:
        saved = bytearray(4096)
        c.read_into(0, memoryview(saved))  # the first block is always sampled
        c.write(0, b"\x01" * 4096)
        c.flush()
        bad = VmProcess(tmp_path, "bad", "-m", MEM, "--incoming", f"file:{snap}", "--drive", drive)
        procs.append(bad)
        info = bad.wait_migration()
        assert info["status"] == "failed"
        assert f"image '{qsd.uri}' differs from the source's at switchover" in info["error-desc"], info
        bad.close()
        c.write(0, saved)
        c.flush()
    finally:
        c.close()
    good = VmProcess(tmp_path, "good", "-m", MEM, "--incoming", f"file:{snap}", "--drive", drive)
    procs.append(good)
    assert good.wait_migration()["status"] == "completed"
    _verifies_after(good)
