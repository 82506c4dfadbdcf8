"""The migration forecast (migration/forecast.py): cases worked by hand, and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.migration.forecast import DEVICE_STATE_MS, ForecastInput, forecast

MiB = 1 << 20


def _in(**kw: float) -> ForecastInput:
    base = {"initial_bytes": 256 * MiB, "dirty_rate_bps": 0.0, "bandwidth_bps": 100.0 * MiB,
            "downtime_limit_ms": 300, "working_set_bytes": 256 * MiB}
    return ForecastInput(**{**base, **kw})


def test_a_static_guest_moves_in_one_pass() -> None:
    f = forecast(_in())
    assert f.converges and f.passes == 1
    assert f.total_bytes == 256 * MiB
    assert f.downtime_ms == DEVICE_STATE_MS
    assert f.total_time_s == pytest.approx(2.56 + DEVICE_STATE_MS / 1000)


def test_a_slow_dirtier_converges_geometrically() -> None:
    # 10 MiB/s against 100 MiB/s: pass 1 (2.56 s) leaves 25.6 MiB, pass 2 (0.256 s) 2.56 MiB:
    # 25.6 ms + 2 ms expected, within 5 % of 300 ms? no (15 ms); pass 2 sent 25.6 MiB and left
    # 2.56 (< half): one more pass leaves 0.256 MiB = 2.56 + 2 ms < 15 ms: switch.
    f = forecast(_in(dirty_rate_bps=10 * MiB))
    assert f.converges and f.passes == 3
    assert f.downtime_ms == pytest.approx(2.56 + 2, rel=1e-3)
    assert f.total_bytes == pytest.approx((256 + 25.6 + 2.56 + 0.256) * MiB, rel=1e-3)


def test_dirtying_faster_than_the_link_never_converges_and_says_what_would() -> None:
    f = forecast(_in(dirty_rate_bps=200 * MiB))
    assert not f.converges and f.total_time_s == float("inf")
    assert f.bandwidth_needed_bps is not None and f.bandwidth_needed_bps > 100 * MiB
    assert f.throttle_percent_needed is not None and 50 <= f.throttle_percent_needed <= 99
    # The whole 256 MiB working set at 100 MiB/s is a 2.56 s pause: that limit would do.
    assert f.downtime_limit_needed_ms == pytest.approx(2562, abs=2)
    q = f.as_qmp()
    assert q["converges"] is False and q["total-time-ms"] is None and q["throttle-percent-needed"] >= 50


def test_a_small_working_set_converges_even_when_dirtied_faster_than_the_link() -> None:
    f = forecast(_in(dirty_rate_bps=1000 * MiB, working_set_bytes=16 * MiB, downtime_limit_ms=300))
    assert f.converges  # at most 16 MiB dirty: a 160 ms pause
    assert f.downtime_ms == pytest.approx(162, rel=1e-3)


def test_zero_bandwidth_is_refused() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        forecast(_in(bandwidth_bps=0))


inputs = st.builds(
    ForecastInput,
    initial_bytes=st.integers(0, 64 << 30),
    dirty_rate_bps=st.floats(0, 10e9),
    bandwidth_bps=st.floats(1e5, 10e9),
    downtime_limit_ms=st.integers(0, 10_000),
    working_set_bytes=st.integers(0, 64 << 30),
)


@settings(max_examples=200, deadline=None)
@given(inputs)
def test_forecast_properties(f: ForecastInput) -> None:
    r = forecast(f)
    assert r.passes >= 1
    if r.converges:
        assert r.total_bytes >= f.initial_bytes
        assert r.downtime_ms <= f.downtime_limit_ms + 1e-6 or r.downtime_ms == pytest.approx(DEVICE_STATE_MS)
        assert r.total_time_s >= f.initial_bytes / f.bandwidth_bps
        # More bandwidth never makes it worse.
        assert forecast(ForecastInput(f.initial_bytes, f.dirty_rate_bps, f.bandwidth_bps * 2,
                                      f.downtime_limit_ms, f.working_set_bytes)).converges
    else:
        if r.bandwidth_needed_bps is not None:
            assert forecast(ForecastInput(f.initial_bytes, f.dirty_rate_bps, r.bandwidth_needed_bps,
                                          f.downtime_limit_ms, f.working_set_bytes)).converges
        if r.throttle_percent_needed is not None:
            slower = f.dirty_rate_bps * (100 - r.throttle_percent_needed) / 100
            assert forecast(ForecastInput(f.initial_bytes, slower, f.bandwidth_bps,
                                          f.downtime_limit_ms, f.working_set_bytes)).converges
