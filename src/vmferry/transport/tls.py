"""TLS on a migration connection: `tls_connect` (source), `tls_accept` (destination), `TlsChannel`.

One TLS connection is used by two threads at once: on the source the migration thread sends while
the return path's reader receives; on the destination the migration thread receives while a
cancel or the ACK sends. `ssl.SSLSocket` is not safe for a read and a write from two threads, so a
`TlsChannel` drives an `ssl.SSLObject` over two memory BIOs and does the socket I/O itself:

  _tls        guards the SSLObject and its BIOs; held only to encrypt or decrypt, never across a
              system call, so a sender blocked on a full socket never stalls the receiver.
  _send_lock  orders ciphertext onto the socket: whoever drains the outgoing BIO writes what it
              drained before anyone drains again (the receiver drains too: TLS 1.3 may answer a
              KeyUpdate from inside a read).

The engine is an ssl.SSLObject for x509 credentials, or, for pre-shared keys (which Python 3.11's
ssl cannot do), a `tls_psk.PskSession` with the same interface; everything here serves both.

TLS 1.3 only. Small writes (a list of 4 KiB page views) are gathered into large plaintext batches
before encryption, so the records are full-sized (16 KiB) and each batch is one system call: the
stream's zero-copy `sendmsg` of page lists does not exist through TLS, and copying a page into
the batch costs far less than encrypting it.

After the handshake the destination says whether it accepts the client, inside TLS, before the
migration's own bytes: one byte 0x01 (accepted), or 0x00 followed by the reason and close_notify.
In TLS 1.3 the client finishes its handshake before the server has checked the client's
certificate, so without this verdict a refused source would only see a reset connection; with it,
the source fails with the destination's reason (an alert for a bad certificate, or "not allowed
by tls-authz ..."). Every connection ends with close_notify; end of file without it is reported
as a truncated connection, never as a clean end.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmferry.errors import TransportError
from vmferry.transport.channel import Buffer, Channel, SocketChannel
from vmferry.transport.tls_psk import PskContext, PskSession

HANDSHAKE_TIMEOUT_S = 10.0  # a peer that stops mid-handshake must not hold a listener forever
CLOSE_TIMEOUT_S = 1.0  # close_notify is best effort: a peer that stopped reading is not waited on
RECV_BYTES = 256 * 1024  # ciphertext read per system call
BATCH_BYTES = 256 * 1024  # plaintext gathered per encryption + send (measured: bench/bench_tls.py)
VERDICT_ACCEPTED = 0x01
VERDICT_REFUSED = 0x00
MAX_REASON_BYTES = 1024

# (authorize) the client's distinguished name (its PSK username under tls-creds-psk), or None
# without a client certificate -> None to accept, or the reason for refusing.
Authorizer = Callable[[str | None], str | None]
# x509 credentials are an ssl.SSLContext; PSK credentials a PskContext (Python's ssl has no PSK).
TlsContext = ssl.SSLContext | PskContext


class TlsAlert(TransportError):
    """The peer ended the connection with a fatal TLS alert (`alert`: OpenSSL's words, e.g.
    "sslv3 alert bad record mac" when one of our records reached it altered)."""

    def __init__(self, message: str, alert: str) -> None:
        super().__init__(message)
        self.alert = alert


# -- contexts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one endpoint (QEMU's `dir` layout, resolved by the caller)."""

    ca_cert: str
    cert: str | None  # None: a client without a certificate (the server may refuse it)
    key: str | None
    crl: str | None = None


