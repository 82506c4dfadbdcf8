"""Will a precopy migration converge, and how long, how many bytes, how long a pause? Pure logic.

The model replays the source's own loop (source.py, source_session.py) on numbers instead of pages:

* setup (`setup_s`: the block table, marking the populated pages, starting the dirty log) comes
  first; nothing is sent for RAM in it;
* pass 1 sends every populated byte with contents (`initial_bytes`; never-populated pages cost
  nothing) at `bandwidth_bps`;
* each next pass sends what the sync that closed the previous pass found dirty: the *distinct*
  pages the guest wrote between two syncs (the pass plus `pass_overhead_s`: the sync, the
  decision, the next PASS record). A guest writing `dirty_rate_bps` into a working set of
  `working_set_bytes` at random rewrites pages it already dirtied, so over t seconds it leaves

      D(t) = W * (1 - exp(-r * t / W))          (W: working set, r: the write rate)

  distinct bytes dirty: r*t while t is short, saturating at W (`distinct_dirtied`). That is the
  curve `calc-dirty-rate` (dirty-bitmap) samples over its window; `fit_dirty_curve` recovers r and
  W from the samples;
* after each pass the engine's expected downtime is remaining / its bandwidth estimate
  (`engine_bandwidth_bps`: end to end, which under max-bandwidth is above the cap) + its fixed
  allowance (source_session.FIXED_MS), and the engine's own `convergence.switch_now` decides: never above
  downtime-limit, at once below limit/20, otherwise one more pass while a pass still halves the
  backlog, at most MAX_EXTRA_PASSES of them. The forecast thus follows the policy the migration
  will really use;
* the final round (paused) sends what is left at `bandwidth_bps`: that, plus the switchover's fixed cost
  (`switchover_ms`: vCPU pause, device state, the destination's load and ACK — known from the
  last migration's `downtime-phases`), is the pause.

It does not converge when the backlog stops shrinking while the expected downtime is above
`downtime-limit` (D is increasing in the pass length, so the backlog moves monotonically towards a
fixed point: once it grows, or stalls, above the limit it never comes back), or after MAX_PASSES
passes. Then it says what would make it converge: the least bandwidth, the least downtime-limit
(ms), or the throttle (percent of the dirty rate taken away, as auto-converge would) — each found
by bisection on the same model (each is monotone in it: more bandwidth, a higher limit or a lower
dirty rate never leaves more dirty).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from vmferry.migration.convergence import expected_downtime_ms, switch_now
from vmferry.migration.source_session import FIXED_MS

PAGE_SIZE = 4096
MAX_PASSES = 100
DEVICE_STATE_MS = FIXED_MS  # the engine's allowance in its expected downtime


def distinct_dirtied(rate_bps: float, working_set_bytes: float, seconds: float) -> float:
    """Distinct bytes a guest writing `rate_bps` uniformly at random into `working_set_bytes`
    has dirtied after `seconds`: the chance a page escaped every write is exp(-r t / W)."""
    if rate_bps <= 0 or working_set_bytes <= 0 or seconds <= 0:
        return 0.0
    return -working_set_bytes * math.expm1(-rate_bps * seconds / working_set_bytes)


# How much (RMS, as a share of the dirtied total) a larger working set may miss the samples by
# beyond the best fit's miss and still be preferred: a guest's pace is uneven (it stops writing
# while it checks its memory, a loaded host delays it), and a small working set is claimed only
# when the bend in the curve is larger than that. Larger tolerances bias the rate low on a truly
# saturating curve (2 %: 179 instead of 200 MiB/s for 200 MiB/s into 1 GiB over 2 s).
FIT_TOLERANCE = 0.005
_FIT_GRID = 400


def fit_dirty_curve(points: Sequence[tuple[float, float]], ceiling_bytes: float) -> tuple[float, float]:
    """(write rate in bytes/s, working set in bytes) of D(t) = W (1 - exp(-r t / W)) through the
    samples (seconds since the window opened, distinct bytes dirtied since), with W between what
    was seen and `ceiling_bytes` (the populated RAM: nothing larger can be dirtied).

    For each W on a log grid, r is the weighted least-squares slope of the linearised samples
    (-W ln(1 - D/W) = r t); the answer is the largest W whose RMS miss is within FIT_TOLERANCE of
    the dirtied total of the best W's: without a clear bend, the working set is the whole RAM."""
    pts = [(float(t), float(d)) for t, d in points if t > 0]
    if not pts:
        raise ValueError("no samples of the dirty curve")
    seen = max(d for _, d in pts)
    if seen <= 0:
        return 0.0, 0.0
    lo = seen * (1 + 1e-6)
    hi = max(float(ceiling_bytes), lo)
    grid = [lo * (hi / lo) ** (i / (_FIT_GRID - 1)) for i in range(_FIT_GRID)] if hi > lo else [lo]
    fits = []
    for w in grid:
        # Weighted by (1 - D/W)^2, the slope of D against the linearised value: a miss in the
        # linearised space near saturation is a small miss in bytes.
        weights = [(1 - d / w) ** 2 for _, d in pts]
        r = (sum(k * -w * math.log1p(-d / w) * t for k, (t, d) in zip(weights, pts, strict=True))
             / sum(k * t * t for k, (t, _) in zip(weights, pts, strict=True)))
        rms = math.sqrt(sum((d - distinct_dirtied(r, w, t)) ** 2 for t, d in pts) / len(pts))
        fits.append((w, r, rms))
    best = min(rms for _, _, rms in fits)
    w, r, _ = max((f for f in fits if f[2] <= best + FIT_TOLERANCE * seen), key=lambda f: f[0])
    return r, w


