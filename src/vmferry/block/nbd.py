"""An NBD client: the Network Block Device protocol as `qemu-storage-daemon`, `qemu-nbd` and
nbdkit serve it (the protocol is github.com/NetworkBlockDevice/nbd, doc/proto.md).

Handshake: fixed newstyle only (the server's NBDMAGIC, IHAVEOPT and handshake flags; our client
flags). Options, in order: NBD_OPT_STRUCTURED_REPLY (used if the server accepts it), then with
structured replies NBD_OPT_SET_META_CONTEXT for "base:allocation" (where the export's data and
holes are), then NBD_OPT_GO with the export name, asking for NBD_INFO_BLOCK_SIZE. An unknown
export, a server that wants TLS, one shutting down: each an `NbdConnectError` naming it.

Transmission: one request at a time on the connection (a lock around each round trip, so the
drive's I/O thread, a migration's thread and its flusher may share one client). READ, WRITE,
FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS and DISC at close. Replies simple or structured
(OFFSET_DATA, OFFSET_HOLE — a hole is zeroed here, never sent —, BLOCK_STATUS, ERROR,
ERROR_OFFSET, NONE). A server's error code is an `NbdError` (an OSError, so a device answers
the guest IOERR) named as the protocol names it (NBD_EIO, NBD_ENOSPC, ...). A connection that
broke (the server died, a reply did not come within `IO_TIMEOUT_S`, a reply that makes no sense)
stays broken: every later request fails at once with the first cause; there is no reconnect.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

NBD_DEFAULT_PORT = 10809
CONNECT_TIMEOUT_S = 30.0
# How long a request waits for its reply before the connection is declared broken: long enough
# for a busy server on a loaded host, short enough that a stalled server turns into I/O errors
# for the guest (and a bounded wait for a quiesce) rather than a device that never answers.
IO_TIMEOUT_S = 30.0

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
REPLY_OPT_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# Options and option replies.
OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 2, 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR = 1 << 31
REP_ERRORS = {REP_ERR + 1: "NBD_REP_ERR_UNSUP", REP_ERR + 2: "NBD_REP_ERR_POLICY",
              REP_ERR + 3: "NBD_REP_ERR_INVALID", REP_ERR + 4: "NBD_REP_ERR_PLATFORM",
              REP_ERR + 5: "NBD_REP_ERR_TLS_REQD", REP_ERR + 6: "NBD_REP_ERR_UNKNOWN",
              REP_ERR + 7: "NBD_REP_ERR_SHUTDOWN", REP_ERR + 8: "NBD_REP_ERR_BLOCK_SIZE_REQD",
              REP_ERR + 9: "NBD_REP_ERR_TOO_BIG"}
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

# Transmission flags (NBD_INFO_EXPORT).
TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1 << 0, 1 << 1, 1 << 2, 1 << 3
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_CAN_MULTI_CONN = 1 << 5, 1 << 6, 1 << 8

# Commands and command flags.
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_FLUSH: "flush", CMD_TRIM: "trim",
             CMD_WRITE_ZEROES: "write-zeroes", CMD_BLOCK_STATUS: "block-status"}

# Structured reply chunks.
REPLY_FLAG_DONE = 1 << 0
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR_BIT = 1 << 15
CHUNK_ERROR, CHUNK_ERROR_OFFSET = CHUNK_ERROR_BIT + 1, CHUNK_ERROR_BIT + 2

# base:allocation's status flags.
STATE_HOLE, STATE_ZERO = 1 << 0, 1 << 1
META_ALLOCATION = "base:allocation"

# The protocol's error values are Linux's errno numbers for the same names.
NBD_ERRORS = {1: "NBD_EPERM", 5: "NBD_EIO", 12: "NBD_ENOMEM", 22: "NBD_EINVAL", 28: "NBD_ENOSPC",
              75: "NBD_EOVERFLOW", 95: "NBD_ENOTSUP", 108: "NBD_ESHUTDOWN"}

# What one request moves at most when the server names no maximum (the protocol's advice: 32 MiB).
DEFAULT_MAX_PAYLOAD = 32 << 20
# A length is 32 bits; requests without a payload (zeroes, trim, block status) are cut here.
MAX_EFFECT = 1 << 30

_OPT = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_STRUCTURED_REST = struct.Struct(">HHQI")  # flags, type, cookie, length (after the magic)


class NbdConnectError(Exception):
    """The connection or the handshake failed; the message names the server and why."""


class NbdError(OSError):
    """A request failed: the server's error code (errno set, named in strerror) or a broken
    connection (EIO). An OSError, as a file's would be: a device answers the guest IOERR."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


