"""TLS-PSK for a migration connection (QEMU's `tls-creds-psk`): the keys file, and a TLS 1.3
engine keyed by a pre-shared key that `transport/tls.py`'s TlsChannel drives like an SSLObject.

Python 3.11's ssl module has no PSK callbacks (they arrive in 3.13), so this engine is pyOpenSSL's
`Connection` over its memory BIOs, with the two PSK callbacks installed through the OpenSSL
bindings that pyOpenSSL itself is built on (`cryptography`'s; pyOpenSSL has no PSK methods). The
callbacks are OpenSSL's "legacy" PSK callbacks, which TLS 1.3 accepts with a SHA-256 ciphersuite:
the key is the external PSK, the username its identity, and a (EC)DHE exchange gives forward
secrecy (psk_dhe_ke).

QEMU's layout: `dir/keys.psk` holds lines `username:hexkey`. A client (the source) uses the key of
its `username` (default "qemu"); a server (the destination) accepts any username in its file
with that username's key. A key that does not match fails the handshake (the server cannot verify
the client's binder: "decrypt error"); an unknown username fails it too (the server has no
certificate to fall back on). Both ends name which it was.
"""

from __future__ import annotations

import os
import ssl
import threading
import weakref
from typing import Any

DEFAULT_USERNAME = "qemu"  # QEMU's default for a tls-creds-psk client without `username`
KEYS_FILE = "keys.psk"
# The legacy PSK callbacks give TLS 1.3 a key with no hash of its own: OpenSSL uses it only with
# a SHA-256 ciphersuite. AES-GCM first (AES-NI); ChaCha20 for a peer without it.
PSK_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
MAX_KEY_BYTES = 256  # OpenSSL's PSK_MAX_PSK_LEN
_BIO_CHUNK = 1 << 20


class PskError(Exception):
    """A keys file or username that cannot be used; the message names the file and line."""


