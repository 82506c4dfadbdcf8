"""Live migration, vmferry against QEMU, side by side on the same guest image and parameters.

Scenarios (bench: /work/shared/BENCHMARKS.md, guest: guests/README.md). Every scenario runs the
bundled `dirty` guest, so each side can prove the destination got intact memory: the destination's
guest must print `verify ok` (its in-guest check of every page) after switchover.

  S1   1 GiB, idle: `dirty` with ws=1 rate=0 (1 MiB written once, then static)
  S2   4 GiB, idle: the same guest, 4 GiB of RAM
  S3   4 GiB, 1 GiB written, then static: ws=1024 rate=0
  S4   4 GiB, 1 GiB dirtied at 50 MiB/s: ws=1024 rate=50
  S5   4 GiB, 1 GiB dirtied at 200 MiB/s: ws=1024 rate=200
  S5d  S5 with each side's DEFAULT max-bandwidth (QEMU 7.2: 128 MiB/s; vmferry: unlimited),
       given --capped-timeout seconds (default 60) to converge, then `migrate_cancel`; one run
       per side (--capped-runs)

Sides: `vmferry` (`python -m vmferry run` source and destination), and QEMU 7.2 with the
accelerators of --qemu-accel: `qemu-kvm` (the default baseline: the same accelerator as vmferry)
and/or `qemu-tcg`. Each side migrates over loopback TCP with its own defaults except
`max-bandwidth`, raised to 100 GiB/s with `migrate-set-parameters` (QEMU's default is 128 MiB/s,
vmferry's unlimited). QEMU under TCG runs S4/S5 with `-m 4194296k` (4 GiB - 8 KiB: QEMU 7.2's
TCG dirty-bitmap bug loses pages of a dirtying guest whose RAM is a multiple of 256 KiB; see
BENCHMARKS.md); everything else runs as given.

Dirtying guests (S4, S5, S5d) verify every --verify-dirtying (20) seconds, the others every --verify
(2): the guest does not write while it verifies, so a verify pass inside a migration is a quiet
window in which either side converges at once, and the switchover it allows is invisible to the
guest's stall= (measured 2026-12-06 with verify=2 everywhere: 4 of 5 vmferry S5 runs and all 10
QEMU+KVM S4/S5 runs switched over inside a verify pass). The migration starts right after the
first `verify ok` that follows the fill, so with 20 s it runs between two verify passes.

Each run: start the source, wait for `dirty: filled` and the first `verify ok` after it (and, for
dirtying guests, progress lines to measure the guest's real write rate), start the destination,
`migrate`, poll `query-migrate` on the source every 20 ms until it ends, then wait for the
destination's guest to print `verify ok` (and no `FAIL`) and its first progress line. Reported:
- from the source's final `query-migrate`: total-time, downtime (vmferry's ends when the
  destination runs the guest and has said so; QEMU's when its source has sent the last byte),
  setup-time, ram.transferred, ram.dirty-sync-count (passes);
- guest stall: the pause as the guest saw it, the `stall=N us` of the destination guest's first
  progress line (its longest gap since its previous line, which the source printed; by its TSC,
  which under KVM is the host's and keeps counting through the pause; QEMU's TCG TSC showed the
  pause too on this one-host setup, measured 2026-12-06). A switchover that lands in the
  guest's verify pass is not a stall to it: those runs have no stall (the column's count is lower
  than the runs'; `stall_note` in the JSON). `stall_src_max_ms` in the JSON
  is the longest stall the source's guest printed while migrating, for comparison;
- expected: the expected downtime at switchover, `expected-downtime-at-switchover` of the final
  `query-migrate` when the side reports it, else the `expected-downtime` of the last pass in its
  `passes` list (vmferry), else the last `expected-downtime` polled before the end (QEMU 7.2 reports
  its downtime-limit until it has measured a dirty rate: 300 on static guests); `expected_from`
  in the JSON says which;
- wall time from `migrate` to the poll that saw the end, the guest's write rate before and while
  migrating (wall clock, from its progress lines) and the highest dirty rate the migration reported.
Medians with [min-max] over --runs, sides interleaved; ratios are vmferry median / QEMU median.
With S3 selected, each repetition also measures the machine's limit for S3's bulk (limit_copy.py:
1 GiB socket copy into fresh memory, 4 KiB pages and MADV_HUGEPAGE) and reports S3 against it.
Every child process has its own process group and is killed on every way out (bench_procs.py).
The VM processes are in migration_vm.py, the tables in migration_report.py.

  python bench/bench_migration.py [--runs 5] [--scenarios S1,S2,S3,S4,S5,S5d]
                                  [--qemu-accel kvm|tcg|kvm,tcg] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import migration_report as report
from bench_procs import install_signal_handlers, stop_all
from limit_copy import measure as measure_limit
from migration_vm import BenchError, Vm, free_port, incoming_uri, vms
from qemu_trace import QemuTrace

MiB = 1 << 20
GiB = 1 << 30
UNCAPPED = 100 * GiB  # bytes/s: "neither side is capped"
QEMU_ACCELS = ("kvm", "tcg")
POLL_S = 0.02
LIMIT_KINDS = {"4k": False, "thp": True}  # limit row kind -> MADV_HUGEPAGE on the receiver


@dataclass(frozen=True)
class Scenario:
    id: str
    desc: str
    memory: str  # `-m` for vmferry and QEMU+KVM
    tcg_memory: str  # `-m` for QEMU+TCG
    guest: str  # `dirty` parameters (verify= is added)
    rate: int  # MiB/s the guest is asked to dirty
    capped: bool = False  # keep the default max-bandwidth and give up after --capped-timeout


SCENARIOS: dict[str, Scenario] = {
    s.id: s
    for s in (
        Scenario("S1", "1 GiB idle (dirty ws=1 rate=0)", "1G", "1G", "ws=1 rate=0", 0),
        Scenario("S2", "4 GiB idle (dirty ws=1 rate=0)", "4G", "4G", "ws=1 rate=0", 0),
        Scenario("S3", "4 GiB, 1 GiB written then static", "4G", "4G", "ws=1024 rate=0", 0),
        Scenario("S4", "4 GiB, 1 GiB dirtied at 50 MiB/s", "4G", "4194296k", "ws=1024 rate=50", 50),
        Scenario("S5", "4 GiB, 1 GiB dirtied at 200 MiB/s", "4G", "4194296k", "ws=1024 rate=200", 200),
        Scenario("S5d", "S5, each side's default max-bandwidth", "4G", "4194296k", "ws=1024 rate=200",
                 200, capped=True),
    )
}

def dirty_rate_seen(info: dict[str, Any]) -> float:
    """Dirty rate (MiB/s) the migration itself reported in one query-migrate answer."""
    rates = [info.get("ram", {}).get("dirty-pages-rate", 0)]
    rates += [p.get("dirty-pages-rate", 0) for p in info.get("passes", [])]
    page = info.get("ram", {}).get("page-size", 4096) or 4096
    return max(rates) * page / MiB


def migrate(src: Vm, uri: str, limit_s: float, res: dict[str, Any],
            on_sample: Callable[[dict[str, Any], float], None] = lambda info, t: None,
            ) -> tuple[dict[str, Any], float, float]:
    """Start the migration, poll it to its end; returns the final query-migrate, t0 and wall
    seconds. `on_sample(answer, seconds since migrate)` sees every polled answer."""
    t0 = time.monotonic()
    src.cmd("migrate", uri=uri)
    seen_rate = 0.0
    limit = limit_s
    while True:
        info = src.cmd("query-migrate")
        on_sample(info, time.monotonic() - t0)
        src.serial()  # timestamps the guest's progress lines while it migrates
        seen_rate = max(seen_rate, dirty_rate_seen(info))
        status = info.get("status")
        if status in ("completed", "failed", "cancelled"):
            break
        expected = info.get("expected-downtime")
        if status == "active" and isinstance(expected, int | float) and expected >= 0:
            res["expected_ms"], res["expected_from"] = expected, "last-sampled"
        if time.monotonic() - t0 > limit:
            res["gave_up_after_s"] = limit
            res["info_at_timeout"] = info
            src.cmd("migrate_cancel")
            limit = float("inf")  # now wait for the cancel to land
        time.sleep(POLL_S)
    passes = [p for p in info.get("passes", []) if "expected-downtime" in p]
    if "expected-downtime-at-switchover" in info:
        res["expected_ms"] = info["expected-downtime-at-switchover"]
        res["expected_from"] = "at-switchover"
    elif passes:  # vmferry: the estimate of the pass whose end decided the switchover
        res["expected_ms"] = passes[-1]["expected-downtime"]
        res["expected_from"] = "last-pass"
    res["dirty_rate_seen_mibs"] = round(seen_rate, 1)
    return info, t0, time.monotonic() - t0


def run_once(side: str, sc: Scenario, tmp: Path, verify_s: int, timeout: float,
             trace: Path | None = None) -> dict[str, Any]:
    """One migration; with `trace`, the source's trace (docs/trace.md) is written there: vmferry's
    own (x-trace-file), or QEMU's made from the polled query-migrate answers (qemu_trace.py)."""
    append = f"{sc.guest} verify={verify_s}"
    mem = sc.tcg_memory if side == "qemu-tcg" else sc.memory
    res: dict[str, Any] = {"side": side, "scenario": sc.id, "memory": mem, "append": append}
    with vms() as started:
        src = Vm(side, tmp, "src", mem, append)
        started.append(src)
        src.connect()
        filled = src.wait_serial(r"dirty: filled \d+ pages", timeout=300)
        t_filled = time.monotonic()
        src.wait_serial(r"verify ok gen=\d+", timeout=verify_s + 120, after=filled.end())
        if sc.rate:
            src.wait_progress(3, t_filled, timeout=60)
            rate = src.write_rate(t_filled)
            res["guest_rate_mibs"] = round(rate, 1) if rate is not None else None
        port = free_port() if side.startswith("qemu") else None
        dst = Vm(side, tmp, "dst", mem, append,
                 incoming=f"tcp:127.0.0.1:{port}" if port else "tcp:127.0.0.1:0")
        started.append(dst)
        dst.connect()
        uri = incoming_uri(dst, port)
        if not sc.capped:
            src.cmd("migrate-set-parameters", **{"max-bandwidth": UNCAPPED})
        res["max_bandwidth"] = src.cmd("query-migrate-parameters")["max-bandwidth"]
        n_before = len(src.progress)
        qemu_trace = None
        if trace is not None and side == "vmferry":
            src.cmd("migrate-set-parameters", **{"x-trace-file": str(trace)})
        elif trace is not None:
            qemu_trace = QemuTrace(trace, parse_size(mem))
        info, t0, wall = migrate(src, uri, timeout, res,
                                 qemu_trace.sample if qemu_trace else lambda info, t: None)
        if qemu_trace is not None:
            qemu_trace.close(info)
        if trace is not None:
            res["trace"] = str(trace)
        src_stalls = [s for _, _, s in src.progress[n_before:] if s is not None]
        if src_stalls:
            res["stall_src_max_ms"] = max(src_stalls) / 1000
        if sc.rate:
            rate = src.write_rate(t0, t0 + wall)
            res["guest_rate_during_mibs"] = round(rate, 1) if rate is not None else None
        ram = info.get("ram", {})
        res.update(
            status=info["status"], wall_ms=round(wall * 1000, 1), total_ms=info.get("total-time"),
            downtime_ms=info.get("downtime"), setup_ms=info.get("setup-time"),
            transferred_mib=round(ram.get("transferred", 0) / MiB, 1),
            passes=ram.get("dirty-sync-count"), mbps=ram.get("mbps"),
            error=info.get("error-desc"), final_info=info,
        )
        if "gave_up_after_s" in res:
            last = res["info_at_timeout"].get("ram", {})
            res.update(transferred_mib=round(last.get("transferred", 0) / MiB, 1),
                       passes=last.get("dirty-sync-count"), total_ms=res["info_at_timeout"].get("total-time"),
                       remaining_mib=round(last.get("remaining", 0) / MiB, 1))
        if info["status"] != "completed":
            # The source must survive a migration that did not happen.
            mark = len(src.serial())
            try:
                src.wait_serial(r"verify ok gen=\d+", timeout=verify_s + 60, after=mark)
                res["source_after"] = "verify ok"
            except BenchError as e:
                res["source_after"] = f"no verify ok: {str(e)[:300]}"
            return res
        check_destination(dst, verify_s, res)
    return res


