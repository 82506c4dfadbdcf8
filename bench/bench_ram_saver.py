"""The RAM saver alone: how fast it turns dirty pages into stream records (gather, zero scan,
checksums, record framing), with the socket replaced by a sink. Needs /dev/kvm (a real memory
slot with dirty logging).

  python bench/bench_ram_saver.py [--runs 5]

Cases: 1 GiB all dirty (a first pass), and 30 000 scattered dirty pages, with the vCPUs running
(pages copied to scratch first) and paused (sent from guest memory where possible).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from vmferry.kvm.system import Kvm
from vmferry.machine.ramblock import RamBlock
from vmferry.migration.ram import RamSaver
from vmferry.stream.encoder import StreamEncoder

GiB = 1 << 30


def one_run(vm: object, dense: bool, stable: bool, slot: int) -> float:
    block = RamBlock("pc.ram", 0, GiB, vm, slot)  # type: ignore[arg-type]
    pages = np.frombuffer(block.mem, dtype=np.uint64).reshape(-1, 512)
    if dense:
        pages[:] = 7
    else:
        pages[np.random.default_rng(1).choice(pages.shape[0], 30_000, replace=False)] = 7
    saver = RamSaver([block], StreamEncoder())
    saver.setup()
    t = time.perf_counter()
    c = saver.send_dirty(lambda bufs: sum(len(b) for b in bufs), stable=stable, cancelled=lambda: False)
    dt = time.perf_counter() - t
    saver.cleanup()
    del pages
    block.close()
    return c.bytes / dt / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    vm = Kvm().create_vm()
    vm.enable_manual_dirty_protect()
    for dense in (True, False):
        for stable in (False, True):
            rates = [one_run(vm, dense, stable, 0) for _ in range(args.runs)]
            name = f"{'1 GiB dense' if dense else '30k scattered'}, {'paused' if stable else 'running'}"
            print(f"{name:28s} {statistics.median(rates):.2f} GB/s [{min(rates):.2f}-{max(rates):.2f}]")


if __name__ == "__main__":
    main()
