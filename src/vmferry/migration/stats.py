"""Migration statistics, shaped as QMP's `query-migrate` reply.

The migration thread updates counters; the monitor thread reads a snapshot. Counters are plain
ints updated by one writer, and a lock makes each snapshot consistent.

Definitions (QEMU's, where QEMU has the field):
- total-time: ms from `migrate` to completion (or to now while running).
- setup-time: ms spent in `setup` (channel up, dirty logging started, first bitmap built).
- downtime: ms the guest was stopped on the source before the destination confirmed it runs.
- ram.transferred: bytes of RAM records written to the channel (headers included).
- ram.duplicate: zero pages sent as runs; ram.normal(-bytes): pages sent with their contents.
- ram.unpopulated (ours): pages never touched by the guest, skipped without being read.
- ram.mbps: megabits/s the migration measures as its bandwidth: end to end (what the destination
  applied, from its PROGRESS reports) with a return path, else what the channel accepted.
- expected-downtime-at-switchover (ours): the expected downtime when the vCPUs were paused.
- cpu-throttle-percentage: auto-converge's current vCPU throttle; present only while it is on.
- ram.postcopy-bytes / postcopy-requests: stream bytes of pages sent after the switch to postcopy,
  and the destination's page requests (received on the source, sent on the destination).
- postcopy-blocktime / postcopy-vcpu-blocktime (destination, with capability postcopy-blocktime):
  ms all vCPUs were blocked on missing pages at once, and ms per vCPU; x-postcopy: vmferry's
  fault figures (migration/postcopy.py, docs/migration.md).
- xbzrle-cache (source, capability xbzrle): QEMU's cache-size, bytes, pages, cache-miss,
  cache-miss-rate, encoding-rate, overflow (migration/xbzrle.py, XbzrleCounters).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from vmferry.migration.convergence import PassReport, convergence_verdict
from vmferry.migration.pages import PAGE_SIZE
from vmferry.migration.state import MigrationStatus


@dataclass
class MigrationStats:
    start_ns: int = 0
    setup_end_ns: int = 0
    end_ns: int = 0
    stop_ns: int = 0  # vCPUs paused for switchover
    downtime_ms: float | None = None
    downtime_phases: dict[str, float] = field(default_factory=dict)
    total_bytes: int = 0  # guest RAM size
    transferred: int = 0
    remaining_pages: int = 0
    duplicate: int = 0
    normal: int = 0
    unpopulated: int = 0
    dirty_sync_count: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0  # stream bytes of pages sent after postcopy's switch
    postcopy_requests: int = 0  # PAGE_REQUESTs received (source) or sent (destination)
    postcopy: dict = field(default_factory=dict)  # destination: blocktime and fault figures
    auto_postcopy: str | None = None  # source: why it switched to postcopy by itself
    postcopy_early_discard: dict | None = None  # source: the early discard's pages and time
    multifd_bytes: int = 0  # of `transferred`, what the multifd data channels carried
    multifd_lost: list[str] = field(default_factory=list)  # data channels lost, and why
    bandwidth_bps: float = 0.0
    dirty_rate_pps: float = 0.0
    dirty_rate_bps: float = 0.0  # every saver's state (RAM and copied disks), for `convergence`
    expected_downtime_ms: float | None = None
    expected_at_switchover_ms: float | None = None  # what the source expected when it paused
    error: str | None = None
    cpu_throttle_percentage: int = 0  # auto-converge's, 0 = off
    xbzrle: dict[str, object] | None = None  # query-migrate's xbzrle-cache, while capability xbzrle is on
    passes: list[PassReport] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self) -> None:
        self.start_ns = time.monotonic_ns()

    def _elapsed_ms(self, since_ns: int, until_ns: int = 0) -> int:
        if not since_ns:
            return 0
        return round(((until_ns or time.monotonic_ns()) - since_ns) / 1e6)

    def query(self, status: MigrationStatus) -> dict:
        """The `query-migrate` return value."""
        with self.lock:
            out: dict = {"status": str(status)}
            if status == MigrationStatus.NONE:
                return out
            out["total-time"] = self._elapsed_ms(self.start_ns, self.end_ns)
            if self.setup_end_ns:
                out["setup-time"] = self._elapsed_ms(self.start_ns, self.setup_end_ns)
            if self.downtime_ms is not None:
                out["downtime"] = round(self.downtime_ms)
            if self.downtime_phases:
                out["downtime-phases"] = dict(self.downtime_phases)
            if self.expected_at_switchover_ms is not None:
                out["expected-downtime-at-switchover"] = round(self.expected_at_switchover_ms, 3)
            running = status in (MigrationStatus.ACTIVE, MigrationStatus.SETUP)
            if running and self.expected_downtime_ms is not None:
                out["expected-downtime"] = (
                    round(self.expected_downtime_ms) if self.expected_downtime_ms != float("inf") else -1
                )
            mbps = self.bandwidth_bps * 8 / 1e6
            out["ram"] = {
                "total": self.total_bytes,
                "transferred": self.transferred,
                "remaining": self.remaining_pages * PAGE_SIZE,
                "duplicate": self.duplicate,
                "normal": self.normal,
                "normal-bytes": self.normal * PAGE_SIZE,
                "dirty-sync-count": self.dirty_sync_count,
                "dirty-pages-rate": round(self.dirty_rate_pps),
                "mbps": round(mbps, 3),
                "pages-per-second": round(self.bandwidth_bps / PAGE_SIZE),
                "page-size": PAGE_SIZE,
                "precopy-bytes": self.precopy_bytes,
                "downtime-bytes": self.downtime_bytes,
                "postcopy-bytes": self.postcopy_bytes,
                "postcopy-requests": self.postcopy_requests,
                "multifd-bytes": self.multifd_bytes,
                "skipped": 0,
                "dirty-sync-missed-zero-copy": 0,
                "unpopulated": self.unpopulated,
            }
            if self.cpu_throttle_percentage:
                out["cpu-throttle-percentage"] = self.cpu_throttle_percentage
            out.update(self.postcopy)
            if self.auto_postcopy:
                out["x-postcopy-auto"] = self.auto_postcopy
            if self.postcopy_early_discard is not None:
                out["x-postcopy-early-discard"] = dict(self.postcopy_early_discard)
            if self.xbzrle is not None:
                out["xbzrle-cache"] = dict(self.xbzrle)
            if self.multifd_lost:
                out["multifd-lost-channels"] = list(self.multifd_lost)
            if self.error:
                out["error-desc"] = self.error
            if self.passes:
                out["passes"] = [p.as_qmp() for p in self.passes]
                dirty_bps = self.dirty_rate_bps
                out["convergence"] = {
                    "dirty-rate-bytes-per-second": round(dirty_bps),
                    "bandwidth-bytes-per-second": round(self.bandwidth_bps),
                    "ratio": round(dirty_bps / self.bandwidth_bps, 4) if self.bandwidth_bps else None,
                    "verdict": convergence_verdict(dirty_bps, self.bandwidth_bps),
                }
            return out