@dataclass(frozen=True)
class NbdAddress:
    """Where an export is: TCP (host, port) or a Unix socket, and the export's name."""

    export: str
    host: str | None = None
    port: int = NBD_DEFAULT_PORT
    socket: str | None = None

    @property
    def server(self) -> str:
        """The server as error messages name it (QEMU's way: 'host:port' or the socket path)."""
        if self.socket is not None:
            return self.socket
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def is_nbd_uri(text: str) -> bool:
    """Does a drive's file= name an NBD export (rather than a file)?"""
    return text.startswith(("nbd:", "nbd+", "nbds:", "nbds+"))


def parse_nbd_uri(uri: str) -> NbdAddress:
    """QEMU's NBD URIs: `nbd://HOST[:PORT]/EXPORT` (also `nbd+tcp://`) and
    `nbd+unix:///EXPORT?socket=PATH`. The export is the path without its first '/',
    percent-decoded ('' is the server's default export). ValueError naming what is wrong."""
    scheme = uri.split(":", 1)[0]
    if scheme in ("nbds", "nbds+tcp", "nbds+unix"):
        raise ValueError(f"'{uri}': NBD over TLS ({scheme}://) is not supported")
    if scheme not in ("nbd", "nbd+tcp", "nbd+unix") or not uri.startswith(f"{scheme}://"):
        raise ValueError(f"'{uri}' is not an NBD URI (nbd://HOST[:PORT]/EXPORT or "
                         "nbd+unix:///EXPORT?socket=PATH)")
    parts = urlsplit(uri)
    if parts.fragment:
        raise ValueError(f"'{uri}': an NBD URI has no #fragment")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query, keep_blank_values=True) if parts.query else {}
    if scheme == "nbd+unix":
        if parts.netloc:
            raise ValueError(f"'{uri}': nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)")
        unknown = sorted(set(query) - {"socket"})
        if unknown:
            raise ValueError(f"'{uri}': unknown parameter '{unknown[0]}' (nbd+unix:// takes socket=PATH)")
        paths = query.get("socket", [])
        if len(paths) != 1 or not paths[0]:
            raise ValueError(f"'{uri}': nbd+unix:// needs one socket=PATH")
        return NbdAddress(export, socket=paths[0])
    if query:
        raise ValueError(f"'{uri}': {scheme}:// takes no parameters (got '{parts.query}')")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"'{uri}': the port must be a number 1..65535") from None
    if not host:
        raise ValueError(f"'{uri}': needs a host ({scheme}://HOST[:PORT]/EXPORT)")
    if port == 0:
        raise ValueError(f"'{uri}': the port must be a number 1..65535")
    return NbdAddress(export, host=host, port=port or NBD_DEFAULT_PORT)


@dataclass(frozen=True)
class ExportInfo:
    size: int
    flags: int  # transmission flags
    min_block: int = 1
    max_payload: int = DEFAULT_MAX_PAYLOAD


