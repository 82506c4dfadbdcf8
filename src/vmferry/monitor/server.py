"""The QMP socket server: a thin driver around protocol.QmpConnection.

    server = QmpServer(CommandDispatcher(backend), ["unix:/run/vm.qmp", "tcp:127.0.0.1:4444"])
    server.emit_event("STOP")            # from any thread
    server.close()

One thread runs a selector loop over every listening socket and client, so a busy migration
thread or a stuck vCPU never delays the monitor, and the monitor never waits on a client: sockets
are non-blocking, and each client's unsent output is buffered up to `max_output_bytes` (a client
that stops reading while events pile up is disconnected rather than allowed to grow memory).

Only this thread writes to sockets. `emit_event` (any thread) encodes the event once, appends it
to every negotiated client's output buffer under `_lock`, and wakes the loop through a socketpair.
Command handlers run on this thread and must return promptly (see backend.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import selectors
import socket
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from vmferry.errors import VmferryError
from vmferry.monitor.events import EVENTS, encode_event
from vmferry.monitor.protocol import DEFAULT_MAX_INPUT_BYTES, Dispatcher, QmpConnection

log = logging.getLogger("vmferry.monitor")

DEFAULT_MAX_OUTPUT_BYTES = 8 << 20
_RECV_BYTES = 65536
_WAKE = object()


@dataclass
class _Listener:
    sock: socket.socket
    address: str  # as bound: tcp port 0 resolved to the real port
    unix_path: str | None = None
    unix_ino: int | None = None  # to unlink only the socket file we created


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    conn: QmpConnection
    peer: str
    out: bytearray = field(default_factory=bytearray)
    writing: bool = False  # registered for EVENT_WRITE
    # Events go out only after the qmp_capabilities reply is queued: the session turns
    # negotiated inside feed(), a moment before its reply is queued, and an event queued in
    # between would reach the client before that reply (qemu.qmp refuses such a greeting).
    events: bool = False


class QmpServer:
    """Serves QMP on every address in `addresses` ("unix:PATH", "tcp:HOST:PORT") at once.
    Binds in the constructor (errors raise VmferryError there) and starts serving at once."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        addresses: Sequence[str] | str,
        *,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        if isinstance(addresses, str):
            addresses = [addresses]
        self._dispatcher = dispatcher
        self._max_input = max_input_bytes
        self._max_output = max_output_bytes
        self._lock = threading.Lock()  # guards _clients, every _Client.out and _closed
        self._clients: dict[socket.socket, _Client] = {}
        self._closed = False
        self._warned_events: set[str] = set()
        self._listeners: list[_Listener] = []
        try:
            for address in addresses:
                self._listeners.append(_bind(address))
        except BaseException:
            self._close_listeners()
            raise
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        for lst in self._listeners:
            self._sel.register(lst.sock, selectors.EVENT_READ, lst)
        self._thread = threading.Thread(target=self._run, name="vmferry-qmp", daemon=True)
        self._thread.start()

    @property
    def addresses(self) -> list[str]:
        """The bound addresses, e.g. "tcp:127.0.0.1:40123" for a requested port 0."""
        return [lst.address for lst in self._listeners]

    def emit_event(self, name: str, data: dict | None = None) -> None:
        """Send an event to every negotiated client. Thread-safe; never blocks on a client."""
        if name not in EVENTS and name not in self._warned_events:
            self._warned_events.add(name)
            log.warning("emitting QMP event %s, which monitor/events.py does not document", name)
        msg = encode_event(name, data)
        with self._lock:
            if self._closed:
                return
            for client in list(self._clients.values()):
                if client.events:
                    self._queue_locked(client, msg)
        self._wake()

    def close(self) -> None:
        """Stop serving, disconnect every client, remove our unix sockets. Idempotent; may be
        called from a command handler (then the loop ends after the current round)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> QmpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the loop (server thread only) --------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed:
                for key, mask in self._sel.select():
                    tag = key.data
                    if tag is _WAKE:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                    elif isinstance(tag, _Listener):
                        self._accept(tag)
                    elif mask & selectors.EVENT_READ and tag.sock in self._clients:
                        self._read(tag)
                    if isinstance(tag, _Client) and mask & selectors.EVENT_WRITE:
                        self._flush(tag)
                self._flush_all()
        except Exception:
            log.exception("QMP server loop failed; the monitor is gone")
        finally:
            self._shutdown()

    def _accept(self, lst: _Listener) -> None:
        try:
            sock, addr = lst.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # e.g. EMFILE: refuse this one, keep serving the rest
            log.warning("QMP accept on %s failed: %s", lst.address, e)
            return
        sock.setblocking(False)
        peer = lst.address if lst.unix_path else f"tcp:{addr[0]}:{addr[1]}"
        conn = QmpConnection(self._dispatcher, max_input_bytes=self._max_input, peer=peer)
        client = _Client(sock, conn, peer)
        with self._lock:
            self._clients[sock] = client
            client.out += client.conn.greeting()
        self._sel.register(sock, selectors.EVENT_READ, client)
        log.debug("QMP client connected: %s", peer)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("QMP client %s: %s", client.peer, e)
            self._drop(client)
            return
        if not data:
            # Peer finished sending (maybe a half-close after its last command): answer what
            # is pending, then hang up.
            self._flush(client)
            self._drop(client)
            return
        client.conn.feed(data, lambda reply: self._queue_reply(client, reply))

    def _queue_reply(self, client: _Client, reply: bytes) -> None:
        # Called between commands, not under _lock while a handler runs (handlers emit events).
        with self._lock:
            self._queue_locked(client, reply)
            client.events = client.conn.negotiated

    def _queue_locked(self, client: _Client, data: bytes) -> None:
        if len(client.out) + len(data) > self._max_output:
            # A client that does not read cannot be allowed to hold memory without bound; the
            # loop notices the closed socket and drops it.
            log.warning("QMP client %s is not reading its output; disconnecting it", client.peer)
            client.out.clear()
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_RDWR)
            return
        client.out += data

    def _flush_all(self) -> None:
        with self._lock:
            pending = [c for c in self._clients.values() if c.out or c.writing]
        for client in pending:
            self._flush(client)

    def _flush(self, client: _Client) -> None:
        dead = False
        with self._lock:
            if client.sock not in self._clients:
                return
            try:
                while client.out:
                    sent = client.sock.send(client.out)
                    del client.out[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:  # the peer went away mid-reply: its problem, not ours
                log.debug("QMP client %s: %s", client.peer, e)
                client.out.clear()
                dead = True
            want_write = bool(client.out)
        if dead:
            self._drop(client)
        elif want_write != client.writing:
            client.writing = want_write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self._sel.modify(client.sock, events, client)

    def _drop(self, client: _Client) -> None:
        with self._lock:
            if self._clients.pop(client.sock, None) is None:
                return
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        client.sock.close()
        log.debug("QMP client disconnected: %s", client.peer)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.sock.close()
        self._sel.close()
        self._close_listeners()
        self._wake_r.close()
        self._wake_w.close()

    def _close_listeners(self) -> None:
        for lst in self._listeners:
            lst.sock.close()
            if lst.unix_path is not None:
                with contextlib.suppress(OSError):
                    if os.stat(lst.unix_path).st_ino == lst.unix_ino:
                        os.unlink(lst.unix_path)


# QMP has no authentication (as in QEMU): whoever can connect controls the VM. So a unix socket is
# owner-only unless asked otherwise, and TCP listens beyond loopback only when asked by name.
UNIX_SOCKET_MODE = 0o600
_ON_OFF = {"on": True, "off": False}
_ADDRESS_HELP = "expected unix:PATH or tcp:HOST:PORT, optionally followed by ,allow-remote=on (tcp)"


@dataclass(frozen=True)
class QmpAddress:
    """One --qmp address: `unix:PATH` or `tcp:HOST:PORT[,allow-remote=on]`. QEMU's `server=on`
    and `wait=off` are accepted as what vmferry does anyway; any other option is refused."""

    kind: str  # "unix" | "tcp"
    path: str = ""
    host: str = ""
    port: int = 0
    allow_remote: bool = False


def parse_qmp_address(address: str) -> QmpAddress:
    head, *options = address.split(",")
    allow_remote = False
    for opt in options:
        key, eq, value = opt.partition("=")
        state = _ON_OFF.get(value) if eq else None
        if key == "allow-remote" and state is not None:
            allow_remote = state
        elif (key, state) in (("server", True), ("wait", False)):
            pass  # vmferry's monitor always listens and never waits for a client
        else:
            raise VmferryError(f"invalid QMP address {address!r}: option {opt!r} is not supported "
                               f"({_ADDRESS_HELP})")
    kind, _, rest = head.partition(":")
    if kind == "unix" and rest and not allow_remote:
        return QmpAddress("unix", path=rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")  # tcp:[::1]:4444
        if host and port.isdigit():
            return QmpAddress("tcp", host=host, port=int(port), allow_remote=allow_remote)
    raise VmferryError(f"invalid QMP address {address!r}: {_ADDRESS_HELP}")


def _bind(address: str) -> _Listener:
    a = parse_qmp_address(address)
    if a.kind == "unix":
        return _bind_unix(a.path)
    return _bind_tcp(a.host, a.port, allow_remote=a.allow_remote)


def _bind_unix(path: str) -> _Listener:
    # Replace a stale socket file left by a previous run, but never another kind of file, and never
    # the socket of a VMM still listening there (that would orphan its monitor).
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            if _someone_listens(path):
                raise VmferryError(f"cannot listen for QMP on unix:{path}: another process listens there")
            os.unlink(path)
    # Bound, made owner-only and listening under a temporary name first, then linked into place:
    # a client that finds `path` always finds a monitor that answers (no ECONNREFUSED window), and
    # link() never replaces a file that appeared at `path` meanwhile. The short name keeps the
    # temporary path within sun_path whenever `path` itself fits.
    tmp = os.path.join(os.path.dirname(path), f".q{os.getpid() % 100000}{secrets.token_hex(2)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(tmp)
        except OSError:  # the temporary name does not fit or cannot be made: bind in place
            tmp = path
            sock.bind(path)
        try:
            os.chmod(tmp, UNIX_SOCKET_MODE)  # before listen(): nobody else can ever connect
            sock.listen(16)
            sock.setblocking(False)
            if tmp != path:
                os.link(tmp, path)
            ino = os.stat(path).st_ino
        finally:
            if tmp != path:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
    except OSError as e:
        sock.close()
        raise VmferryError(f"cannot listen for QMP on unix:{path}: {e.strerror or e}") from e
    return _Listener(sock, f"unix:{path}", path, ino)


def _someone_listens(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _bind_tcp(host: str, port: int, *, allow_remote: bool) -> _Listener:
    try:
        family, socktype, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except OSError as e:
        raise VmferryError(f"cannot listen for QMP on tcp:{host}:{port}: {e.strerror or e}") from e
    if not allow_remote and not ipaddress.ip_address(sockaddr[0].split("%")[0]).is_loopback:
        raise VmferryError(
            f"refusing to listen for QMP on tcp:{host}:{port}: it is not a loopback address, and QMP has "
            f"no authentication (whoever connects controls the VM); add ',allow-remote=on' to do it anyway")
    try:
        sock = socket.socket(family, socktype, proto)
    except OSError as e:
        raise VmferryError(f"cannot listen for QMP on tcp:{host}:{port}: {e.strerror or e}") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(16)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise VmferryError(f"cannot listen for QMP on tcp:{host}:{port}: {e.strerror or e}") from e
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return _Listener(sock, f"tcp:{shown}:{bound_port}")