def check_destination(dst: Vm, verify_s: int, res: dict[str, Any]) -> None:
    """The destination runs, its guest checks every page, and its first progress line has the stall."""
    try:
        if dst.side.startswith("qemu"):
            deadline = time.monotonic() + 30
            while dst.cmd("query-status")["status"] != "running":
                if time.monotonic() > deadline:
                    raise BenchError(f"{dst.name}: not running 30 s after completion")
                time.sleep(0.02)
        m = dst.wait_serial(r"verify (ok|FAIL)[^\n]*\n", timeout=verify_s + 120)
        res["dest_verify"] = m.group(0).strip()
        if "FAIL" in dst.serial():
            res["dest_verify"] = "FAIL: " + dst.serial()[-300:]
    except BenchError as e:
        res["dest_verify"] = f"FAIL: {str(e)[:500]}"
    res["dest_ok"] = res["dest_verify"].startswith("verify ok")
    try:
        dst.wait_progress(1, 0.0, timeout=15)
        stall = dst.progress[0][2]
        text = dst.serial()
        if "verify " in text[:text.find("dirty: t=")]:
            # The guest's own checking is not a stall to it (guests/dirty.c): a switchover during
            # its verify pass is invisible to stall=, which then says nothing about the pause.
            res["stall_note"] = "switchover during the guest's verify pass: not in stall="
        elif stall is not None:
            res["stall_ms"] = stall / 1000
    except BenchError as e:
        res["stall_error"] = str(e)[:300]


