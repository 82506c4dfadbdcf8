"""Driving a migration over QMP: start it, show live progress, report. `vmferry migrate`.

The display polls `query-migrate` on the source (and the destination when given) every 100 ms;
everything shown is what QMP reports, so it is exactly what any management tool would see.
"""

from __future__ import annotations

import argparse
import os
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


def run_forecast(src: QmpClient, bandwidth: int | None, console: Console) -> dict[str, Any] | None:
    """Measure the dirty rate for a second (dirty-bitmap), then ask for the forecast. A forecast
    that cannot be made (no bandwidth known) is said, and the migration goes on."""
    try:
        src.execute("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-bitmap"})
        deadline = time.monotonic() + 60
        while (info := src.execute("query-dirty-rate"))["status"] != "measured":
            if time.monotonic() > deadline:
                raise MigrationError("the dirty rate measurement did not finish within 60 s")
            time.sleep(POLL_S)
        args = {} if bandwidth is None else {"bandwidth": bandwidth}
        f = src.execute("x-migrate-forecast", **args)
    except QmpError as e:
        console.print(f"[yellow]no forecast: {e}")
        return None
    t = Table(title="forecast", show_header=False)
    inputs = f["inputs"]
    t.add_row("inputs", f"{_mib(inputs['initial-bytes'])} populated, dirtied at "
              f"{_mib(inputs['dirty-rate'])}/s (measured {info['dirty-rate']} MiB/s), bandwidth "
              f"{_mib(inputs['bandwidth'])}/s, downtime-limit {inputs['downtime-limit']} ms")
    if f["converges"]:
        t.add_row("verdict", f"converges in {f['passes']} passes")
        t.add_row("total time", f"{f['total-time-ms']:.0f} ms")
        t.add_row("bytes", _mib(f["total-bytes"]))
        t.add_row("pause", f"{f['downtime-ms']:.1f} ms")
    else:
        t.add_row("verdict", "[red]does not converge")
        need = f.get("bandwidth-needed")
        t.add_row("would converge with", " or ".join(x for x in (
            f"bandwidth {_mib(need)}/s" if need else "",
            f"downtime-limit {f['downtime-limit-needed']:.0f} ms" if f.get("downtime-limit-needed") else "",
            f"a {f['throttle-percent-needed']} % cut of the dirty rate" if f.get("throttle-percent-needed")
            else "") if x) or "nothing precopy can do")
    console.print(t)
    return f


def compare_forecast(f: dict[str, Any], info: dict[str, Any], console: Console) -> None:
    t = Table(title="forecast against what happened")
    for col in ("", "forecast", "actual"):
        t.add_column(col)
    done = info.get("status") == "completed"
    t.add_row("converged", str(f["converges"]), str(done))
    if done:
        t.add_row("passes", str(f["passes"]), str(len(info.get("passes", []))))
        # The forecast counts setup as the last migration measured it (0 when none did).
        setup = f.get("inputs", {}).get("setup-ms", 0)
        t.add_row("time", f"{f['total-time-ms'] or 0:.0f} ms (setup {setup:.0f})",
                  f"{info.get('total-time', 0)} ms (setup {info.get('setup-time', 0)})")
        ram = info.get("ram", {})
        t.add_row("page bytes", _mib(f["total-bytes"]), _mib(ram.get("normal-bytes", 0)))
        t.add_row("pause", f"{f['downtime-ms']:.1f} ms", f"{info.get('downtime', 0)} ms")
    console.print(t)


def destination_trace_path(path: str) -> str:
    """Where the destination's trace goes beside the source's: a.jsonl -> a.destination.jsonl."""
    root, ext = os.path.splitext(path)
    return f"{root}.destination{ext or '.jsonl'}"


def main_migrate(args: argparse.Namespace) -> int:
    console = Console()
    src = QmpClient(args.qmp)
    dst = QmpClient(args.dest_qmp) if args.dest_qmp else None
    params: dict[str, object] = {}
    if args.max_bandwidth is not None:
        params["max-bandwidth"] = args.max_bandwidth
    if args.downtime_limit is not None:
        params["downtime-limit"] = args.downtime_limit
    if args.trace:
        # Each VM process writes its trace on its own host; absolute, whatever its working directory.
        path = os.path.abspath(args.trace)
        params["x-trace-file"] = path
        if dst is not None:
            dst.execute("migrate-set-parameters", **{"x-trace-file": destination_trace_path(path)})
    if params:
        src.execute("migrate-set-parameters", **params)
    predicted = run_forecast(src, args.forecast_bandwidth, console) if args.forecast else None
    try:
        if getattr(args, "blk", False):
            src.execute("migrate", uri=args.uri, blk=True)
        else:
            src.execute("migrate", uri=args.uri)
    except QmpError as e:
        raise MigrationError(f"migrate {args.uri}: {e}") from None
    out = watch(src, dst, console)
    report(out, console)
    if predicted is not None:
        compare_forecast(predicted, out.source, console)
    return 0 if out.source.get("status") == "completed" else 1
