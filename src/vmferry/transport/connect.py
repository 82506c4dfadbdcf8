"""From a migration URI to a live Channel: `connect_outgoing` (source), `listen_incoming` (destination).

Every failure is a TransportError that names the URI and the system's reason, e.g.
"cannot connect to tcp:127.0.0.1:4444: Connection refused". The destination binds (or opens, or
spawns) inside `listen_incoming`, so a port in use or a bad path is reported when the operator
types the command, not when the source finally connects.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat

from vmferry.errors import TransportError
from vmferry.transport.channel import Channel, FdChannel, SocketChannel
from vmferry.transport.command import ExecChannel
from vmferry.transport.uri import ExecUri, FdUri, FileUri, MigrationUri, TcpUri, UnixUri, parse_uri

DEFAULT_CONNECT_TIMEOUT_S = 10.0
LISTEN_BACKLOG = 4


def connect_outgoing(
    uri: str | MigrationUri,
    *,
    timeout_s: float | None = DEFAULT_CONNECT_TIMEOUT_S,
    sndbuf_bytes: int | None = None,
) -> Channel:
    """Open the source's end of a migration. The channel blocks without a timeout once open.

    `timeout_s` bounds the connect only. `sndbuf_bytes` None keeps the kernel's auto-tuned socket
    buffer: fixing SO_SNDBUF switches auto-tuning off, and a larger buffer did not speed up
    sendmsg of 4 KiB pages on loopback (KVM-FACTS.md, "Bulk work, measured"; re-measured with these
    channels at 1, 4 and 16 MiB: no consistent gain over auto-tuning).
    """
    u = parse_uri(uri) if isinstance(uri, str) else uri
    if isinstance(u, TcpUri):
        return _connect_tcp(u, timeout_s, sndbuf_bytes)
    if isinstance(u, UnixUri):
        return _connect_unix(u, timeout_s)
    if isinstance(u, FileUri):
        return _open_file(u, writing=True)
    if isinstance(u, ExecUri):
        return ExecChannel(u.command, writing=True)
    return _adopt_fd(u)


def _connect_tcp(u: TcpUri, timeout_s: float | None, sndbuf_bytes: int | None) -> SocketChannel:
    if not u.host:
        raise TransportError(f"cannot connect to {u}: no host given")
    if u.port == 0:
        raise TransportError(f"cannot connect to {u}: port 0 is only for listening")
    try:
        # create_connection tries every address the name resolves to, IPv6 and IPv4.
        sock = socket.create_connection((u.host, u.port), timeout=timeout_s)
    except socket.gaierror as e:
        raise TransportError(f"cannot connect to {u}: cannot resolve {u.host!r}: {e.strerror}") from e
    except TimeoutError as e:
        raise TransportError(f"cannot connect to {u}: no answer within {timeout_s} s") from e
    except OSError as e:
        raise TransportError(f"cannot connect to {u}: {e.strerror or e}") from e
    sock.settimeout(None)
    _tune_tcp(sock, sndbuf_bytes=sndbuf_bytes)
    return SocketChannel(sock, str(u))


KEEPALIVE_IDLE_S = 4
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 10_000


def _tune_tcp(
    sock: socket.socket, *, sndbuf_bytes: int | None = None, rcvbuf_bytes: int | None = None
) -> None:
    # The stream's big writes do not care about Nagle, but the return path's small acks and page
    # requests must not sit 40 ms waiting for a delayed ACK: in postcopy that is a vCPU stalled.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # The backstop below the heartbeats (migration/heartbeat.py), for a peer that sends none:
    # a dead peer or link is noticed in about 10 s instead of the kernel's 2 hours. Keepalive
    # covers an idle connection; TCP_USER_TIMEOUT one whose sent data stays unacknowledged.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    if sndbuf_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf_bytes)
    if rcvbuf_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)


def _connect_unix(u: UnixUri, timeout_s: float | None) -> SocketChannel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(u.path)
        sock.settimeout(None)
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot connect to {u}: {e.strerror or e}") from e
    return SocketChannel(sock, str(u))


def _open_file(u: FileUri, *, writing: bool) -> FdChannel:
    try:
        if writing:
            # No O_TRUNC when there is an offset: the bytes before it belong to whatever container
            # the stream is embedded in. Everything from the offset on is replaced.
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (0 if u.offset else os.O_TRUNC)
            fd = os.open(u.path, flags, 0o600)
        else:
            fd = os.open(u.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        purpose = "writing" if writing else "reading"
        raise TransportError(f"cannot open {u} for {purpose}: {e.strerror}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TransportError(f"cannot use {u}: not a regular file (use unix:, exec: or fd: for streams)")
        if u.offset:
            if writing:
                os.ftruncate(fd, u.offset)
            os.lseek(fd, u.offset, os.SEEK_SET)
    except OSError as e:
        os.close(fd)
        raise TransportError(f"cannot use {u}: {e.strerror}") from e
    except TransportError:
        os.close(fd)
        raise
    return FdChannel(fd, str(u))


def _adopt_fd(u: FdUri) -> Channel:
    """Wrap a descriptor the management tool passed us; the channel takes ownership (as QEMU does)."""
    try:
        mode = os.fstat(u.fd).st_mode
    except OSError as e:
        if e.errno == errno.EBADF:
            raise TransportError(f"{u}: file descriptor {u.fd} is not open") from e
        raise TransportError(f"{u}: {e.strerror}") from e
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=u.fd)
        sock.setblocking(True)
        return SocketChannel(sock, str(u))
    return FdChannel(u.fd, str(u))


# -- destination ------------------------------------------------------------------------------


class Listener:
    """The destination's waiting end. `address` is where the source should connect."""

    address: MigrationUri

    def accept(self, timeout_s: float | None = None) -> Channel:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SocketListener(Listener):
    """A listening tcp or unix socket. close() from another thread wakes a blocked accept()."""

    def __init__(self, sock: socket.socket, address: MigrationUri, *, rcvbuf_bytes: int | None = None):
        self._sock = sock
        self.address = address
        self._rcvbuf_bytes = rcvbuf_bytes
        self._closed = False
        # accept() waits in poll() on the socket and this pipe; close() writes to it. Closing the
        # listening socket alone does not wake a thread already inside accept() on Linux.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._owner_pid = os.getpid()
        sock.setblocking(False)
        # (path, inode) of the socket file we bound, so close() removes exactly that file.
        self._unix_file: tuple[str, int] | None = None
        if isinstance(address, UnixUri):
            self._unix_file = (address.path, os.stat(address.path).st_ino)

    def accept(self, timeout_s: float | None = None) -> SocketChannel:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
        while True:
            if self._closed:
                raise TransportError(f"listener on {self.address} was closed")
            ready = poller.poll(timeout_ms)
            if not ready:
                raise TransportError(f"no incoming migration on {self.address} within {timeout_s} s")
            if self._closed or any(fd == self._wake_r for fd, _ in ready):
                raise TransportError(f"listener on {self.address} was closed")
            try:
                conn, _peer = self._sock.accept()
            except BlockingIOError:
                continue  # the connection went away between poll and accept
            except OSError as e:
                raise TransportError(f"accept on {self.address} failed: {e.strerror or e}") from e
            conn.setblocking(True)
            if isinstance(self.address, TcpUri):
                _tune_tcp(conn, rcvbuf_bytes=self._rcvbuf_bytes)
            return SocketChannel(conn, str(self.address))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if os.getpid() == self._owner_pid:
            # A forked child shares the wake pipe: its close() must not wake the parent's accept().
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        self._sock.close()
        if self._unix_file is not None:
            # Remove our socket file, but not one a newer listener has since bound at the same path.
            path, inode = self._unix_file
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
        # The wake pipe stays open: a thread may still be returning from poll() on it; it is
        # close-on-exec and freed with the object.

    def __del__(self) -> None:
        for fd in (getattr(self, "_wake_r", -1), getattr(self, "_wake_w", -1)):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