def machine_info() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    qemu_ver = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                              text=True).stdout.splitlines()[0]
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "qemu": qemu_ver,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": os.getloadavg()}


BRIEF = ("status", "total_ms", "downtime_ms", "stall_ms", "expected_ms", "expected_from", "setup_ms",
         "transferred_mib", "passes", "wall_ms", "guest_rate_mibs", "guest_rate_during_mibs",
         "dirty_rate_seen_mibs", "stall_src_max_ms", "dest_verify", "source_after", "error", "stall_error",
         "stall_note")


def run_all(args: argparse.Namespace, ids: list[str], sides: list[str],
            limit_runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        tmpdir = (str(args.keep) if args.keep else
                  stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-migration-")))
        for sid in ids:
            sc = SCENARIOS[sid]
            per: dict[str, dict[str, Any]] = {side: {"runs": []} for side in sides}
            results[sid] = per
            runs = args.capped_runs if sc.capped else args.runs
            timeout = args.capped_timeout if sc.capped else args.timeout
            for rep in range(runs):
                for side in sides:  # interleaved, so load drift hits both sides alike
                    tmp = Path(tempfile.mkdtemp(prefix=f"{sid}-{side}-{rep}-", dir=tmpdir))
                    try:
                        verify_s = args.verify_dirtying if sc.rate else args.verify
                        trace = args.traces / f"{sid}-{side}-{rep + 1}.jsonl" if args.traces else None
                        r = run_once(side, sc, tmp, verify_s, timeout, trace)
                    except BenchError as e:
                        r = {"side": side, "scenario": sid, "status": "error", "error": str(e)}
                    per[side]["runs"].append(r)
                    brief = {k: r[k] for k in BRIEF if r.get(k) is not None}
                    print(f"{sid} {side} run {rep + 1}: {json.dumps(brief)}", file=sys.stderr, flush=True)
                if sid == "S3" and not args.no_limit:  # the limit in the same run, interleaved with S3
                    for kind, huge in LIMIT_KINDS.items():
                        lr = measure_limit(1024, huge)
                        limit_runs[kind].append(lr)
                        print(f"limit {kind} run {rep + 1}: {json.dumps(lr)}", file=sys.stderr, flush=True)
            for side in sides:
                per[side]["summary"] = report.summarize(per[side]["runs"])
            if args.traces:
                draw_traces(args.traces, sid, per)
    return results


def draw_traces(where: Path, sid: str, per: dict[str, dict[str, Any]]) -> None:
    """One report per scenario: the first completed run of every side, overlaid."""
    from vmferry.report import write_report  # this checkout's vmferry (PYTHONPATH=src)

    traces = [next((r["trace"] for r in d["runs"] if r.get("status") == "completed" and "trace" in r), None)
              for d in per.values()]
    traces = [t for t in traces if t]
    if traces:
        out = write_report(traces, where / f"{sid}.html")
        print(f"{sid}: report {out}", file=sys.stderr, flush=True)


def parse_size(mem: str) -> int:
    """`-m` sizes as the benchmark writes them: 1G, 4G, 4194296k."""
    units = {"k": 1 << 10, "M": MiB, "G": GiB}
    return int(mem[:-1]) * units[mem[-1]] if mem[-1] in units else int(mem) * MiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5,
                    help="repetitions per scenario and side (issue 9's targets want ≥ 5)")
    ap.add_argument("--scenarios", default="S1,S2,S3,S4,S5,S5d")
    ap.add_argument("--sides", default="qemu,vmferry")
    ap.add_argument("--qemu-accel", default="kvm",
                    help="QEMU's accelerator(s): kvm (default, as vmferry), tcg, or kvm,tcg for both")
    ap.add_argument("--verify", type=int, default=2, help="guest's verify= period, seconds")
    ap.add_argument("--verify-dirtying", type=int, default=20,
                    help="verify= period of dirtying guests (S4, S5, S5d), seconds: longer than a "
                    "migration, so that no verify pass (a pause in the guest's writes) falls inside it")
    ap.add_argument("--timeout", type=float, default=120, help="uncapped migration give-up time, s")
    ap.add_argument("--capped-timeout", type=float, default=60, help="S5d give-up time, s")
    ap.add_argument("--capped-runs", type=int, default=1)
    ap.add_argument("--no-limit", action="store_true", help="skip the limit row measured with S3")
    ap.add_argument("--json", type=Path, help="write every run and the summaries here")
    ap.add_argument("--traces", type=Path, help="write each run's source trace (docs/trace.md) into this "
                    "(existing) directory, QEMU's made from its polled query-migrate, and one "
                    "`vmferry report` per scenario overlaying the sides (SID.html)")
    ap.add_argument("--keep", type=Path, help="keep each run's consoles, logs and QMP sockets in this "
                    "(existing) directory instead of a temporary one")
    args = ap.parse_args()
    ids = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    accels = [a.strip() for a in args.qemu_accel.split(",") if a.strip()]
    sides: list[str] = []
    for sid in ids:
        if sid not in SCENARIOS:
            ap.error(f"unknown scenario {sid}; known: {', '.join(SCENARIOS)}")
    for accel in accels:
        if accel not in QEMU_ACCELS:
            ap.error(f"unknown --qemu-accel {accel}; known: {', '.join(QEMU_ACCELS)}")
    for side in (s.strip() for s in args.sides.split(",") if s.strip()):
        if side == "qemu":
            sides += [f"qemu-{a}" for a in accels]
        elif side == "vmferry":
            sides.append(side)
        else:
            ap.error(f"unknown side {side}; known: qemu, vmferry")
    if any(s.startswith("qemu") for s in sides) and not shutil.which("qemu-system-x86_64"):
        ap.error("qemu-system-x86_64 not found")

    install_signal_handlers()
    info = machine_info()
    print(f"# {info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}, {info['qemu']}, "
          f"Python {info['python']}, {info['date']}, runs={args.runs}, "
          f"verify={args.verify} (dirtying: {args.verify_dirtying}), sides={','.join(sides)}", flush=True)
    limit_runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in LIMIT_KINDS}
    try:
        results = run_all(args, ids, sides, limit_runs)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        raise
    finally:
        stop_all()
    info["loadavg_end"] = os.getloadavg()
    limits = report.limit_summary(limit_runs)
    if args.json:  # first, so a table that fails to print loses nothing
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"json": str(args.json)},
                                         "results": results, "limit": limit_runs,
                                         "limit_summary": limits}, indent=1, default=str))
    print(f"# load average (1 min) at start {info['loadavg'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}")
    print()
    for sid in ids:
        print(f"- {sid}: {SCENARIOS[sid].desc}")
    print()
    capped = {sid for sid in ids if SCENARIOS[sid].capped}
    print(report.results_table(results, capped))
    over = report.s3_over_limit(results, limits)
    if limits:
        print()
        print(report.limit_table(limits, over))
    print()
    print(report.targets_table(results, over))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        sys.exit(f"bench_migration: stopped ({e or 'Ctrl-C'}); every process it started was stopped")
