"""The migration forecast (x-migrate-forecast) against what then happened, on the bench scenarios.

Per case (/work/shared/BENCHMARKS.md's S1-S5, vmferry only, plus S5N): start the `dirty` guest,
wait for it to fill its working set and vouch for it, then

  0  measure its dirty rate where it started (calc-dirty-rate, dirty-bitmap, --calc-time s) with
     the guest's own pace around the window (its progress lines): against its configured rate;
  A  migrate it to a first destination (no forecast): this measures the link, the setup, the
     time between passes and the pause's fixed part, as "the last migration to that
     destination" would (forecast.from_migration on A's query-migrate);
  B  on the first destination (now running the guest), after --settle s and an in-guest check,
     measure the dirty rate again (rate and working set, fitted), ask x-migrate-forecast with
     A's measurements, then migrate to a second destination and compare with B's query-migrate
     (total-time, ram.normal-bytes, passes, downtime).

S5N never converges: 64 MiB rewritten at up to 200 MiB/s, B capped at 8 MiB/s with a 50 ms
downtime-limit; the forecast is given the cap as the bandwidth (as a user states a link's speed).
B runs --convergence-wait s (it must not complete), then the forecast's advice is applied
mid-migration (max-bandwidth = 1.25 x bandwidth-needed) and B must complete. The guest on the
last destination must print `verify ok`. `--max-bandwidth` caps A and B of S1-S5 (125000000 for
the 1 Gbit/s link cases, `--suffix L`).

`--netns-rate 1gbit` migrates over a real shaped link instead of loopback (root); `--hop`
migrates the guest once more before A.

  python bench/bench_forecast.py [--scenarios S1,S3,S4,S5,S5N] [--max-bandwidth N] [--netns-rate R]
                                 [--hop] [--suffix L] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmferry.migration.forecast import ForecastInput, dirty_rate_in_first_pass, forecast, from_migration
from vmferry.monitor.client import QmpClient
from vmferry.testing.netns import Shaping, VethLink, veth_link

# id: (memory, dirty guest's arguments, B's max-bandwidth (None: the --max-bandwidth option),
#      B's downtime-limit ms (None: the default), whether A is capped like B)
CASES: dict[str, tuple[str, str, int | None, int | None, bool]] = {
    "S1": ("1G", "ws=1 rate=0", None, None, True),
    "S2": ("4G", "ws=1 rate=0", None, None, True),
    "S3": ("4G", "ws=1024 rate=0", None, None, True),
    "S4": ("4G", "ws=1024 rate=50", None, None, True),
    "S5": ("4G", "ws=1024 rate=200", None, None, True),
    # Never converges: 64 MiB dirtied faster than an 8 MiB/s link moves it, 50 ms allowed.
    # A (unlimited) moves the guest; B is capped.
    "S5N": ("1G", "ws=64 rate=200", 8 << 20, 50, False),
}
TERMINAL = ("completed", "failed", "cancelled")
REPO = Path(__file__).resolve().parent.parent


class Vm:
    def __init__(self, tmp: Path, name: str, *args: str, prefix: tuple[str, ...] = ()) -> None:
        self.serial = tmp / f"{name}.serial"
        self.log = tmp / f"{name}.log"
        qmp = tmp / f"{name}.qmp"
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "vmferry", "run", "--qmp", f"unix:{qmp}", "--serial",
                 f"file:{self.serial}", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while not qmp.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {self.log.read_text()}")
            time.sleep(0.05)
        self.qmp = QmpClient(f"unix:{qmp}", timeout_s=60)

    def wait_serial(self, pattern: str, after: int = 0, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()[after:]):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"no /{pattern}/: {self.text()[-500:]}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def listen_uri(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = re.search(r"incoming migration on (\S+)", self.log.read_text())
            if m:
                return m.group(1)
            time.sleep(0.05)
        raise RuntimeError("destination never listened")

    def migrate(self, uri: str) -> dict[str, Any]:
        self.qmp.execute("migrate", uri=uri)
        while (info := self.qmp.execute("query-migrate"))["status"] not in TERMINAL:
            time.sleep(0.02)
        return info

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.execute("quit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def vms() -> Iterator[list[Vm]]:
    started: list[Vm] = []
    try:
        yield started
    finally:
        for vm in started:
            vm.close()


def guest_pace(text: str, since: int) -> float | None:
    """MiB/s the dirty guest wrote by its own count (generations over its seconds) in its
    progress lines from offset `since` on; None with fewer than two lines."""
    # Whole lines only: the guest writes a line a character at a time, and a line cut short
    # in the middle of its generation would read as a smaller one.
    lines = re.findall(r"dirty: t=(\d+) gen=(\d+) written=", text[since:])
    if len(lines) < 2:
        return None
    (t0, g0), (t1, g1) = (tuple(map(int, x)) for x in (lines[0], lines[-1]))
    return (g1 - g0) * 4096 / 2**20 / (t1 - t0) if t1 > t0 else None


def measure_dirty_rate(vm: Vm, calc_time: int) -> dict[str, Any]:
    """calc-dirty-rate (dirty-bitmap), with the guest's own pace around the window."""
    since = len(vm.text())
    vm.qmp.execute("calc-dirty-rate", **{"calc-time": calc_time, "mode": "dirty-bitmap"})
    while (dr := vm.qmp.execute("query-dirty-rate"))["status"] != "measured":
        time.sleep(0.1)
    vm.wait_serial(r"dirty: t=\d+", after=len(vm.text()))  # a progress line after the window
    return {**dr, "guest-pace": guest_pace(vm.text(), since)}


