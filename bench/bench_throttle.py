"""vCPU throttle accuracy: does a vCPU throttled at p % lose p % of its time, and of its work?

    python bench/bench_throttle.py [--pcts 0,20,50,80,95,99] [--secs 3] [--runs 2]
    python bench/bench_throttle.py --migrate [--runs 2]

One Machine in this process (real KVM, 2 vCPUs) runs the `dirty` guest with `compute=1 rate=0`:
vCPU 0 idles (halts between timer ticks), vCPU 1 runs a loop of integer work at CPL3 and the guest
prints its loop rate once a second. For each throttle percentage (Machine.set_cpu_throttle, what
auto-converge sets), after 1 s to settle, over --secs seconds:
- slept: the share of wall time vCPU 1's runner accounts as throttle sleep;
- cpu: the share of wall time vCPU 1's thread was on a CPU (/proc/self/task/TID/schedstat);
- work: vCPU 1's loops per host second (its counter read from guest RAM) over the unthrottled
  rate. (The guest's own `compute: rate=` lines use PIT time, which runs slow while vCPU 0 is
  throttled too; not used here.)
Ideal: slept = p; cpu and work = (1 - p) x their unthrottled values. Median of --runs. On a
shared host the unthrottled vCPU gets less than a whole CPU: compare shares, not absolutes.

--migrate: who pays for auto-converge. The same guest, but vCPU 0 dirties a 48 MiB working set
flat out (`ws=48 rate=100000`) while vCPU 1 computes; it migrates over loopback TCP to a
`vmferry run --incoming` process with auto-converge on (defaults but max-bandwidth 32 MiB/s,
downtime-limit 30 ms). Reported: vCPU 1's loops/s before the migration and at each throttle
level (by the host's clock), the throttle steps and the total time.

--s5: who pays on S5 (4 GiB guest, 1 GiB working set rewritten at 200 MiB/s), dirty-limit against
auto-converge. The source Machine (in this process, 2 vCPUs, `--accel kvm,dirty-ring-size=4096`
in both modes so only the throttle differs) runs `dirty` with `ws=1024 rate=200 compute=1`; the
destination is a `vmferry run --incoming` process. --link 1g (default): the destination in a
network namespace behind a veth pair shaped by `tc tbf rate 1gbit` (docs: ../shared/BENCHMARKS.md;
needs root); --link max-bandwidth: loopback with max-bandwidth --bandwidth-mib (110) MiB/s as a
stand-in. Parameters
are QEMU's defaults (downtime-limit 300 ms, throttle-trigger-threshold 50, vcpu-dirty-limit 1,
x-vcpu-dirty-limit-period 1000). Reported per run: status, total s, passes, the pass after whose
sync throttling started and how many passes ran after it (the switchover pass included), and vCPU
1's loops/s by the host's clock: before the migration (3 s), during it before throttling, and
while throttled (0.25 s samples, medians), with the throttled share of before.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from vmferry.devices.state import MachineDeviceState
from vmferry.machine.machine import Machine
from vmferry.machine.vcpu_runner import VcpuRunner
from vmferry.migration.params import MigrationParameters
from vmferry.migration.source import OutgoingMigration
from vmferry.migration.state import MigrationState
from vmferry.testing.netns import GIGABIT, veth_link
from vmferry.transport.channel import Channel
from vmferry.transport.connect import connect_outgoing
from vmferry.vmm import guest_image

COMPUTE_GPA = 0x9080  # the compute vCPU's loop counter (guests/dirty_layout.h)


def _oncpu_ns(tid: int) -> int:
    return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])


def _loops(m: Machine) -> int:
    return int.from_bytes(m.read_gpa(COMPUTE_GPA, 8), "little")


def measure(m: Machine, pct: int, secs: float) -> tuple[float, float, float]:
    """(slept share, on-CPU share, loops/s) of vCPU 1 over about `secs`, from one throttle sleep's
    end to another's when throttled."""
    m.set_cpu_throttle(pct)
    time.sleep(1.0)
    runner = m._runners[1]
    tid = m.vcpu_thread_ids()[1]
    if pct:
        _wait_end(runner)
    t0, slept0, cpu0, loops0 = time.monotonic_ns(), runner.throttle_slept_ns, _oncpu_ns(tid), _loops(m)
    time.sleep(secs)
    if pct:
        _wait_end(runner)
    t1, slept1, cpu1, loops1 = time.monotonic_ns(), runner.throttle_slept_ns, _oncpu_ns(tid), _loops(m)
    wall = t1 - t0
    return (slept1 - slept0) / wall, (cpu1 - cpu0) / wall, (loops1 - loops0) / (wall / 1e9)


