"""User-created objects (QEMU's `object-add` namespace), looked up by id, and the TLS checks of a
migration, which name such objects.

vmferry has no `object-add` yet, so the registry is always empty and every non-empty `tls-creds`
refuses the migration as QEMU refuses a missing object: `No TLS credentials with id '...'`. The
checks still follow QEMU's order (the object exists, is TLS credentials, has the right endpoint;
a client has a hostname to check; a destination's `tls-authz` names an object), so adding
`object-add` fills the registry and nothing else here changes. Even then `migration_tls` refuses
until the transport can wrap a channel in TLS: encryption asked for never becomes plain text.

As in QEMU, `tls-hostname` and `tls-authz` are read only when `tls-creds` is set.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from vmferry.errors import QmpError
from vmferry.migration.params import MigrationParameters

Endpoint = Literal["client", "server"]
TLS_UNSUPPORTED = "TLS migration is not supported by vmferry yet"


@dataclass(frozen=True)
class TlsCredentials:
    """What `tls-creds-x509` / `tls-creds-psk` objects will be: for now, their id and endpoint."""

    id: str
    endpoint: Endpoint


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


def migration_tls(params: MigrationParameters, objects: ObjectRegistry, *, endpoint: Endpoint,
                  uri_host: str = "") -> None:
    """Check the TLS parameters for one migration end: `client` at `migrate` (before anything is
    connected), `server` when the destination's stream arrives. Returns when the migration is
    plain text as asked (tls-creds empty); otherwise raises QmpError naming what is wrong.
    `uri_host` is the host of a tcp: URI, the hostname a client checks when tls-hostname is empty."""
    p = params.snapshot()
    if not p.tls_creds:
        return
    creds = objects.get(p.tls_creds)
    if creds is None:
        raise QmpError(f"No TLS credentials with id '{p.tls_creds}'")
    if not isinstance(creds, TlsCredentials):
        raise QmpError(f"Object with id '{p.tls_creds}' is not TLS credentials")
    if creds.endpoint != endpoint:
        raise QmpError(f"Expected TLS credentials for a {endpoint} endpoint")
    if endpoint == "client" and not (p.tls_hostname or uri_host):
        raise QmpError("No hostname available for TLS")
    if endpoint == "server" and p.tls_authz and objects.get(p.tls_authz) is None:
        raise QmpError(f"Cannot find QAuthZ object ID {p.tls_authz}")
    raise QmpError(TLS_UNSUPPORTED)