def load() -> float:
    return os.getloadavg()[0]


def run(sid: str, tmp: Path, max_bandwidth: int, calc_time: int, settle_s: float,
        convergence_wait_s: float, link: VethLink | None = None, hop: bool = False) -> dict[str, Any]:
    """One case. `link`: the first destination runs in its namespace, so A goes into it and B
    out of it, both over the shaped veth pair. `hop`: migrate the guest once more
    before A (loopback, unlimited), so A's source, like B's, runs a guest that was migrated in."""
    mem, guest, b_cap, b_limit, cap_a = CASES[sid]
    cap = max_bandwidth if b_cap is None else b_cap
    loads = [load()]
    with vms() as started:
        src = Vm(tmp, "src", "-m", mem, "--guest", "dirty", "--append", f"{guest} verify=2")
        started.append(src)
        src.wait_serial(r"dirty: filled")
        src.wait_serial(r"verify ok")
        # The dirty rate on the source the guest started on: against its configured rate.
        at_source = before_a = measure_dirty_rate(src, calc_time)
        if hop:
            pre = Vm(tmp, "pre", "-m", mem, "--incoming", "tcp:127.0.0.1:0")
            started.append(pre)
            if (h := src.migrate(pre.listen_uri()))["status"] != "completed":
                raise RuntimeError(f"{sid} hop: {h}")
            src.close()
            started.remove(src)
            src = pre
            src.wait_serial(r"verify ok", after=0)
            time.sleep(settle_s)
            src.wait_serial(r"verify ok", after=len(src.text()))
            before_a = measure_dirty_rate(src, calc_time)
        mid = (Vm(tmp, "mid", "-m", mem, "--incoming", f"tcp:{link.address}:0", prefix=link.exec_prefix)
               if link else Vm(tmp, "mid", "-m", mem, "--incoming", "tcp:127.0.0.1:0"))
        started.append(mid)
        src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": cap if cap_a else 0})
        a = src.migrate(mid.listen_uri())
        if a["status"] != "completed":
            raise RuntimeError(f"{sid} A: {a}")
        calibration = from_migration(a)
        assert calibration is not None
        src.close()
        started.remove(src)
        loads.append(load())
        # Right after a migration the destination's guest first-touches its pages through KVM's
        # MMU (slower writes; on this host even reads show in the dirty log): let it settle.
        mid.wait_serial(r"verify ok", after=0)
        time.sleep(settle_s)
        mid.wait_serial(r"verify ok", after=len(mid.text()))
        dr = measure_dirty_rate(mid, calc_time)
        params: dict[str, int] = {"max-bandwidth": cap}
        if b_limit is not None:
            params["downtime-limit"] = b_limit
        mid.qmp.execute("migrate-set-parameters", **params)
        # The last migration's measurements (the engine's own, from A's query-migrate), as a
        # source that had migrated before would use them; a capped B with an uncapped A: the cap,
        # as a user states the speed of a link.
        bandwidth = calibration.bandwidth_bps if cap_a or not cap else cap
        # The guest slows while it is migrated (its vCPU shares the 2 cores with the migration):
        # A, under the same conditions as B, says by how much — the rate in A's first pass
        # against the rate measured before A, both through the working set measured there. B
        # under a different cap than A (S5N) gets no such correction: nothing measured it.
        ws_a = before_a.get("x-working-set") or 0
        in_a = dirty_rate_in_first_pass(a, ws_a) if ws_a else None
        rate_a = before_a.get("x-dirty-rate-bytes") or 0
        slowdown = min(1.0, in_a / rate_a) if (cap_a or not cap) and in_a is not None and rate_a else 1.0
        measured = dr.get("x-dirty-rate-bytes") or 0
        forecast = mid.qmp.execute("x-migrate-forecast", **{
            "dirty-rate": round(measured * slowdown), "working-set": dr.get("x-working-set") or 0,
            "bandwidth": round(bandwidth), "switchover-ms": round(calibration.switchover_ms or 0),
            "engine-bandwidth": round(calibration.engine_bandwidth_bps or bandwidth),
            "setup-ms": round(calibration.setup_s * 1000),
            "pass-overhead-ms": round(calibration.pass_overhead_s * 1000)})
        dst = Vm(tmp, "dst", "-m", mem, "--incoming", f"tcp:{link.host_address if link else '127.0.0.1'}:0")
        started.append(dst)
        suggestion: dict[str, Any] | None = None
        if forecast["converges"]:
            b = mid.migrate(dst.listen_uri())
        else:
            b, suggestion = not_converging(mid, dst, forecast, convergence_wait_s)
        if b["status"] == "completed" or (suggestion or {}).get("status") == "completed":
            dst.wait_serial(r"verify ok")
            if "FAIL" in dst.text():
                raise RuntimeError(f"{sid}: the destination's guest found bad pages")
        loads.append(load())
    return {"scenario": sid, "configured": guest, "max-bandwidth": cap, "bandwidth-a": bandwidth,
            "slowdown": slowdown,
            "a": a, "dirty-rate-source": at_source, "dirty-rate": dr, "forecast": forecast, "actual": b,
            "suggestion": suggestion, "load": loads}