class NbdClient:
    """One connection to one export, in its transmission phase (see the module doc)."""

    def __init__(self, address: NbdAddress, *, connect_timeout: float = CONNECT_TIMEOUT_S,
                 io_timeout: float = IO_TIMEOUT_S) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._cookie = 0
        self._broken: str | None = None
        self.structured = False
        self.allocation_context: int | None = None  # base:allocation's id, if the server has it
        self._sock = _connect(address, connect_timeout)
        try:
            self.info = self._handshake()
            self._sock.settimeout(io_timeout)
        except NbdConnectError:
            self._sock.close()
            raise
        except TimeoutError:
            self._sock.close()
            raise NbdConnectError(f"NBD server '{address.server}' did not finish the handshake "
                                  f"within {connect_timeout:.0f} s") from None
        except OSError as e:
            self._sock.close()
            raise NbdConnectError(f"NBD handshake with '{address.server}' failed: "
                                  f"{e.strerror or e}") from None

    @property
    def read_only(self) -> bool:
        return bool(self.info.flags & TF_READ_ONLY)

    @property
    def can(self) -> dict[str, bool]:
        f = self.info.flags
        return {"flush": bool(f & TF_SEND_FLUSH), "trim": bool(f & TF_SEND_TRIM),
                "write_zeroes": bool(f & TF_SEND_WRITE_ZEROES), "multi_conn": bool(f & TF_CAN_MULTI_CONN)}

    # --- handshake ---

    def _handshake(self) -> ExportInfo:
        magic, second = struct.unpack(">QQ", self._recv(16))
        if magic != NBDMAGIC:
            raise NbdConnectError(f"'{self.address.server}' is not an NBD server (no NBDMAGIC)")
        if second == OLDSTYLE_MAGIC:
            raise NbdConnectError(f"NBD server '{self.address.server}' speaks the oldstyle "
                                  "handshake, which has no export names: not supported")
        if second != IHAVEOPT:
            raise NbdConnectError(f"NBD server '{self.address.server}': unknown handshake magic "
                                  f"0x{second:x}")
        (hflags,) = struct.unpack(">H", self._recv(2))
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise NbdConnectError(f"NBD server '{self.address.server}' does not offer the fixed "
                                  "newstyle handshake: not supported")
        self._sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
        export = self.address.export.encode()
        if len(export) > 4096:
            raise NbdConnectError(f"NBD export name of {len(export)} bytes: at most 4096")
        self.structured = self._option_ack(OPT_STRUCTURED_REPLY, b"")
        if self.structured:
            self.allocation_context = self._set_meta_context(export, META_ALLOCATION)
        return self._go(export)

    def _send_option(self, option: int, data: bytes) -> None:
        self._sock.sendall(_OPT.pack(IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, kind, length = _OPT_REPLY.unpack(self._recv(_OPT_REPLY.size))
        if magic != REPLY_OPT_MAGIC or opt != option:
            raise NbdConnectError(f"NBD server '{self.address.server}': malformed option reply "
                                  f"(magic 0x{magic:x}, option {opt}, expected {option})")
        if length > 1 << 20:
            raise NbdConnectError(f"NBD server '{self.address.server}': an option reply of "
                                  f"{length} bytes")
        return kind, self._recv(length)

    def _option_ack(self, option: int, data: bytes) -> bool:
        """Send an option that expects a bare ACK: True if acked, False if unsupported."""
        self._send_option(option, data)
        kind, payload = self._option_reply(option)
        if kind == REP_ACK:
            return True
        if kind & REP_ERR:
            return False
        raise NbdConnectError(f"NBD server '{self.address.server}': unexpected reply {kind} to "
                              f"option {option}")

    def _set_meta_context(self, export: bytes, name: str) -> int | None:
        query = name.encode()
        data = (struct.pack(">I", len(export)) + export + struct.pack(">I", 1)
                + struct.pack(">I", len(query)) + query)
        self._send_option(OPT_SET_META_CONTEXT, data)
        found: int | None = None
        while True:
            kind, payload = self._option_reply(OPT_SET_META_CONTEXT)
            if kind == REP_META_CONTEXT and len(payload) >= 4:
                if payload[4:] == query:
                    found = struct.unpack_from(">I", payload)[0]
            elif kind == REP_ACK:
                return found
            elif kind & REP_ERR:
                # Not fatal here: NBD_OPT_GO names an unknown export for what it is.
                return None

    def _go(self, export: bytes) -> ExportInfo:
        data = struct.pack(">I", len(export)) + export + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        self._send_option(OPT_GO, data)
        size = flags = None
        min_block, max_payload = 1, DEFAULT_MAX_PAYLOAD
        while True:
            kind, payload = self._option_reply(OPT_GO)
            if kind == REP_ACK:
                break
            if kind == REP_INFO and len(payload) >= 2:
                (info,) = struct.unpack_from(">H", payload)
                if info == INFO_EXPORT and len(payload) >= 12:
                    size, flags = struct.unpack_from(">QH", payload, 2)
                elif info == INFO_BLOCK_SIZE and len(payload) >= 14:
                    min_block, _, max_payload = struct.unpack_from(">III", payload, 2)
                continue
            if kind & REP_ERR:
                raise NbdConnectError(self._go_error(kind, payload))
            raise NbdConnectError(f"NBD server '{self.address.server}': unexpected reply {kind} "
                                  "to NBD_OPT_GO")
        if size is None or flags is None:
            raise NbdConnectError(f"NBD server '{self.address.server}' sent no export size")
        return ExportInfo(size, flags, max(1, min_block), max(4096, min(max_payload, DEFAULT_MAX_PAYLOAD)))

    def _go_error(self, kind: int, payload: bytes) -> str:
        name = REP_ERRORS.get(kind, f"error {kind - REP_ERR}")
        said = payload.decode("utf-8", "replace").strip()
        export = self.address.export
        what = {
            "NBD_REP_ERR_UNKNOWN": f"has no export '{export}'",
            "NBD_REP_ERR_UNSUP": "does not support NBD_OPT_GO (too old a server)",
            "NBD_REP_ERR_TLS_REQD": "requires TLS, which vmferry does not speak",
            "NBD_REP_ERR_POLICY": f"refuses export '{export}' (policy)",
            "NBD_REP_ERR_SHUTDOWN": "is shutting down",
        }.get(name, f"refused export '{export}'")
        return (f"NBD server '{self.address.server}' {what} ({name}"
                + (f": {said})" if said else ")"))

    # --- transmission ---

    def read_into(self, offset: int, buf: memoryview) -> None:
        step = self.info.max_payload
        for pos in range(0, len(buf), step):
            part = buf[pos : pos + step]
            self._request(CMD_READ, offset + pos, len(part), read_into=part)

    def write(self, offset: int, data: memoryview | bytes, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        step = self.info.max_payload
        for pos in range(0, len(view), step):
            part = view[pos : pos + step]
            self._request(CMD_WRITE, offset + pos, len(part), payload=part, flags=1 if fua else 0)

    def flush(self) -> None:
        if self.info.flags & TF_SEND_FLUSH:
            self._request(CMD_FLUSH, 0, 0)

    def trim(self, offset: int, nbytes: int) -> None:
        """Tell the server the range is unused (it may deallocate it; reads become undefined)."""
        if not self.info.flags & TF_SEND_TRIM:
            raise NbdError(errno.EOPNOTSUPP, f"NBD server '{self.address.server}' does not accept trim")
        for pos, n in _pieces(offset, nbytes):
            self._request(CMD_TRIM, pos, n)

    def write_zeroes(self, offset: int, nbytes: int) -> None:
        """The range reads as zeros afterwards; the server may deallocate it (no NO_HOLE flag).
        Without NBD_CMD_WRITE_ZEROES on the server, the zeros are written."""
        if self.info.flags & TF_SEND_WRITE_ZEROES:
            for pos, n in _pieces(offset, nbytes):
                self._request(CMD_WRITE_ZEROES, pos, n)
            return
        zeros = bytes(min(nbytes, 1 << 20))
        for pos in range(0, nbytes, len(zeros) or 1):
            n = min(len(zeros), nbytes - pos)
            self.write(offset + pos, memoryview(zeros)[:n])

    def block_status(self, offset: int, nbytes: int) -> list[tuple[int, int]]:
        """base:allocation extents from `offset`, as (length, flags), covering at least one byte
        and at most `nbytes` (the last one clipped). Only with structured replies and the context."""
        if self.allocation_context is None:
            raise NbdError(errno.EOPNOTSUPP, f"NBD server '{self.address.server}' has no "
                           f"{META_ALLOCATION} context")
        n = min(nbytes, MAX_EFFECT)
        extents = self._request(CMD_BLOCK_STATUS, offset, n)
        out, total = [], 0
        for length, flags in extents:
            length = min(length, n - total)
            if length <= 0:
                break
            out.append((length, flags))
            total += length
        if not out:
            raise self._break(f"a block-status reply at offset {offset} described nothing")
        return out

    def close(self) -> None:
        """NBD_CMD_DISC (if the connection is sound and idle), then close the socket. Never
        waits long for a request another thread has under way: that one fails."""
        got = self._lock.acquire(timeout=1.0)
        try:
            if got and self._broken is None:
                with contextlib.suppress(OSError):
                    self._sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, self._next_cookie(), 0, 0))
            self._broken = self._broken or "the drive was closed"
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        finally:
            if got:
                self._lock.release()

    def _next_cookie(self) -> int:
        self._cookie = (self._cookie + 1) & 0xFFFFFFFFFFFFFFFF
        return self._cookie

    def _request(self, cmd: int, offset: int, length: int, *, payload: memoryview | None = None,
                 read_into: memoryview | None = None, flags: int = 0) -> list[tuple[int, int]]:
        """One round trip. Returns the base:allocation extents of a BLOCK_STATUS, else []."""
        with self._lock:
            if self._broken is not None:
                raise NbdError(errno.EIO, f"NBD connection to '{self.address.server}' is broken "
                               f"({self._broken})")
            cookie = self._next_cookie()
            try:
                header = _REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)
                if payload is not None:
                    _send_all(self._sock, [header, payload])
                else:
                    self._sock.sendall(header)
                return self._reply(cmd, cookie, offset, length, read_into)
            except NbdError:
                raise
            except TimeoutError:
                raise self._break(f"no reply to a {CMD_NAMES.get(cmd, cmd)} within "
                                  f"{self._sock.gettimeout():.0f} s") from None
            except OSError as e:
                raise self._break(e.strerror or str(e)) from None

    def _break(self, why: str) -> NbdError:
        """The connection is unusable from now on (module doc)."""
        self._broken = self._broken or why
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        return NbdError(errno.EIO, f"NBD connection to '{self.address.server}' broke: {why}")

    def _reply(self, cmd: int, cookie: int, offset: int, length: int,
               read_into: memoryview | None) -> list[tuple[int, int]]:
        what = f"{CMD_NAMES.get(cmd, cmd)} at offset {offset} ({length} bytes)"
        extents: list[tuple[int, int]] = []
        error: tuple[int, str] | None = None
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                err, got = struct.unpack(">IQ", self._recv(12))
                self._check_cookie(got, cookie)
                if err:
                    raise _server_error(err, what, self.address.server, "")
                if cmd == CMD_READ and read_into is not None:
                    if self.structured:
                        raise self._break("a simple reply with data to a read after structured "
                                          "replies were agreed")
                    self._recv_into(read_into)
                return extents
            if magic != STRUCTURED_REPLY_MAGIC:
                raise self._break(f"bad reply magic 0x{magic:08x}")
            rflags, kind, got, clen = _STRUCTURED_REST.unpack(self._recv(_STRUCTURED_REST.size))
            self._check_cookie(got, cookie)
            if kind == CHUNK_OFFSET_DATA and read_into is not None:
                (off,) = struct.unpack(">Q", self._recv(8))
                n = clen - 8
                if off < offset or off + n > offset + length:
                    raise self._break(f"read data at {off} (+{n}) outside the request ({what})")
                self._recv_into(read_into[off - offset : off - offset + n])
            elif kind == CHUNK_OFFSET_HOLE and read_into is not None:
                off, n = struct.unpack(">QI", self._recv(12))
                if off < offset or off + n > offset + length:
                    raise self._break(f"a hole at {off} (+{n}) outside the request ({what})")
                read_into[off - offset : off - offset + n] = bytes(n)
            elif kind == CHUNK_BLOCK_STATUS and cmd == CMD_BLOCK_STATUS:
                body = self._recv(clen)
                if clen < 12 or (clen - 4) % 8:
                    raise self._break(f"a block-status chunk of {clen} bytes")
                (ctx,) = struct.unpack_from(">I", body)
                if ctx == self.allocation_context:
                    extents = [struct.unpack_from(">II", body, p) for p in range(4, clen, 8)]
            elif kind & CHUNK_ERROR_BIT:
                body = self._recv(clen)
                if clen < 6:
                    raise self._break(f"an error chunk of {clen} bytes")
                err, mlen = struct.unpack_from(">IH", body)
                message = body[6 : 6 + mlen].decode("utf-8", "replace")
                if kind == CHUNK_ERROR_OFFSET and clen >= 6 + mlen + 8:
                    (at,) = struct.unpack_from(">Q", body, 6 + mlen)
                    message = f"{message} (at offset {at})" if message else f"at offset {at}"
                error = error or (err, message)
            elif kind == CHUNK_NONE:
                if not rflags & REPLY_FLAG_DONE:
                    raise self._break("an NBD_REPLY_TYPE_NONE chunk without the DONE flag")
            else:
                raise self._break(f"an unexpected reply chunk of type {kind} to a {what}")
            if rflags & REPLY_FLAG_DONE:
                if error is not None:
                    raise _server_error(error[0] or errno.EIO, what, self.address.server, error[1])
                return extents

    def _check_cookie(self, got: int, want: int) -> None:
        if got != want:
            raise self._break(f"a reply for request {got} while waiting for {want}")

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            got = self._sock.recv_into(view[done:])
            if got == 0:
                raise ConnectionResetError(errno.ECONNRESET, "the server closed the connection")
            done += got


def _pieces(offset: int, nbytes: int) -> Iterator[tuple[int, int]]:
    pos = 0
    while pos < nbytes:
        n = min(MAX_EFFECT, nbytes - pos)
        yield offset + pos, n
        pos += n


def _send_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def _server_error(err: int, what: str, server: str, message: str) -> NbdError:
    name = NBD_ERRORS.get(err, f"error {err}")
    text = f"NBD server '{server}': {what} failed: {name} ({os.strerror(err)})"
    return NbdError(err, text + (f": {message}" if message else ""))


def _connect(address: NbdAddress, timeout: float) -> socket.socket:
    try:
        if address.socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(address.socket)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except socket.gaierror as e:
        raise NbdConnectError(f"Failed to connect to '{address.server}': {e.strerror}") from None
    except TimeoutError:
        raise NbdConnectError(f"Failed to connect to '{address.server}': no answer within "
                              f"{timeout:.0f} s") from None
    except OSError as e:
        raise NbdConnectError(f"Failed to connect to '{address.server}': {e.strerror or e}") from None
