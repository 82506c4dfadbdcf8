"""`calc-dirty-rate` / `query-dirty-rate`: how fast the guest dirties memory, before migrating.

QEMU 7.2's command and reply (names, fields, checks and messages), two of its modes:

* `dirty-bitmap`: a dirty-log consumer of its own (`dirty-rate`) on every RamBlock. The log's
  single producer feeds every consumer, so the measurement neither takes pages from a running
  migration nor gives it any: each sync ORs KVM's harvest into both bitmaps. The count is of
  distinct pages written during the window (a page rewritten ten times counts once, as in QEMU),
  so for a working set smaller than what the guest writes in `calc-time`, the rate saturates.
* `page-sampling` (QEMU's default): `sample-pages` random pages per GiB of populated RAM are
  copied at the start and compared at the end; the changed fraction times the populated size,
  over the time, is the rate. It needs no dirty log, and misses rewrites with the same bytes.

* `dirty-ring`: only on a VM with KVM's dirty ring (`--accel kvm,dirty-ring-size=N`; refused by
  QEMU's message otherwise): each vCPU's pages from its ring over the window
  (machine/dirty_ring.py: the distinct pages of each harvest, summed), so the reply adds
  `vcpu-dirty-rate`: `[{"id": i, "dirty-rate": MB/s}]`, and `dirty-rate` is their sum, as in
  QEMU. A page written again after its entry was harvested counts again (KVM logs it again), so
  this rate can exceed dirty-bitmap's count of distinct pages for the same guest.

In `dirty-bitmap` mode the window is sampled up to CURVE_SAMPLES times (a sync and a count of the
distinct pages so far: `x-dirty-curve`, [ms, bytes] pairs), and the saturating curve of a random
writer, D(t) = W (1 - exp(-r t / W)), is fitted through the samples (forecast.fit_dirty_curve):
dirty-rate is r, the rate at which the guest dirties pages it had not dirtied yet in the window
(its write rate, before its working set saturates), and `x-working-set` is W (capped at the
populated RAM; the whole populated RAM when the curve shows no bend). A guest writing 200 MiB/s
into 1 GiB leaves 335 distinct MiB over 2 s, 167 MiB/s; the fit says ~190 (measured: docs/
migration.md). `x-dirty-bytes` and `x-elapsed-ms` stay the window's own totals. In
`page-sampling` mode, dirty-rate (MB/s, QEMU's unit: MiB) = dirty bytes / 2^20 / measured
seconds. The measured time is the wall time of the window as it really was (a loaded host may
sleep past calc-time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from vmferry.errors import QmpError
from vmferry.machine.dirty_ring import DirtyRing
from vmferry.machine.ramblock import PAGE_SIZE, RamBlock
from vmferry.migration.forecast import fit_dirty_curve

log = logging.getLogger("vmferry.migration")
CONSUMER = "dirty-rate"
MODES = ("page-sampling", "dirty-ring", "dirty-bitmap")
MIN_CALC_TIME_S, MAX_CALC_TIME_S = 1, 60  # QEMU 7.2's MIN/MAX_FETCH_DIRTYRATE_TIME_SEC
MIN_SAMPLE_PAGES, MAX_SAMPLE_PAGES = 128, 4096
DEFAULT_SAMPLE_PAGES = 512
GiB = 1 << 30
MiB = 1 << 20
# Syncs in a dirty-bitmap window: enough points to see a working set saturate, few enough not to
# slow the guest (each sync write-protects what it found again, and holds KVM's MMU: 8 syncs a
# second halved a 200 MiB/s guest's pace on the bench host, 2 a second did not show).
CURVE_SAMPLES = 4
CURVE_SPACING_S = 0.5


class DirtyRateMeter:
    """One measurement at a time, on a thread of its own; the monitor only starts and queries."""

    def __init__(self, blocks: Sequence[RamBlock], ring: DirtyRing | None = None) -> None:
        self.blocks = list(blocks)
        self.ring = ring
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._info: dict[str, object] = {"status": "unstarted", "start-time": 0, "calc-time": 0,
                                         "sample-pages": DEFAULT_SAMPLE_PAGES, "mode": "page-sampling"}

    def calc(self, calc_time: int, mode: str | None = None, sample_pages: int | None = None) -> None:
        """Start a measurement (QEMU's checks, in QEMU's order and words)."""
        with self._lock:
            if self._info["status"] == "measuring":
                raise QmpError("the dirty rate is already being measured.")
            if not MIN_CALC_TIME_S <= calc_time <= MAX_CALC_TIME_S:
                raise QmpError(f"calc-time is out of range[{MIN_CALC_TIME_S}, {MAX_CALC_TIME_S}].")
            mode = mode or "page-sampling"
            if sample_pages is not None and mode != "page-sampling":
                raise QmpError("sample-pages is used only in page-sampling mode")
            if sample_pages is not None and not MIN_SAMPLE_PAGES <= sample_pages <= MAX_SAMPLE_PAGES:
                raise QmpError(f"sample-pages is out of range[{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}].")
            if mode == "dirty-ring" and self.ring is None:
                raise QmpError("mode dirty-ring is not enabled, use other method instead.")
            if any(b.vm is None for b in self.blocks):
                raise QmpError("the dirty rate cannot be measured: guest RAM is not mapped into a VM")
            pages = (sample_pages or DEFAULT_SAMPLE_PAGES) if mode == "page-sampling" else 0
            self._info = {"status": "measuring", "start-time": int(time.time()), "calc-time": calc_time,
                          "sample-pages": pages, "mode": mode}
            self._thread = threading.Thread(target=self._run, args=(calc_time, mode, pages),
                                            name="dirty-rate", daemon=True)
            self._thread.start()

    def query(self) -> dict[str, object]:
        """query-dirty-rate's answer: `dirty-rate` only once measured."""
        with self._lock:
            return dict(self._info)

    def close(self) -> None:
        """Stop a measurement early (the VM is going away) and wait for its thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self, calc_time: int, mode: str, sample_pages: int) -> None:
        try:
            result: dict[str, object] = {"status": "measured"}
            if mode == "dirty-bitmap":
                curve = self._bitmap(calc_time)
                dirty_bytes, elapsed = curve[-1][1], curve[-1][0]
                populated = sum(int(np.count_nonzero(b.populated_pages())) for b in self.blocks) * PAGE_SIZE
                rate, working_set = fit_dirty_curve(curve, max(populated, dirty_bytes))
                result |= {"dirty-rate": round(rate / MiB), "x-working-set": round(working_set),
                           "x-dirty-curve": [[round(t * 1000, 3), int(d)] for t, d in curve]}
            elif mode == "dirty-ring":
                per_vcpu, elapsed = self._ring(calc_time)
                dirty_bytes = sum(per_vcpu)
                rate = dirty_bytes / elapsed
                vcpus = [{"id": i, "dirty-rate": round(b / MiB / elapsed)} for i, b in enumerate(per_vcpu)]
                result |= {"dirty-rate": sum(v["dirty-rate"] for v in vcpus), "vcpu-dirty-rate": vcpus}
            else:
                dirty_bytes, elapsed = self._sampling(calc_time, sample_pages)
                rate = dirty_bytes / elapsed
                result["dirty-rate"] = round(rate / MiB)
            result |= {"x-dirty-rate-bytes": round(rate), "x-dirty-bytes": int(dirty_bytes),
                       "x-elapsed-ms": round(elapsed * 1000, 3)}
        except Exception as e:  # noqa: BLE001 - the monitor reports it; the VM goes on
            log.warning("dirty rate measurement failed: %s", e)
            result = {"status": "measured", "dirty-rate": -1, "x-error": str(e)}
        with self._lock:
            self._info = {**self._info, **result}

    def _bitmap(self, calc_time: int) -> list[tuple[float, int]]:
        """[(seconds since the window opened, distinct bytes dirtied since)]: up to CURVE_SAMPLES,
        at least CURVE_SPACING_S apart, the last at the window's end."""
        samples = max(1, min(CURVE_SAMPLES, round(calc_time / CURVE_SPACING_S)))
        t0 = self.begin_bitmap()
        curve: list[tuple[float, int]] = []
        try:
            for i in range(1, samples + 1):
                # Paced against the window's start, so a late wake-up does not stretch the window.
                if self._stop.wait(max(0.0, t0 + calc_time * i / samples - time.monotonic())):
                    break
                dirty, elapsed = self.end_bitmap(t0)
                curve.append((elapsed, dirty))
            if not curve:
                dirty, elapsed = self.end_bitmap(t0)
                curve.append((elapsed, dirty))
            return curve
        finally:
            self.release_bitmap()

    def _ring(self, calc_time: int) -> tuple[list[int], float]:
        """Bytes each vCPU's ring delivered over the window, and the window's length."""
        assert self.ring is not None
        self.begin_bitmap()  # the consumer keeps the slots logging, so the rings fill
        try:
            before = self.ring.snapshot()
            t0 = time.monotonic()
            self._stop.wait(calc_time)
            after = self.ring.snapshot()
            elapsed = time.monotonic() - t0
        finally:
            self.release_bitmap()
        return [(a.pages - b.pages) * PAGE_SIZE for a, b in zip(after, before, strict=True)], elapsed

    # The dirty-bitmap window in three steps, so a test can pause the guest around it.

    def begin_bitmap(self) -> float:
        """Open the window; returns its start (time.monotonic())."""
        for b in self.blocks:
            # The consumer first: add_dirty_consumer folds what KVM logged so far into the others
            # (a migration's), so ours starts clear. Then make sure the log runs.
            b.add_dirty_consumer(CONSUMER)
            b.start_dirty_log()
        return time.monotonic()

    def end_bitmap(self, t0: float) -> tuple[int, float]:
        """Close the window, or sample it (the consumer's bitmap keeps accumulating): (bytes of
        distinct pages dirtied since it opened, seconds since it opened)."""
        pages = 0
        for b in self.blocks:
            b.sync_dirty()
            pages += int(np.bitwise_count(b.dirty_bitmap(CONSUMER)).sum())
        return pages * PAGE_SIZE, time.monotonic() - t0

    def release_bitmap(self) -> None:
        """Drop our consumer; the dirty log stops only if nobody else (a migration) uses it."""
        for b in self.blocks:
            b.release_dirty_consumer(CONSUMER)

    def _sampling(self, calc_time: int, sample_pages: int) -> tuple[float, float]:
        rng = np.random.default_rng()
        samples = []
        for b in self.blocks:
            populated = np.flatnonzero(b.populated_pages())  # never read a page the guest never touched
            n = min(populated.size, max(1, sample_pages * b.nbytes // GiB))
            if n == 0:
                continue
            index = np.sort(rng.choice(populated, size=n, replace=False))
            pages = np.frombuffer(b.mem, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            samples.append((pages, index, pages[index].copy(), populated.size))
        t0 = time.monotonic()
        self._stop.wait(calc_time)
        dirty = 0.0
        for pages, index, before, npopulated in samples:
            changed = int(np.count_nonzero((pages[index] != before).any(axis=1)))
            dirty += changed / index.size * npopulated * PAGE_SIZE
        elapsed = time.monotonic() - t0
        del samples
        return dirty, elapsed
