"""Postcopy fault latency on loopback while the background push runs.

    python bench/bench_postcopy.py [--runs 3] [--mem 1G] [--ws 512] [--rate 64] [--transport tcp]
                                   [--preempt]

Two `vmferry run` processes on KVM; the `dirty` guest (--ws MiB working set, --rate MiB/s of
random page writes) on the source. `postcopy-ram` on both sides, `migrate`, and
`migrate-start-postcopy` at once (precopy limited to 1 MiB/s meanwhile), so (nearly) the whole
working set moves after the switch: the
guest faults on pages still at the source while the push streams the rest. Reported per run from
the destination's query-migrate (docs/migration.md, "Postcopy"): fault latency (from the
resolver reading the fault to the page placed) average, p50, p99, max and its log2 histogram;
requests; postcopy-blocktime against the guest's own worst `stall=` after the switch; the
source's switch pause (downtime) and total time. Every run must end with the destination's guest
printing `verify ok` and the host verifier agreeing. `--preempt`: capability `postcopy-preempt`
on both sides (requested pages on a second connection); the load average is printed per run.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from polling import wait_for  # noqa: E402
from vmproc import VmProcess  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run(tmp: Path, args: argparse.Namespace) -> dict:
    append = f"ws={args.ws} rate={args.rate} verify=0 check=ends"
    src = VmProcess(tmp, "src", "-m", args.mem, "--guest", "dirty", "--append", append)
    dst = VmProcess(tmp, "dst", "-m", args.mem, "--incoming", "defer")
    try:
        src.wait_serial(r"dirty: filled \d+ pages", timeout=300)  # the whole working set is populated
        caps = ["postcopy-ram", "postcopy-preempt"] if args.preempt else ["postcopy-ram"]
        for vm in (src, dst):
            vm.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
        dst.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "postcopy-blocktime", "state": True}])
        uri = f"tcp:127.0.0.1:{_free_port()}" if args.transport == "tcp" else f"unix:{tmp / 'm.sock'}"
        dst.cmd("migrate-incoming", uri=uri)
        serial_at = len(dst.serial())
        # Precopy crawls until the switch, so (nearly) the whole working set moves in postcopy.
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
        src.cmd("migrate", uri=uri)
        src.cmd("migrate-start-postcopy")
        d = wait_for(lambda: (i := dst.cmd("query-migrate"))["status"] in ("completed", "failed",
                                                                           "postcopy-paused") and i,
                     "the destination to finish", 600)
        s = src.wait_migration(("completed", "failed", "postcopy-paused"), timeout=120)
        assert d["status"] == s["status"] == "completed", (s, d)
        dst.wait_serial(r"dirty: t=\d+ .*stall=", after=serial_at, timeout=60)
        time.sleep(1.5)  # one more line of the guest's own figures
        stalls = [int(x) for x in re.findall(r"stall=(\d+) us", dst.serial()[serial_at:])]
        # The guest's own total of the time the host held it (gaps > 20 us, idling left out):
        # on the destination that is the switch's pause plus every fault's wait.
        stalled_us = sum(int(x) for x in re.findall(r"stalled=(\d+) us", dst.serial()[serial_at:]))
        verdict = dst.cmd("x-verify-dirty-guest")
        assert verdict["ok"], verdict
        x = d["x-postcopy"]
        return {"latency": x["fault-latency"], "requests": x["requests"], "placed": x["pages-placed"],
                "blocktime": d.get("postcopy-blocktime"), "stall_ms": max(stalls) / 1000 if stalls else None,
                "guest_stalled_ms": stalled_us / 1000,
                "downtime": s.get("downtime"), "total": s.get("total-time"),
                "postcopy_mb": s["ram"]["postcopy-bytes"] / 1e6, "load": os.getloadavg()[0],
                "preempt_mb": x.get("preempt-page-bytes", 0) / 1e6}
    finally:
        src.close()
        dst.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--mem", default="1G")
    p.add_argument("--ws", type=int, default=512)
    p.add_argument("--rate", type=int, default=64)
    p.add_argument("--transport", choices=("tcp", "unix"), default="tcp")
    p.add_argument("--preempt", action="store_true", help="capability postcopy-preempt on both sides")
    args = p.parse_args()
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="bench-postcopy-") as d:
            r = one_run(Path(d), args)
        lat = r["latency"]
        print(f"run {i + 1}: faults {lat['faults']} avg {lat['avg-ms']} ms p50 {lat['p50-ms']} "
              f"p99 {lat['p99-ms']} max {lat['max-ms']} ms; requests {r['requests']}, {r['placed']} pages "
              f"after the switch ({r['postcopy_mb']:.0f} MB); blocktime {r['blocktime']} ms vs guest stall "
              f"{r['stall_ms']} ms; switch pause {r['downtime']} ms, total {r['total']} ms; "
              f"preempt channel {r['preempt_mb']:.1f} MB; load average {r['load']:.1f}", flush=True)
        held = r["guest_stalled_ms"] - (r["downtime"] or 0)  # the guest's total less the switch's pause
        print(f"       guest's stalled total {r['guest_stalled_ms']:.0f} ms, less the pause {held:.0f} ms "
              f"= {held / r['blocktime']:.2f} x blocktime" if r["blocktime"] else "", flush=True)
        print(f"       histogram (<= us: faults) {lat['histogram-us']}", flush=True)
        results.append(r)
    avg = [r["latency"]["avg-ms"] for r in results]
    p99 = [r["latency"]["p99-ms"] for r in results]
    print(f"median over {len(results)} runs: avg {statistics.median(avg)} ms, "
          f"p99 {statistics.median(p99)} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
