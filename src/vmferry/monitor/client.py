"""A small synchronous QMP client, for `vmferry migrate` and `vmferry demo`.

The monitor's tests use the official `qemu.qmp` client as an independent peer; the CLI needs only
this much and no asyncio: connect, negotiate, run a command, collect events on the side.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from vmferry.errors import QmpError, VmferryError


class QmpClient:
    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        """`address`: unix:PATH or tcp:HOST:PORT (the `--qmp` syntax)."""
        self.address = address
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._id = 0
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock = _connect(address)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    why = e.strerror or str(e)
                    raise VmferryError(f"cannot connect to the QMP monitor at {address}: {why}") from None
                time.sleep(0.05)
        self.sock.settimeout(timeout_s)
        greeting = self._read()
        if "QMP" not in greeting:
            raise VmferryError(f"{address} is not a QMP monitor (greeting: {greeting})")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                data = self.sock.recv(65536)
            except OSError as e:
                raise VmferryError(f"QMP monitor at {self.address}: {e}") from None
            if not data:
                raise VmferryError(f"the QMP monitor at {self.address} closed the connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run `command`; its return value, or QmpError with the monitor's class and text."""
        self._id += 1
        msg: dict[str, Any] = {"execute": command, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self._id:
                continue
            if "error" in reply:
                raise QmpError(reply["error"].get("desc", ""), reply["error"].get("class", "GenericError"))
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()


def _connect(address: str) -> socket.socket:
    if address.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(address[5:])
        except OSError:
            s.close()
            raise
        return s
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        return socket.create_connection((host.strip("[]"), int(port)))
    raise VmferryError(f"QMP address {address!r}: expected unix:PATH or tcp:HOST:PORT")
