"""The QMP events vmferry emits: names, data members (QEMU's) and how one is put on the wire.

Emitters (machine, migration thread) call `QmpServer.emit_event(name, data)`; this module is the
list they pick names from and the source of the events section of docs/qmp.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from vmferry.monitor.backend import MIGRATION_STATES

# QEMU's ShutdownCause names, SHUTDOWN's "reason".
SHUTDOWN_REASONS = (
    "none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal", "host-ui",
    "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset", "snapshot-load",
)


@dataclass(frozen=True)
class EventSpec:
    name: str
    doc: str
    data: tuple[tuple[str, str, str], ...] = ()  # (member, type, meaning); () -> no "data" member
    example: dict | None = None


EVENTS: dict[str, EventSpec] = {
    e.name: e
    for e in (
        EventSpec("STOP", "The vCPUs stopped (stop, migration switchover, shutdown)."),
        EventSpec("RESUME", "The vCPUs run again (cont, destination after switchover)."),
        EventSpec(
            "SHUTDOWN",
            "The VM is shutting down; the process exits after it.",
            (("guest", "bool", "true if the guest asked for it, false if the host did (e.g. quit)"),
             ("reason", "ShutdownCause", "one of: " + ", ".join(SHUTDOWN_REASONS))),
            {"guest": False, "reason": "host-qmp-quit"},
        ),
        EventSpec("POWERDOWN", "system_powerdown was requested; the guest was asked to power off."),
        EventSpec(
            "MIGRATION",
            "The migration changed state (only with the 'events' capability on).",
            (("status", "MigrationStatus", "one of: " + ", ".join(MIGRATION_STATES)),),
            {"status": "completed"},
        ),
        EventSpec(
            "MIGRATION_PASS",
            "A new pass over dirty RAM began (only with the 'events' capability on).",
            (("pass", "int", "the pass number, from 1"),),
            {"pass": 2},
        ),
    )
}


def encode_event(name: str, data: dict | None = None, now: float | None = None) -> bytes:
    """One event as QEMU sends it: timestamp of emission (wall clock, s + us), name, and `data`
    only when it is non-empty."""
    if now is None:
        now = time.time()
    seconds = int(now)
    msg: dict[str, object] = {
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
        "event": name,
    }
    if data:
        msg["data"] = data
    return json.dumps(msg).encode() + b"\n"