def not_converging(mid: Vm, dst: Vm, forecast: dict[str, Any], wait_s: float) -> tuple[dict, dict]:
    """B for a forecast of "never converges": migrate for `wait_s` (it must not complete, and
    its passes must stop shrinking above the limit), then follow the forecast's advice — raise
    max-bandwidth to 1.25 x `bandwidth-needed` mid-migration, as an operator would — and see it
    complete. Returns (B as it stood before the advice, the outcome after it)."""
    mid.qmp.execute("migrate", uri=dst.listen_uri())
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        info = mid.qmp.execute("query-migrate")
        if info["status"] in TERMINAL:
            return info, {"applied": None}
        time.sleep(0.2)
    before = mid.qmp.execute("query-migrate")
    need = forecast.get("bandwidth-needed")
    if need is None:
        mid.qmp.execute("migrate_cancel")
        return before, {"applied": None}
    raised = round(need * 1.25)
    mid.qmp.execute("migrate-set-parameters", **{"max-bandwidth": raised})
    t0 = time.monotonic()
    while (after := mid.qmp.execute("query-migrate"))["status"] not in TERMINAL:
        if time.monotonic() - t0 > 120:
            mid.qmp.execute("migrate_cancel")
        time.sleep(0.1)
    return before, {"applied": {"max-bandwidth": raised}, "status": after["status"],
                    "seconds": round(time.monotonic() - t0, 1), "passes": len(after.get("passes", []))}


def hindsight(r: dict[str, Any]) -> dict[str, Any] | None:
    """The same forecast with B's own numbers as inputs: its passes' bandwidth and engine
    bandwidth, its setup and time between passes, and the rate the guest dirtied at while B's
    first pass ran (pass 1's dirty pages over its time, through D(t) with the measured working
    set). What it misses is the model's error; the rest of the forecast's is its inputs'."""
    b, inputs = r["actual"], r["forecast"]["inputs"]
    c = from_migration(b)
    if c is None:
        return None
    first = b["passes"][0]
    ws = inputs["working-set"]
    dirty = first["dirty-pages"] * 4096
    secs = (first["duration-ms"] / 1000) + c.pass_overhead_s
    if 0 < dirty < ws:
        rate = -ws * math.log1p(-dirty / ws) / secs
    else:
        rate = 0.0 if dirty == 0 else inputs["dirty-rate"]
    f = forecast(ForecastInput(
        initial_bytes=inputs["initial-bytes"], dirty_rate_bps=rate, bandwidth_bps=c.bandwidth_bps,
        downtime_limit_ms=inputs["downtime-limit"], working_set_bytes=ws, switchover_ms=c.switchover_ms,
        setup_s=c.setup_s, pass_overhead_s=c.pass_overhead_s, engine_bandwidth_bps=c.engine_bandwidth_bps))
    return {**f.as_qmp(), "dirty-rate": rate, "bandwidth": c.bandwidth_bps}


def _rate(dr: dict[str, Any]) -> str:
    pace = dr.get("guest-pace")
    return f"{dr['dirty-rate']} ({'-' if pace is None else round(pace)})"