def make_context(files: TlsFiles, *, server: bool, verify_peer: bool) -> ssl.SSLContext:
    """An SSLContext for one endpoint, TLS 1.3 only. Raises TransportError naming the bad file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if server:
        ctx.num_tickets = 0  # migrations never resume sessions: don't send tickets
    else:
        # Without verify-peer (QEMU's verify-peer=no on a client) the server is not checked at all.
        ctx.check_hostname = verify_peer
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    _load(ctx.load_verify_locations, files.ca_cert, what="CA certificate")
    if files.crl:
        _load(ctx.load_verify_locations, files.crl, what="certificate revocation list")
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if files.cert and files.key:
        try:
            ctx.load_cert_chain(files.cert, files.key)
        except ssl.SSLError as e:
            raise TransportError(f"cannot load certificate {files.cert} with key {files.key}: "
                                 f"{_ssl_reason(e)}") from e
        except OSError as e:
            raise TransportError(f"cannot load certificate {files.cert} with key {files.key}: "
                                 f"{e.strerror or e}") from e
    return ctx


def _load(load: Callable[[str], None], path: str, *, what: str) -> None:
    try:
        load(path)
    except ssl.SSLError as e:
        raise TransportError(f"cannot load {what} {path}: {_ssl_reason(e)}") from e
    except OSError as e:
        raise TransportError(f"cannot load {what} {path}: {e.strerror or e}") from e


# -- the channel ------------------------------------------------------------------------------


class TlsChannel(SocketChannel):
    """A SocketChannel whose bytes are TLS records. Counters count plaintext bytes."""

    def __init__(self, sock: socket.socket, label: str, sslobj: ssl.SSLObject | PskSession,
                 incoming: ssl.MemoryBIO | Any, outgoing: ssl.MemoryBIO | Any) -> None:
        super().__init__(sock, label)
        self._ssl = sslobj
        self._in = incoming
        self._out = outgoing
        self._tls = threading.Lock()
        self._send_lock = threading.Lock()
        self._batch = bytearray(BATCH_BYTES)
        self._recv_buf = bytearray(RECV_BYTES)
        self._peer_closed = False  # close_notify received
        # The destination's view of its client, once accepted: its certificate's distinguished
        # name, or its PSK username.
        self.peer_dn: str | None = None

    @property
    def tls_version(self) -> str | None:
        return self._ssl.version()

    @property
    def cipher(self) -> str | None:
        c = self._ssl.cipher()
        return c[0] if c else None

    # -- sending --------------------------------------------------------------------------------

    def _write_vector(self, views: Sequence[Buffer]) -> int:
        """All of it, or a TransportError: the partial-write resumption of Channel.sendmsg never
        runs here (sendall underneath)."""
        if self._shut_down:
            raise TransportError(f"send on {self.label} failed: the channel was shut down")
        total = 0
        batch = memoryview(self._batch)
        with self._send_lock:
            fill = 0
            for v in views:
                n = len(v)
                total += n
                if fill + n <= BATCH_BYTES:
                    batch[fill : fill + n] = v
                    fill += n
                    continue
                if fill:
                    self._encrypt_and_send(batch[:fill])
                    fill = 0
                if n >= BATCH_BYTES:
                    self._encrypt_and_send(v)  # already large: encrypt in place, no copy
                else:
                    batch[:n] = v
                    fill = n
            if fill:
                self._encrypt_and_send(batch[:fill])
        self.bytes_sent += total
        return total

    def _encrypt_and_send(self, plain: Buffer) -> None:
        # Caller holds _send_lock.
        with self._tls:
            try:
                self._ssl.write(plain)
            except ssl.SSLError as e:
                raise TransportError(f"send on {self.label} failed: TLS: {_ssl_reason(e)}") from e
            data = self._out.read()
        self._sock_sendall(data)

    def _sock_sendall(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise self._error("send on", e) from e

    def _flush_best_effort(self) -> None:
        """_flush for a failing connection: bounded, errors ignored (the peer may be gone)."""
        if not self._send_lock.acquire(timeout=CLOSE_TIMEOUT_S):
            return
        try:
            with self._tls:
                data = self._out.read()
            if data:
                with contextlib.suppress(OSError):
                    self._sock.settimeout(CLOSE_TIMEOUT_S)
                    self._sock.sendall(data)
        finally:
            self._send_lock.release()

    def _flush(self) -> None:
        """Send whatever the TLS engine queued (alerts, KeyUpdate answers, close_notify)."""
        with self._send_lock:
            with self._tls:
                data = self._out.read()
            if data:
                self._sock_sendall(data)

    # -- receiving ------------------------------------------------------------------------------

    def _read_into(self, view: memoryview) -> int:
        while True:
            failure: TransportError | None = None
            with self._tls:
                try:
                    got = self._decrypt_into(view)
                except TransportError as e:
                    failure, got = e, 0
                queued = self._out.pending
            if failure is not None:
                # The engine queued a fatal alert (a record that fails its MAC: "bad record
                # mac"): send it, so the peer learns why, then fail.
                if queued:
                    self._flush_best_effort()
                raise failure
            if queued:
                self._flush()
            if got:
                self.bytes_received += got
                return got
            if self._peer_closed:
                return 0
            self._receive_ciphertext("receive on")

    def recv_buffered_into(self, buf: Buffer) -> int:
        """Plaintext of the whole records already received (no system call); 0 when none."""
        view = memoryview(buf).cast("B")
        failure: TransportError | None = None
        with self._tls:
            try:
                got = self._decrypt_into(view)
            except TransportError as e:
                failure, got = e, 0
            queued = self._out.pending
        if failure is not None:  # the engine queued a fatal alert (see _read_into): send it, then fail
            if queued:
                self._flush_best_effort()
            raise failure
        if queued:
            self._flush()
        self.bytes_received += got
        return got

    def _decrypt_into(self, view: memoryview) -> int:
        # Caller holds _tls. As many whole records as fit and are here; 0 when none is.
        got, want = 0, len(view)
        while got < want and not self._peer_closed:
            try:
                n = self._ssl.read(want - got, view[got:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._peer_closed = True
                break
            except ssl.SSLError as e:
                message = f"receive on {self.label} failed: TLS: {_ssl_reason(e)}"
                if "ALERT" in (e.reason or ""):
                    raise TlsAlert(message, _ssl_reason(e)) from e
                raise TransportError(message) from e
            if n == 0:
                self._peer_closed = True
                break
            got += n
        return got

    def _receive_ciphertext(self, op: str) -> None:
        try:
            n = self._sock.recv_into(self._recv_buf)
        except OSError as e:
            raise self._error(op, e) from e
        if n == 0:
            if self._shut_down:
                raise TransportError(f"{op} {self.label} failed: the channel was shut down")
            raise TransportError(f"{op} {self.label} failed: the connection was closed without "
                                 f"TLS close_notify (truncated)")
        with self._tls:
            self._in.write(memoryview(self._recv_buf)[:n])

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        if not self._shut_down:
            self._send_close_notify()
        super().close()

    def _send_close_notify(self) -> None:
        # Best effort, bounded: a sender stuck on a dead peer keeps the lock; then there is nobody
        # to tell anyway.
        if not self._send_lock.acquire(timeout=CLOSE_TIMEOUT_S):
            return
        try:
            with self._tls:
                # The first SSL_shutdown queues close_notify and then wants the peer's: not waited.
                with contextlib.suppress(ssl.SSLError, ValueError):
                    self._ssl.unwrap()
                data = self._out.read()
            if data:
                with contextlib.suppress(OSError):
                    self._sock.settimeout(CLOSE_TIMEOUT_S)
                    self._sock.sendall(data)
        finally:
            self._send_lock.release()


# -- handshakes -------------------------------------------------------------------------------


def tls_connect(channel: Channel, context: TlsContext, hostname: str, *,
                timeout_s: float = HANDSHAKE_TIMEOUT_S) -> TlsChannel:
    """The source's side: handshake, check the destination's certificate against `hostname`, and
    wait for the destination's verdict. The plain channel is consumed (closed on failure)."""
    tls = _wrap(channel, context, server=False, hostname=hostname)
    try:
        _handshake(tls, timeout_s)
        _receive_verdict(tls)
        tls.settimeout(None)
    except BaseException:
        tls.shutdown()
        tls.close()
        raise
    return tls


