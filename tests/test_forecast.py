"""The migration forecast (migration/forecast.py): cases worked by hand, and properties."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vmferry.migration.convergence import DOWNTIME_GOAL_FRACTION
from vmferry.migration.forecast import (
    DEVICE_STATE_MS,
    FIT_TOLERANCE,
    ForecastInput,
    dirty_rate_in_first_pass,
    distinct_dirtied,
    fit_dirty_curve,
    forecast,
    from_migration,
)
from vmferry.migration.source_session import FIXED_MS

MiB = 1 << 20


def _in(**kw: float) -> ForecastInput:
    base = {"initial_bytes": 256 * MiB, "dirty_rate_bps": 0.0, "bandwidth_bps": 100.0 * MiB,
            "downtime_limit_ms": 300, "working_set_bytes": 256 * MiB}
    return ForecastInput(**{**base, **kw})


def test_the_allowance_is_the_engines() -> None:
    assert DEVICE_STATE_MS == FIXED_MS


def test_a_static_guest_moves_in_one_pass() -> None:
    f = forecast(_in())
    assert f.converges and f.passes == 1
    assert f.total_bytes == 256 * MiB
    assert f.downtime_ms == DEVICE_STATE_MS
    assert f.total_time_s == pytest.approx(2.56 + DEVICE_STATE_MS / 1000)


def test_setup_and_the_time_between_passes_count() -> None:
    f = forecast(_in(setup_s=0.5, pass_overhead_s=0.01, switchover_ms=20))
    assert f.passes == 1 and f.downtime_ms == 20
    assert f.total_time_s == pytest.approx(0.5 + 2.56 + 0.01 + 0.02)


def test_a_slow_dirtier_converges_geometrically() -> None:
    # 10 MiB/s into 256 MiB against 100 MiB/s. Pass 1 (2.56 s) leaves D(2.56) = 256 (1 - e^-0.1)
    # = 24.36 MiB: 243.6 + 5 ms expected, within 300 but not within 300/20 = 15, and it left
    # less than half of what it sent: another pass. Pass 2 (0.2436 s) leaves 2.43 MiB: 29.3 ms,
    # still above 15 and less than half: pass 3 (24.3 ms) leaves 0.243 MiB: 7.4 ms <= 15: switch.
    f = forecast(_in(dirty_rate_bps=10 * MiB))
    d1 = 256 * -math.expm1(-0.1)
    d2 = 256 * -math.expm1(-10 * d1 / 100 / 256)
    d3 = 256 * -math.expm1(-10 * d2 / 100 / 256)
    assert f.converges and f.passes == 3
    assert f.total_bytes == pytest.approx((256 + d1 + d2 + d3) * MiB, rel=1e-6)
    assert f.downtime_ms == pytest.approx(d3 * 10 + FIXED_MS, rel=1e-6)
    assert f.total_time_s == pytest.approx((256 + d1 + d2) / 100 + f.downtime_ms / 1000, rel=1e-6)


def test_within_the_limit_a_pass_that_does_not_halve_the_backlog_ends_it() -> None:
    # A 64 MiB working set rewritten at 1 GiB/s is all dirty after every pass longer than a
    # few ms: 640 + 5 ms expected at 100 MiB/s, within a 1000 ms limit, above 1000/20; pass 2
    # sends 64 MiB and leaves 64: not halved, switch after it.
    f = forecast(_in(dirty_rate_bps=1024 * MiB, working_set_bytes=64 * MiB, downtime_limit_ms=1000))
    assert f.converges and f.passes == 2
    assert f.downtime_ms == pytest.approx(640 + FIXED_MS, rel=1e-3)


def test_a_pause_within_a_twentieth_of_the_limit_switches_at_once() -> None:
    # The same slow dirtier with a 3 s limit: pass 1 leaves 243.6 + 5 ms expected, within
    # 3000 / 20 = 150? No: pass 2 leaves 29.3 ms, within 150: switch after pass 2, although
    # pass 2 still halved the backlog.
    f = forecast(_in(dirty_rate_bps=10 * MiB, downtime_limit_ms=3000))
    assert f.converges and f.passes == 2
    assert 3000 * DOWNTIME_GOAL_FRACTION > f.downtime_ms > 20


def test_an_engine_that_overestimates_the_link_switches_early_and_pauses_longer() -> None:
    # Under max-bandwidth the engine's end-to-end measure is the destination's apply speed:
    # 10x the cap here. Pass 1 (25.6 s at 10 MiB/s) leaves D(25.6) of 1 MiB/s into 256 MiB,
    # 24.4 MiB: the engine expects 244 + 5 ms at its 100 MiB/s (within 300, above 15; less than
    # half of what pass 1 sent: another pass), pass 2 (2.44 s) leaves 2.4 MiB: 24 + 5 ms, again
    # halved, pass 3 leaves 0.24 MiB: 7.4 ms within 15, switch; the pause runs at the cap,
    # 24 + 5 ms. At the cap itself the engine would have needed more passes.
    slow = _in(dirty_rate_bps=1 * MiB, bandwidth_bps=10 * MiB)
    honest, fooled = forecast(slow), forecast(replace(slow, engine_bandwidth_bps=100 * MiB))
    d1 = 256 * -math.expm1(-25.6 / 256)
    d2 = 256 * -math.expm1(-d1 / 10 / 256)
    d3 = 256 * -math.expm1(-d2 / 10 / 256)
    assert fooled.converges and fooled.passes == 3 and honest.passes > fooled.passes
    assert fooled.total_bytes == pytest.approx((256 + d1 + d2 + d3) * MiB, rel=1e-6)
    assert fooled.downtime_ms == pytest.approx(d3 / 10 * 1000 + FIXED_MS, rel=1e-6)


def test_dirtying_faster_than_the_link_never_converges_and_says_what_would() -> None:
    f = forecast(_in(dirty_rate_bps=200 * MiB))
    assert not f.converges and f.total_time_s == float("inf")
    assert f.bandwidth_needed_bps is not None and f.bandwidth_needed_bps > 100 * MiB
    assert f.throttle_percent_needed is not None and 30 <= f.throttle_percent_needed <= 99
    # The backlog settles near where D(backlog / bandwidth) = backlog: ~2 s of the link.
    assert f.downtime_limit_needed_ms is not None and 1500 < f.downtime_limit_needed_ms < 2600
    for advice in ({"bandwidth_bps": f.bandwidth_needed_bps},
                   {"downtime_limit_ms": f.downtime_limit_needed_ms},
                   {"dirty_rate_bps": 200 * MiB * (100 - f.throttle_percent_needed) / 100}):
        assert forecast(_in(**{"dirty_rate_bps": 200 * MiB, **advice})).converges, advice
    q = f.as_qmp()
    assert q["converges"] is False and q["total-time-ms"] is None and q["throttle-percent-needed"] >= 30


def test_a_small_working_set_converges_even_when_dirtied_faster_than_the_link() -> None:
    f = forecast(_in(dirty_rate_bps=1000 * MiB, working_set_bytes=16 * MiB, downtime_limit_ms=300))
    assert f.converges  # at most 16 MiB dirty: a 160 ms pause
    assert f.downtime_ms == pytest.approx(160 + FIXED_MS, rel=1e-3)


def test_zero_bandwidth_is_refused() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        forecast(_in(bandwidth_bps=0))


def test_distinct_pages_saturate_at_the_working_set() -> None:
    assert distinct_dirtied(50 * MiB, 1024 * MiB, 0.01) == pytest.approx(0.5 * MiB, rel=1e-3)
    # 200 MiB/s into 1 GiB for 2 s: 1 - e^-0.39 of it, 331 MiB, not 400.
    assert distinct_dirtied(200 * MiB, 1024 * MiB, 2) / MiB == pytest.approx(331.2, abs=0.1)
    assert distinct_dirtied(200 * MiB, 64 * MiB, 10) == pytest.approx(64 * MiB)
    assert distinct_dirtied(0, 64 * MiB, 10) == 0 == distinct_dirtied(10, 0, 10)


@settings(max_examples=200, deadline=None)
@given(st.floats(1e3, 1e10), st.floats(1e6, 1e12), st.floats(1e-3, 100), st.floats(1e-3, 100))
def test_distinct_dirtied_properties(rate: float, ws: float, t1: float, t2: float) -> None:
    lo, hi = sorted((t1, t2))
    d_lo, d_hi = distinct_dirtied(rate, ws, lo), distinct_dirtied(rate, ws, hi)
    assert 0 <= d_lo <= d_hi * (1 + 1e-12)
    assert d_hi <= min(rate * hi, ws) * (1 + 1e-9)


def test_the_fit_recovers_a_saturating_curve() -> None:
    rate, ws = 200 * MiB, 1024 * MiB
    points = [(t, distinct_dirtied(rate, ws, t)) for t in (0.5, 1, 1.5, 2)]
    r, w = fit_dirty_curve(points, 4096 * MiB)
    assert r == pytest.approx(rate, rel=0.05) and w == pytest.approx(ws, rel=0.3)
    # The plain window average would have said 166 MiB/s.
    assert points[-1][1] / 2 / MiB == pytest.approx(165.6, abs=0.1)


def test_a_straight_line_is_the_whole_ram() -> None:
    r, w = fit_dirty_curve([(0.5, 25 * MiB), (1.0, 50 * MiB)], 1024 * MiB)
    assert w == pytest.approx(1024 * MiB, rel=1e-6)
    assert 50 * MiB < r < 54 * MiB  # 50 MiB/s, a little more for the pages it may have rewritten


def test_nothing_dirtied_is_no_rate() -> None:
    assert fit_dirty_curve([(1.0, 0)], 1 << 30) == (0.0, 0.0)
    with pytest.raises(ValueError, match="no samples"):
        fit_dirty_curve([], 1 << 30)


@settings(max_examples=100, deadline=None)
@given(st.floats(1e5, 1e10), st.floats(1e6, 1e11), st.floats(0.1, 10), st.integers(1, 8))
def test_fit_properties(rate: float, ws: float, window: float, n: int) -> None:
    """On samples of the model itself the fit follows them (within a few % of the total: the
    grid of working sets is discrete, and a larger working set within the tolerance wins),
    never claims less than was seen, never more than the ceiling."""
    ceiling = ws * 2
    points = [(window * i / n, distinct_dirtied(rate, ws, window * i / n)) for i in range(1, n + 1)]
    seen = points[-1][1]
    # Not all of it flat at the working set already: a curve that saturated before its first
    # sample says the working set and nothing about the rate.
    assume(seen > 0 and rate * window / n < 2 * ws)
    r, w = fit_dirty_curve(points, ceiling)
    assert seen <= w <= ceiling * (1 + 1e-9)
    for t, d in points:
        assert abs(distinct_dirtied(r, w, t) - d) <= (0.03 + 2 * FIT_TOLERANCE) * seen


def test_calibration_from_a_completed_migration() -> None:
    info = {"status": "completed", "total-time": 1200, "setup-time": 100, "downtime": 10,
            "convergence": {"bandwidth-bytes-per-second": 900 * MiB},
            "passes": [{"bytes": 800 * MiB, "duration-ms": 1000.0}, {"bytes": 20 * MiB, "duration-ms": 60.0}],
            "downtime-phases": {"pause": 0.5, "stopped-ram": 3.0, "stopped-devices": 2.0, "end": 0.1,
                                "confirm": 4.0, "destination-apply": 1.0, "destination-start": 0.5}}
    c = from_migration(info)
    assert c is not None
    assert c.bandwidth_bps == pytest.approx(820 * MiB / 1.06)
    assert c.setup_s == pytest.approx(0.1) and c.engine_bandwidth_bps == 900 * MiB
    assert c.pass_overhead_s == pytest.approx((1200 - 100 - 10 - 1060) / 2 / 1000)
    assert c.switchover_ms == pytest.approx(0.5 + 2.0 + 0.1 + 4.0)
    assert from_migration({**info, "status": "failed"}) is None
    assert from_migration({"status": "completed", "passes": []}) is None


def test_the_rate_in_a_first_pass() -> None:
    # 1 GiB working set, 2 s pass, 100 MiB found dirty: r = -W ln(1 - D/W) / t = 51.3 MiB/s.
    info = {"passes": [{"dirty-pages": 100 * 256, "duration-ms": 2000.0}]}
    r = dirty_rate_in_first_pass(info, 1024 * MiB)
    assert r == pytest.approx(-1024 * math.log1p(-100 / 1024) / 2 * MiB)
    assert distinct_dirtied(r, 1024 * MiB, 2) == pytest.approx(100 * MiB)
    assert dirty_rate_in_first_pass(info, 100 * MiB) is None  # saturated
    assert dirty_rate_in_first_pass({"passes": [{"dirty-pages": 0, "duration-ms": 5.0}]}, MiB) == 0
    assert dirty_rate_in_first_pass({}, MiB) is None


inputs = st.builds(
    ForecastInput,
    initial_bytes=st.integers(0, 64 << 30),
    dirty_rate_bps=st.floats(0, 10e9),
    bandwidth_bps=st.floats(1e5, 10e9),
    downtime_limit_ms=st.integers(0, 10_000),
    working_set_bytes=st.integers(0, 64 << 30),
    setup_s=st.floats(0, 10),
    pass_overhead_s=st.floats(0, 0.1),
)


@settings(max_examples=200, deadline=None)
@given(inputs)
def test_forecast_properties(f: ForecastInput) -> None:
    r = forecast(f)
    assert r.passes >= 1
    if r.converges:
        assert r.total_bytes >= f.initial_bytes
        assert r.downtime_ms <= f.downtime_limit_ms + 1e-6 or r.downtime_ms == pytest.approx(DEVICE_STATE_MS)
        assert r.total_time_s >= f.setup_s + f.initial_bytes / f.bandwidth_bps
        # More bandwidth never makes it worse.
        assert forecast(replace(f, bandwidth_bps=f.bandwidth_bps * 2)).converges
    else:
        if r.bandwidth_needed_bps is not None:
            assert forecast(replace(f, bandwidth_bps=r.bandwidth_needed_bps)).converges
        if r.throttle_percent_needed is not None:
            slower = f.dirty_rate_bps * (100 - r.throttle_percent_needed) / 100
            assert forecast(replace(f, dirty_rate_bps=slower)).converges
        if r.downtime_limit_needed_ms is not None:
            assert forecast(replace(f, downtime_limit_ms=r.downtime_limit_needed_ms)).converges
