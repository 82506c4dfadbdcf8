"""Failures end with their named error and nothing else: no Python traceback on either side's
stderr, and the process exits cleanly when asked to. Real `vmferry run` processes on KVM."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vmferry.stream.decoder import StreamDecoder
from vmproc import REPO, VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "64M"
DIRTY = "ws=8 rate=5 verify=1"


def _source(tmp: Path, procs: list[VmProcess]) -> VmProcess:
    src = VmProcess(tmp, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    src.wait_serial(r"verify ok")
    return src


def _quit_cleanly(vm: VmProcess) -> str:
    """`quit`, wait for the exit, and return what the process printed; it must hold no traceback
    and the exit status must be 0."""
    vm.cmd("quit")
    assert vm.proc.wait(30) == 0, vm.log()
    log = vm.log()
    assert "Traceback" not in log and "Error:" not in log.replace("error-desc", ""), log
    return log


def _snapshot(tmp: Path, procs: list[VmProcess]) -> bytes:
    src = _source(tmp, procs)
    src.cmd("migrate", uri=f"file:{tmp / 'vm.snap'}")
    assert src.wait_migration()["status"] == "completed"
    return (tmp / "vm.snap").read_bytes()


def _largest_page_record(data: bytes) -> tuple[int, int]:
    """(payload offset, payload length) of the largest RAM_PAGES record: the one the destination
    receives straight into guest memory."""
    found: list[tuple[int, int]] = []
    dec = StreamDecoder(place=lambda block, first, count: found.append((dec.bytes_consumed, count * 4096)))
    dec.feed(data)
    while dec.next_record() is not None:
        pass
    offset, length = max(found, key=lambda f: f[1])
    assert length >= 256 << 10, found  # large enough to be received in place
    return offset, length


def _restore(tmp: Path, procs: list[VmProcess], name: str, data: bytes | bytearray) -> VmProcess:
    path = tmp / name
    path.write_bytes(data)
    dst = VmProcess(tmp, f"dst-{name}", "-m", MEM, "--incoming", f"file:{path}")
    procs.append(dst)
    return dst


@pytest.mark.parametrize(("case", "message"), [
    ("cut", r"stream truncated inside a RAM_PAGES record"),
    ("flipped", r"checksum mismatch in RAM_PAGES payload"),
    ("trailing", r"^10 bytes after the end of stream"),
])
def test_a_bad_snapshot_is_refused_without_a_traceback(
    tmp_path: Path, procs: list[VmProcess], case: str, message: str
) -> None:
    data = _snapshot(tmp_path, procs)
    offset, length = _largest_page_record(data)
    if case == "cut":
        bad: bytes | bytearray = data[:offset + length // 2]
    elif case == "flipped":
        bad = bytearray(data)
        bad[offset + length // 2] ^= 0x01
    else:
        bad = data + b"\0" * 10
    dst = _restore(tmp_path, procs, case, bad)
    info = dst.wait_migration()
    assert info["status"] == "failed" and re.search(message, info["error-desc"]), info
    assert dst.status() == "inmigrate"  # the guest never started
    _quit_cleanly(dst)


def test_source_gone_mid_record_leaves_no_traceback_on_the_destination(
    tmp_path: Path, procs: list[VmProcess]
) -> None:
    """The source's connection ends inside a RAM record being received straight into guest
    memory (as when the source is killed). Played by this test from a real stream, so the cut
    lands inside the record every time."""
    data = _snapshot(tmp_path, procs)
    offset, length = _largest_page_record(data)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    with socket.create_connection(dst.incoming_address(), timeout=30) as sock:
        sock.sendall(data[:offset + length // 2])
        # End the stream with a FIN, and read what the destination says back (PROGRESS) until it
        # closes: closing with unread bytes would send a reset instead of ending the stream.
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    info = dst.wait_migration()
    assert info["status"] == "failed" and "truncated inside a RAM_PAGES record" in info["error-desc"], info
    assert dst.status() == "inmigrate"
    _quit_cleanly(dst)


def test_migrate_to_a_failing_command_leaves_no_traceback(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs)
    src.cmd("migrate", uri="exec:exit 3")
    info = src.wait_migration()
    assert info["status"] == "failed", info
    desc = info["error-desc"]
    assert "exec:exit 3" in desc and "status 3" in desc and "to on" not in desc, desc
    assert src.status() == "running"
    _quit_cleanly(src)


def test_qmp_on_a_remote_address_is_refused_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-m", "vmferry", "run", "-m", MEM, "--guest", "heartbeat",
                        "--serial", "null", "--qmp", "tcp:0.0.0.0:0"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "allow-remote=on" in r.stderr, r.stderr
