"""A migration trace (docs/trace.md) for a QEMU source, made from the `query-migrate` answers the
benchmark polls, so `vmferry report` can draw QEMU's migration beside vmferry's.

QEMU has no trace of its own in this format; what it reports is sampled (bench_migration.py polls
every 20 ms), so events are placed at the sample that first showed them:
- `setup` at the first answer with RAM figures: `ram.remaining` is what pass 1 will look at;
- `phase` when `status` changed;
- `sync` + `pass` when `ram.dirty-sync-count` went up (QEMU counts the setup's bitmap as sync 1,
  as vmferry does): the pass's bytes, pages and zero pages are the growth of `transferred`,
  `normal` and `duplicate` since the previous pass ended; its bandwidth is QEMU's `mbps`; its
  dirty rate `dirty-pages-rate` × page size; its expected downtime QEMU's `expected-downtime`;
  `remaining-bytes` is `ram.remaining`. A pass shorter than the polling interval merges with the
  next one;
- `downtime` at the end, with one phase (`qemu`): QEMU does not say where its pause went;
- `end` with QEMU's status, total time and bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmferry.migration.trace import TraceWriter


class QemuTrace:
    """Feed it every polled `query-migrate` answer of the source, then `close()`."""

    def __init__(self, path: str | Path, ram_bytes: int) -> None:
        self.writer = TraceWriter(path, "source", ram_bytes=ram_bytes, producer="qemu")
        self._status = ""
        self._sync = 0
        self._last: dict[str, float] = {"t": 0.0, "transferred": 0, "normal": 0, "duplicate": 0}
        self._passes = 0
        self._t_rel = 0.0

    def sample(self, info: dict[str, Any], t: float) -> None:
        """One `query-migrate` answer, taken `t` seconds after `migrate` was sent."""
        status = info.get("status", "")
        if status and status != self._status:
            self._status = status
            self.writer.event("phase", phase=status)
        ram = info.get("ram")
        if not isinstance(ram, dict):
            return
        sync = int(ram.get("dirty-sync-count", 0))
        if sync > self._sync:
            if self._sync == 0:  # the first sample: the setup's bitmap, no pass yet
                page = int(ram.get("page-size", 4096) or 4096)
                self.writer.event("setup", pages_to_send=int(ram.get("remaining", 0)) // page,
                                  unpopulated_pages=0)
                self._last.update(t=t, transferred=ram.get("transferred", 0), normal=ram.get("normal", 0),
                                  duplicate=ram.get("duplicate", 0))
            else:
                self._pass(ram, info, t, sync)
            self._sync = sync

    def _pass(self, ram: dict[str, Any], info: dict[str, Any], t: float, sync: int) -> None:
        page = int(ram.get("page-size", 4096) or 4096)
        remaining = int(ram.get("remaining", 0))
        self.writer.event("sync", sync=sync, dirty_pages=remaining // page, remaining_bytes=remaining,
                          duration_ms=0.0)
        self._passes += 1
        expected = info.get("expected-downtime")
        self.writer.event(
            "pass", pass_=self._passes, duration_ms=(t - self._last["t"]) * 1000,
            bytes=int(ram.get("transferred", 0) - self._last["transferred"]),
            pages=int(ram.get("normal", 0) - self._last["normal"]),
            zero_pages=int(ram.get("duplicate", 0) - self._last["duplicate"]),
            unpopulated_pages=0, transferred_bytes=int(ram.get("transferred", 0)),
            remaining_bytes=remaining, bandwidth_bps=float(ram.get("mbps", 0.0)) * 1e6 / 8,
            dirty_rate_bps=float(ram.get("dirty-pages-rate", 0)) * page,
            expected_downtime_ms=float(expected) if isinstance(expected, int | float) else None,
            throttle_percent=float(info.get("cpu-throttle-percentage", 0)),
        )
        self._last.update(t=t, transferred=ram.get("transferred", 0), normal=ram.get("normal", 0),
                          duplicate=ram.get("duplicate", 0))

    def close(self, final: dict[str, Any]) -> None:
        """The final `query-migrate` answer: downtime and end."""
        ram = final.get("ram", {}) if isinstance(final.get("ram"), dict) else {}
        downtime = final.get("downtime")
        if isinstance(downtime, int | float):
            self.writer.event("downtime", downtime_ms=float(downtime), bytes=0,
                              phases={"qemu": float(downtime)})
        self.writer.close(final.get("status", "failed"), total_time_ms=final.get("total-time", 0),
                          transferred_bytes=int(ram.get("transferred", 0)), error=final.get("error-desc"))
