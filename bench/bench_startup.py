"""Startup cost of a vmferry VM, and proof that guest RAM is allocated lazily.

For each guest size (512 MiB, 4 GiB) it starts a fresh process several times and reports
median and range of:
  to_running_ms  process start (the parent's Popen) -> every vCPU thread started
  to_serial_ms   process start -> the first byte the guest wrote to COM1 reaches the parent
  rss_boot_mib   the VMM process's resident memory (VmRSS, guest RAM included) at first output
  rss_ws_mib     the same after the dirty guest filled its working set (default 100 MiB)

The guest is the bundled `dirty` guest (ws=100, rate=1): its writes are emulated CPL0 stores
(KVM-FACTS.md), so the fill time is the emulator's, not the host's. A lazily allocated 4 GiB guest
that touched ~100 MiB should cost about what the 512 MiB guest costs.

  python bench/bench_startup.py [--runs 5] [--ws 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def child(memory: str, append: str) -> None:
    from vmferry.machine.machine import Machine
    from vmferry.machine.machine_type import parse_size
    from vmferry.vmm import guest_image

    m = Machine(memory=parse_size(memory), serial="stdio")
    m.load_kernel(guest_image("dirty"), append)
    m.start()
    # CLOCK_MONOTONIC is system-wide: the parent subtracts its own start stamp.
    print(f"RUNNING {time.monotonic()}", file=sys.stderr, flush=True)
    m.wait()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_run(memory: str, ws: int) -> dict[str, float]:
    append = f"ws={ws} rate=1 verify=1000"
    t0 = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, __file__, "--child", memory, append],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )
    assert p.stdout is not None and p.stderr is not None
    try:
        first = p.stdout.read(1)
        t_serial = time.monotonic()
        if not first:
            raise RuntimeError(p.stderr.read().decode())
        rss_boot = rss_mib(p.pid)
        running = p.stderr.readline().decode().split()
        t_running = float(running[1])
        buf = first
        while b"filled" not in buf:
            chunk = p.stdout.read(256)
            if not chunk:
                raise RuntimeError("guest output ended before the fill")
            buf += chunk
        rss_ws = rss_mib(p.pid)
    finally:
        p.terminate()
        p.wait(30)
    return {
        "to_running_ms": (t_running - t0) * 1e3,
        "to_serial_ms": (t_serial - t0) * 1e3,
        "rss_boot_mib": rss_boot,
        "rss_ws_mib": rss_ws,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ws", type=int, default=100, help="working set the guest touches, MiB")
    ap.add_argument("--sizes", default="512M,4G")
    args = ap.parse_args()
    print(f"# {os.uname().nodename} {os.uname().release}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}, runs={args.runs}, ws={args.ws} MiB")
    print(f"{'memory':>7} {'metric':>14} {'median':>9} {'min':>9} {'max':>9}")
    for size in args.sizes.split(","):
        runs = [one_run(size, args.ws) for _ in range(args.runs)]
        for key in runs[0]:
            vals = [r[key] for r in runs]
            print(f"{size:>7} {key:>14} {statistics.median(vals):9.1f} {min(vals):9.1f} {max(vals):9.1f}")


if __name__ == "__main__":
    main()
