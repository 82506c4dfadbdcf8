"""The migration forecast (x-migrate-forecast) against what then happened, on the bench scenarios.

Per scenario (/work/shared/BENCHMARKS.md; vmferry only): start the `dirty` guest, wait for it to
fill its working set and vouch for it, then

  A  migrate it to a first destination (no forecast): this measures the link, as "the last
     migration to that destination" would;
  B  on the first destination (now running the guest), after --settle s and an in-guest check,
     measure the dirty rate (calc-dirty-rate, dirty-bitmap, --calc-time s), ask
     x-migrate-forecast with A's end-to-end bandwidth and pause overhead, then migrate to a
     second destination and compare.

Reported per scenario: the forecast's verdict, passes, time after setup, page bytes and pause,
against B's query-migrate (total-time - setup-time, ram.normal-bytes, downtime, passes). The
guest on the second destination must print `verify ok`. `--max-bandwidth` caps both migrations
(e.g. 125000000 for the 1 Gbit/s link cases, S4L / S5L).

  python bench/bench_forecast.py [--scenarios S1,S3,S4,S5] [--max-bandwidth N] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmferry.monitor.client import QmpClient

SCENARIOS = {
    "S1": ("1G", "ws=1 rate=0"),
    "S2": ("4G", "ws=1 rate=0"),
    "S3": ("4G", "ws=1024 rate=0"),
    "S4": ("4G", "ws=1024 rate=50"),
    "S5": ("4G", "ws=1024 rate=200"),
}
TERMINAL = ("completed", "failed", "cancelled")
REPO = Path(__file__).resolve().parent.parent


class Vm:
    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.serial = tmp / f"{name}.serial"
        self.log = tmp / f"{name}.log"
        qmp = tmp / f"{name}.qmp"
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmferry", "run", "--qmp", f"unix:{qmp}", "--serial",
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


def run(sid: str, tmp: Path, max_bandwidth: int, calc_time: int, settle_s: float) -> dict[str, Any]:
    mem, guest = SCENARIOS[sid]
    with vms() as started:
        src = Vm(tmp, "src", "-m", mem, "--guest", "dirty", "--append", f"{guest} verify=2")
        started.append(src)
        src.wait_serial(r"dirty: filled")
        src.wait_serial(r"verify ok")
        mid = Vm(tmp, "mid", "-m", mem, "--incoming", "tcp:127.0.0.1:0")
        started.append(mid)
        params = {"max-bandwidth": max_bandwidth}
        src.qmp.execute("migrate-set-parameters", **params)
        a = src.migrate(mid.listen_uri())
        if a["status"] != "completed":
            raise RuntimeError(f"{sid} A: {a}")
        # The engine's own end-to-end measure (bytes over the passes' wall time), as a source
        # that had migrated before would use; the pause's fixed part from A's downtime-phases.
        bandwidth = a["convergence"]["bandwidth-bytes-per-second"]
        switchover = round(sum(v for k, v in a["downtime-phases"].items() if k != "ram"))
        src.close()
        started.remove(src)
        # Right after a migration the destination's guest first-touches its pages through KVM's
        # MMU (slower writes; on this host even reads show in the dirty log): let it settle.
        mid.wait_serial(r"verify ok", after=0)
        time.sleep(settle_s)
        mid.wait_serial(r"verify ok", after=len(mid.text()))
        mid.qmp.execute("calc-dirty-rate", **{"calc-time": calc_time, "mode": "dirty-bitmap"})
        while (dr := mid.qmp.execute("query-dirty-rate"))["status"] != "measured":
            time.sleep(0.1)
        mid.qmp.execute("migrate-set-parameters", **params)
        forecast = mid.qmp.execute("x-migrate-forecast", **{"bandwidth": round(bandwidth),
                                                             "switchover-ms": switchover})
        dst = Vm(tmp, "dst", "-m", mem, "--incoming", "tcp:127.0.0.1:0")
        started.append(dst)
        b = mid.migrate(dst.listen_uri())
        if b["status"] == "completed":
            dst.wait_serial(r"verify ok")
            if "FAIL" in dst.text():
                raise RuntimeError(f"{sid}: the destination's guest found bad pages")
    return {"scenario": sid, "bandwidth-a": bandwidth, "dirty-rate": dr, "forecast": forecast, "actual": b}


def row(r: dict[str, Any]) -> str:
    f, b = r["forecast"], r["actual"]
    done = b["status"] == "completed"
    actual_ms = b["total-time"] - b.get("setup-time", 0)
    f_ms = f["total-time-ms"]

    def err(pred: float | None, real: float) -> str:
        return "-" if pred is None or not real else f"{(pred - real) / real:+.0%}"

    return (f"| {r['scenario']} | {r['dirty-rate']['dirty-rate']} | {r['bandwidth-a'] / 2**20:,.0f} | "
            f"{'yes' if f['converges'] else 'no'} / {'yes' if done else 'no'} | "
            f"{f['passes']} / {len(b.get('passes', []))} | "
            f"{f_ms if f_ms is None else round(f_ms)} / {actual_ms} ({err(f_ms, actual_ms)}) | "
            f"{f['total-bytes'] / 2**20:,.0f} / {b['ram']['normal-bytes'] / 2**20:,.0f} "
            f"({err(f['total-bytes'], b['ram']['normal-bytes'])}) | "
            f"{f['downtime-ms']:.0f} / {b.get('downtime', '-')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="S1,S3,S4,S5")
    ap.add_argument("--max-bandwidth", type=int, default=0, help="bytes/s for both migrations; 0 = unlimited")
    ap.add_argument("--calc-time", type=int, default=2, help="seconds of calc-dirty-rate")
    ap.add_argument("--settle", type=float, default=5, help="seconds the guest runs on the first "
                    "destination before the measurement")
    ap.add_argument("--json", type=Path)
    ns = ap.parse_args()
    results = []
    for sid in ns.scenarios.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-forecast-{sid}-") as tmp:
            results.append(run(sid, Path(tmp), ns.max_bandwidth, ns.calc_time, ns.settle))
        print(row(results[-1]), flush=True)
    print("\n| id | dirty MiB/s | A's MiB/s | converges f/a | passes f/a | ms after setup f/a (err) | "
          "page MiB f/a (err) | pause ms f/a |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
