"""The VM processes of `bench_migration.py`: QEMU or vmferry, with QMP and the guest's console in a file."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench_procs import spawn, stop
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmferry.guests import image_path

PROGRESS_RX = re.compile(r"dirty: t=(\d+) gen=\d+ written=(\d+) MiB(?: stalled=\d+ us)?(?: stall=(\d+) us)?")


class BenchError(Exception):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect_qmp(path: Path, proc: subprocess.Popen[bytes], name: str, log: str,
                timeout: float = 30.0) -> QEMUMonitorProtocol:
    """Connect and negotiate, retrying: QEMU's socket file exists a moment before it listens."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited {proc.returncode}: {log[-2000:]}")
        if path.exists():
            qmp = QEMUMonitorProtocol(str(path))
            try:
                qmp.connect(negotiate=True)
                qmp.settimeout(60)
                return qmp
            except Exception as e:  # ConnectError wraps ConnectionRefusedError and friends
                last = e
                with contextlib.suppress(Exception):
                    qmp.close()
        time.sleep(0.02)
    raise BenchError(f"{name}: no QMP connection after {timeout} s ({last!r}): {log[-2000:]}")


class Vm:
    """One VM process (QEMU or vmferry) with a QMP socket and its COM1 output in a file."""

    def __init__(self, side: str, tmp: Path, name: str, memory: str, append: str,
                 incoming: str | None = None, netns: str | None = None) -> None:
        """`netns`: run the process in that network namespace (`ip netns exec`, which execs: the
        process id is the VM's own)."""
        self.side = side
        self.name = f"{side}-{name}"
        self.qmp_path = tmp / f"{self.name}.qmp"
        self.serial_path = tmp / f"{self.name}.serial"
        self.log_path = tmp / f"{self.name}.log"
        self.progress: list[tuple[float, int, int | None]] = []  # (time seen, MiB written, stall us)
        self._seen = 0
        if side.startswith("qemu"):
            # debug-threads: the vCPU threads are named ("CPU 0/KVM"), so a benchmark can tell
            # the guest's CPU time from the migration's.
            cmd = ["qemu-system-x86_64", "-accel", side.removeprefix("qemu-"), "-nodefaults",
                   "-name", f"{name},debug-threads=on",
                   "-display", "none", "-m", memory, "-kernel", str(image_path("dirty")),
                   "-append", append, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                   "-serial", f"file:{self.serial_path}",
                   "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
            if incoming:
                cmd += ["-incoming", incoming]
        else:
            cmd = [sys.executable, "-m", "vmferry", "run", "-m", memory,
                   "--qmp", f"unix:{self.qmp_path}", "--serial", f"file:{self.serial_path}"]
            cmd += ["--incoming", incoming] if incoming else ["--guest", "dirty", "--append", append]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.cmd_line = cmd
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.qmp: QEMUMonitorProtocol | None = None
        self.proc = spawn(cmd, self._log)

    def connect(self) -> None:
        self.qmp = connect_qmp(self.qmp_path, self.proc, self.name, self.log())

    def cmd(self, name: str, **args: Any) -> Any:
        assert self.qmp is not None
        reply = self.qmp.cmd_raw(name, args or None)
        if "error" in reply:
            raise BenchError(f"{self.name}: {name}: {reply['error']['class']}: {reply['error']['desc']}")
        return reply["return"]

    def serial(self) -> str:
        try:
            text = self.serial_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        now = time.monotonic()
        for m in PROGRESS_RX.finditer(text, self._seen):
            if not text.startswith("\n", m.end()):
                break  # a line still being written: read it whole next time
            stall = int(m.group(3)) if m.group(3) is not None else None
            self.progress.append((now, int(m.group(2)), stall))
            self._seen = m.end()
        return text

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serial(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.serial()
            m = rx.search(text, after)
            if m:
                return m
            if "FAIL" in text:
                raise BenchError(f"{self.name}: guest reported a failure: {text[-1500:]}")
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no /{pattern}/ after {timeout} s (exit {self.proc.poll()})"
                                 f":\n{text[-1500:]}\n--- log:\n{self.log()[-1500:]}")
            time.sleep(0.05)

    def wait_progress(self, lines: int, after_time: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for p in self.progress if p[0] >= after_time) < lines:
            self.serial()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name}: fewer than {lines} progress lines after {timeout} s")
            time.sleep(0.05)

    def write_rate(self, since: float, until: float = float("inf")) -> float | None:
        """MiB/s the guest wrote in wall-clock time, from progress lines seen in [since, until]."""
        pts = [(t, w) for t, w, _ in self.progress if since <= t <= until]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    def close(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.close()
        stop(self.proc)
        self._log.close()


@contextlib.contextmanager
def vms() -> Iterator[list[Vm]]:
    started: list[Vm] = []
    try:
        yield started
    finally:
        for vm in reversed(started):
            vm.close()


def incoming_uri(dst: Vm, qemu_port: int | None) -> str:
    if qemu_port is not None:
        return f"tcp:127.0.0.1:{qemu_port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"incoming migration on (\S+)", dst.log())
        if m:
            return m.group(1)
        if dst.proc.poll() is not None:
            break
        time.sleep(0.02)
    raise BenchError(f"{dst.name} never listened: {dst.log()[-2000:]}")
