"""Will a precopy migration converge, and how long, how many bytes, how long a pause? Pure logic.

The model replays the source's own loop (source.py) on numbers instead of pages:

* pass 1 sends every populated byte (`initial_bytes`) at `bandwidth_bps`;
* pass k+1 sends what the guest dirtied while pass k ran: `dirty_rate_bps` x its duration,
  but never more than the `working_set_bytes` the guest writes into (a guest rewriting 16 MiB
  at 1 GiB/s leaves at most 16 MiB dirty, however long a pass takes);
* after each pass the expected downtime is remaining / bandwidth + the device-state allowance,
  and the engine's own `convergence.switch_now` decides whether to switch over, so the forecast
  follows the policy the migration will really use;
* the final round (paused) sends what is left: that, plus the switchover's fixed cost
  (`switchover_ms`: vCPU pause, device state, the destination's load and ACK — known from the
  last migration's `downtime-phases`), is the pause.

It does not converge when the backlog stops shrinking while the expected downtime is above
`downtime-limit` (a fixed point), or after MAX_PASSES passes. Then it says what would make it
converge: the least bandwidth, the least downtime-limit (ms), or the throttle (percent of the dirty
rate taken away, as auto-converge would) — each found by bisection on the same model (each is
monotone in it: more bandwidth, a higher limit or a lower dirty rate never leaves more dirty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from vmferry.migration.convergence import expected_downtime_ms, switch_now

PAGE_SIZE = 4096
MAX_PASSES = 100
DEVICE_STATE_MS = 2.0  # source.py's allowance for device state


@dataclass(frozen=True)
class ForecastInput:
    initial_bytes: int  # populated guest RAM: what pass 1 sends
    dirty_rate_bps: float  # bytes the guest dirties per second (distinct pages)
    bandwidth_bps: float  # end-to-end bytes per second
    downtime_limit_ms: float
    working_set_bytes: int  # the most that can be dirty at once
    device_state_ms: float = DEVICE_STATE_MS  # the engine's allowance in its switchover decision
    # What the pause costs besides the last RAM (pausing vCPUs, device state, the destination's
    # load, start and ACK): in the forecast pause, not in the decision (the engine does not know
    # it). None: the device-state allowance.
    switchover_ms: float | None = None


@dataclass(frozen=True)
class Forecast:
    converges: bool
    passes: int  # precopy passes before switchover (or the passes tried)
    total_time_s: float  # setup excluded; the passes plus the pause
    total_bytes: int  # page bytes sent, precopy and paused
    downtime_ms: float  # the pause (when converging), else the expected pause at the fixed point
    bandwidth_needed_bps: float | None = None  # when not converging: least bandwidth that converges
    downtime_limit_needed_ms: float | None = None  # ... least downtime-limit that converges
    throttle_percent_needed: int | None = None  # ... least dirty-rate cut (%) that converges

    def as_qmp(self) -> dict[str, object]:
        out: dict[str, object] = {
            "converges": self.converges, "passes": self.passes,
            # null when it does not converge: no finite total time
            "total-time-ms": round(self.total_time_s * 1000, 3) if math.isfinite(self.total_time_s) else None,
            "total-bytes": self.total_bytes,
            "downtime-ms": round(self.downtime_ms, 3),
        }
        if not self.converges:
            bw = self.bandwidth_needed_bps
            out["bandwidth-needed"] = None if bw is None else round(bw)
            out["downtime-limit-needed"] = (None if self.downtime_limit_needed_ms is None
                                            else round(self.downtime_limit_needed_ms, 3))
            out["throttle-percent-needed"] = self.throttle_percent_needed
        return out


def _simulate(f: ForecastInput) -> Forecast:
    if f.bandwidth_bps <= 0:
        raise ValueError("bandwidth must be positive")
    to_send = float(f.initial_bytes)
    elapsed = 0.0
    sent = 0.0
    extra = 0
    previous_remaining = float("inf")
    for number in range(1, MAX_PASSES + 1):
        duration = to_send / f.bandwidth_bps
        elapsed += duration
        sent += to_send
        remaining = min(f.dirty_rate_bps * duration, float(f.working_set_bytes))
        exp = expected_downtime_ms(round(remaining), f.bandwidth_bps, f.device_state_ms)
        pages_sent = round(to_send / PAGE_SIZE)
        if switch_now(exp, int(f.downtime_limit_ms), pages_sent, round(remaining / PAGE_SIZE), extra):
            fixed = f.device_state_ms if f.switchover_ms is None else f.switchover_ms
            pause = exp - f.device_state_ms + fixed
            return Forecast(True, number, elapsed + pause / 1000, round(sent + remaining), pause)
        if exp <= f.downtime_limit_ms:
            extra += 1
        elif remaining >= previous_remaining:
            return Forecast(False, number, float("inf"), round(sent), exp)  # the backlog stopped shrinking
        previous_remaining = remaining
        to_send = remaining
    return Forecast(False, MAX_PASSES, float("inf"), round(sent), exp)


def simulate(f: ForecastInput) -> Forecast:
    """The forecast alone, without the search for what would make it converge (cheap: at most
    MAX_PASSES steps of arithmetic; the source asks it after every pass for postcopy's automatic
    switch)."""
    return _simulate(f)


def _least(lo: float, hi: float, ok, steps: int = 60) -> float | None:  # noqa: ANN001 - predicate
    """The least x in [lo, hi] with ok(x), for an ok that is monotone in x; None if not even hi."""
    if not ok(hi):
        return None
    for _ in range(steps):
        mid = (lo + hi) / 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _least_int(lo: int, hi: int, ok) -> int | None:  # noqa: ANN001 - predicate
    """The least integer in [lo, hi] with ok(), for a monotone ok; None if not even hi."""
    if not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def forecast(f: ForecastInput) -> Forecast:
    """The forecast, with what would make a non-converging migration converge."""
    result = _simulate(f)
    if result.converges:
        return result
    # Ample: every byte of the working set within the limit, the dirty rate 1000x below.
    ample = max(f.dirty_rate_bps * 1000, f.working_set_bytes * 1000 / max(f.downtime_limit_ms, 1e-3),
                f.bandwidth_bps)
    bandwidth = _least(f.bandwidth_bps, ample, lambda b: _simulate(replace(f, bandwidth_bps=b)).converges)
    limit = _least_int(int(f.downtime_limit_ms), 10**9,
                       lambda ms: _simulate(replace(f, downtime_limit_ms=ms)).converges)
    throttle = _least_int(1, 99, lambda p: _simulate(
        replace(f, dirty_rate_bps=f.dirty_rate_bps * (100 - p) / 100)).converges)
    return replace(result, bandwidth_needed_bps=bandwidth,
                   downtime_limit_needed_ms=None if limit is None else float(limit),
                   throttle_percent_needed=throttle)
