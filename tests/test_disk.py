"""The disk: virtio-blk on virtio-mmio with raw images, under vmferry and under QEMU -accel kvm,
on real files. The same `disk` guest image runs on both and checks its own writes; the host
verifier checks the image afterwards. Bad inputs end with a named error and no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polling import wait_for
from vmferry.guests import image_path
from vmferry.guests.verify_disk import verify_disk_image
from vmproc import REPO, QmpReplyError, VmProcess

pytestmark = pytest.mark.kvm
GUEST_ARGS = "dws=1 drate=1 verify=1 runtime=2"
_PATH = (str(REPO / "src"), os.environ.get("PYTHONPATH"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in _PATH if p)}


def _image(tmp_path: Path, size: int = 4 << 20, name: str = "disk.img") -> Path:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def _run(*args: str, timeout: float = 120, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "vmferry", "run", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def _qemu(img: Path, *extra: str) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "kvm", "-M", "microvm",
            # microvm's transports are legacy (version 1) by default in QEMU 7.2; ours are 1.x
            "-global", "virtio-mmio.force-legacy=false",
            "-nodefaults", "-display", "none", "-no-reboot", "-m", "64M", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive", f"if=none,file={img},format=raw,id=d0",
            "-device", "virtio-blk-device,drive=d0,serial=disk0", *extra]


def _assert_verified(console: str) -> None:
    assert "disk verify ok" in console, console
    assert "FAIL" not in console, console
    assert "disk: done" in console and "fails=0" in console, console


def test_disk_guest_verifies_under_vmferry(tmp_path: Path) -> None:
    img = _image(tmp_path)
    p = _run("--guest", "disk", "--append", GUEST_ARGS, "--drive", f"file={img},format=raw,id=disk0")
    assert p.returncode == 0, p.stdout + p.stderr
    _assert_verified(p.stdout)
    assert "id=disk0 capacity=8192 sectors" in p.stdout
    verdict = verify_disk_image(img)
    assert verdict.ok and verdict.sectors > 0, verdict
    # Only the working set (the first MiB) was written: no data at or after 1 MiB (ENXIO).
    with open(img, "rb") as f, pytest.raises(OSError):
        os.lseek(f.fileno(), 1 << 20, os.SEEK_DATA)


@pytest.mark.qemu
def test_same_guest_image_verifies_under_qemu_kvm(tmp_path: Path) -> None:
    img = _image(tmp_path)
    p = subprocess.run([*_qemu(img, "-kernel", str(image_path("disk")), "-append", GUEST_ARGS)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr  # debug-exit value 0 -> QEMU status (0 << 1) | 1
    _assert_verified(p.stdout)
    assert verify_disk_image(img).ok


# The benchmark's guest (bench/bench_disk.py) scaled down: a filled disk, 16 KiB requests, RAM
# dirtied alongside.
BENCH_ARGS = "dws=2 dfill=2 dreq=16 drate=2 ws=2 rate=4 verify=1 runtime=2"


@pytest.mark.parametrize("hypervisor", ["vmferry", pytest.param("qemu", marks=pytest.mark.qemu)])
def test_filled_disk_bigger_requests_and_ram_dirtying_verify(tmp_path: Path, hypervisor: str) -> None:
    img = _image(tmp_path)
    if hypervisor == "vmferry":
        p = _run("--guest", "disk", "--append", BENCH_ARGS, "--drive", f"file={img},format=raw,id=disk0")
        assert p.returncode == 0, p.stdout + p.stderr
    else:
        p = subprocess.run([*_qemu(img, "-kernel", str(image_path("disk")), "-append", BENCH_ARGS)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1, p.stdout + p.stderr
    _assert_verified(p.stdout)
    assert "disk: filled 2 MiB gen=512" in p.stdout and "disk: ram filled 2 MiB" in p.stdout, p.stdout
    # every block of the 2 MiB written by the fill, and checked by the guest
    assert "disk verify ok gen=" in p.stdout and " blocks=512\n" in p.stdout, p.stdout
    assert "stall=" in p.stdout
    verdict = verify_disk_image(img)
    assert verdict.ok and verdict.sectors == 2 * 2048, verdict
    with open(img, "rb") as f, pytest.raises(OSError):
        os.lseek(f.fileno(), 2 << 20, os.SEEK_DATA)  # nothing past the working set


def test_disk_guest_refuses_a_request_size_that_is_not_whole_blocks(tmp_path: Path) -> None:
    img = _image(tmp_path)
    p = _run("--guest", "disk", "--append", "dreq=6", "--drive", f"file={img},format=raw,id=disk0")
    assert "disk: bad parameter" in p.stdout and "dreq=4..1024 KiB in 4 KiB steps" in p.stdout, p.stdout


def test_query_block_and_blockstats(tmp_path: Path) -> None:
    img = _image(tmp_path)
    ro = _image(tmp_path, 1 << 20, "ro.img")
    vm = VmProcess(tmp_path, "vm", "--guest", "disk", "--append", "dws=1 drate=1 verify=1",
                   "--drive", f"file={img},format=raw,id=disk0", "--drive", f"file={ro},id=cdrom,readonly=on")
    try:
        vm.wait_serial(r"disk verify ok gen=\d+ blocks=[1-9]", timeout=120)
        blocks = vm.cmd("query-block")
        assert [b["device"] for b in blocks] == ["disk0", "cdrom"]
        assert blocks[0]["inserted"]["file"] == str(img) and blocks[0]["inserted"]["ro"] is False
        assert blocks[1]["inserted"]["ro"] is True
        assert blocks[0]["inserted"]["image"]["virtual-size"] == 4 << 20
        stats = {s["device"]: s["stats"] for s in vm.cmd("query-blockstats")}
        s = stats["disk0"]
        assert s["wr_operations"] > 0 and s["wr_bytes"] == 4096 * s["wr_operations"]
        assert s["rd_operations"] > 0 and s["rd_bytes"] > 0 and s["flush_operations"] > 0
        assert s["wr_total_time_ns"] > 0 and s["rd_total_time_ns"] > 0
        assert stats["cdrom"]["wr_operations"] == 0
        vm.cmd("migrate-set-parameters", **{"x-block-drives": "cdrom"})
        with pytest.raises(QmpReplyError, match="drive 'cdrom' is read-only; only writable drives"):
            vm.cmd("migrate", uri=f"unix:{tmp_path}/m.sock")
    finally:
        vm.close()
    assert verify_disk_image(img).ok


def _assert_refused(p: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    for f in fragments:
        assert f in p.stderr, p.stderr


@pytest.mark.parametrize(("drive", "fragments"), [
    ("file=/nonexistent/disk.img,id=d0", ("drive d0: Could not open '/nonexistent/disk.img'",
                                          "No such file or directory")),
    ("file=/tmp,id=d0,readonly=on", ("drive d0", "/tmp")),
    ("file=x.img,format=qcow2", ("format 'qcow2' is not supported",)),
    ("file=x.img,bogus=1", ("unknown option 'bogus'",)),
    ("id=d0", ("needs file=PATH",)),
])
def test_bad_drive_is_refused_by_name(drive: str, fragments: tuple[str, ...]) -> None:
    _assert_refused(_run("--guest", "heartbeat", "--drive", drive, timeout=60), *fragments)


def test_unreadable_image_is_refused(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed")
    img = _image(tmp_path)
    img.chmod(0)
    # Root reads anything; without CAP_DAC_OVERRIDE it obeys the mode bits like any user.
    prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    p = _run("--guest", "heartbeat", "--drive", f"file={img},id=d0,readonly=on", timeout=60, prefix=prefix)
    _assert_refused(p, f"drive d0: Could not open '{img}': Permission denied")


def test_read_only_image_with_a_writable_drive_is_refused(tmp_path: Path) -> None:
    img = _image(tmp_path)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(img)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i not supported here")
    else:
        img.chmod(0o444)
    try:
        p = _run("--guest", "heartbeat", "--drive", f"file={img},id=d0", timeout=60)
        _assert_refused(p, f"drive d0: Could not open '{img}'", "add readonly=on")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(img)], check=True)


def test_image_locked_by_another_vmferry(tmp_path: Path) -> None:
    img = _image(tmp_path)
    holder = VmProcess(tmp_path, "holder", "-S", "--guest", "heartbeat", "--drive", f"file={img},id=disk0")
    try:
        p = _run("--guest", "heartbeat", "--drive", f"file={img},id=disk1", timeout=60)
        _assert_refused(p, 'drive disk1: Failed to get "write" lock', "is another process using the image?")
        p = _run("--guest", "heartbeat", "--drive", f"file={img},id=disk1,readonly=on", timeout=60)
        _assert_refused(p, 'Failed to get shared "write" lock')
        assert holder.status() == "paused"  # the holder is unharmed
    finally:
        holder.close()


def _locks_on(path: Path) -> int:
    inode = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return sum(1 for line in f if f":{inode} " in line)


@pytest.mark.qemu
def test_image_locked_by_qemu_and_qemu_refused_by_vmferry(tmp_path: Path) -> None:
    img = _image(tmp_path)
    qemu = subprocess.Popen(_qemu(img, "-S"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _locks_on(img) >= 2 or qemu.poll() is not None, "QEMU to lock the image")
        assert qemu.poll() is None, qemu.stderr.read() if qemu.stderr else ""
        p = _run("--guest", "heartbeat", "--drive", f"file={img},id=disk0", timeout=60)
        _assert_refused(p, 'drive disk0: Failed to get "write" lock')
    finally:
        qemu.kill()
        qemu.wait()
    holder = VmProcess(tmp_path, "holder", "-S", "--guest", "heartbeat", "--drive", f"file={img},id=disk0")
    try:
        p = subprocess.run(_qemu(img, "-S"), capture_output=True, text=True, timeout=60)
        assert p.returncode != 0
        assert 'Failed to get "write" lock' in p.stderr, p.stderr
    finally:
        holder.close()
    deadline = time.monotonic() + 30
    while _locks_on(img) and time.monotonic() < deadline:  # the holder's exit drops its locks
        time.sleep(0.05)
    assert _locks_on(img) == 0


def test_drive_with_incoming_waits_unlocked(tmp_path: Path) -> None:
    """A destination opens its images without locking them: a shared image is still the
    source's until switchover (docs/disks.md, "Migration")."""
    img = _image(tmp_path)
    vm = VmProcess(tmp_path, "dst", "--incoming", "defer", "--drive", f"file={img},id=disk0")
    try:
        assert vm.status() == "inmigrate"
        assert [b["device"] for b in vm.cmd("query-block")] == ["disk0"]
        assert _locks_on(img) == 0
    finally:
        vm.close()
