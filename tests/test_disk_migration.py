"""Live migration of a VM with a disk, between real `vmferry run` processes on real KVM and real
image files: shared storage (the image stays, ownership moves, requests in flight travel in the
device's state) and non-shared storage (the contents go in the stream). The `disk` guest checks
its own writes after the migration, the host verifier checks the image. Bad input ends with a
named error and the source running on, unharmed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from polling import wait_for
from vmferry.block.options import DriveSpec
from vmferry.block.raw import RawImage
from vmferry.guests.verify_disk import verify_disk_image
from vmferry.migration.trace import read_trace
from vmproc import REPO, QmpReplyError, VmProcess

pytestmark = pytest.mark.kvm
MEM = "64M"
DISK = 64 << 20
GUEST = "dws=8 drate=4 verify=1"
QDEV = "/machine/virtio-mmio@feb00000"
_PATH = (str(REPO / "src"), os.environ.get("PYTHONPATH"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in _PATH if p)}


def _image(tmp: Path, name: str, size: int = DISK) -> Path:
    p = tmp / name
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def _drive(img: Path, drive_id: str = "disk0") -> str:
    return f"file={img},format=raw,id={drive_id}"


def _source(tmp: Path, procs: list[VmProcess], img: Path, env: dict[str, str] | None = None) -> VmProcess:
    src = VmProcess(tmp, "src", "-m", MEM, "--guest", "disk", "--append", GUEST, "--drive", _drive(img),
                    env=env)
    procs.append(src)
    src.wait_serial(r"disk verify ok gen=\d+", timeout=60)
    return src


def _dest(tmp: Path, procs: list[VmProcess], img: Path, *extra: str, drive_id: str = "disk0",
          name: str = "dst") -> VmProcess:
    dst = VmProcess(tmp, name, "-m", MEM, "--incoming", "tcp:127.0.0.1:0",
                    "--drive", _drive(img, drive_id), *extra)
    procs.append(dst)
    return dst


def _verifies_after(vm: VmProcess) -> None:
    start = len(vm.serial())
    vm.wait_serial(r"disk verify ok gen=\d+", after=start, timeout=60)
    vm.wait_serial(r"disk verify ok gen=\d+", after=vm.serial().rindex("disk verify ok") + 1, timeout=60)
    assert "FAIL" not in vm.serial(), vm.serial()[-2000:]


def _ring_settled(vm: VmProcess) -> dict:
    """Paused: every request the device took was completed exactly once or is still in flight
    (a request completed twice would put used-idx past it; a lost one would hang the guest)."""
    st = vm.cmd("x-query-virtio-queue-status", path=QDEV, queue=0)
    assert (st["last-avail-idx"] - st["used-idx"]) % 65536 == st["inuse"], st
    return st


def _source_survives(src: VmProcess) -> None:
    assert src.status() == "running"
    _verifies_after(src)


def test_shared_storage_with_a_request_in_flight_at_switchover(tmp_path: Path,
                                                                procs: list[VmProcess]) -> None:
    img = _image(tmp_path, "shared.img")
    hold = tmp_path / "hold"
    src = _source(tmp_path, procs, img, env={"VMFERRY_TEST_BLK_HOLD": str(hold)})
    dst = _dest(tmp_path, procs, img)
    # The backend stops answering: the guest's next request stays in flight.
    hold.touch()
    wait_for(lambda: src.cmd("x-query-virtio-queue-status", path=QDEV, queue=0)["inuse"] >= 1,
             "a request held in flight on the source")
    src.cmd("migrate", uri=dst.incoming_uri())
    info = src.wait_migration()
    assert info["status"] == "completed", info
    assert "disk" not in info  # shared: nothing of the disk in the stream
    assert dst.wait_migration()["status"] == "completed"
    # The source left the held request in flight, untouched; the destination served it.
    assert src.cmd("x-query-virtio-queue-status", path=QDEV, queue=0)["inuse"] == 1
    _verifies_after(dst)
    # The source gave the image up; the destination holds it now.
    with pytest.raises(QmpReplyError, match='Failed to get "write" lock'):
        src.cmd("cont")
    dst.cmd("stop")
    _ring_settled(dst)
    verdict = verify_disk_image(img)
    assert verdict.ok and verdict.sectors > 0, verdict


def test_shared_storage_guest_writing_through_switchover(tmp_path: Path, procs: list[VmProcess]) -> None:
    img = _image(tmp_path, "shared.img")
    src = _source(tmp_path, procs, img)
    dst = _dest(tmp_path, procs, img)
    src.cmd("migrate", uri=dst.incoming_uri())
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    _verifies_after(dst)
    dst.cmd("stop")
    _ring_settled(dst)
    assert verify_disk_image(img).ok


def _allocated(path: Path) -> list[tuple[int, int]]:
    out, pos = [], 0
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            pos = hole
    return out


def test_non_shared_storage_copies_the_disk_in_the_stream(tmp_path: Path, procs: list[VmProcess]) -> None:
    src_img = _image(tmp_path, "src.img")
    dst_img = _image(tmp_path, "dst.img")
    # Something old on the destination where the source has a hole: it must become a hole.
    with open(dst_img, "r+b") as f:
        f.seek(40 << 20)
        f.write(b"\xff" * (1 << 20))
    src = _source(tmp_path, procs, src_img)
    dst = _dest(tmp_path, procs, dst_img, "-S")  # stays paused: the images can be compared
    trace = tmp_path / "src.trace"
    src.cmd("migrate-set-parameters", **{"x-trace-file": str(trace)})
    src.cmd("migrate", uri=dst.incoming_uri(), blk=True)
    info = src.wait_migration()
    assert info["status"] == "completed", info
    # The disk went first: the first pass held RAM back (its bulk copy alone), a later one sent
    # RAM, and no held pass ended in the switchover.
    passes = read_trace(trace).of("pass")
    assert passes[0]["held"] == ["ram", "devices"] and passes[0]["pages"] == 0, passes[0]
    assert any(not p["held"] and p["pages"] > 0 for p in passes[1:]), passes
    assert not passes[-1]["held"], passes
    assert info["disk"]["total"] == DISK and info["disk"]["remaining"] == 0, info["disk"]
    assert info["disk"]["transferred"] > 0
    assert dst.wait_migration()["status"] == "completed"
    assert dst.status() == "paused"
    # Paused on both sides: the destination's image is the source's at switchover.
    assert src_img.read_bytes() == dst_img.read_bytes()
    src_ext, dst_ext = _allocated(src_img), _allocated(dst_img)
    assert sum(n for _, n in dst_ext) <= sum(n for _, n in src_ext), (src_ext, dst_ext)
    with open(dst_img, "rb") as f, pytest.raises(OSError):
        os.lseek(f.fileno(), 8 << 20, os.SEEK_DATA)  # past the guest's working set: all hole
    dst.cmd("cont")
    _verifies_after(dst)
    dst.cmd("stop")
    _ring_settled(dst)
    verdict = verify_disk_image(dst_img)
    assert verdict.ok and verdict.sectors > 0, verdict


def _refused(src: VmProcess, dst: VmProcess, match: str, **migrate: object) -> None:
    # A downtime limit of 0 never switches over: the destination's refusal ends the migration,
    # however late it arrives on a loaded machine (a source already paused for switchover stays
    # paused once END is out: docs/migration.md, "Nothing lost").
    src.cmd("migrate-set-parameters", **{"downtime-limit": 0})
    src.cmd("migrate", uri=dst.incoming_uri(), **migrate)
    info = src.wait_migration()
    assert info["status"] == "failed", info
    assert re.search(match, info.get("error-desc", "")), info
    _source_survives(src)


def test_non_shared_wrong_size_on_the_destination(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs, _image(tmp_path, "src.img"))
    small = _image(tmp_path, "small.img", 32 << 20)
    dst = _dest(tmp_path, procs, small)
    _refused(src, dst, r"drive disk0: the source's image is 67108864 bytes but .* is 33554432 bytes",
             blk=True)
    assert not _allocated(small)  # not a byte written


def test_non_shared_drive_id_the_destination_lacks(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs, _image(tmp_path, "src.img"))
    dst = _dest(tmp_path, procs, _image(tmp_path, "dst.img"), drive_id="other")
    _refused(src, dst, r"copies drive 'disk0', but this destination has no such drive", blk=True)


def test_shared_drive_id_the_destination_lacks(tmp_path: Path, procs: list[VmProcess]) -> None:
    img = _image(tmp_path, "shared.img")
    src = _source(tmp_path, procs, img)
    dst = _dest(tmp_path, procs, img, drive_id="other")
    _refused(src, dst, r"the source shares drive 'disk0', but this destination has no such drive")


def test_non_shared_destination_image_locked_by_another_vmm(tmp_path: Path,
                                                            procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs, _image(tmp_path, "src.img"))
    dst_img = _image(tmp_path, "dst.img")
    dst = _dest(tmp_path, procs, dst_img)
    other = RawImage(DriveSpec("other", str(dst_img)))  # another VMM's writer lock on it
    try:
        _refused(src, dst, r'drive disk0: Failed to get "write" lock', blk=True)
    finally:
        other.close()


def test_x_block_drives_names_a_drive_the_vm_lacks(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs, _image(tmp_path, "src.img"))
    src.cmd("migrate-set-parameters", **{"x-block-drives": "nosuch"})
    with pytest.raises(QmpReplyError, match="this VM has no drive 'nosuch'"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1")
    _source_survives(src)


def test_snapshot_records_the_drive_and_restore_checks_the_image(tmp_path: Path,
                                                                 procs: list[VmProcess]) -> None:
    img = _image(tmp_path, "disk.img")
    src = _source(tmp_path, procs, img)
    snap = tmp_path / "snap.vmf"
    src.cmd("migrate", uri=f"file:{snap}")
    assert src.wait_migration()["status"] == "completed"
    src.close()
    # The image written to after the snapshot: restoring refuses, by name.
    saved = img.read_bytes()
    with open(img, "r+b") as f:
        f.write(b"\x01" * 4096)
    bad = VmProcess(tmp_path, "bad", "-m", MEM, "--incoming", f"file:{snap}", "--drive", _drive(img))
    procs.append(bad)
    info = bad.wait_migration()
    assert info["status"] == "failed"
    assert "differs from the source's at switchover" in info["error-desc"], info
    bad.close()
    img.write_bytes(saved)
    good = VmProcess(tmp_path, "good", "-m", MEM, "--incoming", f"file:{snap}", "--drive", _drive(img))
    procs.append(good)
    assert good.wait_migration()["status"] == "completed"
    _verifies_after(good)


def test_analyze_shows_block_records_per_drive_and_the_requests_in_flight(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    img, spare = _image(tmp_path, "disk.img"), _image(tmp_path, "spare.img", 1 << 20)
    hold = tmp_path / "hold"
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "disk", "--append", GUEST,
                    "--drive", _drive(img), "--drive", _drive(spare, "spare"),
                    env={"VMFERRY_TEST_BLK_HOLD": str(hold)})
    procs.append(src)
    src.wait_serial(r"disk verify ok gen=\d+", timeout=60)
    hold.touch()
    wait_for(lambda: src.cmd("x-query-virtio-queue-status", path=QDEV, queue=0)["inuse"] >= 1,
             "a request held in flight on the source")
    src.cmd("migrate-set-parameters", **{"x-block-drives": "disk0"})
    snap = tmp_path / "snap.vmf"
    src.cmd("migrate", uri=f"file:{snap}")
    info = src.wait_migration()
    assert info["status"] == "completed", info
    assert info["disk"]["total"] == DISK
    out = subprocess.run([sys.executable, "-m", "vmferry", "analyze", str(snap)], capture_output=True,
                         text=True, timeout=120, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"^disk disk0: base 0x0, 67108864 bytes \(131072 sectors\); sectors sent (\d+), "
                  r"zero (\d+), .*BLOCK_DATA", out.stdout, re.M)
    assert m and int(m.group(1)) > 0 and int(m.group(1)) + int(m.group(2)) >= 8 << 11, out.stdout
    assert re.search(r"^disk spare: 1048576 bytes \(2048 sectors\), shared", out.stdout, re.M), out.stdout
    assert "BLOCK_COMPRESSED" not in out.stdout  # x-block-compression none (the default): all raw
    assert re.search(r"section virtio-blk \(id \d+, instance 0\)", out.stdout), out.stdout
    # The request held in flight travels as the list in disk0's section; spare has none.
    assert re.search(r'drive_id = "disk0"(.*\n)+?    pending = \[\{"queue": 0, "head": \d+\}\]\n',
                     out.stdout), out.stdout
    assert re.search(r'drive_id = "spare"(.*\n)+?    pending = \[\]\n', out.stdout), out.stdout


def test_compressed_blocks_restore_the_guest_and_analyze_shows_them(tmp_path: Path,
                                                                    procs: list[VmProcess]) -> None:
    """x-block-compression zstd: the copied drive's data runs go as BLOCK_COMPRESSED (the disk
    guest's sectors compress well); the destination decompresses, checks each run's checksum,
    writes it into an empty image, and the guest there finds every block it wrote."""
    img = _image(tmp_path, "disk.img")
    src = _source(tmp_path, procs, img)
    src.cmd("migrate-set-parameters", **{"x-block-compression": "zstd"})
    snap = tmp_path / "snap.vmf"
    src.cmd("migrate", uri=f"file:{snap}", blk=True)
    info = src.wait_migration()
    assert info["status"] == "completed", info
    # Fewer stream bytes than the blocks it carried (8 MiB working set)
    assert 0 < info["disk"]["transferred"] < 8 << 20, info["disk"]
    src.close()
    out = subprocess.run([sys.executable, "-m", "vmferry", "analyze", str(snap)], capture_output=True,
                         text=True, timeout=120, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^disk disk0: .*BLOCK_COMPRESSED zstd \d+", out.stdout, re.M), out.stdout
    assert re.search(r"^    compressed: \d+ bytes in \d+ \(\d+\.\d%\)", out.stdout, re.M), out.stdout
    assert '"block-compression":"zstd"' in out.stdout.replace(" ", ""), out.stdout
    fresh = _image(tmp_path, "fresh.img")
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", f"file:{snap}", "--drive", _drive(fresh))
    procs.append(dst)
    assert dst.wait_migration()["status"] == "completed"
    _verifies_after(dst)
    dst.cmd("stop")
    _ring_settled(dst)
    verdict = verify_disk_image(fresh)
    assert verdict.ok and verdict.sectors > 0, verdict


def test_x_block_compression_refuses_an_unknown_codec(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs, _image(tmp_path, "src.img"))
    with pytest.raises(QmpReplyError, match="x-block-compression"):
        src.cmd("migrate-set-parameters", **{"x-block-compression": "brotli"})
    _source_survives(src)