def _wait_end(runner: VcpuRunner) -> None:
    """Return just after a throttle sleep of `runner` ended (its count moved)."""
    n = runner.throttle_sleeps
    while runner.throttle_sleeps == n:  # a sleep started: now wait for its end to be stamped
        time.sleep(0.0002)
    end = runner.throttle_last_end_ns
    while runner.throttle_last_end_ns == end:
        time.sleep(0.0002)


def _destination(tmp: Path, memory: str = "128M", address: str = "127.0.0.1",
                 wrap: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], str]:
    log = Path(tmp) / "dst.log"
    proc = subprocess.Popen([*wrap, sys.executable, "-m", "vmferry", "run", "-m", memory, "--smp", "2",
                             "--incoming", f"tcp:{address}:0", "--serial", f"file:{tmp}/dst.serial"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"incoming migration on (\S+)", log.read_text())
        if m:
            return proc, m.group(1)
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the destination never listened: {log.read_text()}")


@dataclass
class MigrationRun:
    status: str
    total_s: float
    passes: int
    before: float  # vCPU 1 loops/s before the migration
    levels: dict[int, float]  # throttle % -> vCPU 1 loops/s (median of 0.25 s samples)


def migrate_once(tmp: str) -> MigrationRun:
    with Machine(memory=128 << 20, smp=2) as m:
        m.load_kernel(guest_image("dirty"), "ws=48 rate=100000 verify=0 compute=1")
        m.start()
        deadline = time.monotonic() + 60
        while _loops(m) == 0 or int.from_bytes(m.read_gpa(0x9040, 8), "little") < 48 * 256:
            if time.monotonic() > deadline:
                raise SystemExit("the guest never filled its working set")
            time.sleep(0.05)
        t0, l0 = time.monotonic(), _loops(m)
        time.sleep(2.0)
        before = (_loops(m) - l0) / (time.monotonic() - t0)
        dst, uri = _destination(Path(tmp))
        try:
            channel: Future[Channel] = Future()
            channel.set_result(connect_outgoing(uri))
            params = MigrationParameters.from_qmp({"max-bandwidth": 32 << 20, "downtime-limit": 30})
            out = OutgoingMigration(m, MachineDeviceState(m), channel, params, MigrationState(),
                                    auto_converge=True)
            per_level: dict[int, list[float]] = {}
            start = time.monotonic()
            out.start()
            last_t, last_l = time.monotonic(), _loops(m)
            while out._thread.is_alive():
                time.sleep(0.25)
                pct, t, loops = m.cpu_throttle_percentage, time.monotonic(), _loops(m)
                if m.running:
                    per_level.setdefault(pct, []).append((loops - last_l) / (t - last_t))
                last_t, last_l = t, loops
            total = time.monotonic() - start
            status = str(out.state.status)
        finally:
            dst.kill()
            dst.wait()
        return MigrationRun(status, total, len(out.stats.passes), before,
                            {p: statistics.median(v) for p, v in per_level.items()})


def main_migrate(runs: int) -> None:
    print(f"# {platform.node()} {platform.release()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| run | status | total s | passes | vCPU 1 loops/s before "
          "| at each throttle % (share of before) |")
    print("|---|---|---|---|---|---|")
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            r = migrate_once(tmp)
        cells = ", ".join(f"{p} %: {v / 1e6:.2f} M ({v / r.before:.2f})" for p, v in sorted(r.levels.items()))
        print(f"| {i + 1} | {r.status} | {r.total_s:.1f} | {r.passes} | {r.before / 1e6:.2f} M | {cells} |")


# --- S5: dirty-limit against auto-converge -------------------------------------------------------

@dataclass
class S5Run:
    mode: str
    status: str
    total_s: float
    passes: int
    throttle_pass: int | None  # the pass after whose sync throttling started
    before: float  # vCPU 1 loops/s before the migration
    unthrottled: float  # ... during the migration, before throttling
    throttled: float  # ... while throttled
    writer_throttled: float  # vCPU 0's page writes/s while throttled
    steps: str  # auto-converge's percentages, or dirty-limit's quota
    writer_unthrottled: float = 0.0  # vCPU 0's page writes/s during the migration, unthrottled
    error: str = ""


def _median(v: list[float]) -> float:
    return statistics.median(v) if v else float("nan")


def s5_once(tmp: str, mode: str, link: str, bandwidth_mib: int = 110, ws_mib: int = 1024,
            memory_gib: int = 4) -> S5Run:
    writes_gpa = 0x9048  # the guest's page-write counter (guests/dirty_layout.h)
    with contextlib.ExitStack() as stack:
        m = stack.enter_context(Machine(memory=memory_gib << 30, smp=2, dirty_ring_size=4096))
        m.load_kernel(guest_image("dirty"), f"ws={ws_mib} rate=200 verify=0 compute=1")
        m.start()
        deadline = time.monotonic() + 300
        while _loops(m) == 0 or int.from_bytes(m.read_gpa(0x9040, 8), "little") < ws_mib * 256:
            if time.monotonic() > deadline:
                raise SystemExit("the guest never filled its working set")
            time.sleep(0.1)
        t0, l0 = time.monotonic(), _loops(m)
        time.sleep(3.0)
        before = (_loops(m) - l0) / (time.monotonic() - t0)
        params = {"downtime-limit": 300}
        if link == "1g":
            gigabit = stack.enter_context(veth_link(GIGABIT))
            dst, uri = _destination(Path(tmp), f"{memory_gib}G", gigabit.address, gigabit.exec_prefix)
        else:
            dst, uri = _destination(Path(tmp), f"{memory_gib}G")
            params["max-bandwidth"] = bandwidth_mib << 20
        stack.callback(dst.wait)
        stack.callback(dst.kill)
        channel: Future[Channel] = Future()
        channel.set_result(connect_outgoing(uri))
        out = OutgoingMigration(m, MachineDeviceState(m), channel, MigrationParameters.from_qmp(params),
                                MigrationState(), auto_converge=mode == "auto-converge",
                                dirty_limit=mode == "dirty-limit")
        limiter = m.dirty_limiter
        assert limiter is not None
        start = time.monotonic()
        out.start()
        samples: dict[bool, list[float]] = {False: [], True: []}
        writer: list[float] = []
        writer_free: list[float] = []
        first_pass: int | None = None
        def writes() -> int:
            return int.from_bytes(m.read_gpa(writes_gpa, 8), "little")

        last_t, last_l, last_w = time.monotonic(), _loops(m), writes()
        while out._thread.is_alive():
            if time.monotonic() - start > 600:
                out.cancel()
            time.sleep(0.25)
            throttled = bool(m.cpu_throttle_percentage) or limiter.in_service
            if throttled and first_pass is None:
                first_pass = out.dirty_limit_pass if mode == "dirty-limit" else len(out.stats.passes)
            t, loops = time.monotonic(), _loops(m)
            w = writes()
            if m.running:
                samples[throttled].append((loops - last_l) / (t - last_t))
                (writer if throttled else writer_free).append((w - last_w) / (t - last_t))
            last_t, last_l, last_w = t, loops, w
        total = time.monotonic() - start
        if out.auto_converge is not None:
            steps = ",".join(f"{p} %" for p in out.auto_converge.history)
        else:
            assert out.dirty_limit is not None
            steps = ",".join(f"{q} MB/s" for q in out.dirty_limit.history)
        return S5Run(mode, str(out.state.status), total, len(out.stats.passes), first_pass, before,
                     _median(samples[False]), _median(samples[True]), _median(writer), steps,
                     _median(writer_free), out.stats.error or "")


def main_s5(runs: int, link: str, modes: list[str], bandwidth_mib: int) -> None:
    print(f"# {platform.node()} {platform.release()} {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, link {link}"
          f"{f' {bandwidth_mib} MiB/s' if link == 'max-bandwidth' else ''}, load {os.getloadavg()}")
    print("| run | mode | status | total s | passes | throttling from pass | passes after | vCPU 1 loops/s "
          "before | during, unthrottled | throttled (share of before) | writer MiB/s unthrottled "
          "| throttled | steps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i in range(runs):
        for mode in modes:
            with tempfile.TemporaryDirectory() as tmp:
                r = s5_once(tmp, mode, link, bandwidth_mib)
            after = r.passes - r.throttle_pass if r.throttle_pass is not None else "-"
            print(f"| {i + 1} | {r.mode} | {r.status} | {r.total_s:.1f} | {r.passes} | {r.throttle_pass} "
                  f"| {after} "
                  f"| {r.before / 1e6:.2f} M | {r.unthrottled / 1e6:.2f} M | {r.throttled / 1e6:.2f} M "
                  f"({r.throttled / r.before:.3f}) | {r.writer_unthrottled / 256:.1f} "
                  f"| {r.writer_throttled / 256:.1f} | {r.steps} |", flush=True)
            if r.error:
                print(f"  ({r.mode} run {i + 1}: {r.error})", flush=True)
    print(f"load average after: {os.getloadavg()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pcts", default="0,20,50,80,95,99")
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--migrate", action="store_true")
    ap.add_argument("--s5", action="store_true")
    ap.add_argument("--link", choices=["1g", "max-bandwidth"], default="1g")
    ap.add_argument("--modes", default="dirty-limit,auto-converge")
    ap.add_argument("--bandwidth-mib", type=int, default=110, help="--link max-bandwidth: MiB/s")
    args = ap.parse_args()
    if args.s5:
        main_s5(args.runs, args.link, args.modes.split(","), args.bandwidth_mib)
        return
    if args.migrate:
        main_migrate(args.runs)
        return
    pcts = [int(p) for p in args.pcts.split(",")]
    print(f"# {platform.node()} {platform.release()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        serial = Path(tmp) / "serial"
        with Machine(memory=64 << 20, smp=2, serial=f"file:{serial}") as m:
            m.load_kernel(guest_image("dirty"), "ws=1 rate=0 verify=0 compute=1")
            m.start()
            deadline = time.monotonic() + 30
            while "compute: t=" not in serial.read_text():
                if time.monotonic() > deadline:
                    raise SystemExit(f"the compute vCPU never reported: {serial.read_text()}")
                time.sleep(0.1)
            results: dict[int, list[tuple[float, float, float]]] = {p: [] for p in pcts}
            for _ in range(args.runs):
                for p in pcts:
                    results[p].append(measure(m, p, args.secs))
            m.set_cpu_throttle(0)
            m.shutdown()
    base = statistics.median(r[2] for r in results[pcts[0]]) if pcts[0] == 0 else None
    cpu_base = statistics.median(r[1] for r in results[pcts[0]]) if pcts[0] == 0 else None
    print("| throttle | slept (ideal) | vCPU 1 on CPU | on CPU vs unthrottled (ideal) | loops/s "
          "| work vs unthrottled (ideal) |")
    print("|---|---|---|---|---|---|")
    for p in pcts:
        slept = statistics.median(r[0] for r in results[p])
        cpu = statistics.median(r[1] for r in results[p])
        rate = statistics.median(r[2] for r in results[p])
        work = f"{rate / base:.3f} ({1 - p / 100:.2f})" if base else "-"
        oncpu = f"{cpu / cpu_base:.3f} ({1 - p / 100:.2f})" if cpu_base else "-"
        print(f"| {p} % | {slept:.3f} ({p / 100:.2f}) | {cpu:.3f} | {oncpu} | {rate / 1e6:.2f} M "
              f"| {work} |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
