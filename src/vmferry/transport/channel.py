"""Channels: the byte pipe the migration code reads and writes, whatever the URI was.

A `Channel` moves bytes and nothing else; what flows through it is the stream's business. The
hot path is `sendmsg(list_of_page_views)` on the source and `recv_exactly_into(guest_ram_view)` on
the destination: neither copies a page in Python. Two kinds:

  SocketChannel  tcp and unix sockets (and an fd: that is a socket). Duplex, so the same channel
                 carries the destination's return path (acks, postcopy page requests).
  FdChannel      pipes and regular files (file:, fd: of a pipe); exec: adds a child process
                 (`ExecChannel`). One direction only: `has_return_path` is False.
  TlsChannel     (transport/tls.py) a SocketChannel whose bytes are TLS 1.3 records.

Threads: one thread sends and one thread receives at a time; `shutdown()` may be called from any
thread (the cancel path) and makes a send or receive blocked in another thread fail promptly with a
TransportError saying the channel was shut down.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
from collections.abc import Sequence
from typing import TypeAlias

from vmferry.errors import TransportError

# Anything exposing the buffer protocol with one-byte items: bytes, bytearray, mmap, and
# memoryviews of format "B" (page slices of guest RAM). len() must be the size in bytes: the fast
# path of sendmsg sums len() to tell a complete write from a partial one.
Buffer: TypeAlias = bytes | bytearray | memoryview

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):
    IOV_MAX = 1024  # Linux's value; sendmsg/writev refuse longer vectors with EMSGSIZE/EINVAL


class Channel:
    """Base of every channel: the counters, the send/receive loops and error wording.

    Subclasses supply `_write_vector(views) -> int` and `_read_into(view) -> int`, each one system
    call's worth of work that may be partial, and translate OSError into TransportError.
    """

    has_return_path = False

    def __init__(self, label: str) -> None:
        self.label = label  # the URI, for messages: "send on tcp:127.0.0.1:4444 failed: ..."
        self.bytes_sent = 0  # bytes the kernel accepted from us (not bytes the peer has read)
        self.bytes_received = 0
        self._shut_down = False
        self._closed = False

    # -- sending --------------------------------------------------------------------------------

    def sendall(self, buf: Buffer) -> None:
        self.sendmsg([buf])

    def sendmsg(self, buffers: Sequence[Buffer]) -> int:
        """Write every byte of every buffer, in order, without copying them; returns the byte count.

        Vectors longer than IOV_MAX go in several calls; a partial write (a signal, a timeout, a
        non-blocking pipe) resumes from the exact byte where the kernel stopped.
        """
        total = 0
        i, count = 0, len(buffers)
        while i < count:
            batch = buffers[i : i + IOV_MAX]
            want = sum(map(len, batch))
            sent = self._write_vector(batch)
            total += sent
            if sent == want:
                i += len(batch)
                continue
            # Partial: skip the buffers that went out whole, then finish the one cut in the middle.
            k = 0
            while sent >= len(batch[k]):
                sent -= len(batch[k])
                k += 1
            i += k
            rest = memoryview(buffers[i]).cast("B")[sent:]
            while rest:
                sent = self._write_vector([rest])
                total += sent
                rest = rest[sent:]
            i += 1
        return total

    # -- receiving ------------------------------------------------------------------------------

    def recv_into(self, buf: Buffer) -> int:
        """Read what is available (at least one byte, up to len(buf)) into buf; 0 means EOF."""
        view = memoryview(buf).cast("B")
        if not view:
            return 0
        return self._read_into(view)

    def recv_buffered_into(self, buf: Buffer) -> int:
        """What this side holds already (read from the kernel but not handed out: TLS records),
        up to len(buf), without a system call; 0 when nothing is held (never EOF). A thread that
        polls the fd calls it after each read: the kernel's readiness does not show these bytes."""
        return 0

    def recv_exactly_into(self, buf: Buffer) -> None:
        """Fill all of buf (e.g. a page range of guest RAM); EOF first is a TransportError."""
        view = memoryview(buf).cast("B")
        want, got = len(view), 0
        while got < want:
            n = self._read_into(view[got:])
            if n == 0:
                raise TransportError(f"{self.label}: connection closed after {got} of {want} bytes")
            got += n

    def recv(self, nbytes: int) -> bytes:
        """Up to nbytes bytes, whatever arrives first; b"" at EOF."""
        buf = bytearray(nbytes)
        n = self.recv_into(buf)
        return bytes(buf[:n])

    def recv_exactly(self, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        self.recv_exactly_into(buf)
        return bytes(buf)

    # -- lifetime -------------------------------------------------------------------------------

    def fileno(self) -> int:
        raise NotImplementedError

    def settimeout(self, timeout_s: float | None) -> None:
        """None = block forever (the migration thread's normal mode; cancel uses shutdown())."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop all traffic now; callable from any thread. Blocked calls fail with TransportError."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label} sent={self.bytes_sent} received={self.bytes_received}>"

    # -- for subclasses -------------------------------------------------------------------------

    def _write_vector(self, views: Sequence[Buffer]) -> int:
        raise NotImplementedError

    def _read_into(self, view: memoryview) -> int:
        raise NotImplementedError

    def _error(self, op: str, exc: OSError) -> TransportError:
        """`op` names the operation with its preposition ("send on", "write to", "read from"),
        so the message reads "write to exec:CMD failed: ..."."""
        if self._shut_down:
            return TransportError(f"{op} {self.label} failed: the channel was shut down")
        if isinstance(exc, TimeoutError):
            return TransportError(f"{op} {self.label} timed out")
        return TransportError(f"{op} {self.label} failed: {exc.strerror or exc}")


class SocketChannel(Channel):
    """A connected stream socket (tcp or unix). Owns the socket."""

    has_return_path = True  # the socket is duplex: the destination answers on the same connection

    def __init__(self, sock: socket.socket, label: str) -> None:
        super().__init__(label)
        self._sock = sock

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def _write_vector(self, views: Sequence[Buffer]) -> int:
        if self._shut_down:
            raise TransportError(f"send on {self.label} failed: the channel was shut down")
        try:
            n = self._sock.sendmsg(views)
        except OSError as e:
            raise self._error("send on", e) from e
        self.bytes_sent += n
        return n

    def _read_into(self, view: memoryview) -> int:
        try:
            n = self._sock.recv_into(view)
        except OSError as e:
            raise self._error("receive on", e) from e
        if n == 0 and self._shut_down:
            # shutdown() from another thread looks like EOF to recv; say what really happened.
            raise TransportError(f"receive on {self.label} failed: the channel was shut down")
        self.bytes_received += n
        return n

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout_s: float | None) -> None:
        self._sock.settimeout(timeout_s)

    def shutdown(self) -> None:
        # SHUT_RDWR wakes a thread blocked in recv (it sees EOF) or in send (EPIPE), and tells the
        # peer: its recv sees EOF, so a destination blocked on us unblocks too.
        self._shut_down = True
        # OSError: not connected any more, or already closed: nothing left to wake.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()


class FdChannel(Channel):
    """A pipe, FIFO or regular file, one direction. Owns the descriptor.

    Pipes are switched to non-blocking mode and every wait goes through poll() together with a
    private wake-up pipe: that is how shutdown() interrupts a thread blocked on a pipe, which
    closing the descriptor would not do. Regular files never block, so they need none of it.
    """

    def __init__(self, fd: int, label: str) -> None:
        super().__init__(label)
        self._fd = fd
        self._timeout_s: float | None = None
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            raise TransportError(f"{label}: {e.strerror}") from e
        self._pollable = not stat.S_ISREG(mode)
        self._wake_r = self._wake_w = -1
        if self._pollable:
            # O_NONBLOCK lives on the open file description: an fd: handed to us shares it with
            # whoever gave it, which is fine because they handed the stream over to us.
            os.set_blocking(fd, False)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._owner_pid = os.getpid()

    def _write_vector(self, views: Sequence[Buffer]) -> int:
        while True:
            if self._shut_down:
                raise TransportError(f"write to {self.label} failed: the channel was shut down")
            try:
                n = os.writev(self._fd, views)
            except BlockingIOError:
                self._wait(select.POLLOUT, "write to")
                continue
            except OSError as e:
                raise self._error("write to", e) from e
            self.bytes_sent += n
            return n

    def _read_into(self, view: memoryview) -> int:
        while True:
            if self._shut_down:
                raise TransportError(f"read from {self.label} failed: the channel was shut down")
            try:
                n = os.readv(self._fd, [view])
            except BlockingIOError:
                self._wait(select.POLLIN, "read from")
                continue
            except OSError as e:
                raise self._error("read from", e) from e
            if n == 0 and self._shut_down:
                # A cancel that raced this read (an exec: command killed, say) must not pass for
                # a clean end of stream.
                raise TransportError(f"read from {self.label} failed: the channel was shut down")
            self.bytes_received += n
            return n

    def _wait(self, events: int, op: str) -> None:
        poller = select.poll()
        poller.register(self._fd, events)
        poller.register(self._wake_r, select.POLLIN)
        timeout_ms = None if self._timeout_s is None else max(0, int(self._timeout_s * 1000))
        ready = poller.poll(timeout_ms)
        if not ready:
            raise TransportError(f"{op} {self.label} timed out after {self._timeout_s} s")
        if any(fd == self._wake_r for fd, _ in ready):
            raise TransportError(f"{op} {self.label} failed: the channel was shut down")
        # POLLHUP / POLLERR on our fd: the retried read returns 0 (EOF) or the write raises EPIPE.

    def fileno(self) -> int:
        return self._fd

    def settimeout(self, timeout_s: float | None) -> None:
        self._timeout_s = timeout_s  # regular files never wait, so it only matters for pipes

    def shutdown(self) -> None:
        self._shut_down = True
        # A forked child shares the wake pipe: its shutdown() must not cancel the parent's I/O.
        if self._wake_w >= 0 and os.getpid() == self._owner_pid:
            # OSError: already woken (pipe full) or closed: either way nobody is left asleep.
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._fd)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
