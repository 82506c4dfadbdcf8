"""Convergence arithmetic: measured bandwidth, dirty rate, expected downtime. Pure logic.

Definitions (reported in query-migrate and per pass):
- bandwidth: bytes the channel accepted (returned from sendmsg) over the wall time they took,
  measured per pass; never bytes written into a buffer.
- dirty rate: pages found dirty by a sync, divided by the time since the previous sync.
- expected downtime: bytes still dirty after a sync divided by the measured bandwidth, plus the
  measured cost of sending device state (small). Switch over when it is within downtime-limit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassReport:
    """What one iteration pass did; kept as history and reported through QMP."""

    number: int
    pages_sent: int
    zero_pages: int
    bytes_sent: int
    duration_s: float
    bandwidth_bps: float  # bytes/s accepted by the channel during this pass
    dirty_pages_after: int  # dirty pages found by the sync that ended this pass
    dirty_rate_pps: float  # pages/s dirtied while this pass ran
    expected_downtime_ms: float

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
            "expected-downtime": round(self.expected_downtime_ms, 3),
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
