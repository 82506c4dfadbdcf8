"""Host-side character backends for the serial port, named with QEMU's chardev words:

  stdio       output to our stdout; input from our stdin (a reader thread)
  file:PATH   output appended to PATH (truncated at start); no input
  unix:PATH   listen on a unix socket at PATH (like QEMU's `unix:PATH,server=on,wait=off`):
              output goes to the connected client (dropped while none is), input comes from it
  null        output discarded, no input
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable

from vmferry.errors import VmferryError

Receiver = Callable[[bytes], None]


class Chardev:
    """Base: discards output, has no input (the `null` backend)."""

    spec = "null"

    def write(self, data: bytes) -> None:
        pass

    def set_receiver(self, receiver: Receiver) -> None:
        """Start delivering input bytes to `receiver` (called from a backend thread)."""

    def close(self) -> None:
        pass


class StdioChardev(Chardev):
    spec = "stdio"

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(1, data)

    def set_receiver(self, receiver: Receiver) -> None:
        def pump() -> None:
            while True:
                try:
                    data = os.read(0, 256)
                except OSError:
                    return
                if not data:
                    return
                receiver(data)

        threading.Thread(target=pump, name="serial-stdin", daemon=True).start()


class FileChardev(Chardev):
    def __init__(self, path: str) -> None:
        self.spec = f"file:{path}"
        try:
            # Unbuffered: every guest byte is on disk when the guest's OUT returns, so a reader
            # (a test, `tail -f`) never waits for a flush.
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise VmferryError(f"serial backend {self.spec}: {e.strerror}") from None

    def write(self, data: bytes) -> None:
        if self._fd >= 0:
            os.write(self._fd, data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class UnixServerChardev(Chardev):
    def __init__(self, path: str) -> None:
        self.spec = f"unix:{path}"
        self.path = path
        self._client: socket.socket | None = None
        self._receiver: Receiver | None = None
        self._lock = threading.Lock()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._server.bind(path)
        except OSError as e:
            raise VmferryError(f"serial backend {self.spec}: {e.strerror}") from None
        self._server.listen(1)
        threading.Thread(target=self._accept_loop, name="serial-unix", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._client is not None:
                    self._client.close()
                self._client = client
            while True:
                try:
                    data = client.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    break
                if self._receiver is not None:
                    self._receiver(data)
            with self._lock:
                if self._client is client:
                    self._client = None
            client.close()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._client is None:
                return
            try:
                self._client.sendall(data)
            except OSError:
                self._client = None

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def close(self) -> None:
        self._server.close()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def open_chardev(spec: str) -> Chardev:
    """`stdio`, `file:PATH`, `unix:PATH` or `null` -> a Chardev."""
    if spec == "stdio":
        return StdioChardev()
    if spec in ("null", "none"):
        return Chardev()
    kind, _, arg = spec.partition(":")
    if kind == "file" and arg:
        return FileChardev(arg)
    if kind == "unix" and arg:
        return UnixServerChardev(arg.split(",")[0])
    raise VmferryError(f"unknown serial backend {spec!r}: use stdio, file:PATH, unix:PATH or null")
