"""Test harness: a `vmferry run` process with a QMP socket and its serial console in a file.

Every migration test runs source and destination as separate processes, drives them through
the official QMP client (qemu.qmp's synchronous `QEMUMonitorProtocol`), and reads what the guest
printed on COM1.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError
from qemu.qmp.qmp_client import NegotiationError

REPO = Path(__file__).resolve().parent.parent


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, however that happens
    (a killed or timed-out pytest must not leave VMs running)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class VmProcess:
    """`connect=False`: leave the monitor to the test's own client (no QMP connection here).
    `wrap`: a command that runs the VMM, e.g. `ip netns exec NAME` (it must exec it in place)."""

    def __init__(self, tmp: Path, name: str, *args: str, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = (), connect: bool = True,
                 wrap: tuple[str, ...] = ()) -> None:
        self.name = name
        self.qmp_path = tmp / f"{name}.qmp"
        self.serial_path = tmp / f"{name}.serial"
        self.log_path = tmp / f"{name}.log"
        cmd = [*wrap, sys.executable, "-m", "vmferry", "run", "--qmp", f"unix:{self.qmp_path}",
               "--serial", f"file:{self.serial_path}", *args]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        # The vmferry of this checkout, whichever one happens to be installed.
        path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": path, **(env or {})},
                                     pass_fds=pass_fds, preexec_fn=die_with_parent)
        self.qmp: QEMUMonitorProtocol | None = None
        # Generous: starting Python, numpy and the VMM takes seconds on a loaded 2-core machine.
        deadline = time.monotonic() + 60
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{name}: no QMP socket in 60 s (exit {self.proc.poll()}): {self.log()}")
            time.sleep(0.02)
        if connect:
            self.qmp = self._connect(deadline)
            self.qmp.settimeout(60)

    def _connect(self, deadline: float) -> QEMUMonitorProtocol:
        # The socket file appears at bind(), an instant before listen(): a busy machine can run
        # the test in between, and that connect is refused. Retry until the process is ready.
        # Release 0.1.0's monitor could also send an event (the guest starting) ahead of its
        # qmp_capabilities reply, which qemu.qmp refuses as a failed negotiation (fixed since):
        # a new session then negotiates cleanly.
        while True:
            qmp = QEMUMonitorProtocol(str(self.qmp_path))
            try:
                qmp.connect(negotiate=True)
                return qmp
            except ConnectError as e:
                with contextlib.suppress(Exception):
                    qmp.close()
                retry = isinstance(e.exc, (ConnectionRefusedError, NegotiationError))
                if not retry or self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise
            time.sleep(0.05)

    def cmd(self, name: str, **args: Any) -> Any:
        """Run a command; return its value or raise AssertionError with the QMP error."""
        assert self.qmp is not None, "started with connect=False"
        reply = self.qmp.cmd_raw(name, args or None)
        if "error" in reply:
            raise QmpReplyError(reply["error"]["class"], reply["error"]["desc"])
        return reply["return"]

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def serial(self) -> str:
        try:
            return self.serial_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serial(self, pattern: str, timeout: float = 30, after: int = 0) -> re.Match[str]:
        """Wait until the console (from character offset `after`) matches `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.serial(), after)
            if m:
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no /{pattern}/ on the console after {timeout} s "
                    f"(exit {self.proc.poll()}):\n{self.serial()[-2000:]}\n--- log:\n{self.log()[-2000:]}"
                )
            time.sleep(0.05)

    def incoming_uri(self, timeout: float = 60) -> str:
        """The URI this destination listens on (`--incoming tcp:HOST:0`, or `defer` and then
        migrate-incoming), as its log says once it listens."""
        rx = re.compile(r"incoming migration on (\S+)")
        deadline = time.monotonic() + timeout
        while not (m := rx.search(self.log())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: not listening for a migration after {timeout} s "
                                     f"(exit {self.proc.poll()}): {self.log()[-2000:]}")
            time.sleep(0.05)
        return m.group(1)

    def incoming_address(self, timeout: float = 60) -> tuple[str, int]:
        """(host, port) of `incoming_uri`, which must be a tcp: one."""
        uri = self.incoming_uri(timeout)
        assert uri.startswith("tcp:"), f"{self.name} listens on {uri}, not on TCP"
        host, port = uri.removeprefix("tcp:").rsplit(":", 1)
        return host, int(port)

    def wait_migration(self, states: tuple[str, ...] = ("completed", "failed", "cancelled"),
                       timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: migration still {info.get('status')} after {timeout} s")
            time.sleep(0.05)

    def close(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):  # best effort: the process may be gone
                self.qmp.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class QmpReplyError(Exception):
    def __init__(self, error_class: str, desc: str) -> None:
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"{error_class}: {desc}")
