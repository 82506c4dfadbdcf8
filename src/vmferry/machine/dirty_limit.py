"""`DirtyLimiter`: keep chosen vCPUs' dirty rates near a quota by making them sleep each time
their dirty ring fills — QEMU's dirtylimit (`set-vcpu-dirty-limit`, and migration's
`dirty-limit` capability), which needs KVM's dirty ring (`--accel kvm,dirty-ring-size=N`).

How (QEMU 8.1's softmmu/dirtylimit.c, restated; the arithmetic is `adjust_throttle_us`, pure):

- While any vCPU has a limit, a thread measures every vCPU's dirty rate once per *period*
  (1000 ms; during a migration with `dirty-limit`, `x-vcpu-dirty-limit-period`): the distinct
  pages its ring delivered in the period (machine/dirty_ring.py), in MB/s (MiB, QEMU's unit).
  The RAM blocks' dirty log is kept on meanwhile (a dirty-log consumer of its own, `dirty-limit`):
  rings only fill while slots log dirty pages.
- Each limited vCPU's sleep per ring-full exit (`throttle_us_per_full`) is then adjusted: no
  change while |current - quota| is within the dead band (QEMU: 25 MB/s; here at most a quarter
  of the quota, `tolerance_mb_s`, so small quotas mean something); 0 when the vCPU dirtied
  nothing; a linear step (ring_full_time x pct/(100-pct), pct = the relative error) when the
  error exceeds 50 %, else +/- ring_full_time/10; never above 99 x ring_full_time.
- The vCPU sleeps that long after each KVM_EXIT_DIRTY_RING_FULL (machine/vcpu_runner.py). A
  vCPU that does not write never fills its ring and never sleeps: only writers pay.

ring_full_time: QEMU derives it from the ring's size in MB over the highest dirty rate seen; here
it is the ring's entries over the highest rate of ring *entries* seen per second — what really
fills a ring (KVM may log one page several times between harvests: entries outpace pages).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmferry.errors import VmferryError

if TYPE_CHECKING:
    from vmferry.machine.machine import Machine

log = logging.getLogger("vmferry.machine")

TOLERANCE_MB_S = 25  # DIRTYLIMIT_TOLERANCE_RANGE: the widest dead band (see tolerance_mb_s)
LINEAR_ADJUSTMENT_PCT = 50  # DIRTYLIMIT_LINEAR_ADJUSTMENT_PCT
THROTTLE_PCT_MAX = 99  # DIRTYLIMIT_THROTTLE_PCT_MAX: sleep at most 99 ring-full times per fill
DEFAULT_PERIOD_MS = 1000  # DIRTYLIMIT_CALC_TIME_MS
CONSUMER = "dirty-limit"
MiB = 1 << 20
PAGE_SIZE = 4096


def tolerance_mb_s(quota: int) -> int:
    """The dead band around a quota: QEMU's fixed 25 MB/s, narrowed to a quarter of the quota
    (at least 1 MB/s) for quotas under 100 MB/s. With QEMU's band, a quota below 25 MB/s — its
    default of 1 MB/s included — never slows a vCPU writing under 26 MB/s: measured here, a
    loaded host's writer at 9 MB/s went unlimited through a whole migration."""
    return max(1, min(TOLERANCE_MB_S, quota // 4))


def adjust_throttle_us(throttle_us: int, quota: int, current: int, ring_full_us: int) -> int:
    """One period's adjustment of a vCPU's sleep per ring-full exit (QEMU's
    dirtylimit_adjust_throttle + dirtylimit_set_throttle, with `tolerance_mb_s`'s dead band).
    quota and current in MB/s."""
    lo, hi = min(quota, current), max(quota, current)
    if hi - lo <= tolerance_mb_s(quota):
        return throttle_us
    if current == 0:
        return 0
    if (hi - lo) * 100 // hi > LINEAR_ADJUSTMENT_PCT:
        pct = (hi - lo) * 100 // hi
        step = int(ring_full_us * pct / (100 - pct))
        throttle_us += step if quota < current else -step
    else:
        throttle_us += ring_full_us // 10 if quota < current else -(ring_full_us // 10)
    throttle_us = min(throttle_us, ring_full_us * THROTTLE_PCT_MAX)
    return max(throttle_us, 0)


@dataclass
class VcpuLimit:
    enabled: bool = False
    quota: int = 0  # MB/s
    current: int = 0  # MB/s, the last period's
    throttle_us: int = 0  # sleep per ring-full exit


class DirtyLimiter:
    """One per Machine with a dirty ring. `set`/`cancel`/`query` are QMP's; `period_ms` is read
    at every period (a migration points it at its parameter)."""

    def __init__(self, machine: Machine) -> None:
        if machine.dirty_ring is None:
            raise VmferryError("dirty page limit feature requires KVM with accelerator property "
                               "'dirty-ring-size' set")
        self.machine = machine
        self.ring = machine.dirty_ring
        self.vcpus = [VcpuLimit() for _ in machine.vcpus]
        self.period_ms: Callable[[], int] = lambda: DEFAULT_PERIOD_MS
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._max_entries_per_s = 0.0
        self.periods = 0

    # --- QMP ---

    @property
    def in_service(self) -> bool:
        with self._lock:
            return any(v.enabled for v in self.vcpus)

    def check_index(self, cpu_index: int | None) -> None:
        if cpu_index is not None and not 0 <= cpu_index < len(self.vcpus):
            raise VmferryError("incorrect cpu index specified")

    def set(self, cpu_index: int | None, quota: int) -> None:
        """Limit one vCPU (None: all) to `quota` MB/s; 0 cancels (QEMU's set-vcpu-dirty-limit)."""
        self.check_index(cpu_index)
        if quota == 0:
            self.cancel(cpu_index)
            return
        with self._lock:
            for i in self._indexes(cpu_index):
                self.vcpus[i].enabled = True
                self.vcpus[i].quota = quota
            start = self._thread is None
            if start:
                self._start_locked()
        if start:
            log.info("dirty limit on: %s", self.query())

    def cancel(self, cpu_index: int | None = None) -> None:
        """Lift the limit of one vCPU (None: all); the service stops with the last one."""
        self.check_index(cpu_index)
        with self._lock:
            for i in self._indexes(cpu_index):
                self.vcpus[i] = VcpuLimit()
                self.machine.set_dirty_limit_sleep(i, 0)
            thread = self._thread if not any(v.enabled for v in self.vcpus) else None
            if thread is not None:
                self._stop.set()
                self._thread = None
        if thread is not None:
            thread.join(10)
            for b in self.machine.ram_blocks:
                b.release_dirty_consumer(CONSUMER)

    def query(self) -> list[dict[str, int]]:
        """query-vcpu-dirty-limit: the limited vCPUs (an empty list when none is)."""
        with self._lock:
            return [{"cpu-index": i, "limit-rate": v.quota, "current-rate": v.current}
                    for i, v in enumerate(self.vcpus) if v.enabled]

    # --- query-migrate's figures (QEMU 8.1) ---

    def throttle_time_per_round(self) -> int:
        """The largest sleep per ring-full exit among the vCPUs, µs."""
        with self._lock:
            return max((v.throttle_us for v in self.vcpus), default=0)

    def ring_full_time(self) -> int:
        """The ring's memory size over the vCPUs' average dirty rate, µs; 0 when the guest
        dirties nothing."""
        with self._lock:
            avg = sum(v.current for v in self.vcpus) / max(1, len(self.vcpus))
        if avg <= 0:
            return 0
        return round(self.ring.entries * PAGE_SIZE / (avg * MiB) * 1e6)

    def close(self) -> None:
        self.cancel(None)

    # --- the period thread ---

    def _indexes(self, cpu_index: int | None) -> range:
        return range(len(self.vcpus)) if cpu_index is None else range(cpu_index, cpu_index + 1)

    def _start_locked(self) -> None:
        for b in self.machine.ram_blocks:
            # Consumer first, then the log (as calc-dirty-rate does): the log stops only when its
            # last consumer leaves, so a migration and the limiter never stop it under each other.
            b.add_dirty_consumer(CONSUMER)
            b.start_dirty_log()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="dirty-limit",
                                        daemon=True)
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        before = self.ring.snapshot()
        t0 = time.monotonic()
        while not stop.wait(max(1, self.period_ms()) / 1000):
            now = self.ring.snapshot()
            t1 = time.monotonic()
            dt = max(t1 - t0, 1e-6)
            for b in self.machine.ram_blocks:
                # Nobody else may sync (no migration): drop what our consumer collected.
                b.take_dirty(CONSUMER)
            with self._lock:
                if stop.is_set():
                    return
                self.periods += 1
                for i, v in enumerate(self.vcpus):
                    pages = now[i].pages - before[i].pages
                    entries = now[i].entries - before[i].entries
                    v.current = int(pages * PAGE_SIZE / MiB / dt)
                    self._max_entries_per_s = max(self._max_entries_per_s, entries / dt)
                ring_full_us = self._ring_full_us()
                for i, v in enumerate(self.vcpus):
                    if not v.enabled:
                        continue
                    v.throttle_us = adjust_throttle_us(v.throttle_us, v.quota, v.current, ring_full_us)
                    self.machine.set_dirty_limit_sleep(i, v.throttle_us)
            before, t0 = now, t1

    def _ring_full_us(self) -> int:
        if self._max_entries_per_s <= 0:
            return 0
        return int(self.ring.entries / self._max_entries_per_s * 1e6)