def row(r: dict[str, Any]) -> str:
    f, b = r["forecast"], r["actual"]
    done = b["status"] == "completed"
    f_ms = f["total-time-ms"]
    configured = re.search(r"rate=(\d+)", r["configured"]).group(1)

    def err(pred: float | None, real: float) -> str:
        return "" if pred is None or not real else f" ({(pred - real) / real:+.0%})"

    if done:
        real_ms, real_bytes = b["total-time"], b["ram"]["normal-bytes"]
        time_cell = f"{f_ms if f_ms is None else round(f_ms)} / {real_ms}{err(f_ms, real_ms)}"
        f_bytes = f["total-bytes"] if f["converges"] else None
        bytes_cell = (f"{'-' if f_bytes is None else f'{f_bytes / 2**20:,.0f}'} / {real_bytes / 2**20:,.0f}"
                      f"{err(f_bytes, real_bytes)}")
        pause_cell = f"{f['downtime-ms']:.0f} / {b.get('downtime', '-')}"
    else:
        last = (b.get("passes") or [{}])[-1]
        time_cell = f"{f_ms} / not done in {b['total-time'] / 1000:.0f} s"
        bytes_cell = f"- / {b['ram']['normal-bytes'] / 2**20:,.0f} so far"
        pause_cell = f"{f['downtime-ms']:.0f} / expected {last.get('expected-downtime', '-')}"
    verdict = f"{'yes' if f['converges'] else 'no'} / {'yes' if done else 'no'}"
    dw = r["dirty-rate"].get("x-working-set", 0) / 2**20
    h = hindsight(r) if done else None
    h_cell = "-" if h is None else (
        f"{h['dirty-rate'] / 2**20:,.0f} MiB/s, {h['bandwidth'] / 2**20:,.0f} MiB/s: {h['passes']} passes, "
        f"{err(h['total-time-ms'], b['total-time']).strip()} time, "
        f"{err(h['total-bytes'], real_bytes).strip()} bytes")
    return (f"| {r['scenario']} | {configured} | {_rate(r['dirty-rate-source'])} | "
            f"{_rate(r['dirty-rate'])} x {r.get('slowdown', 1):.2f}, W {dw:,.0f} | "
            f"{r['bandwidth-a'] / 2**20:,.0f} | {verdict} | "
            f"{f['passes']} / {len(b.get('passes', []))} | {time_cell} | {bytes_cell} | {pause_cell} | "
            f"{h_cell} | {max(r['load']):.1f} |")


HEADER = ("| id | configured MiB/s | source: calc-dirty-rate (guest's pace) | forecast's: rate (pace) x "
          "slowdown in A, working set MiB | bandwidth MiB/s | converges f/a | passes f/a | "
          "total ms f/a (err) | "
          "page MiB f/a (err) | pause ms f/a | with B's own rates: dirty, bandwidth: passes, err | load |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="S1,S3,S4,S5,S5N")
    ap.add_argument("--max-bandwidth", type=int, default=0, help="bytes/s for both migrations; 0 = unlimited "
                    "(S5N has its own cap for B)")
    ap.add_argument("--calc-time", type=int, default=4, help="seconds of calc-dirty-rate")
    ap.add_argument("--settle", type=float, default=5, help="seconds the guest runs on the first "
                    "destination before the measurement")
    ap.add_argument("--convergence-wait", type=float, default=45, help="seconds a migration forecast "
                    "not to converge runs before the forecast's advice is applied")
    ap.add_argument("--suffix", default="", help="appended to the ids in the table (e.g. L)")
    ap.add_argument("--netns-rate", help="migrate over a veth pair shaped by tc tbf to this rate (e.g. "
                    "1gbit) instead of loopback; root needed")
    ap.add_argument("--hop", action="store_true", help="migrate the guest once before A, so A's "
                    "source ran a migrated-in guest as B's does")
    ap.add_argument("--json", type=Path)
    ns = ap.parse_args()
    results = []
    # Both ways: A goes into the namespace, B out of it.
    shaped = veth_link(Shaping(ns.netns_rate), both_ways=True) if ns.netns_rate else contextlib.nullcontext()
    with shaped as link:
        for sid in ns.scenarios.split(","):
            results.append(case(sid, ns, link))
    print("\n" + HEADER)
    for r in results:
        print(row(r))
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=1))


def case(sid: str, ns: argparse.Namespace, link: VethLink | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-forecast-{sid}-") as tmp:
        r = run(sid, Path(tmp), ns.max_bandwidth, ns.calc_time, ns.settle, ns.convergence_wait,
                link=link, hop=ns.hop)
    r["scenario"] += ns.suffix
    print(row(r), flush=True)
    if r["suggestion"] is not None:
        print(f"  {r['scenario']} advice: {r['suggestion']}", flush=True)
    return r


if __name__ == "__main__":
    main()