def tls_accept(channel: Channel, context: TlsContext, authorize: Authorizer | None, *,
               timeout_s: float = HANDSHAKE_TIMEOUT_S) -> TlsChannel:
    """The destination's side: handshake (the client's certificate is required when the context
    verifies peers), check the client's distinguished name with `authorize`, send the verdict.
    The plain channel is consumed (closed on failure)."""
    tls = _wrap(channel, context, server=True, hostname=None)
    try:
        _handshake(tls, timeout_s)
        if isinstance(tls._ssl, PskSession):
            tls.peer_dn = tls._ssl.identity
        else:
            cert = tls._ssl.getpeercert()
            tls.peer_dn = distinguished_name(cert) if cert else None
        refusal = authorize(tls.peer_dn) if authorize is not None else None
        if refusal is not None:
            reason = refusal.encode()[:MAX_REASON_BYTES]
            with contextlib.suppress(TransportError):
                tls.sendall(bytes([VERDICT_REFUSED]) + reason)
            tls.close()  # close_notify ends the reason
            raise TransportError(f"TLS client on {tls.label} refused: {refusal}")
        tls.sendall(bytes([VERDICT_ACCEPTED]))
        tls.settimeout(None)
    except BaseException:
        tls.shutdown()
        tls.close()
        raise
    return tls


