"""TCP relays that stand between a migration's source and destination and break one data
channel (multifd's second connection onward): cut it with a reset, stop reading it, or hold back
its last bytes. The main connection and every other channel pass through untouched.

`migrate_through` runs a migration through one: max-bandwidth (the caller's) holds precopy back
until the relay has done its deed, then it is lifted so the migration can end.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

from vmproc import VmProcess


class CuttingRelay:
    """Passes the main connection through and resets the first data connection (the second
    connection) after `cut_after` bytes from the source; `cut` is set when it has."""

    def __init__(self, target: tuple[str, int], cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.uri = f"tcp:127.0.0.1:{self.port}"
        self.cut = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, limit: int | None) -> None:
        seen = 0
        try:
            while data := a.recv(1 << 16):
                seen += len(data)
                if limit is not None and seen > limit:
                    # A reset, both ways: the connection is gone, as when a link or peer dies.
                    # (shutdown first: it wakes the other direction's thread blocked in recv,
                    # which would otherwise keep the socket open past close.)
                    for s in (a, b):
                        with contextlib.suppress(OSError):
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            s.shutdown(socket.SHUT_RDWR)
                    for s in (a, b):
                        s.close()
                    self.cut.set()
                    return
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        n = 0
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
                self._socks += [client, server]
                limit = self.cut_after if n == 1 else None
                n += 1
                threading.Thread(target=self._pipe, args=(client, server, limit), daemon=True).start()
                threading.Thread(target=self._pipe, args=(server, client, None), daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for s in self._socks:  # shutdown first: it wakes the threads blocked in recv
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for s in self._socks:
            s.close()


class StallingRelay(CuttingRelay):
    """Passes everything through but the first data connection's source to destination
    direction: `stop` forwards `stall_after` bytes of it, then stops reading it (the source's
    send queue fills and stays full); `hold` forwards all of it but the newest `stall_after`
    bytes, which it holds back for good (the source sees every byte leave, the destination never
    gets that channel's last records and END). `cut` is set once it stalls."""

    def __init__(self, target: tuple[str, int], stall_after: int, mode: str) -> None:
        self.mode = mode
        self.closed = threading.Event()
        super().__init__(target, stall_after)

    def _pipe(self, a: socket.socket, b: socket.socket, limit: int | None) -> None:
        if limit is None:
            super()._pipe(a, b, None)
            return
        seen = 0
        held = b""
        with contextlib.suppress(OSError):
            while data := a.recv(1 << 16):
                seen += len(data)
                if self.mode == "hold":
                    held += data
                    if len(held) > limit:
                        b.sendall(held[:-limit])
                        held = held[-limit:]
                        self.cut.set()
                    continue
                b.sendall(data)
                if seen > limit:
                    self.cut.set()
                    self.closed.wait()
                    return

    def close(self) -> None:
        self.closed.set()
        super().close()


def migrate_through(src: VmProcess, relay: CuttingRelay, timeout: float = 180) -> dict:
    """`src` migrates through `relay`; once the relay has cut or stalled its channel (the
    source still setting up or active meanwhile), max-bandwidth is lifted. Returns the source's
    final query-migrate; the relay is closed on every way out."""
    try:
        src.cmd("migrate", uri=relay.uri)
        deadline = time.monotonic() + 120
        while not relay.cut.wait(0.1):
            assert time.monotonic() < deadline, f"the {type(relay).__name__} never broke the data channel"
            assert src.cmd("query-migrate")["status"] in ("setup", "active"), src.cmd("query-migrate")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        return src.wait_migration(timeout=timeout)
    finally:
        relay.close()
