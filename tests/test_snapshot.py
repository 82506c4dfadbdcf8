"""Snapshot to a file and restore in a new process (QEMU's `migrate file:` / `-incoming file:`),
on real KVM, and the stream file read back by `vmferry analyze`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmproc import VmProcess

pytestmark = [pytest.mark.kvm]


def _ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"tick (\d+)\n", text)]


def _snapshot_heartbeat(tmp: Path, procs: list[VmProcess]) -> tuple[VmProcess, Path]:
    src = VmProcess(tmp, "src", "-m", "64M", "--guest", "heartbeat", "--append", "hz=20")
    procs.append(src)
    src.wait_serial(r"tick 10\n")
    snap = tmp / "heartbeat.snap"
    src.cmd("migrate", uri=f"file:{snap}")
    assert src.wait_migration()["status"] == "completed"
    assert src.status() == "postmigrate"
    return src, snap


def test_heartbeat_continues_from_a_snapshot_in_a_new_process(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, snap = _snapshot_heartbeat(tmp_path, procs)
    before = src.serial()
    dst = VmProcess(tmp_path, "dst", "-m", "64M", "--incoming", f"file:{snap}")
    procs.append(dst)
    assert dst.wait_migration()["status"] == "completed"
    dst.wait_serial(r"tick \d+\n(.|\n)*tick \d+\n(.|\n)*tick \d+\n")
    after = dst.serial()
    assert "heartbeat:" not in after  # it continued; it did not boot again
    ticks = _ticks(before + after)  # a line cut by the pause completes on the destination
    assert ticks == list(range(1, len(ticks) + 1)), ticks
    assert _ticks(after)[0] > 10


def test_restore_paused_with_S_then_cont(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, snap = _snapshot_heartbeat(tmp_path, procs)
    dst = VmProcess(tmp_path, "dst", "-m", "64M", "--incoming", f"file:{snap}", "-S")
    procs.append(dst)
    assert dst.wait_migration()["status"] == "completed"
    assert dst.status() == "paused"
    time.sleep(0.3)
    assert _ticks(dst.serial()) == []
    dst.cmd("cont")
    dst.wait_serial(r"tick \d+\n")
    assert dst.status() == "running"


def test_dirty_guest_snapshot_over_exec_and_analyze(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = VmProcess(tmp_path, "src", "-m", "128M", "--guest", "dirty", "--append", "ws=16 rate=10 verify=1")
    procs.append(src)
    src.wait_serial(r"verify ok")
    snap = tmp_path / "dirty.snap"
    src.cmd("migrate", uri=f"exec:cat > {snap}")
    assert src.wait_migration()["status"] == "completed"

    verify = subprocess.run([sys.executable, "-m", "vmferry", "analyze", "--verify", str(snap)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    info = subprocess.run([sys.executable, "-m", "vmferry", "analyze", "--json", str(snap)],
                          capture_output=True, text=True, check=True)
    dump = json.dumps(json.loads(info.stdout))
    for section in ("cpu", "serial", "pit"):
        assert f'"{section}' in dump

    dst = VmProcess(tmp_path, "dst", "-m", "128M", "--incoming", f"exec:cat {snap}")
    procs.append(dst)
    assert dst.wait_migration()["status"] == "completed"
    dst.wait_serial(r"verify ok")
    assert dst.cmd("x-verify-dirty-guest")["ok"]


def test_corrupted_snapshot_is_refused_and_nothing_runs(tmp_path: Path, procs: list[VmProcess]) -> None:
    _, snap = _snapshot_heartbeat(tmp_path, procs)
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0x01
    snap.write_bytes(bytes(data))
    verify = subprocess.run([sys.executable, "-m", "vmferry", "analyze", "--verify", str(snap)],
                            capture_output=True, text=True)
    assert verify.returncode != 0 and "record" in verify.stdout + verify.stderr
    dst = VmProcess(tmp_path, "dst", "-m", "64M", "--incoming", f"file:{snap}")
    procs.append(dst)
    info = dst.wait_migration()
    assert info["status"] == "failed" and "record" in info["error-desc"]
    assert dst.status() == "inmigrate"
    assert dst.serial() == ""
