"""Driving a migration over QMP: start it, show live progress, report. `vmferry migrate`.

The display polls `query-migrate` on the source (and the destination when given) every 100 ms;
everything shown is what QMP reports, so it is exactly what any management tool would see.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from vmferry.errors import MigrationError, QmpError
from vmferry.monitor.client import QmpClient

POLL_S = 0.1
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Outcome:
    source: dict[str, Any]
    destination: dict[str, Any] | None
    wall_s: float


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def progress_table(info: dict[str, Any], dest: dict[str, Any] | None) -> Table:
    ram = info.get("ram", {})
    t = Table(title="live migration", show_header=False, min_width=60)
    t.add_row("status", str(info.get("status")) + (f"  (destination: {dest.get('status')})" if dest else ""))
    t.add_row("pass", str(max(ram.get("dirty-sync-count", 0), 1)))
    t.add_row("transferred", _mib(ram.get("transferred", 0)))
    t.add_row("remaining", _mib(ram.get("remaining", 0)))
    t.add_row("bandwidth", f"{ram.get('mbps', 0) / 8:,.0f} MB/s")
    t.add_row("dirty rate", f"{ram.get('dirty-pages-rate', 0) * 4096 / 2**20:,.1f} MiB/s")
    disk = info.get("disk")
    if disk:
        t.add_row("disk", f"{_mib(disk.get('transferred', 0))} sent, {_mib(disk.get('remaining', 0))} "
                  f"remaining of {_mib(disk.get('total', 0))}")
    if "expected-downtime" in info:
        t.add_row("expected downtime", f"{info['expected-downtime']} ms")
    conv = info.get("convergence")
    if conv:
        t.add_row("convergence", conv["verdict"])
    return t


def watch(src: QmpClient, dst: QmpClient | None, console: Console, timeout_s: float = 600) -> Outcome:
    """Poll until the source's migration ends; returns the last query-migrate of each side."""
    start = time.monotonic()
    info: dict[str, Any] = {}
    dinfo: dict[str, Any] | None = None
    with Live(console=console, refresh_per_second=10, transient=False) as live:
        while True:
            info = src.execute("query-migrate")
            dinfo = dst.execute("query-migrate") if dst else None
            live.update(progress_table(info, dinfo))
            if info.get("status") in TERMINAL:
                break
            if time.monotonic() - start > timeout_s:
                raise MigrationError(f"migration still {info.get('status')} after {timeout_s:.0f} s")
            time.sleep(POLL_S)
    if dst is not None:
        # The destination confirms before the source completes; give its state a moment to settle.
        deadline = time.monotonic() + 10
        while dinfo is not None and dinfo.get("status") not in TERMINAL and time.monotonic() < deadline:
            time.sleep(POLL_S)
            dinfo = dst.execute("query-migrate")
    return Outcome(info, dinfo, time.monotonic() - start)


def report(out: Outcome, console: Console) -> Table:
    info, ram = out.source, out.source.get("ram", {})
    console.print()
    t = Table(title="migration report", show_header=False)
    t.add_row("status", info.get("status", "?"))
    if info.get("error-desc"):
        t.add_row("error", info["error-desc"])
    t.add_row("total time", f"{info.get('total-time', 0)} ms (setup {info.get('setup-time', 0)} ms)")
    if "downtime" in info:
        t.add_row("downtime (host)", f"{info['downtime']} ms: vCPUs paused on the source until the "
                  "destination confirmed it runs the guest")
    phases = info.get("downtime-phases")
    if phases:
        t.add_row("  of which", ", ".join(f"{k} {v:.1f} ms" for k, v in phases.items()))
    t.add_row("passes", str(len(info.get("passes", []))) + " + final")
    t.add_row("transferred", f"{_mib(ram.get('transferred', 0))} of {_mib(ram.get('total', 0))} guest RAM")
    t.add_row("pages", f"{ram.get('normal', 0):,} sent, {ram.get('duplicate', 0):,} zero, "
              f"{ram.get('unpopulated', 0):,} never populated (free)")
    secs = info.get("total-time", 0) / 1000
    if secs > 0:
        t.add_row("average bandwidth", f"{ram.get('transferred', 0) / secs / 1e6:,.0f} MB/s")
    for p in info.get("passes", []):
        t.add_row(f"  pass {p['pass']}", f"{p['pages']:,} pages in {p['duration-ms']:.0f} ms, "
                  f"{p['mbps'] / 8:,.0f} MB/s; {p['dirty-pages']:,} dirty after")
    console.print(t)
    return t


def main_migrate(args: argparse.Namespace) -> int:
    console = Console()
    src = QmpClient(args.qmp)
    dst = QmpClient(args.dest_qmp) if args.dest_qmp else None
    params: dict[str, int] = {}
    if args.max_bandwidth is not None:
        params["max-bandwidth"] = args.max_bandwidth
    if args.downtime_limit is not None:
        params["downtime-limit"] = args.downtime_limit
    if params:
        src.execute("migrate-set-parameters", **params)
    try:
        if getattr(args, "blk", False):
            src.execute("migrate", uri=args.uri, blk=True)
        else:
            src.execute("migrate", uri=args.uri)
    except QmpError as e:
        raise MigrationError(f"migrate {args.uri}: {e}") from None
    out = watch(src, dst, console)
    report(out, console)
    return 0 if out.source.get("status") == "completed" else 1
