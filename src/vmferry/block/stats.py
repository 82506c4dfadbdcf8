"""Per-drive I/O statistics in QEMU's BlockDeviceStats names (query-blockstats).

A request counts when it completes (successfully or not: failed ones also count in
`failed_*_operations`); `*_total_time_ns` is the sum, over completed requests, of the time from
the device taking the request off the ring to writing its status — the backend's service time
plus the device's own copying, not the guest's wait in the queue. Updated only on the drive's
I/O thread; read from the monitor's thread as whole ints (no torn values under the GIL).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

KINDS = ("rd", "wr", "flush")


@dataclass
class BlockStats:
    rd_bytes: int = 0
    wr_bytes: int = 0
    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    rd_total_time_ns: int = 0
    wr_total_time_ns: int = 0
    flush_total_time_ns: int = 0
    failed_rd_operations: int = 0
    failed_wr_operations: int = 0
    failed_flush_operations: int = 0
    invalid_rd_operations: int = 0
    invalid_wr_operations: int = 0
    invalid_flush_operations: int = 0
    wr_highest_offset: int = 0
    last_done_ns: int | None = None  # monotonic time of the last completed request

    def done(self, kind: str, nbytes: int, start_ns: int, *, ok: bool, offset: int = 0) -> None:
        now = time.monotonic_ns()
        setattr(self, f"{kind}_operations", getattr(self, f"{kind}_operations") + 1)
        setattr(self, f"{kind}_total_time_ns", getattr(self, f"{kind}_total_time_ns") + now - start_ns)
        if not ok:
            setattr(self, f"failed_{kind}_operations", getattr(self, f"failed_{kind}_operations") + 1)
        elif kind in ("rd", "wr"):
            setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + nbytes)
            if kind == "wr":
                self.wr_highest_offset = max(self.wr_highest_offset, offset + nbytes)
        self.last_done_ns = now

    def invalid(self, kind: str) -> None:
        """A request refused before reaching the backend (out of range, write to read-only)."""
        setattr(self, f"invalid_{kind}_operations", getattr(self, f"invalid_{kind}_operations") + 1)

    def query(self) -> dict:
        """QMP BlockDeviceStats, in QEMU's member names (this struct's are underscored)."""
        out: dict = {k: v for k, v in vars(self).items() if k != "last_done_ns"}
        if self.last_done_ns is not None:  # QEMU: present once a request has completed
            out["idle_time_ns"] = time.monotonic_ns() - self.last_done_ns
        out["account_invalid"] = True
        out["account_failed"] = True
        out["timed_stats"] = []
        return out