def _wrap(channel: Channel, context: TlsContext, *, server: bool, hostname: str | None) -> TlsChannel:
    if not isinstance(channel, SocketChannel) or isinstance(channel, TlsChannel):
        channel.close()
        raise TransportError(f"TLS needs a socket (tcp:, unix: or a socket fd:); {channel.label} is not one")
    sock = channel.socket
    if isinstance(context, PskContext):
        if context.server != server:
            channel.close()
            raise TransportError(f"cannot start TLS on {channel.label}: PSK credentials for the "
                                 f"other endpoint")
        session = context.new_session()
        return TlsChannel(sock, channel.label, session, session.incoming, session.outgoing)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        sslobj = context.wrap_bio(incoming, outgoing, server_side=server, server_hostname=hostname)
    except (ssl.SSLError, ValueError) as e:
        channel.close()
        raise TransportError(f"cannot start TLS on {channel.label}: {e}") from e
    # The TlsChannel takes over the socket; the plain channel object is dropped without closing.
    return TlsChannel(sock, channel.label, sslobj, incoming, outgoing)


def _handshake(tls: TlsChannel, timeout_s: float) -> None:
    tls.settimeout(timeout_s)
    op = "TLS handshake on"
    while True:
        failure: ssl.SSLError | None = None
        with tls._tls:
            try:
                tls._ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as e:  # SSLCertVerificationError too
                failure = e
                done = True
        # Whatever the engine queued goes out, an alert too: the peer learns why.
        try:
            tls._flush()
        except TransportError:
            if not done or failure is None:
                raise
        if done:
            if failure is not None:
                raise TransportError(f"{op} {tls.label} failed: {_handshake_reason(failure)}") from failure
            return
        try:
            tls._receive_ciphertext(op)
        except TransportError as e:
            if "timed out" in str(e):
                raise TransportError(f"{op} {tls.label} failed: no answer within {timeout_s:g} s") from e
            if "close_notify" in str(e):
                raise TransportError(f"{op} {tls.label} failed: the peer closed the connection "
                                     f"during the handshake (is it expecting TLS?)") from e
            raise


def _receive_verdict(tls: TlsChannel) -> None:
    head = bytearray(1)
    try:
        n = tls.recv_into(head)
    except TransportError as e:
        raise TransportError(_refused_message(tls, str(e))) from e
    if n == 1 and head[0] == VERDICT_ACCEPTED:
        return
    if n == 0:
        raise TransportError(f"the destination on {tls.label} closed the TLS connection without "
                             f"accepting it")
    if head[0] != VERDICT_REFUSED:
        raise TransportError(f"the destination on {tls.label} sent no TLS verdict (byte {head[0]:#04x})")
    reason = bytearray()
    buf = bytearray(MAX_REASON_BYTES)
    with contextlib.suppress(TransportError):
        while len(reason) < MAX_REASON_BYTES and (k := tls.recv_into(buf)):
            reason += buf[:k]
    text = reason.decode(errors="replace") or "no reason given"
    raise TransportError(f"the destination on {tls.label} refused the TLS connection: {text}")


def _refused_message(tls: TlsChannel, error: str) -> str:
    # The destination's alert (its verdict on our certificate) arrives on the first read.
    prefix = f"receive on {tls.label} failed: TLS: "
    if error.startswith(prefix):
        return f"the destination on {tls.label} refused the TLS connection: {error[len(prefix):]}"
    return error


# -- names and messages -----------------------------------------------------------------------

# OpenSSL's long attribute names (as ssl.getpeercert() gives them) -> RFC 4514 / GnuTLS short names.
_SHORT_NAMES = {
    "commonName": "CN", "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
    "organizationName": "O", "organizationalUnitName": "OU", "streetAddress": "STREET",
    "domainComponent": "DC", "userId": "UID", "emailAddress": "EMAIL", "serialNumber": "serialNumber",
    "title": "title", "surname": "SN", "givenName": "GN", "initials": "initials",
    "pseudonym": "pseudonym", "generationQualifier": "generationQualifier",
}


def distinguished_name(cert: dict) -> str:
    """The certificate's subject as an RFC 4514 string, most specific first — the form QEMU's
    authz-simple `identity` takes (GnuTLS's), e.g. "CN=laptop.example.com,O=Example Org,C=GB"."""
    rdns = cert.get("subject", ())
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    out = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _ssl_reason(e: ssl.SSLError) -> str:
    """OpenSSL's words without the bracketed code and source location:
    "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)" -> "tlsv1 alert unknown ca"."""
    text = str(e.args[1]) if len(e.args) > 1 else str(e)
    text = re.sub(r"^\[[^]]*\]\s*", "", text)
    text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)
    return text or (e.reason or "TLS error").lower().replace("_", " ")


def _handshake_reason(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    reason = _ssl_reason(e)
    if e.reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        reason += " (the peer does not speak TLS: is it configured with tls-creds?)"
    return reason
