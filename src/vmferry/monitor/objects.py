"""User-created objects (QEMU's `object-add` namespace) and the TLS checks of a migration, which
name such objects.

Three object types exist, with QEMU's names and properties:

  tls-creds-x509  `dir` holds ca-cert.pem and, by `endpoint`, server-cert.pem + server-key.pem or
                  client-cert.pem + client-key.pem (optional for a client; ca-crl.pem if present
                  is checked). `verify-peer` (default on) makes a server require and check the
                  client's certificate — mutual authentication — and a client check the server's.
                  `sanity-check` (default on) refuses, at creation, a certificate or CA that has
                  expired or is not yet valid. The files are read and checked when the object is
                  created, so a bad file is an error of `object-add`, not of a later migration.
  tls-creds-psk   `dir` holds keys.psk, lines `username:hexkey`; `endpoint`; `username` (a client's
                  identity, default "qemu"; refused on a server, as QEMU does). A server accepts
                  any username of its file with that username's key. The file is read when the
                  object is created. Under PSK, `tls-authz` checks the client's username.
  authz-simple    `identity`: the one client distinguished name `tls-authz` allows, in the RFC 4514
                  form QEMU uses ("CN=laptop.example.com,O=Example Org,C=GB"), or, under PSK,
                  the one username.

Every other type and every property not listed is refused by name.

`migration_tls` runs QEMU's checks in QEMU's order (the object exists, is TLS credentials, has the
right endpoint; a client has a hostname to check; a destination's `tls-authz` names an object) and
returns what the transport needs. As in QEMU, `tls-hostname` and `tls-authz` are read only when
`tls-creds` is set.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from vmferry.errors import QmpError, TransportError
from vmferry.migration.params import MigrationParameters
from vmferry.options import split_options
from vmferry.transport.tls import Authorizer, TlsContext, TlsFiles, make_context
from vmferry.transport.tls_psk import PskContext, PskError

Endpoint = Literal["client", "server"]

OBJECT_TYPES = ("authz-simple", "tls-creds-psk", "tls-creds-x509")
# Properties per type: name -> "str" | "bool". id and qom-type are common to all.
PROPERTIES: dict[str, dict[str, str]] = {
    "tls-creds-x509": {"dir": "str", "endpoint": "str", "verify-peer": "bool", "sanity-check": "bool"},
    "tls-creds-psk": {"dir": "str", "endpoint": "str", "username": "str"},
    "authz-simple": {"identity": "str"},
}


@dataclass(frozen=True)
class TlsCredentials:
    """A `tls-creds-x509` or `tls-creds-psk` object: its endpoint and the context made from its
    files (an SSLContext, or a PskContext)."""

    id: str
    endpoint: Endpoint
    context: TlsContext | None = None
    dir: str = ""
    verify_peer: bool = True


@dataclass(frozen=True)
class AuthzSimple:
    """An `authz-simple` object: allows exactly one distinguished name."""

    id: str
    identity: str

    def authorizer(self) -> Authorizer:
        def authorize(dn: str | None) -> str | None:
            if dn is None:
                return f"the client sent no certificate, and tls-authz '{self.id}' needs its name"
            if dn != self.identity:
                return f"client '{dn}' is not allowed by tls-authz '{self.id}'"
            return None
        return authorize


@dataclass(frozen=True)
class TlsSetup:
    """What one end of an encrypted migration uses: its credentials, the hostname a client checks,
    the authorization a server applies."""

    creds: TlsCredentials
    hostname: str = ""
    authorize: Authorizer | None = None

    @property
    def context(self) -> TlsContext:
        assert self.creds.context is not None
        return self.creds.context


class ObjectRegistry:
    """Objects by id. Thread-safe: the monitor adds, the migration threads look up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, object] = {}

    def add(self, obj_id: str, obj: object) -> None:
        with self._lock:
            if obj_id in self._objects:
                raise QmpError(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
            self._objects[obj_id] = obj

    def remove(self, obj_id: str) -> None:
        with self._lock:
            if self._objects.pop(obj_id, None) is None:
                raise QmpError(f"object '{obj_id}' not found")

    def get(self, obj_id: str) -> object | None:
        with self._lock:
            return self._objects.get(obj_id)


# -- creating objects -------------------------------------------------------------------------


def create_object(qom_type: str, obj_id: str, props: Mapping[str, object]) -> object:
    """Build an object from typed properties (QMP's: bool for bool). Raises QmpError naming the
    type, property or file that is wrong."""
    if qom_type not in PROPERTIES:
        raise QmpError(f"Object type '{qom_type}' is not supported by vmferry "
                       f"(supported: {', '.join(OBJECT_TYPES)})")
    if not obj_id:
        raise QmpError("Parameter 'id' is missing")
    allowed = PROPERTIES[qom_type]
    for name, value in props.items():
        kind = allowed.get(name)
        if kind is None:
            raise QmpError(f"Property '{qom_type}.{name}' not found")
        if kind == "bool" and not isinstance(value, bool):
            raise QmpError(f"Invalid parameter type for '{name}', expected: boolean")
        if kind == "str" and not isinstance(value, str):
            raise QmpError(f"Invalid parameter type for '{name}', expected: string")
    if qom_type == "authz-simple":
        identity = props.get("identity")
        if not isinstance(identity, str) or not identity:
            raise QmpError("Parameter 'identity' is missing")
        return AuthzSimple(obj_id, identity)
    if qom_type == "tls-creds-psk":
        return _psk(obj_id, props)
    return _x509(obj_id, props)


def parse_object_option(text: str) -> tuple[str, str, dict[str, object]]:
    """`--object TYPE,id=ID,key=value,...` (QEMU's spelling; ",," is a literal comma) ->
    (type, id, typed properties). Booleans are on/off/yes/no/true/false, as in QEMU."""
    fields = split_options(text)
    if not fields or not fields[0] or "=" in fields[0] and not fields[0].startswith("qom-type="):
        raise QmpError(f"--object {text!r}: the object type comes first, e.g. "
                       f"tls-creds-x509,id=tls0,dir=/etc/pki/vmferry,endpoint=server")
    qom_type = fields[0].removeprefix("qom-type=")
    obj_id = ""
    props: dict[str, object] = {}
    kinds = PROPERTIES.get(qom_type, {})
    for item in fields[1:]:
        key, eq, value = item.partition("=")
        if not eq:
            raise QmpError(f"--object {qom_type}: '{item}' is not key=value")
        if key == "id":
            obj_id = value
        elif kinds.get(key) == "bool":
            props[key] = _parse_bool(key, value)
        else:
            props[key] = value
    return qom_type, obj_id, props


def _parse_bool(key: str, value: str) -> bool:
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise QmpError(f"Parameter '{key}' expects 'on' or 'off'")


def _x509(obj_id: str, props: Mapping[str, object]) -> TlsCredentials:
    endpoint = props.get("endpoint", "client")  # QEMU's default endpoint
    if endpoint not in ("client", "server"):
        raise QmpError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    directory = props.get("dir")
    if not isinstance(directory, str) or not directory:
        raise QmpError(f"tls-creds-x509 '{obj_id}': Missing 'dir' property value")
    verify_peer = bool(props.get("verify-peer", True))
    server = endpoint == "server"
    role = "server" if server else "client"

    def path(name: str, required: bool) -> str | None:
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
        if required:
            raise QmpError(f"Unable to access credentials {p}: No such file or directory")
        return None

    ca = path("ca-cert.pem", True)
    # A server must prove who it is; a client may go without a certificate (the server decides).
    cert = path(f"{role}-cert.pem", server)
    key = path(f"{role}-key.pem", server or cert is not None)
    if key is not None and cert is None:
        path(f"{role}-cert.pem", True)  # a key without its certificate: name the missing file
    assert ca is not None
    files = TlsFiles(ca, cert, key, path("ca-crl.pem", False))
    if props.get("sanity-check", True):
        for what, p in (("CA certificate", ca), ("certificate", cert)):
            if p is not None:
                _check_validity(what, p)
    try:
        ctx = make_context(files, server=server, verify_peer=verify_peer)
    except TransportError as e:
        raise QmpError(f"tls-creds-x509 '{obj_id}': {e}") from e
    return TlsCredentials(obj_id, endpoint, ctx, directory, verify_peer)  # type: ignore[arg-type]


def _psk(obj_id: str, props: Mapping[str, object]) -> TlsCredentials:
    endpoint = props.get("endpoint", "client")  # QEMU's default endpoint
    if endpoint not in ("client", "server"):
        raise QmpError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    directory = props.get("dir")
    if not isinstance(directory, str) or not directory:
        raise QmpError(f"tls-creds-psk '{obj_id}': Missing 'dir' property value")
    username = props.get("username")
    if endpoint == "server" and username is not None:
        raise QmpError(f"tls-creds-psk '{obj_id}': username should not be set when endpoint=server")
    try:
        ctx = PskContext(directory, server=endpoint == "server",
                         username=username if isinstance(username, str) else None)
    except PskError as e:
        raise QmpError(f"tls-creds-psk '{obj_id}': {e}") from e
    return TlsCredentials(obj_id, endpoint, ctx, directory, True)  # type: ignore[arg-type]


def _check_validity(what: str, path: str) -> None:
    """QEMU's sanity check: a certificate outside its validity period is refused at creation."""
    try:
        # The ssl module's own PEM decoder (no third-party parser); gives notBefore / notAfter.
        info = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except (ssl.SSLError, OSError) as e:
        raise QmpError(f"Unable to read {what} {path}: {e}") from e
    now = time.time()
    if ssl.cert_time_to_seconds(info["notAfter"]) < now:
        raise QmpError(f"The {what} {path} has expired ({info['notAfter']})")
    if ssl.cert_time_to_seconds(info["notBefore"]) > now:
        raise QmpError(f"The {what} {path} is not yet valid ({info['notBefore']})")


# -- the migration's TLS ----------------------------------------------------------------------


def migration_tls(params: MigrationParameters, objects: ObjectRegistry, *, endpoint: Endpoint,
                  uri_host: str = "") -> TlsSetup | None:
    """Check the TLS parameters for one migration end: `client` at `migrate` (before anything is
    connected), `server` when the destination's stream arrives. Returns None when the migration is
    plain text as asked (tls-creds empty); otherwise the TlsSetup, or raises QmpError naming what
    is wrong. `uri_host` is the host of a tcp: URI, the hostname a client checks when tls-hostname
    is empty."""
    p = params.snapshot()
    if not p.tls_creds:
        return None
    creds = objects.get(p.tls_creds)
    if creds is None:
        raise QmpError(f"No TLS credentials with id '{p.tls_creds}'")
    if not isinstance(creds, TlsCredentials):
        raise QmpError(f"Object with id '{p.tls_creds}' is not TLS credentials")
    if creds.endpoint != endpoint:
        raise QmpError(f"Expected TLS credentials for a {endpoint} endpoint")
    if endpoint == "client":
        hostname = p.tls_hostname or uri_host
        # Only a certificate is checked against a name: PSK needs none (unix: works without).
        if not hostname and not isinstance(creds.context, PskContext):
            raise QmpError("No hostname available for TLS")
        return TlsSetup(creds, hostname=hostname)
    authorize = None
    if p.tls_authz:
        authz = objects.get(p.tls_authz)
        if authz is None:
            raise QmpError(f"Cannot find QAuthZ object ID {p.tls_authz}")
        if not isinstance(authz, AuthzSimple):
            raise QmpError(f"Object with id '{p.tls_authz}' is not an authorization object")
        authorize = authz.authorizer()
    return TlsSetup(creds, authorize=authorize)
