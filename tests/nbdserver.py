"""Test harness: a real `qemu-storage-daemon` exporting a qcow2 image (made with `qemu-img`) over
NBD, on a Unix socket or TCP, and ways to read the image afterwards.

qemu-storage-daemon comes with qemu-system-x86 (package qemu-system-common), qemu-img with
qemu-utils. Without them the tests that need a server skip — or fail when VMFERRY_REQUIRE_KVM=1,
as on CI, which installs both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vmferry.block.nbd import NbdAddress, NbdClient, NbdConnectError
from vmproc import die_with_parent

HAVE_TOOLS = all(shutil.which(t) for t in ("qemu-storage-daemon", "qemu-img"))


def require_tools() -> None:
    if HAVE_TOOLS:
        return
    if os.environ.get("VMFERRY_REQUIRE_KVM") == "1":
        pytest.fail("VMFERRY_REQUIRE_KVM=1 (CI) but qemu-storage-daemon or qemu-img is not "
                    "installed (packages qemu-system-x86, qemu-utils)")
    pytest.skip("qemu-storage-daemon or qemu-img not installed")


def create_qcow2(path: Path, size: int) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True,
                   capture_output=True, timeout=60)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StorageDaemon:
    """qemu-storage-daemon serving `image` (qcow2) as export `export`. `tcp=True`: on
    127.0.0.1 (a free port; `uri` says which), else on a Unix socket next to the image."""

    def __init__(self, image: Path, export: str = "disk0", *, writable: bool = True,
                 tcp: bool = False) -> None:
        self.image = image
        self.export = export
        self.log_path = image.with_suffix(".qsd.log")
        self.proc: subprocess.Popen[bytes] | None = None
        for _ in range(20):  # a TCP port taken between our probe and its bind: another port
            if tcp:
                port = free_port()
                addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
                self.address = NbdAddress(export, host="127.0.0.1", port=port)
                self.uri = f"nbd://127.0.0.1:{port}/{export}"
            else:
                sock = image.with_suffix(".nbd.sock")
                addr = f"addr.type=unix,addr.path={sock}"
                self.address = NbdAddress(export, socket=str(sock))
                self.uri = f"nbd+unix:///{export}?socket={sock}"
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    ["qemu-storage-daemon",
                     "--blockdev", f"driver=file,node-name=file0,filename={image}",
                     "--blockdev", "driver=qcow2,node-name=fmt0,file=file0",
                     "--nbd-server", addr,
                     "--export", f"type=nbd,id=exp0,node-name=fmt0,name={export},"
                                 f"writable={'on' if writable else 'off'}"],
                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            if self._ready():
                return
            if not tcp:
                break
        self.stop()
        pytest.fail(f"qemu-storage-daemon did not start: {self.log()}")

    def _ready(self) -> bool:
        """Poll until an NBD client gets through the handshake (the socket exists an instant
        before the server listens), or the daemon exited."""
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(NbdConnectError):
                NbdClient(self.address, connect_timeout=10).close()
                return True
            time.sleep(0.05)
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self) -> NbdClient:
        return NbdClient(self.address)

    def kill(self) -> None:
        """The server dies (SIGKILL): its clients' connections close under them."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def freeze(self) -> None:
        """SIGSTOP, and wait until every thread of the daemon has stopped: from now on no
        request is answered (a stalled server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        task = Path(f"/proc/{self.proc.pid}/task")

        def stopped() -> bool:
            states = []
            for t in task.iterdir():
                with contextlib.suppress(OSError):
                    states.append((t / "stat").read_text().rsplit(")", 1)[1].split()[0])
            return bool(states) and all(st in "Tt" for st in states)

        deadline = time.monotonic() + 60
        while not stopped():
            if time.monotonic() > deadline:
                pytest.fail("qemu-storage-daemon did not stop on SIGSTOP")
            time.sleep(0.02)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """A clean exit (SIGTERM: the daemon flushes and closes the image)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def to_raw(image: Path, raw: Path) -> Path:
    """The qcow2 image's guest-visible bytes as a raw file (`qemu-img convert`; the server must
    have stopped: it holds the image's lock)."""
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True,
                   capture_output=True, timeout=120)
    return raw
