"""Convergence arithmetic: measured bandwidth, dirty rate, expected downtime. Pure logic.

Definitions (reported in query-migrate and per pass):
- pass bandwidth: the pass's own bytes (accepted by the channel) over the pass's own wall time;
  never bytes written into a buffer, never an average over earlier passes.
- bandwidth (end to end): with a return path, the rate at which the destination applied the
  stream, from its PROGRESS reports, counted only over the time it had something to apply
  (`EndToEndRate`). Without a return path, the bytes the channel accepted over the time the
  passes took.
- backlog: bytes sent that the destination has not reported applied yet (in flight).
- dirty rate: pages found dirty by a sync, divided by the time since the previous sync.
- expected downtime: (bytes the savers still have to send + the backlog) / bandwidth + a small
  fixed allowance (pausing, END, the confirmation). Switch over when it is within downtime-limit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class PassReport:
    """What one iteration pass did; kept as history and reported through QMP."""

    number: int
    pages_sent: int
    zero_pages: int
    bytes_sent: int
    duration_s: float
    bandwidth_bps: float  # this pass's bytes over this pass's time
    dirty_pages_after: int  # dirty pages found by the sync that ended this pass
    dirty_rate_pps: float  # pages/s dirtied while this pass ran
    expected_downtime_ms: float
    # bytes/s of state dirtied while this pass ran, over every saver (RAM pages and disk blocks):
    # what the convergence verdict weighs against the bandwidth
    dirty_rate_bps: float = 0.0
    # savers that sent nothing in this pass, held back while the bulk-first savers' backlog was
    # large (hold_back): RAM while a copied disk goes first
    held: tuple[str, ...] = ()

    def as_qmp(self) -> dict[str, float | int]:
        return {
            "pass": self.number,
            "pages": self.pages_sent,
            "zero-pages": self.zero_pages,
            "bytes": self.bytes_sent,
            "duration-ms": round(self.duration_s * 1000, 3),
            "mbps": round(self.bandwidth_bps * 8 / 1e6, 3),
            "dirty-pages": self.dirty_pages_after,
            "dirty-pages-rate": round(self.dirty_rate_pps),
            # -1: nothing measured yet to expect anything from (as query-migrate says it)
            "expected-downtime": (round(self.expected_downtime_ms, 3)
                                  if self.expected_downtime_ms != float("inf") else -1),
        }


def expected_downtime_ms(remaining_bytes: int, bandwidth_bps: float, fixed_ms: float = 0.0) -> float:
    """Time to send what is left at the measured rate, in ms. Infinite with no measurement yet."""
    if remaining_bytes == 0:
        return fixed_ms
    if bandwidth_bps <= 0:
        return float("inf")
    return remaining_bytes / bandwidth_bps * 1000.0 + fixed_ms


# Within downtime-limit, keep iterating while passes still shrink the backlog fast: each extra pass
# is short (it sends only what the previous one left), and every halving halves the pause. Stop
# once the expected pause is this fraction of the limit, or a pass no longer halves the backlog.
DOWNTIME_GOAL_FRACTION = 0.05
SHRINK_RATIO = 0.5
MAX_EXTRA_PASSES = 8


def switch_now(expected_ms: float, downtime_limit_ms: int, pages_sent: int, dirty_after: int,
               extra_passes: int) -> bool:
    """Switch over after this pass? Never while the expected downtime is above the limit; at
    once when it is within the goal; otherwise only when one more pass would not pay: the last
    pass left at least half of what it sent, or the extra passes are used up."""
    if expected_ms > downtime_limit_ms:
        return False
    if expected_ms <= downtime_limit_ms * DOWNTIME_GOAL_FRACTION:
        return True
    if dirty_after >= pages_sent * SHRINK_RATIO:
        return True
    return extra_passes >= MAX_EXTRA_PASSES


# While the bulk-first savers (the copied drives) still have a large backlog, the others (RAM)
# send nothing: the disk goes first and converges, then RAM (QEMU's drive-mirror path does the
# same: the mirror is `ready` before the RAM migration starts). RAM sent during the disk's bulk
# copy would be dirtied again at the guest's RAM rate while the disk still takes the link, and
# sent again. A held RAM keeps its dirty set (bounded by the RAM it has); its pending bytes stay
# in the one expected downtime, so no switchover happens while it is held.
MAX_HELD_PASSES = 8


def hold_back(bulk_left: int, bulk_sent_last: int | None, bandwidth_bps: float,
              downtime_limit_ms: int, held_passes: int) -> bool:
    """Hold the other savers back for the next pass? Only while the bulk-first savers have a
    backlog (`bulk_left` bytes, after the last sync) that

    - would take longer than downtime-limit to send at the measured bandwidth (unmeasured, as
      before the first pass: it would), and
    - still shrinks: their last pass (`bulk_sent_last` bytes; None before the first pass) left
      less than SHRINK_RATIO of what it sent — a disk the guest rewrites as fast as the link
      carries it never gets small alone, and RAM must not wait for it forever —

    and for at most MAX_HELD_PASSES passes."""
    if bulk_left <= 0 or held_passes >= MAX_HELD_PASSES:
        return False
    if bulk_sent_last is not None and bulk_left >= bulk_sent_last * SHRINK_RATIO:
        return False
    return not (bandwidth_bps > 0 and bulk_left / bandwidth_bps * 1000.0 <= downtime_limit_ms)


def convergence_verdict(dirty_rate_bps: float, bandwidth_bps: float) -> str:
    """A sentence for a person: does this migration converge, and by how much does it miss?"""
    if bandwidth_bps <= 0:
        return "no bandwidth measured yet"
    ratio = dirty_rate_bps / bandwidth_bps
    if ratio < 1.0:
        return f"converging: guest dirties memory at {ratio:.0%} of the measured bandwidth"
    return (
        f"not converging: guest dirties {dirty_rate_bps / 2**20:.1f} MiB/s but the channel moves "
        f"{bandwidth_bps / 2**20:.1f} MiB/s ({ratio:.2f}x); raise max-bandwidth or downtime-limit"
    )


class EndToEndRate:
    """The destination's apply rate, from its PROGRESS reports (stream bytes applied), each
    stamped on arrival with the source's clock and what the source had sent by then.

    An interval between two reports counts only if the destination had a backlog at its start
    (it was busy throughout: it reports again whenever it catches up, so idle time starts a new
    interval that is left out). The rate is the busy intervals' bytes over their time, over the
    most recent WINDOW_S of busy time: recent enough to follow a changing link, long enough to
    smooth the reports' arrival jitter."""

    WINDOW_S = 0.5

    def __init__(self) -> None:
        self.applied = 0
        self.samples = 0
        self._last: tuple[float, int, int] | None = None
        self._intervals: deque[tuple[int, float]] = deque()
        self._bytes = 0
        self._secs = 0.0

    def report(self, now: float, applied: int, sent: int) -> None:
        """The destination has applied `applied` stream bytes; the source had sent `sent`."""
        if self._last is not None:
            t0, a0, s0 = self._last
            if s0 > a0 and now > t0 and applied >= a0:
                self._intervals.append((applied - a0, now - t0))
                self._bytes += applied - a0
                self._secs += now - t0
                while len(self._intervals) > 1 and self._secs - self._intervals[0][1] >= self.WINDOW_S:
                    b, t = self._intervals.popleft()
                    self._bytes -= b
                    self._secs -= t
        self._last = (now, applied, sent)
        self.applied = max(self.applied, applied)
        self.samples += 1

    def rate(self) -> float:
        """Bytes/s, or 0.0 before any busy interval was measured."""
        return self._bytes / self._secs if self._secs > 0 and self._bytes > 0 else 0.0
