"""What the monitor needs from the VMM process: the `MonitorBackend` interface.

The monitor knows nothing about KVM or the migration machinery; every command handler calls one
of these methods. The VMM (a Machine plus its migration state) implements them.

Rules for implementers:
* Every method runs on the monitor's thread and must return promptly: `migrate` starts the
  migration thread and returns, `quit` arranges for the process to exit *after* the reply has
  been sent (e.g. sets an event the main thread waits on) - never block or join here.
* Refuse with a `VmferryError` (e.g. `QmpError(desc, qmp_class)`, `MigrationError`): the client
  gets `{"error": {"class": e.qmp_class, "desc": str(e)}}`. Any other exception is a bug: it is
  logged with its traceback and answered as a GenericError; the monitor keeps serving.
* Raise `NotImplementedError` (or leave an optional method out) for machinery that does not exist
  yet; the client gets a GenericError saying it is not supported yet.
* Emit QMP events where the state changes, through `QmpServer.emit_event` (any thread):
  STOP / RESUME when vCPUs pause / run, SHUTDOWN {"guest", "reason"} on quit or guest shutdown,
  POWERDOWN on system_powerdown, and - only when the `events` capability is on -
  MIGRATION {"status"} on every state change and MIGRATION_PASS {"pass"} per RAM pass.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.monitor.objects import ObjectRegistry

# QEMU's RunState names that query-status may report.
RUN_STATES = (
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
    "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog",
    "guest-panicked", "colo",
)

# QEMU's MigrationStatus names (query-migrate's "status", MIGRATION's "status").
MIGRATION_STATES = (
    "none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
    "postcopy-recover", "completed", "failed", "colo", "pre-switchover", "device", "wait-unplug",
)

# States in which "a migration is running" (QEMU's migration_is_running()).
MIGRATION_RUNNING_STATES = (
    "setup", "cancelling", "active", "postcopy-active", "postcopy-paused", "postcopy-recover",
    "colo", "pre-switchover", "device", "wait-unplug",
)


@runtime_checkable
class MonitorBackend(Protocol):
    """The VMM as the monitor sees it. Return shapes are QMP's (see docs/qmp.md)."""

    #: Read by the migration thread; written by migrate-set-parameters / -capabilities.
    migration_parameters: MigrationParameters
    migration_capabilities: MigrationCapabilities
    #: Objects by id (QEMU's object-add namespace; empty until object-add exists): `migrate` and
    #: the incoming migration look tls-creds up here.
    objects: ObjectRegistry

    def query_status(self) -> dict:
        """`{"status": RUN_STATE, "running": bool}`; the monitor adds `"singlestep": false`.
        A destination waiting for its stream is "inmigrate"; a source after a completed
        migration is "postmigrate"."""
        ...

    def stop(self) -> None:
        """Pause the vCPUs (emit STOP if they were running)."""
        ...

    def cont(self) -> None:
        """Resume the vCPUs (emit RESUME). In "inmigrate": just start once the migration is in."""
        ...

    def quit(self) -> None:
        """Emit SHUTDOWN {"guest": false, "reason": "host-qmp-quit"} and make the process exit
        after this call returns (the reply is sent first)."""
        ...

    def system_powerdown(self) -> None:
        """Ask the guest to power down (ACPI-style); emit POWERDOWN."""
        ...

    def query_cpus_fast(self) -> list[dict]:
        """One dict per vCPU: `{"cpu-index": int, "thread-id": int}` at least; the monitor fills
        in `"qom-path"`, `"target": "x86_64"` and `"props"` when missing."""
        ...

    def migrate(self, uri: str, blk: bool = False) -> None:
        """Start an outgoing migration to `uri` on the migration thread and return at once;
        `blk`: copy every writable drive in the stream. The monitor has already refused: a
        running migration, "inmigrate" and "postmigrate"."""
        ...

    def migrate_incoming(self, uri: str) -> None:
        """Start listening on `uri` for the incoming stream (after `-incoming defer`) and return.
        Called only in "inmigrate"; refuse a second call with QmpError
        ("The incoming migration has already been started")."""
        ...

    def migrate_cancel(self) -> None:
        """Cancel the outgoing migration if one runs (no error if none)."""
        ...

    def query_migrate(self) -> dict:
        """`{}` before any migration; else `{"status": MIGRATION_STATE, ...}` with, on the source,
        "setup-time", "total-time", "downtime" / "expected-downtime" (ms) and a "ram" dict
        (total, transferred, remaining, duplicate, normal, normal-bytes, dirty-sync-count,
        dirty-pages-rate, mbps, pages-per-second, page-size, precopy-bytes, downtime-bytes,
        postcopy-bytes, ...), as QEMU 7.2 answers."""
        ...

    # Optional, not in the Protocol's required surface (the monitor looks them up with getattr):
    #   migrate_start_postcopy() -> None      # "Postcopy is not supported yet" when absent
    #   migrate_resume(uri: str) -> None      # migrate {"resume": true}
    #   migrate_recover(uri: str) -> None     # destination side of postcopy recovery
    #   migrate_pause() -> None
