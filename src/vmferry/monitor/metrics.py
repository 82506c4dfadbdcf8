"""`vmferry run --metrics tcp:HOST:PORT`: the VM's state and migration counters for Prometheus.

`GET /metrics` answers the Prometheus text exposition format (version 0.0.4): `# HELP` and
`# TYPE` lines, then `name{label="value"} number`. Written by hand: the format is a few lines
of text, and a client library would bring a process-global registry for a handful of values
read from `query-status` / `query-migrate` at scrape time.

Names follow Prometheus conventions: a `vmferry_` prefix, base units in the name (`_bytes`,
`_seconds`), `_total` on counters. Migration values are those of the current or last migration
(what `query-migrate` reports): a new migration starts them from zero again, which Prometheus
reads as a counter reset.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from vmferry import __version__
from vmferry.errors import VmferryError
from vmferry.migration.state import MigrationStatus

log = logging.getLogger("vmferry.monitor")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RUN_STATES = ("running", "paused", "inmigrate", "finish-migrate", "postmigrate", "shutdown")

# (name, type, help, query-migrate key path, scale)
_MIGRATION_METRICS: tuple[tuple[str, str, str, tuple[str, ...], float], ...] = (
    ("vmferry_migration_transferred_bytes_total", "counter",
     "Bytes of the migration stream written (source) or received (destination).", ("ram", "transferred"), 1),
    ("vmferry_migration_normal_pages_total", "counter", "Pages sent with their contents.",
     ("ram", "normal"), 1),
    ("vmferry_migration_zero_pages_total", "counter", "Zero pages sent as runs.", ("ram", "duplicate"), 1),
    ("vmferry_migration_dirty_syncs_total", "counter", "Dirty log syncs (dirty-sync-count).",
     ("ram", "dirty-sync-count"), 1),
    ("vmferry_migration_unpopulated_pages", "gauge", "Pages never populated, skipped without being sent.",
     ("ram", "unpopulated"), 1),
    ("vmferry_migration_remaining_bytes", "gauge", "Bytes still dirty after the last sync.",
     ("ram", "remaining"), 1),
    ("vmferry_migration_bandwidth_bytes_per_second", "gauge", "End-to-end bandwidth over the passes.",
     ("convergence", "bandwidth-bytes-per-second"), 1),
    ("vmferry_migration_dirty_rate_bytes_per_second", "gauge", "Rate at which the guest dirties memory.",
     ("convergence", "dirty-rate-bytes-per-second"), 1),
    ("vmferry_migration_expected_downtime_seconds", "gauge", "Expected pause if switching over now.",
     ("expected-downtime",), 1e-3),
    ("vmferry_migration_downtime_seconds", "gauge", "Pause of the completed migration.", ("downtime",), 1e-3),
    ("vmferry_migration_total_time_seconds", "gauge", "Time since the migration started, or its total.",
     ("total-time",), 1e-3),
)


def _lookup(info: dict, path: tuple[str, ...]) -> float | None:
    value: object = info
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None  # expected-downtime is -1 when unbounded: no sample rather than a lie
    return float(value)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def render(status: dict, migration: dict, *, ram_bytes: int, vcpus: int) -> str:
    """The exposition text for one scrape."""
    out: list[str] = []

    def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {doc}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

    metric("vmferry_info", "gauge", "vmferry version (always 1).", [(f'{{version="{__version__}"}}', 1)])
    state = str(status.get("status", ""))
    states = RUN_STATES if state in RUN_STATES else (*RUN_STATES, state)
    metric("vmferry_vm_state", "gauge", "1 for the VM's run state (query-status), 0 for the others.",
           [(f'{{state="{s}"}}', 1 if s == state else 0) for s in states])
    metric("vmferry_vm_running", "gauge", "1 while the vCPUs run.", [("", 1 if status.get("running") else 0)])
    metric("vmferry_vm_ram_bytes", "gauge", "Guest RAM size.", [("", ram_bytes)])
    metric("vmferry_vm_vcpus", "gauge", "Number of vCPUs.", [("", vcpus)])
    mig = str(migration.get("status", "none"))
    metric("vmferry_migration_status", "gauge", "1 for the last migration's status (query-migrate).",
           [(f'{{status="{s}"}}', 1 if s == mig else 0) for s in MigrationStatus])
    for name, kind, doc, path, scale in _MIGRATION_METRICS:
        v = _lookup(migration, path)
        if v is not None:
            metric(name, kind, doc, [("", v * scale)])
    return "\n".join(out) + "\n"


class MetricsServer:
    """An HTTP server on its own threads; `collect()` is called per scrape and must be cheap."""

    def __init__(self, address: str, collect: Callable[[], str]) -> None:
        host, port = _parse(address)
        collect_fn = collect

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = collect_fn().encode()
                except Exception as e:  # noqa: BLE001 - a scrape must get an answer, not a reset
                    log.exception("metrics collection failed")
                    self.send_error(500, f"metrics collection failed: {e}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("metrics: " + format, *args)

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise VmferryError(f"--metrics {address}: cannot listen: {e.strerror or e}") from None
        self._httpd.daemon_threads = True
        bound_host, bound_port = self._httpd.server_address[:2]
        self.address = f"tcp:{bound_host}:{bound_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def _parse(address: str) -> tuple[str, int]:
    if not address.startswith("tcp:"):
        raise VmferryError(f"--metrics {address}: expected tcp:HOST:PORT")
    host, sep, port = address[4:].rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise VmferryError(f"--metrics {address}: expected tcp:HOST:PORT with a port number")
    return host.strip("[]") or "127.0.0.1", int(port)