@dataclass(frozen=True)
class Calibration:
    """What a completed migration measured, for the next forecast (`from_migration`)."""

    bandwidth_bps: float  # the passes' bytes over the passes' time: the rate passes really ran at
    # The engine's own end-to-end measure at the end (what its switchover decisions divided by):
    # under max-bandwidth the destination applies each paced burst at its own speed, so this is
    # above the cap, and the engine expects shorter pauses than the cap will give.
    engine_bandwidth_bps: float | None
    setup_s: float
    pass_overhead_s: float  # per pass: the time between passes (syncs, drains), not sending
    # The pause besides its RAM: the downtime phases without `stopped-ram` (the last pages) and
    # without `destination-*` (the destination's own account of part of `confirm`).
    switchover_ms: float | None


def from_migration(info: dict) -> Calibration | None:
    """The calibration in a completed migration's query-migrate answer; None if it has none."""
    passes = info.get("passes") or []
    secs = sum(p["duration-ms"] for p in passes) / 1000
    if info.get("status") != "completed" or secs <= 0:
        return None
    total_ms, setup_ms = info.get("total-time", 0), info.get("setup-time", 0)
    between_ms = total_ms - setup_ms - info.get("downtime", 0) - secs * 1000
    phases = {k: v for k, v in (info.get("downtime-phases") or {}).items()
              if k != "stopped-ram" and not k.startswith("destination-")}
    return Calibration(
        bandwidth_bps=sum(p["bytes"] for p in passes) / secs,
        engine_bandwidth_bps=(info.get("convergence") or {}).get("bandwidth-bytes-per-second") or None,
        setup_s=setup_ms / 1000,
        pass_overhead_s=max(0.0, between_ms / 1000 / len(passes)),
        switchover_ms=sum(phases.values()) if phases else None)


def dirty_rate_in_first_pass(info: dict, working_set_bytes: float) -> float | None:
    """The guest's write rate while a migration's first pass ran (bytes/s), from its
    query-migrate answer: the pages its closing sync found dirty, over the pass, through D(t)
    with the working set. Set against the rate measured before that migration, it says how much
    the guest slows while it is being migrated (its vCPU shares the host with the migration);
    None without a first pass."""
    passes = info.get("passes") or []
    if not passes or passes[0]["duration-ms"] <= 0:
        return None
    dirty = passes[0]["dirty-pages"] * PAGE_SIZE
    secs = passes[0]["duration-ms"] / 1000
    if dirty <= 0:
        return 0.0
    if dirty >= working_set_bytes:
        return None  # saturated: the rate is not known, only that it filled the working set
    return -working_set_bytes * math.log1p(-dirty / working_set_bytes) / secs


@dataclass(frozen=True)
class ForecastInput:
    initial_bytes: int  # populated guest RAM: what pass 1 sends
    dirty_rate_bps: float  # bytes/s the guest writes (distinct pages while its working set is clean)
    bandwidth_bps: float  # end-to-end bytes per second, as the passes move them
    downtime_limit_ms: float
    working_set_bytes: int  # where the guest writes: the most that can be dirty at once
    device_state_ms: float = DEVICE_STATE_MS  # the engine's allowance in its switchover decision
    # What the pause costs besides the last RAM (pausing vCPUs, device state, the destination's
    # load, start and ACK): in the forecast pause, not in the decision (the engine does not know
    # it). None: the engine's allowance.
    switchover_ms: float | None = None
    setup_s: float = 0.0  # before pass 1 (the last migration's setup-time)
    # The bandwidth the engine's switchover decision divides by (Calibration.engine_bandwidth_bps);
    # None: bandwidth_bps. The pause itself moves at bandwidth_bps.
    engine_bandwidth_bps: float | None = None
    pass_overhead_s: float = 0.0  # per pass, between its last byte and the next pass's first


@dataclass(frozen=True)
class Forecast:
    converges: bool
    passes: int  # precopy passes before switchover (or the passes tried)
    total_time_s: float  # setup, the passes and the pause
    total_bytes: int  # page bytes sent, precopy and paused
    downtime_ms: float  # the pause (when converging), else the pause switching over where it stopped
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
    engine_bps = f.engine_bandwidth_bps or f.bandwidth_bps
    to_send = float(f.initial_bytes)
    elapsed = f.setup_s
    sent = 0.0
    extra = 0
    previous_remaining = float("inf")
    exp = float("inf")
    for number in range(1, MAX_PASSES + 1):
        window = to_send / f.bandwidth_bps + f.pass_overhead_s  # from one sync to the next
        elapsed += window
        sent += to_send
        remaining = distinct_dirtied(f.dirty_rate_bps, f.working_set_bytes, window)
        exp = expected_downtime_ms(round(remaining), engine_bps, f.device_state_ms)
        pages_sent = math.ceil(to_send / PAGE_SIZE)
        if switch_now(exp, int(f.downtime_limit_ms), pages_sent, math.ceil(remaining / PAGE_SIZE), extra):
            pause = _pause(f, remaining)
            return Forecast(True, number, elapsed + pause / 1000, round(sent + remaining), pause)
        if exp <= f.downtime_limit_ms:
            extra += 1
        elif remaining >= previous_remaining:  # the backlog stopped shrinking
            return Forecast(False, number, float("inf"), round(sent), _pause(f, remaining))
        previous_remaining = remaining
        to_send = remaining
    return Forecast(False, MAX_PASSES, float("inf"), round(sent), _pause(f, previous_remaining))


def _pause(f: ForecastInput, remaining: float) -> float:
    """The pause, in ms, switching over with `remaining` bytes dirty."""
    fixed = f.device_state_ms if f.switchover_ms is None else f.switchover_ms
    return remaining / f.bandwidth_bps * 1000 + fixed


def _least(lo: float, hi: float, ok: Callable[[float], bool], steps: int = 60) -> float | None:
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


def _least_int(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
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