class OneShotListener(Listener):
    """file:, exec: and non-listening fd: — the channel exists already; accept() hands it over once."""

    def __init__(self, channel: Channel, address: MigrationUri):
        self._channel: Channel | None = channel
        self.address = address

    def accept(self, timeout_s: float | None = None) -> Channel:
        if self._channel is None:
            raise TransportError(f"{self.address} carries a single incoming migration; it was already taken")
        channel, self._channel = self._channel, None
        return channel

    def close(self) -> None:
        # Only a channel nobody accepted is ours to close; an accepted one belongs to its taker.
        if self._channel is not None:
            channel, self._channel = self._channel, None
            channel.close()


def listen_incoming(uri: str | MigrationUri, *, rcvbuf_bytes: int | None = None) -> Listener:
    """Prepare the destination's end now, so that every error shows at once."""
    u = parse_uri(uri) if isinstance(uri, str) else uri
    if isinstance(u, TcpUri):
        return _listen_tcp(u, rcvbuf_bytes)
    if isinstance(u, UnixUri):
        return _listen_unix(u)
    if isinstance(u, FileUri):
        return OneShotListener(_open_file(u, writing=False), u)
    if isinstance(u, ExecUri):
        return OneShotListener(ExecChannel(u.command, writing=False), u)
    channel = _adopt_fd(u)
    if isinstance(channel, SocketChannel) and channel.socket.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        return SocketListener(channel.socket, u)
    return OneShotListener(channel, u)


def _listen_tcp(u: TcpUri, rcvbuf_bytes: int | None) -> SocketListener:
    host = u.host or None  # None + AI_PASSIVE = the wildcard address
    try:
        infos = socket.getaddrinfo(host, u.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TransportError(f"cannot listen on {u}: cannot resolve {u.host!r}: {e.strerror}") from e
    if not u.host:
        # Prefer the IPv6 wildcard: with V6ONLY off it takes IPv4 connections too, as QEMU does.
        infos.sort(key=lambda info: info[0] != socket.AF_INET6)
    last: OSError | None = None
    for family, type_, proto, _canon, sockaddr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            # A destination restarted right after a failed attempt must not wait out TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and sockaddr[0] == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if rcvbuf_bytes:
                # Must precede listen(): the window scale is negotiated on the SYN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
        except OSError as e:
            sock.close()
            last = e
            continue
        bound_host, bound_port = sock.getsockname()[:2]
        return SocketListener(sock, TcpUri(bound_host, bound_port), rcvbuf_bytes=rcvbuf_bytes)
    reason = last.strerror if last is not None else "no usable address"
    raise TransportError(f"cannot listen on {u}: {reason}")


def _listen_unix(u: UnixUri) -> SocketListener:
    _remove_stale_socket(u)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(u.path)
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot listen on {u}: {e.strerror or e}") from e
    return SocketListener(sock, u)


def _remove_stale_socket(u: UnixUri) -> None:
    """A socket file left by a dead destination blocks bind(); a live one must not be stolen."""
    try:
        mode = os.lstat(u.path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise TransportError(f"cannot listen on {u}: {e.strerror}") from e
    if not stat.S_ISSOCK(mode):
        raise TransportError(f"cannot listen on {u}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(u.path)
    except OSError:
        # Nobody answers (ECONNREFUSED): it is stale.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(u.path)
        return
    finally:
        probe.close()
    raise TransportError(f"cannot listen on {u}: another process is listening there")
