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

QEMU side: `qemu-system-x86_64 -accel tcg` (this host has no usable nested VMX for QEMU), its own
migration over loopback TCP, `max-bandwidth` raised to 100 GiB/s with `migrate-set-parameters`.
QEMU runs S4/S5 with `-m 4194296k` (4 GiB - 8 KiB: QEMU 7.2's dirty-bitmap bug loses pages of a
dirtying guest whose RAM is a multiple of 256 KiB; see BENCHMARKS.md), everything else as given.
vmferry side: `python -m vmferry run` source and destination processes, vmferry's default
migration parameters except `max-bandwidth`, raised the same way (vmferry's default is
unlimited, unlike QEMU's 128 MiB/s). The guest runs under KVM there (its page writes are native
CPL3 stores) and under TCG for QEMU: the same program, not the same CPU speed.

Each run: start the source, wait for `dirty: filled` and the first `verify ok` after it (and, for
dirtying guests, two progress lines to measure the guest's real write rate), start the
destination, `migrate`, poll `query-migrate` on the source every 20 ms until it ends, then wait
for the destination's guest to print `verify ok` (and no `FAIL`). Reported from the source's final
`query-migrate`: total-time, downtime, setup-time, ram.transferred, ram.dirty-sync-count
(passes); plus the wall time from `migrate` to the poll that saw the end, the guest's write rate
before migrating (wall clock, from its progress lines) and the highest dirty rate the migration
itself reported. Medians with [min-max] over --runs; ratios are vmferry median / QEMU median.

  python bench/bench_migration.py [--runs 3] [--scenarios S1,S2,S3,S4,S5,S5d] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from vmferry.guests import image_path

MiB = 1 << 20
GiB = 1 << 30
UNCAPPED = 100 * GiB  # bytes/s: "neither side is capped"
SIDES = ("qemu", "vmferry")
POLL_S = 0.02


@dataclass(frozen=True)
class Scenario:
    id: str
    desc: str
    vmferry_mem: str  # vmferry `-m`
    qemu_mem: str  # qemu `-m`
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

PROGRESS_RX = re.compile(r"dirty: t=(\d+) gen=\d+ written=(\d+) MiB")


class BenchError(Exception):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Vm:
    """One VM process (QEMU or vmferry) with a QMP socket and its COM1 output in a file."""

    def __init__(self, side: str, tmp: Path, name: str, memory: str, append: str,
                 incoming: str | None = None) -> None:
        self.side = side
        self.name = f"{side}-{name}"
        self.qmp_path = tmp / f"{self.name}.qmp"
        self.serial_path = tmp / f"{self.name}.serial"
        self.log_path = tmp / f"{self.name}.log"
        self.progress: list[tuple[float, int]] = []  # (monotonic time seen, MiB written)
        self._seen = 0
        if side == "qemu":
            cmd = ["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none",
                   "-m", memory, "-kernel", str(image_path("dirty")), "-append", append,
                   "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                   "-serial", f"file:{self.serial_path}",
                   "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
            if incoming:
                cmd += ["-incoming", incoming]
        else:
            cmd = [sys.executable, "-m", "vmferry", "run", "-m", memory,
                   "--qmp", f"unix:{self.qmp_path}", "--serial", f"file:{self.serial_path}"]
            cmd += ["--incoming", incoming] if incoming else ["--guest", "dirty", "--append", append]
        self.cmd_line = cmd
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.qmp: QEMUMonitorProtocol | None = None
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no QMP socket after 30 s: {self.log()[-2000:]}")
            time.sleep(0.02)
        self.qmp = QEMUMonitorProtocol(str(self.qmp_path))
        self.qmp.connect(negotiate=True)
        self.qmp.settimeout(60)

    def cmd(self, name: str, **args: Any) -> Any:
        assert self.qmp is not None
        reply = self.qmp.cmd_raw(name, args or None)
        if "error" in reply:
            raise BenchError(f"{self.name}: {name}: {reply['error']['class']}: {reply['error']['desc']}")
        return reply["return"]

    def serial(self) -> str:
        try:
            text = self.serial_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        now = time.monotonic()
        for m in PROGRESS_RX.finditer(text, self._seen):
            self.progress.append((now, int(m.group(2))))
            self._seen = m.end()
        return text

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serial(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.serial()
            m = rx.search(text, after)
            if m:
                return m
            if "FAIL" in text:
                raise BenchError(f"{self.name}: guest reported a failure: {text[-1500:]}")
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no /{pattern}/ after {timeout} s (exit {self.proc.poll()})"
                                 f":\n{text[-1500:]}\n--- log:\n{self.log()[-1500:]}")
            time.sleep(0.05)

    def wait_progress(self, lines: int, after_time: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for t, _ in self.progress if t >= after_time) < lines:
            self.serial()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name}: fewer than {lines} progress lines after {timeout} s")
            time.sleep(0.05)

    def write_rate(self, since: float, until: float = float("inf")) -> float | None:
        """MiB/s the guest wrote in wall-clock time, from progress lines seen in [since, until]."""
        pts = [(t, w) for t, w in self.progress if since <= t <= until]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    def close(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def vms() -> Iterator[list[Vm]]:
    started: list[Vm] = []
    try:
        yield started
    finally:
        for vm in reversed(started):
            vm.close()


def incoming_uri(dst: Vm, qemu_port: int | None) -> str:
    if qemu_port is not None:
        return f"tcp:127.0.0.1:{qemu_port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"incoming migration on (\S+)", dst.log())
        if m:
            return m.group(1)
        if dst.proc.poll() is not None:
            break
        time.sleep(0.02)
    raise BenchError(f"{dst.name} never listened: {dst.log()[-2000:]}")


def dirty_rate_seen(info: dict[str, Any], side: str) -> float:
    """Dirty rate (MiB/s) the migration itself reported in one query-migrate answer."""
    rates = [info.get("ram", {}).get("dirty-pages-rate", 0)]
    rates += [p.get("dirty-pages-rate", 0) for p in info.get("passes", [])]
    page = info.get("ram", {}).get("page-size", 4096) or 4096
    return max(rates) * page / MiB


def run_once(side: str, sc: Scenario, tmp: Path, verify_s: int, timeout: float) -> dict[str, Any]:
    append = f"{sc.guest} verify={verify_s}"
    mem = sc.qemu_mem if side == "qemu" else sc.vmferry_mem
    res: dict[str, Any] = {"side": side, "scenario": sc.id, "memory": mem, "append": append}
    with vms() as started:
        src = Vm(side, tmp, "src", mem, append)
        started.append(src)
        filled = src.wait_serial(r"dirty: filled \d+ pages", timeout=300)
        t_filled = time.monotonic()
        src.wait_serial(r"verify ok gen=\d+", timeout=120, after=filled.end())
        if sc.rate:
            src.wait_progress(3, t_filled, timeout=60)
            rate = src.write_rate(t_filled)
            res["guest_rate_mibs"] = round(rate, 1) if rate is not None else None
        port = free_port() if side == "qemu" else None
        dst = Vm(side, tmp, "dst", mem, append,
                 incoming=f"tcp:127.0.0.1:{port}" if port else "tcp:127.0.0.1:0")
        started.append(dst)
        uri = incoming_uri(dst, port)
        if not sc.capped:
            src.cmd("migrate-set-parameters", **{"max-bandwidth": UNCAPPED})
        res["max_bandwidth"] = src.cmd("query-migrate-parameters")["max-bandwidth"]
        limit = timeout
        t0 = time.monotonic()
        src.cmd("migrate", uri=uri)
        seen_rate = 0.0
        while True:
            info = src.cmd("query-migrate")
            src.serial()  # timestamps the guest's progress lines while it migrates
            seen_rate = max(seen_rate, dirty_rate_seen(info, side))
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() - t0 > limit:
                res["gave_up_after_s"] = limit
                res["info_at_timeout"] = info
                src.cmd("migrate_cancel")
                limit = float("inf")  # now wait for the cancel to land
            time.sleep(POLL_S)
        wall = time.monotonic() - t0
        if sc.rate:
            rate = src.write_rate(t0, t0 + wall)
            res["guest_rate_during_mibs"] = round(rate, 1) if rate is not None else None
        ram = info.get("ram", {})
        res.update(
            status=info["status"], wall_ms=round(wall * 1000, 1), total_ms=info.get("total-time"),
            downtime_ms=info.get("downtime"), setup_ms=info.get("setup-time"),
            transferred_mib=round(ram.get("transferred", 0) / MiB, 1),
            passes=ram.get("dirty-sync-count"), mbps=ram.get("mbps"),
            dirty_rate_seen_mibs=round(seen_rate, 1), error=info.get("error-desc"),
            final_info=info,
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
        # Destination: running, and its guest checks every page of its working set.
        try:
            if side == "qemu":
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
    return res


# ---------------------------------------------------------------------------------------- report

METRICS = ("total_ms", "downtime_ms", "setup_ms", "transferred_mib", "passes", "wall_ms")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in runs if r["status"] == "completed"]
    out: dict[str, Any] = {"runs": len(runs), "completed": len(done),
                           "dest_ok": sum(1 for r in done if r.get("dest_ok"))}
    for k in METRICS + ("guest_rate_mibs", "guest_rate_during_mibs", "dirty_rate_seen_mibs"):
        vals = [r[k] for r in done if r.get(k) is not None]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def fmt(s: dict[str, Any], key: str, digits: int = 0) -> str:
    v = s.get(key)
    if not v:
        return "-"
    f = f"{{:.{digits}f}}"
    if v["min"] == v["max"]:
        return f.format(v["median"])
    return f"{f.format(v['median'])} [{f.format(v['min'])}-{f.format(v['max'])}]"


def rates(s: dict[str, Any]) -> str:
    if "guest_rate_mibs" not in s and "guest_rate_during_mibs" not in s:
        return "-"
    return f"{fmt(s, 'guest_rate_mibs')} / {fmt(s, 'guest_rate_during_mibs')}"


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    if key not in a or key not in b or not b[key]["median"]:
        return "-"
    return f"{a[key]['median'] / b[key]['median']:.2f}x"


def table(results: dict[str, dict[str, Any]]) -> str:
    head = ("| id | side | completed | total ms | downtime ms | setup ms | transferred MiB | passes "
            "| wall ms | guest MiB/s before / during | dest `verify ok` |")
    lines = [head, "|" + "---|" * 11]
    for sid, per in results.items():
        sc = SCENARIOS[sid]
        for side in SIDES:
            if side not in per:
                continue
            s = per[side]["summary"]
            if sc.capped:
                r = per[side]["runs"]
                comp = "; ".join(
                    f"{x['status']}" + (f" (gave up at {x['gave_up_after_s']:.0f} s, "
                                        f"{x.get('passes')} passes, {x['transferred_mib']:.0f} MiB sent, "
                                        f"{x.get('remaining_mib', 0):.0f} MiB left)"
                                        if "gave_up_after_s" in x else "") for x in r)
            else:
                comp = f"{s['completed']}/{s['runs']}"
            lines.append(
                f"| {sid} | {side} | {comp} | {fmt(s, 'total_ms')} | {fmt(s, 'downtime_ms')} | "
                f"{fmt(s, 'setup_ms')} | {fmt(s, 'transferred_mib')} | {fmt(s, 'passes')} | "
                f"{fmt(s, 'wall_ms')} | {rates(s)} | {s['dest_ok']}/{s['completed']} |")
        if all(side in per for side in SIDES) and not sc.capped:
            v, q = per["vmferry"]["summary"], per["qemu"]["summary"]
            lines.append(
                f"| {sid} | vmferry/QEMU | | {ratio(v, q, 'total_ms')} | {ratio(v, q, 'downtime_ms')} | "
                f"{ratio(v, q, 'setup_ms')} | {ratio(v, q, 'transferred_mib')} | | "
                f"{ratio(v, q, 'wall_ms')} | | |")
    return "\n".join(lines)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="repetitions per scenario and side")
    ap.add_argument("--scenarios", default="S1,S2,S3,S4,S5,S5d")
    ap.add_argument("--sides", default="qemu,vmferry")
    ap.add_argument("--verify", type=int, default=2, help="guest's verify= period, seconds")
    ap.add_argument("--timeout", type=float, default=120, help="uncapped migration give-up time, s")
    ap.add_argument("--capped-timeout", type=float, default=60, help="S5d give-up time, s")
    ap.add_argument("--capped-runs", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write every run and the summaries here")
    args = ap.parse_args()
    ids = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for sid in ids:
        if sid not in SCENARIOS:
            ap.error(f"unknown scenario {sid}; known: {', '.join(SCENARIOS)}")
    for side in sides:
        if side not in SIDES:
            ap.error(f"unknown side {side}")
    if "qemu" in sides and not shutil.which("qemu-system-x86_64"):
        ap.error("qemu-system-x86_64 not found")

    # SIGTERM/SIGHUP tear down like Ctrl-C: every VM process is closed by the context managers.
    def _stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)

    info = machine_info()
    print(f"# {info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}, {info['qemu']}, "
          f"Python {info['python']}, {info['date']}, runs={args.runs}, verify={args.verify}",
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-migration-") as tmpdir:
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
                        r = run_once(side, sc, tmp, args.verify, timeout)
                    except BenchError as e:
                        r = {"side": side, "scenario": sid, "status": "error", "error": str(e)}
                    per[side]["runs"].append(r)
                    brief = {k: r.get(k) for k in ("status", "total_ms", "downtime_ms", "setup_ms",
                                                   "transferred_mib", "passes", "wall_ms",
                                                   "guest_rate_mibs", "guest_rate_during_mibs",
                                                   "dirty_rate_seen_mibs",
                                                   "dest_verify", "source_after", "error")
                             if r.get(k) is not None}
                    print(f"{sid} {side} run {rep + 1}: {json.dumps(brief)}", file=sys.stderr, flush=True)
            for side in sides:
                per[side]["summary"] = summarize(per[side]["runs"])
    info["loadavg_end"] = os.getloadavg()
    print(f"# load average at start {info['loadavg'][0]:.1f}, at end {info['loadavg_end'][0]:.1f}")
    print()
    for sid in ids:
        print(f"- {sid}: {SCENARIOS[sid].desc}")
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