def read_keys(path: str) -> dict[str, bytes]:
    """`username:hexkey` lines -> {username: key}. Blank lines are skipped; the first line of a
    username wins (as QEMU's lookup). Raises PskError naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.removesuffix("\r") for line in f.read().split("\n")]
    except OSError as e:
        raise PskError(f"Unable to access credentials {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise PskError(f"{path} is not text (username:hexkey lines)") from e
    keys: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        user, colon, hexkey = line.partition(":")
        if not colon or not user:
            raise PskError(f"{path} line {number}: expected username:hexkey")
        try:
            key = bytes.fromhex(hexkey.strip())
        except ValueError as e:
            raise PskError(f"{path} line {number}: the key of '{user}' is not hexadecimal") from e
        if not key or len(key) > MAX_KEY_BYTES:
            raise PskError(f"{path} line {number}: the key of '{user}' must be 1 to "
                           f"{MAX_KEY_BYTES} bytes")
        keys.setdefault(user, key)
    if not keys:
        raise PskError(f"{path} holds no username:hexkey line")
    return keys


class PskContext:
    """One endpoint's PSK credentials, made once per `tls-creds-psk` object; `new_session` makes
    the engine of one connection."""

    def __init__(self, directory: str, *, server: bool, username: str | None = None) -> None:
        self.server = server
        self.path = os.path.join(directory, KEYS_FILE)
        keys = read_keys(self.path)
        if server:
            self.username = None
            self.keys = keys
        else:
            self.username = username or DEFAULT_USERNAME
            key = keys.get(self.username)
            if key is None:
                raise PskError(f"Username {self.username} not found in PSK file {self.path}")
            self.keys = {self.username: key}
        self._ctx = _openssl_context(self)
        # SSL* address -> its session: the callbacks see only the SSL*.
        self._sessions: weakref.WeakValueDictionary[int, PskSession] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def new_session(self) -> PskSession:
        return PskSession(self)

    def _session_of(self, ssl_ptr: Any) -> PskSession | None:
        with self._lock:
            return self._sessions.get(int(_ffi().cast("uintptr_t", ssl_ptr)))


class PskSession:
    """One connection's TLS engine, with the part of ssl.SSLObject's interface TlsChannel uses
    (write, read, do_handshake, unwrap, version, cipher) and its two memory BIOs (`incoming`,
    `outgoing`, like ssl.MemoryBIO's write / read / pending). OpenSSL's errors become ssl.SSLError
    with OpenSSL's words, and the PSK failures are named."""

    def __init__(self, context: PskContext) -> None:
        from OpenSSL import SSL

        self._SSL = SSL
        self._ffi, self._lib = _ffi(), _lib()
        self._context = context
        self._conn = SSL.Connection(context._ctx, None)
        if context.server:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
        self.identity: str | None = context.username  # the server learns it in the handshake
        self.unknown_identity: str | None = None
        self.incoming = _Incoming(self._conn)
        self.outgoing = _Outgoing(self._conn)
        address = int(_ffi().cast("uintptr_t", self._conn._ssl))
        with context._lock:
            context._sessions[address] = self

    # -- the SSLObject interface ------------------------------------------------------------

    def do_handshake(self) -> None:
        try:
            self._conn.do_handshake()
        except self._SSL.Error as e:
            raise self._translate(e, handshake=True) from None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += self._conn.send(view[done:])
            except self._SSL.Error as e:
                raise self._translate(e, handshake=False) from None
        return done

    def read(self, n: int, buffer: Any) -> int:
        # Straight into the caller's buffer: pyOpenSSL's recv_into decrypts into a buffer it
        # allocates per call and copies from there (the destination's bulk path: each byte).
        with self._ffi.from_buffer(buffer, require_writable=True) as out:
            result = self._lib.SSL_read(self._conn._ssl, out, min(n, len(out)))
        if result > 0:
            return result
        try:
            self._conn._raise_ssl_error(self._conn._ssl, result)
        except self._SSL.Error as e:
            raise self._translate(e, handshake=False) from None
        raise ssl.SSLZeroReturnError()  # result <= 0 and no error: the peer's close_notify

    def unwrap(self) -> None:
        try:
            self._conn.shutdown()
        except self._SSL.Error as e:
            raise self._translate(e, handshake=False) from None

    def version(self) -> str | None:
        return self._conn.get_protocol_version_name()

    def cipher(self) -> tuple[str, str, int] | None:
        name = self._conn.get_cipher_name()
        if name is None:
            return None
        return (name, self._conn.get_cipher_version() or "", self._conn.get_cipher_bits() or 0)

    def getpeercert(self) -> None:
        return None  # PSK: no certificates; the client is known by its username (`identity`)

    # -- errors -----------------------------------------------------------------------------

    def _translate(self, e: Exception, *, handshake: bool) -> ssl.SSLError:
        SSL = self._SSL
        if isinstance(e, SSL.WantReadError):
            return ssl.SSLWantReadError()
        if isinstance(e, SSL.ZeroReturnError):
            return ssl.SSLZeroReturnError()
        if isinstance(e, SSL.SysCallError):
            err = ssl.SSLError(1, "unexpected eof while reading")
            err.reason = "UNEXPECTED_EOF_WHILE_READING"  # type: ignore[misc]
            return err
        reasons = [r for (_lib, _func, r) in (e.args[0] if e.args and isinstance(e.args[0], list) else [])]
        # The first entry is the cause ("decryption failed or bad record mac"); later ones are
        # the layers above it ("record layer failure").
        reason = reasons[0] if reasons else "TLS error"
        text = reason
        ctx = self._context
        if handshake and ctx.server:
            if self.unknown_identity is not None:
                text = f"PSK username '{self.unknown_identity}' is not in {ctx.path} ({reason})"
            elif reason == "binder does not verify":
                text = (f"the client's key for PSK username '{self.identity}' does not match "
                        f"{ctx.path} ({reason})")
        elif handshake:
            if reason.endswith("alert decrypt error"):
                text = (f"{reason} (the destination's key for PSK username '{ctx.username}' "
                        f"is not the one in {ctx.path})")
            elif reason.endswith("alert handshake failure"):
                text = (f"{reason} (does the destination's keys.psk hold PSK username "
                        f"'{ctx.username}'? Or does it use other credentials?)")
        err = ssl.SSLError(1, text)
        err.reason = reason.upper().replace(" ", "_")  # type: ignore[misc]
        return err


class _Incoming:
    """Ciphertext into the engine (ssl.MemoryBIO.write's role)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def write(self, data: Any) -> int:
        return self._conn.bio_write(data)


class _Outgoing:
    """Ciphertext out of the engine (ssl.MemoryBIO.read / pending)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._held = b""  # drained to answer `pending`, handed out by the next read

    def _drain(self) -> bytes:
        from OpenSSL import SSL

        parts = [self._held] if self._held else []
        self._held = b""
        while True:
            try:
                parts.append(self._conn.bio_read(_BIO_CHUNK))
            except SSL.WantReadError:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @property
    def pending(self) -> int:
        self._held = self._drain()
        return len(self._held)

    def read(self) -> bytes:
        return self._drain()


# -- OpenSSL ------------------------------------------------------------------------------------


def _ffi() -> Any:
    from cryptography.hazmat.bindings.openssl.binding import Binding

    return Binding.ffi


def _lib() -> Any:
    from cryptography.hazmat.bindings.openssl.binding import Binding

    return Binding.lib


def _openssl_context(owner: PskContext) -> Any:
    try:
        from cryptography.hazmat.bindings.openssl.binding import Binding
        from OpenSSL import SSL
    except ImportError as e:
        raise PskError(f"tls-creds-psk needs pyOpenSSL (not installed: {e.name})") from e
    ffi, lib = Binding.ffi, Binding.lib
    if not getattr(lib, "Cryptography_HAS_PSK_TLSv1_3", False):
        raise PskError("this OpenSSL build has no TLS 1.3 PSK")
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_tls13_ciphersuites(PSK_CIPHERSUITES)
    ctx.set_options(SSL.OP_NO_TICKET)  # migrations never resume sessions
    # pyOpenSSL turns on partial writes (one 16 KiB record per SSL_write); into a memory BIO a
    # whole batch can always be written, so one call encrypts all of it (measured: the Python
    # call per record cost about a third of the encryption).
    lib.SSL_CTX_clear_mode(ctx._context, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    ref = weakref.ref(owner)

    if owner.server:
        @ffi.callback("unsigned int(SSL *, const char *, unsigned char *, unsigned int)")
        def server_cb(ssl_ptr: Any, identity: Any, psk: Any, max_len: int) -> int:
            owner_ = ref()
            if owner_ is None or identity == ffi.NULL:
                return 0
            name = ffi.string(identity).decode(errors="replace")
            session = owner_._session_of(ssl_ptr)
            key = owner_.keys.get(name)
            if session is not None:
                session.identity = name
                if key is None:
                    session.unknown_identity = name
            if key is None or len(key) > max_len:
                return 0
            ffi.memmove(psk, key, len(key))
            return len(key)

        lib.SSL_CTX_set_psk_server_callback(ctx._context, server_cb)
        callback: Any = server_cb
    else:
        username = (owner.username or DEFAULT_USERNAME).encode()
        key = owner.keys[owner.username or DEFAULT_USERNAME]

        @ffi.callback("unsigned int(SSL *, const char *, char *, unsigned int, unsigned char *, "
                      "unsigned int)")
        def client_cb(ssl_ptr: Any, hint: Any, identity: Any, max_identity: int, psk: Any,
                      max_len: int) -> int:
            if len(username) + 1 > max_identity or len(key) > max_len:
                return 0
            ffi.memmove(identity, username + b"\0", len(username) + 1)
            ffi.memmove(psk, key, len(key))
            return len(key)

        lib.SSL_CTX_set_psk_client_callback(ctx._context, client_cb)
        callback = client_cb
    ctx._vmferry_psk_callback = callback  # keep the C callback alive as long as the context
    return ctx
