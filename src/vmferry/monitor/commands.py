"""The QMP command table and the dispatcher that runs it against a MonitorBackend.

Each entry is data: name, argument schema (QMP names and QAPI types), what it returns, the errors
it may answer, and the handler. `query-commands` and docs/qmp.md are generated from this table,
so what we document is what we accept. Arguments are validated (schema.validate) before a handler
runs; a handler only sees well-typed arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vmferry import __version__
from vmferry.errors import QmpError
from vmferry.migration.params import CAPABILITIES, PARAMETER_SPECS, ParamSpec
from vmferry.monitor.backend import MIGRATION_RUNNING_STATES, MonitorBackend
from vmferry.monitor.objects import OBJECT_TYPES, create_object, migration_tls
from vmferry.monitor.protocol import Session
from vmferry.monitor.schema import (
    BOOL,
    INT,
    SCALARS_BY_NAME,
    SIZE,
    STR,
    STR_OR_NULL,
    Arg,
    Enum,
    ListOf,
    QType,
    Struct,
    validate,
)

log = logging.getLogger("vmferry.monitor")

# We speak QEMU 7.2's QMP dialect (names, shapes, errors); tools read this version to decide what
# to send. `package` says who actually answers.
QEMU_DIALECT = {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": f"vmferry-{__version__}"}

Handler = Callable[["CommandDispatcher", dict, Session], object]


@dataclass(frozen=True)
class Command:
    name: str
    doc: str
    handler: Handler
    args: tuple[Arg, ...] = ()
    returns: str = "`{}`"
    errors: tuple[str, ...] = ()
    example: tuple[dict, object] | None = None  # (arguments, return value) for the docs


COMMANDS: dict[str, Command] = {}


def command(name: str, doc: str, *, args: tuple[Arg, ...] = (), returns: str = "`{}`",
            errors: tuple[str, ...] = (), example: tuple[dict, object] | None = None
            ) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = Command(name, doc, fn, args, returns, errors, example)
        return fn
    return register


class CommandDispatcher:
    """Binds the command table to one backend; implements protocol.Dispatcher."""

    def __init__(self, backend: MonitorBackend, *, commands: dict[str, Command] | None = None) -> None:
        self.backend = backend
        self.commands = COMMANDS if commands is None else commands

    def greeting_version(self) -> dict:
        return QEMU_DIALECT

    def has_command(self, name: str) -> bool:
        return name in self.commands

    def dispatch(self, name: str, arguments: dict, session: Session) -> object:
        cmd = self.commands.get(name)
        if cmd is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        args = validate(cmd.args, arguments)
        log.debug("QMP %s %s from %s", name, args, session.peer)
        return cmd.handler(self, args, session)


def _optional(backend: object, method: str, unsupported: str) -> Callable[..., object]:
    """A backend method that may not exist yet; calling it answers `unsupported` if it is missing
    or raises NotImplementedError."""
    fn = getattr(backend, method, None)

    def call(*a: object) -> object:
        if fn is None:
            raise QmpError(unsupported)
        try:
            return fn(*a)
        except NotImplementedError:
            raise QmpError(unsupported) from None
    return call


def _migration_running(backend: MonitorBackend) -> bool:
    return backend.query_migrate().get("status", "none") in MIGRATION_RUNNING_STATES


def _capabilities_locked(backend: MonitorBackend) -> bool:
    """What refuses migrate-set-capabilities. On a destination (`inmigrate`) a migration in
    `setup` is only listening: as in QEMU, capabilities may still be set until the stream arrives
    (QEMU's postcopy and multifd how-tos set them on a destination started with -incoming)."""
    status = backend.query_migrate().get("status", "none")
    if status == "setup" and backend.query_status().get("status") == "inmigrate":
        return False
    return status in MIGRATION_RUNNING_STATES


def _uri_host(uri: str) -> str:
    """The host of a tcp: URI (what a TLS client checks the certificate against), else ""."""
    if not uri.startswith("tcp:"):
        return ""
    return uri[4:].rpartition(":")[0].strip("[]")


def _socket_uri(uri: str) -> bool:
    """tcp:, unix: or fd: (which may be a socket; checked again when it is opened)."""
    return uri.split(":", 1)[0] in ("tcp", "unix", "fd")


_MIGRATION_ACTIVE = "There's a migration process in progress"
_POSTCOPY_UNSUPPORTED = "Postcopy is not supported yet"
_RECOVERY_UNSUPPORTED = "Postcopy recovery is not supported yet"

# --- session and identity ---------------------------------------------------------------------


@command("qmp_capabilities", "Leave capabilities negotiation mode; the only command accepted before it.",
         args=(Arg("enable", ListOf(Enum("QMPCapability", ("oob",))), optional=True,
                   doc="capabilities to enable; \"oob\" is offered in the greeting"),),
         errors=("CommandNotFound: Capabilities negotiation is already complete, command ignored",),
         example=({"enable": ["oob"]}, {}))
def _qmp_capabilities(d: CommandDispatcher, args: dict, session: Session) -> object:
    if session.negotiated:
        raise QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
    enable = args.get("enable", [])
    missing = [c for c in enable if c not in session.offered]
    if missing:
        raise QmpError(f"Capability {', '.join(missing)} not available")
    session.oob_enabled = "oob" in enable
    session.negotiated = True
    return {}


@command("query-version", "The QMP dialect spoken (QEMU 7.2's) and the vmferry version answering.",
         returns='`{"qemu": {"major", "minor", "micro"}, "package": "vmferry-X.Y.Z"}`',
         example=({}, QEMU_DIALECT))
def _query_version(d: CommandDispatcher, args: dict, session: Session) -> object:
    return QEMU_DIALECT


@command("query-commands", "Every command this monitor accepts.",
         returns='`[{"name": str}, ...]`', example=({}, [{"name": "qmp_capabilities"}, "..."]))
def _query_commands(d: CommandDispatcher, args: dict, session: Session) -> object:
    return [{"name": name} for name in d.commands]


# --- run state ---------------------------------------------------------------------------------


@command("query-status", "The VM's run state.",
         returns='`{"status": RunState, "running": bool, "singlestep": false}`',
         example=({}, {"status": "running", "running": True, "singlestep": False}))
def _query_status(d: CommandDispatcher, args: dict, session: Session) -> object:
    status = dict(d.backend.query_status())
    status.setdefault("singlestep", False)
    return status


@command("stop", "Pause the vCPUs; emits STOP.")
def _stop(d: CommandDispatcher, args: dict, session: Session) -> object:
    d.backend.stop()
    return {}


@command("cont", "Resume the vCPUs; emits RESUME. On a destination still in `inmigrate`, the VM "
         "starts once the migration completes.")
def _cont(d: CommandDispatcher, args: dict, session: Session) -> object:
    d.backend.cont()
    return {}


@command("quit", "Exit the VMM after replying; emits SHUTDOWN {guest: false, reason: host-qmp-quit}.")
def _quit(d: CommandDispatcher, args: dict, session: Session) -> object:
    d.backend.quit()
    return {}


@command("system_powerdown", "Ask the guest to power off; emits POWERDOWN.")
def _system_powerdown(d: CommandDispatcher, args: dict, session: Session) -> object:
    d.backend.system_powerdown()
    return {}


@command("query-cpus-fast", "The vCPUs, without interrupting them.",
         returns='`[{"cpu-index": int, "thread-id": int, "qom-path": str, "target": "x86_64", '
                 '"props": {"core-id", "thread-id", "socket-id"}}, ...]`',
         example=({}, [{"cpu-index": 0, "thread-id": 4242, "qom-path": "/machine/unattached/device[0]",
                        "target": "x86_64", "props": {"core-id": 0, "thread-id": 0, "socket-id": 0}}]))
def _query_cpus_fast(d: CommandDispatcher, args: dict, session: Session) -> object:
    cpus = []
    for cpu in d.backend.query_cpus_fast():
        cpu = dict(cpu)
        index = cpu["cpu-index"]
        cpu.setdefault("qom-path", f"/machine/unattached/device[{index}]")
        cpu.setdefault("target", "x86_64")
        cpu.setdefault("props", {"core-id": 0, "thread-id": 0, "socket-id": index})
        cpus.append(cpu)
    return cpus


@command("query-machines", "The machine types this build runs (`-M`), oldest first, in QEMU's "
         "MachineInfo names: `alias` on the newest (`vmferry`, as QEMU's `pc`), `is-default` on the one `-M` "
         "defaults to, `deprecated` on those to be retired (docs/machine-types.md).",
         returns='`[{"name": str, "alias"?: str, "is-default"?: true, "cpu-max": int, '
                 '"hotpluggable-cpus": false, "numa-mem-supported": false, "deprecated": bool, '
                 '"default-ram-id": "pc.ram", "acpi": false}, ...]`',
         example=({}, [{"name": "vmferry-0.1", "cpu-max": 64, "hotpluggable-cpus": False,
                        "numa-mem-supported": False, "deprecated": False, "default-ram-id": "pc.ram",
                        "acpi": False}, "..."]))
def _query_machines(d: CommandDispatcher, args: dict, session: Session) -> object:
    from vmferry.machine.machine_type import query_machines

    return query_machines()


# --- block -------------------------------------------------------------------------------------

_NO_BLOCK = "This VMM has no block devices"


@command("query-block", "The drives (`--drive`): one entry per virtio-blk device and its image "
         "(for an NBD export, `file` and `filename` are its URI and `image` has no `actual-size`, "
         "as QEMU 7.2 answers).",
         returns='`[{"device": id, "qdev", "locked", "removable", "type", "tray_open", "io-status", '
                 '"inserted": {"file", "ro", "drv", "node-name", "image": {"filename", "format", '
                 '"virtual-size", "actual-size"}, ...}}, ...]`',
         example=({}, [{"device": "disk0", "qdev": "/machine/virtio-mmio@feb00000", "locked": False,
                        "removable": False, "type": "unknown", "tray_open": False, "io-status": "ok",
                        "inserted": {"file": "disk.img", "ro": False, "drv": "raw", "node-name": "disk0",
                                     "image": {"filename": "disk.img", "format": "raw",
                                               "virtual-size": 67108864, "actual-size": 1048576}}}]))
def _query_block(d: CommandDispatcher, args: dict, session: Session) -> object:
    return _optional(d.backend, "query_block", _NO_BLOCK)()


@command("query-blockstats", "I/O statistics per drive, in QEMU's BlockDeviceStats names: "
         "requests, bytes, and total service time (ns) for reads, writes and flushes.",
         returns='`[{"device": id, "qdev", "node-name", "stats": {"rd_bytes", "wr_bytes", '
                 '"rd_operations", "wr_operations", "flush_operations", "rd_total_time_ns", '
                 '"wr_total_time_ns", "flush_total_time_ns", "failed_*_operations", '
                 '"invalid_*_operations", "wr_highest_offset", "idle_time_ns", ...}}, ...]`',
         example=({}, [{"device": "disk0", "node-name": "disk0", "stats": {
             "rd_bytes": 4096, "wr_bytes": 1048576, "rd_operations": 1, "wr_operations": 16,
             "flush_operations": 0, "rd_total_time_ns": 51000, "wr_total_time_ns": 2400000,
             "flush_total_time_ns": 0}}]))
def _query_blockstats(d: CommandDispatcher, args: dict, session: Session) -> object:
    return _optional(d.backend, "query_blockstats", _NO_BLOCK)()


@command("x-query-virtio-queue-status", "The device's position in one virtqueue of a virtio device, "
         "by its qdev path (query-block's `qdev`): QEMU 7.2's VirtQueueStatus, the members vmferry "
         "keeps. With the device idle, `used-idx` = `last-avail-idx` and `inuse` = 0: every request "
         "taken was completed exactly once.",
         args=(Arg("path", STR, doc="the device's qdev path, e.g. /machine/virtio-mmio@feb00000"),
               Arg("queue", SCALARS_BY_NAME["uint16"], doc="the queue index")),
         returns='`{"name", "queue-index", "inuse", "vring-num", "vring-num-default", "vring-desc", '
                 '"vring-avail", "vring-used", "last-avail-idx", "used-idx"}`',
         errors=("GenericError: No virtio device with path 'PATH'",
                 "GenericError: Invalid virtqueue index N"),
         example=({"path": "/machine/virtio-mmio@feb00000", "queue": 0},
                  {"name": "virtio-blk", "queue-index": 0, "inuse": 0, "vring-num": 8,
                   "vring-num-default": 256, "vring-desc": 1060864, "vring-avail": 1060992,
                   "vring-used": 1061056, "last-avail-idx": 42, "used-idx": 42}))
def _x_query_virtio_queue_status(d: CommandDispatcher, args: dict, session: Session) -> object:
    return _optional(d.backend, "query_virtio_queue_status", _NO_BLOCK)(args["path"], args["queue"])


# --- migration ---------------------------------------------------------------------------------


@command("migrate", "Start migrating the VM to `uri` (tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD, "
         "fd:N) and return at once; follow it with query-migrate or MIGRATION events.",
         args=(Arg("uri", STR, doc="where to send the stream"),
               Arg("detach", BOOL, optional=True, doc="accepted and ignored: migrate always detaches"),
               Arg("blk", BOOL, optional=True, doc="copy every writable drive's contents in the stream "
                   "(non-shared storage); without it drives are shared unless named in x-block-drives"),
               Arg("inc", BOOL, optional=True, doc="incremental block migration over a shared backing "
                   "image: not supported (refused when true)"),
               Arg("resume", BOOL, optional=True, doc="resume a paused postcopy migration")),
         errors=("GenericError: There's a migration process in progress",
                 "GenericError: Guest is waiting for an incoming migration",
                 "GenericError: Can't migrate the vm that was paused due to previous migration",
                 "GenericError: No TLS credentials with id 'ID' (tls-creds names no object); "
                 "nothing is connected or sent",
                 "GenericError: Expected TLS credentials for a client endpoint",
                 "GenericError: No hostname available for TLS (tls-creds set, no tls-hostname and "
                 "the URI has no host)",
                 "GenericError: TLS needs a socket (tcp:, unix: or a socket fd:) (tls-creds set with "
                 "a file: or exec: URI)",
                 "GenericError: Cannot resume if there is no paused migration (resume: true)",
                 "GenericError: x-block-drives: this VM has no drive 'ID' (drives: ...)",
                 "GenericError: x-block-drives: drive 'ID' is read-only; only writable drives are copied",
                 "GenericError: inc: incremental block migration is not supported by vmferry"),
         example=({"uri": "tcp:192.0.2.7:4444"}, {}))
def _migrate(d: CommandDispatcher, args: dict, session: Session) -> object:
    if args.get("resume"):
        _optional(d.backend, "migrate_resume", _RECOVERY_UNSUPPORTED)(args["uri"])
        return {}
    run_state = d.backend.query_status().get("status")
    # Before the running check: on a destination, query-migrate reports the *incoming* migration,
    # which QEMU's check (of the outgoing state) never sees.
    if run_state == "inmigrate":
        raise QmpError("Guest is waiting for an incoming migration")
    if _migration_running(d.backend):
        raise QmpError(_MIGRATION_ACTIVE)
    if run_state == "postmigrate":
        raise QmpError("Can't migrate the vm that was paused due to previous migration")
    # Before any connection: encryption asked for and impossible must never become plain text.
    tls = migration_tls(d.backend.migration_parameters, d.backend.objects, endpoint="client",
                        uri_host=_uri_host(args["uri"]))
    if tls is not None and not _socket_uri(args["uri"]):
        raise QmpError("TLS needs a socket (tcp:, unix: or a socket fd:); "
                       f"{args['uri'].split(':', 1)[0]}: carries the stream one way")
    if args.get("inc"):
        raise QmpError("inc: incremental block migration is not supported by vmferry")
    if args.get("blk"):
        d.backend.migrate(args["uri"], blk=True)
    else:
        d.backend.migrate(args["uri"])
    return {}


@command("migrate-incoming", "Start listening for the incoming stream on `uri` (after `--incoming defer`).",
         args=(Arg("uri", STR, doc="where to accept the stream"),),
         errors=("GenericError: '-incoming' was not specified on the command line",
                 "GenericError: The incoming migration has already been started"),
         example=({"uri": "tcp:0.0.0.0:4444"}, {}))
def _migrate_incoming(d: CommandDispatcher, args: dict, session: Session) -> object:
    if d.backend.query_status().get("status") != "inmigrate":
        raise QmpError("'-incoming' was not specified on the command line")
    d.backend.migrate_incoming(args["uri"])
    return {}


@command("migrate_cancel", "Cancel the outgoing migration, if any; the VM keeps running on the source.")
def _migrate_cancel(d: CommandDispatcher, args: dict, session: Session) -> object:
    d.backend.migrate_cancel()
    return {}


@command("query-migrate", "Progress and statistics of the current or last migration; `{}` before any.",
         returns='`{"status": MigrationStatus, "setup-time", "total-time", "downtime" | '
                 '"expected-downtime" (ms), "ram": {total, transferred, remaining, duplicate, normal, '
                 'normal-bytes, dirty-sync-count, dirty-pages-rate, mbps, pages-per-second, page-size, '
                 'precopy-bytes, downtime-bytes, postcopy-bytes, ...}, "cpu-throttle-percentage" '
                 '(while auto-converge throttles), "dirty-limit-throttle-time-per-round" and '
                 '"dirty-limit-ring-full-time" (µs, while dirty-limit limits the vCPUs)}`',
         example=({}, {"status": "completed", "setup-time": 1, "downtime": 4, "total-time": 11,
                       "ram": {"total": 84746240, "transferred": 1144598, "remaining": 0,
                               "mbps": 1172.9, "dirty-sync-count": 2, "page-size": 4096}}))
def _query_migrate(d: CommandDispatcher, args: dict, session: Session) -> object:
    return d.backend.query_migrate()


def _param_type(spec: ParamSpec) -> QType:
    if spec.choices:
        return Enum(spec.qapi_type, spec.choices)
    if spec.qapi_type == "str":
        return STR_OR_NULL  # null resets a TLS string to "" (off), as in QEMU
    return SCALARS_BY_NAME[spec.qapi_type]


_PARAM_ARGS = tuple(Arg(s.qmp_name, _param_type(s), optional=True, doc=s.doc) for s in PARAMETER_SPECS)


@command("migrate-set-parameters", "Change migration parameters; all or nothing. May be used during a "
         "migration (max-bandwidth and downtime-limit take effect at once). Only the parameters "
         "marked effective in [Migration parameters](#migration-parameters) may change; the others "
         "accept only their default.",
         args=_PARAM_ARGS,
         errors=("GenericError: Parameter 'downtime-limit' expects an integer in the range of 0 to "
                 "2000000 ms (and the like for each parameter)",
                 "GenericError: Parameter 'compress-level' is not supported by vmferry yet (any "
                 "parameter not marked effective, set to anything but its default)"),
         example=({"max-bandwidth": 1073741824, "downtime-limit": 500}, {}))
def _migrate_set_parameters(d: CommandDispatcher, args: dict, session: Session) -> object:
    d.backend.migration_parameters.apply(args)
    return {}


@command("query-migrate-parameters", "Every migration parameter and its current value.",
         returns="`{PARAMETER: value, ...}` (every parameter of migrate-set-parameters)",
         example=({}, {"max-bandwidth": 0, "downtime-limit": 300, "multifd-channels": 2,
                       "...": "..."}))
def _query_migrate_parameters(d: CommandDispatcher, args: dict, session: Session) -> object:
    return d.backend.migration_parameters.to_qmp()


_CAP_STATUS = Struct("MigrationCapabilityStatus",
                     (Arg("capability", Enum("MigrationCapability", CAPABILITIES)), Arg("state", BOOL)))


@command("migrate-set-capabilities", "Turn migration capabilities on or off; all or nothing. Refused "
         "while a migration runs; on a destination, accepted until the incoming stream arrives. Only "
         "the capabilities marked effective in [Migration capabilities](#migration-capabilities) may "
         "be turned on.",
         args=(Arg("capabilities", ListOf(_CAP_STATUS), doc="`[{\"capability\": NAME, \"state\": bool}]`"),),
         errors=("GenericError: " + _MIGRATION_ACTIVE,
                 "GenericError: Parameter 'capabilities[0].capability' does not accept value 'x'",
                 "GenericError: Capability 'x-colo' is not supported by vmferry yet (any capability "
                 "not marked effective, turned on)",
                 "GenericError: Capability 'return-path' cannot be turned off in vmferry: the "
                 "destination confirms the switchover on it"),
         example=({"capabilities": [{"capability": "events", "state": True}]}, {}))
def _migrate_set_capabilities(d: CommandDispatcher, args: dict, session: Session) -> object:
    if _capabilities_locked(d.backend):
        raise QmpError(_MIGRATION_ACTIVE)
    d.backend.migration_capabilities.set(args["capabilities"])
    return {}


@command("query-migrate-capabilities", "Every migration capability and whether it is on.",
         returns='`[{"capability": NAME, "state": bool}, ...]` in QEMU 7.2\'s order',
         example=({}, [{"capability": "xbzrle", "state": False}, "..."]))
def _query_migrate_capabilities(d: CommandDispatcher, args: dict, session: Session) -> object:
    return d.backend.migration_capabilities.query()


@command("migrate-start-postcopy", "Switch the running migration to postcopy at its next step (also "
         "during setup or the first pass): the source stops the vCPUs, sends the device state, and the "
         "destination runs the guest while the rest of RAM arrives (docs/migration.md, Postcopy). Needs "
         "capability postcopy-ram on both sides when the migration starts.",
         errors=("GenericError: Enable postcopy with migrate_set_capability before the start of migration",
                 "GenericError: Postcopy must be started after migration has been started",
                 "GenericError: Postcopy cannot start: the migration is STATUS"))
def _migrate_start_postcopy(d: CommandDispatcher, args: dict, session: Session) -> object:
    _optional(d.backend, "migrate_start_postcopy", _POSTCOPY_UNSUPPORTED)()
    return {}


@command("migrate-recover", "Destination in postcopy-paused: accept the source's resumed stream on `uri` "
         "(the source then runs `migrate` with `\"resume\": true`); the destination sends which pages "
         "it has and the migration goes on to completed.",
         args=(Arg("uri", STR, doc="where to accept the resumed stream"),),
         errors=("GenericError: Migrate recover can only be run when postcopy is paused.",))
def _migrate_recover(d: CommandDispatcher, args: dict, session: Session) -> object:
    _optional(d.backend, "migrate_recover", _RECOVERY_UNSUPPORTED)(args["uri"])
    return {}


@command("migrate-pause", "Break an active postcopy migration's connection on purpose, on either side: "
         "both sides go to postcopy-paused, keep their state, and a recovery continues it.",
         errors=("GenericError: migrate-pause is only for a postcopy migration after the switch",))
def _migrate_pause(d: CommandDispatcher, args: dict, session: Session) -> object:
    _optional(d.backend, "migrate_pause", _RECOVERY_UNSUPPORTED)()
    return {}


# --- objects -----------------------------------------------------------------------------------

_OBJECT_ARGS = (
    Arg("qom-type", STR, doc="the object type: " + ", ".join(f"`{t}`" for t in OBJECT_TYPES)),
    Arg("id", STR, doc="the object's id, what `tls-creds` / `tls-authz` name"),
    Arg("dir", STR, optional=True, doc="tls-creds-x509: directory of `ca-cert.pem`, "
        "`server-cert.pem` + `server-key.pem` or `client-cert.pem` + `client-key.pem`, optional "
        "`ca-crl.pem`; tls-creds-psk: directory of `keys.psk` (lines `username:hexkey`)"),
    Arg("endpoint", Enum("QCryptoTLSCredsEndpoint", ("client", "server")), optional=True,
        doc="tls-creds-x509, tls-creds-psk: `client` (default, the source) or `server` (the "
        "destination)"),
    Arg("username", STR, optional=True, doc="tls-creds-psk, client only: the identity whose key "
        "`keys.psk` holds (default `qemu`)"),
    Arg("verify-peer", BOOL, optional=True, doc="tls-creds-x509: check the peer's certificate "
        "(default true): a server requires the client's, a client checks the server's and its hostname"),
    Arg("sanity-check", BOOL, optional=True, doc="tls-creds-x509: refuse an expired or not yet "
        "valid certificate or CA when the object is created (default true)"),
    Arg("identity", STR, optional=True, doc="authz-simple: the one client distinguished name "
        "allowed, RFC 4514 form, e.g. `CN=src.example.com,O=Example Org,C=GB` (under "
        "tls-creds-psk: the one PSK username)"),
)


@command("object-add", "Create an object: TLS credentials for a migration (`tls-creds`) or the "
         "authorization a destination checks clients with (`tls-authz`). Certificate and key files are "
         "read and checked now.",
         args=_OBJECT_ARGS,
         errors=("GenericError: attempt to add duplicate property 'ID' to object (type 'container')",
                 "GenericError: Object type 'memory-backend-ram' is not supported by vmferry "
                 "(supported: authz-simple, tls-creds-psk, tls-creds-x509)",
                 "GenericError: tls-creds-psk 'ID': Username NAME not found in PSK file DIR/keys.psk",
                 "GenericError: tls-creds-psk 'ID': username should not be set when endpoint=server",
                 "GenericError: Property 'tls-creds-x509.identity' not found (a property of "
                 "another type)",
                 "GenericError: Unable to access credentials DIR/ca-cert.pem: No such file or directory",
                 "GenericError: The certificate DIR/server-cert.pem has expired (...) (sanity-check)",
                 "GenericError: tls-creds-x509 'ID': cannot load certificate ... with key ...: REASON"),
         example=({"qom-type": "tls-creds-x509", "id": "tls0", "dir": "/etc/pki/vmferry",
                   "endpoint": "server"}, {}))
def _object_add(d: CommandDispatcher, args: dict, session: Session) -> object:
    qom_type, obj_id = args.pop("qom-type"), args.pop("id")
    obj = create_object(qom_type, obj_id, args)
    d.backend.objects.add(obj_id, obj)
    return {}


@command("object-del", "Delete an object. A migration already running keeps the credentials it "
         "started with.",
         args=(Arg("id", STR, doc="the object's id"),),
         errors=("GenericError: object 'ID' not found",),
         example=({"id": "tls0"}, {}))
def _object_del(d: CommandDispatcher, args: dict, session: Session) -> object:
    d.backend.objects.remove(args["id"])
    return {}


# --- dirty rate -------------------------------------------------------------------------------

_DIRTY_RATE_MODE = Enum("DirtyRateMeasureMode", ("page-sampling", "dirty-ring", "dirty-bitmap"))


@command("calc-dirty-rate", "Start measuring how fast the guest dirties memory, for `calc-time` seconds; "
         "read the result with query-dirty-rate. `dirty-bitmap` counts the distinct pages written, from "
         "the dirty log, through a consumer of its own (a running migration is not disturbed); "
         "`page-sampling` compares `sample-pages` random pages per GiB; `dirty-ring` (only with "
         "`--accel kvm,dirty-ring-size=N`) counts each vCPU's pages from its dirty ring and answers "
         "per vCPU too.",
         args=(Arg("calc-time", INT, doc="seconds to measure, 1 to 60"),
               Arg("sample-pages", INT, optional=True, doc="pages sampled per GiB, 128 to 4096 "
                   "(page-sampling only; default 512)"),
               Arg("mode", _DIRTY_RATE_MODE, optional=True, doc="page-sampling (default), dirty-bitmap; "
                   "dirty-ring on a VM with the dirty ring, refused otherwise")),
         errors=("GenericError: the dirty rate is already being measured.",
                 "GenericError: calc-time is out of range[1, 60].",
                 "GenericError: sample-pages is out of range[128, 4096].",
                 "GenericError: sample-pages is used only in page-sampling mode",
                 "GenericError: mode dirty-ring is not enabled, use other method instead."),
         example=({"calc-time": 1, "mode": "dirty-bitmap"}, {}))
def _calc_dirty_rate(d: CommandDispatcher, args: dict, session: Session) -> object:
    _optional(d.backend, "calc_dirty_rate", "calc-dirty-rate is not supported here")(
        args["calc-time"], args.get("mode"), args.get("sample-pages"))
    return {}


@command("query-dirty-rate", "The result of the last calc-dirty-rate. `dirty-rate` (MiB/s, QEMU's "
         "\"MB/s\") is there once `status` is `measured`; `-1` if the measurement failed (then "
         "`x-error` says why). Mode dirty-ring adds `vcpu-dirty-rate`, each vCPU's rate (QEMU's "
         "field), and `dirty-rate` is their sum. vmferry adds `x-dirty-bytes` (distinct bytes found "
         "dirty), `x-elapsed-ms` (the window as measured) and `x-dirty-rate-bytes` (the rate in "
         "bytes/s). In dirty-bitmap mode the window is sampled 8 times (`x-dirty-curve`: [ms, bytes] "
         "pairs) and `dirty-rate` is the write rate r of the curve D(t) = W (1 - exp(-r t / W)) fitted "
         "through them, `x-working-set` its W (docs/migration.md, \"Seeing a migration\").",
         returns='`{"status": "unstarted"|"measuring"|"measured", "dirty-rate": int, "start-time": int, '
                 '"calc-time": int, "sample-pages": int, "mode": DirtyRateMeasureMode, '
                 '"vcpu-dirty-rate": [{"id": int, "dirty-rate": int}] (dirty-ring), ...}`',
         example=({}, {"status": "measured", "dirty-rate": 8, "start-time": 1700000000, "calc-time": 1,
                       "sample-pages": 0, "mode": "dirty-bitmap", "x-working-set": 134217728,
                       "x-dirty-curve": [[125.2, 1048576], [250.1, 2097152], [375.3, 3145728],
                                         [500.2, 4194304], [625.1, 5242880], [750.3, 6291456],
                                         [875.2, 7340032], [1000.4, 8388608]],
                       "x-dirty-rate-bytes": 8388608, "x-dirty-bytes": 8388608, "x-elapsed-ms": 1000.4}))
def _query_dirty_rate(d: CommandDispatcher, args: dict, session: Session) -> object:
    return _optional(d.backend, "query_dirty_rate", "query-dirty-rate is not supported here")()


# --- dirty page rate limit -------------------------------------------------------------------

_NO_RING = ("dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'")


@command("set-vcpu-dirty-limit", "Limit one vCPU's dirty page rate (all vCPUs without `cpu-index`) to "
         "`dirty-rate` MB/s (QEMU's dirtylimit; machine/dirty_limit.py): once per second each vCPU's "
         "rate is measured from its dirty ring and a vCPU above its quota (by more than a quarter of "
         "it, at most 25 MB/s) sleeps longer after each time its ring fills. A vCPU that does not "
         "write is never slowed. Keeps the RAM's dirty log on while any limit is set. 0 cancels. "
         "Needs `--accel kvm,dirty-ring-size=N`.",
         args=(Arg("cpu-index", INT, optional=True, doc="the vCPU; all when absent"),
               Arg("dirty-rate", SIZE, doc="the quota, MB/s")),
         errors=("GenericError: " + _NO_RING,
                 "GenericError: incorrect cpu index specified",
                 "GenericError: can't set dirty page limit while migration is running (with dirty-limit)"),
         example=({"cpu-index": 0, "dirty-rate": 200}, {}))
def _set_vcpu_dirty_limit(d: CommandDispatcher, args: dict, session: Session) -> object:
    rate = args["dirty-rate"]
    if rate < 0:
        raise QmpError("Parameter 'dirty-rate' expects uint64")
    _optional(d.backend, "set_vcpu_dirty_limit", _NO_RING)(args.get("cpu-index"), rate)
    return {}


@command("cancel-vcpu-dirty-limit", "Lift one vCPU's dirty page rate limit (all without `cpu-index`). "
         "Without a dirty ring there is nothing to cancel and it succeeds, as in QEMU.",
         args=(Arg("cpu-index", INT, optional=True, doc="the vCPU; all when absent"),),
         errors=("GenericError: incorrect cpu index specified",
                 "GenericError: can't cancel dirty page limit while migration is running (with dirty-limit)"),
         example=({"cpu-index": 0}, {}))
def _cancel_vcpu_dirty_limit(d: CommandDispatcher, args: dict, session: Session) -> object:
    _optional(d.backend, "cancel_vcpu_dirty_limit", _NO_RING)(args.get("cpu-index"))
    return {}


@command("query-vcpu-dirty-limit", "The limited vCPUs: quota and the last period's dirty rate, MB/s; "
         "`[]` when none is limited.",
         returns='`[{"cpu-index": int, "limit-rate": int, "current-rate": int}]`',
         example=({}, [{"cpu-index": 0, "limit-rate": 200, "current-rate": 184}]))
def _query_vcpu_dirty_limit(d: CommandDispatcher, args: dict, session: Session) -> object:
    fn = getattr(d.backend, "query_vcpu_dirty_limit", None)
    return [] if fn is None else fn()


@command("x-migrate-forecast",
         "vmferry extension: forecast a precopy migration before starting it (docs/migration.md, "
         "\"Forecast\"): will it converge under downtime-limit, in how many passes, how long, how "
         "many bytes, how long a pause; if not, the least bandwidth, downtime-limit or throttle that "
         "would make it converge. Inputs not given come from the last calc-dirty-rate (dirty-bitmap: "
         "rate and working set) and the last completed outgoing migration (the passes' bandwidth, "
         "else max-bandwidth; setup, time between passes, switchover cost).",
         args=(Arg("bandwidth", SIZE, optional=True, doc="bytes per second the passes move (default: the "
                   "last migration's passes' bytes over their time, else max-bandwidth)"),
               Arg("engine-bandwidth", SIZE, optional=True,
                   doc="bytes per second the engine's switchover decision will divide by (its end-to-end "
                       "measure; above max-bandwidth under a cap) (default: the last migration's, when "
                       "`bandwidth` comes from it too, else `bandwidth`)"),
               Arg("dirty-rate", SIZE, optional=True, doc="bytes the guest dirties per second"),
               Arg("downtime-limit", SIZE, optional=True, doc="ms (default: the parameter)"),
               Arg("working-set", SIZE, optional=True,
                   doc="bytes the guest writes into (default: the measured working set with the "
                       "measured rate, else all populated RAM)"),
               Arg("switchover-ms", SIZE, optional=True,
                   doc="the pause's fixed cost besides RAM (default: the last migration's "
                       "downtime-phases without `stopped-ram` and `destination-*`, else 5 ms)"),
               Arg("setup-ms", SIZE, optional=True,
                   doc="setup before pass 1 (default: the last migration's setup-time, else 0)"),
               Arg("pass-overhead-ms", SIZE, optional=True,
                   doc="time between passes (default: the last migration's, else 0)")),
         returns='`{"converges": bool, "passes": int, "total-time-ms": number|null, "total-bytes": int, '
                 '"downtime-ms": number, "bandwidth-needed", "downtime-limit-needed", '
                 '"throttle-percent-needed" (when not converging), "inputs": {...}}`',
         errors=("GenericError: no dirty rate measured: run calc-dirty-rate with mode dirty-bitmap first, "
                 "or give 'dirty-rate'",
                 "GenericError: no bandwidth known: give 'bandwidth' (bytes/s), set max-bandwidth, or "
                 "migrate once to measure it"),
         example=({"bandwidth": 104857600, "dirty-rate": 10485760},
                  {"converges": True, "passes": 3, "total-time-ms": 2835.286, "total-bytes": 296776970,
                   "downtime-ms": 7.423, "inputs": {"initial-bytes": 268435456, "dirty-rate": 10485760,
                                                    "bandwidth": 104857600, "downtime-limit": 300,
                                                    "engine-bandwidth": 104857600,
                                                    "working-set": 268435456, "switchover-ms": None,
                                                    "setup-ms": 0, "pass-overhead-ms": 0}}))
def _migrate_forecast(d: CommandDispatcher, args: dict, session: Session) -> object:
    return _optional(d.backend, "migrate_forecast", "x-migrate-forecast is not supported here")(args)


# --- vmferry extensions ------------------------------------------------------------------------


@command("x-verify-dirty-guest",
         "vmferry extension: pause the vCPUs, check the `dirty` test guest's memory against its own "
         "generation table with the host-side verifier, resume. The proof a migration lost nothing.",
         returns='`{"ok": bool, "pages": int, "generation": int, "first-bad-page": int|null, "reason": str}`',
         example=({}, {"ok": True, "pages": 65536, "generation": 81234, "first-bad-page": None,
                       "reason": "verify ok gen=81234 pages=65536"}))
def _verify_dirty_guest(d: CommandDispatcher, args: dict, session: Session) -> object:
    return _optional(d.backend, "verify_dirty_guest", "x-verify-dirty-guest is not supported here")()
