"""Rate limiting and throughput arithmetic, driven by a fake clock: no real time is measured."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.transport.bandwidth import MAX_SLEEP_SLICE_S, RateLimiter, ThroughputMeter


class FakeClock:
    """A clock whose sleep() moves time forward instead of waiting, and records every slice."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []
        self.on_sleep = None  # optional hook called after each slice

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()


def make_limiter(bytes_per_s: int) -> tuple[RateLimiter, FakeClock]:
    clock = FakeClock()
    return RateLimiter(bytes_per_s, clock=clock, sleep=clock.sleep), clock


def test_unlimited_never_waits() -> None:
    limiter, clock = make_limiter(0)
    limiter.record(10**12)
    assert limiter.delay_s() == 0.0
    assert limiter.wait() is True
    assert clock.sleeps == []


def test_debt_is_bytes_over_rate_and_paid_in_short_slices() -> None:
    limiter, clock = make_limiter(1000)
    limiter.record(500)
    assert limiter.delay_s() == pytest.approx(0.5)
    assert limiter.wait() is True
    assert sum(clock.sleeps) == pytest.approx(0.5)
    assert max(clock.sleeps) <= MAX_SLEEP_SLICE_S
    assert limiter.delay_s() == 0.0


def test_a_sender_slower_than_the_limit_never_waits() -> None:
    limiter, clock = make_limiter(1000)
    limiter.record(500)
    clock.now += 1.0
    assert limiter.delay_s() == 0.0


def test_idle_time_earns_no_burst_credit() -> None:
    limiter, clock = make_limiter(1000)
    clock.now += 60.0
    limiter.record(2000)
    assert limiter.delay_s() == pytest.approx(2.0)


def test_raising_the_limit_mid_wait_reprices_what_is_owed() -> None:
    limiter, clock = make_limiter(1000)
    limiter.record(1000)  # 1 s owed at 1000 B/s

    def raise_limit_halfway() -> None:
        if clock.now >= 100.5 and limiter.bytes_per_s == 1000:
            limiter.set_limit(2000)  # 500 bytes still owed -> 0.25 s at the new rate

    clock.on_sleep = raise_limit_halfway
    assert limiter.wait() is True
    assert clock.now - 100.0 == pytest.approx(0.75, abs=MAX_SLEEP_SLICE_S)


def test_removing_the_limit_mid_wait_releases_at_once() -> None:
    limiter, clock = make_limiter(1000)
    limiter.record(10_000)

    def unlimit() -> None:
        if len(clock.sleeps) == 3:
            limiter.set_limit(0)

    clock.on_sleep = unlimit
    assert limiter.wait() is True
    assert len(clock.sleeps) == 3


def test_limit_set_after_unlimited_starts_fresh() -> None:
    limiter, clock = make_limiter(0)
    limiter.record(10**9)
    limiter.set_limit(1000)
    assert limiter.delay_s() == 0.0
    limiter.record(100)
    assert limiter.delay_s() == pytest.approx(0.1)


def test_cancel_stops_the_wait_within_one_slice() -> None:
    limiter, clock = make_limiter(1)
    limiter.record(10**6)
    assert limiter.wait(cancelled=lambda: len(clock.sleeps) >= 4) is False
    assert len(clock.sleeps) == 4


def test_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        RateLimiter(-1)
    limiter, _ = make_limiter(5)
    with pytest.raises(ValueError):
        limiter.set_limit(-5)


@given(
    st.integers(min_value=10**6, max_value=10**10),
    st.lists(st.integers(min_value=1, max_value=4 << 20), min_size=1, max_size=50),
)
def test_paced_sender_averages_at_most_the_limit(bytes_per_s: int, batches: list[int]) -> None:
    # An infinitely fast sender that waits before each batch: by the time the last batch was
    # reported and paid for, the fake clock has advanced at least total / rate.
    limiter, clock = make_limiter(bytes_per_s)
    start = clock.now
    for nbytes in batches:
        limiter.wait()
        limiter.record(nbytes)
    limiter.wait()
    # (The tolerance covers float rounding of a clock that reads ~100 s.)
    assert clock.now - start >= sum(batches) / bytes_per_s - 1e-9
    # ... and not more than that: a sender at full speed is not held back beyond the limit.
    assert clock.now - start <= sum(batches) / bytes_per_s + 1e-9


def make_meter(window_s: float = 1.0, resolution_s: float = 0.01) -> tuple[ThroughputMeter, FakeClock]:
    clock = FakeClock()
    return ThroughputMeter(clock=clock, window_s=window_s, resolution_s=resolution_s), clock


def test_average_is_total_over_wall_time() -> None:
    meter, clock = make_meter()
    for _ in range(10):
        clock.now += 0.1
        meter.record(1_000_000)
    assert meter.total_bytes == 10_000_000
    assert meter.average_bps() == pytest.approx(10_000_000)


def test_average_counts_idle_time() -> None:
    meter, clock = make_meter()
    meter.record(1000)
    clock.now += 10.0
    assert meter.average_bps() == pytest.approx(100.0)


def test_window_follows_a_change_of_speed() -> None:
    meter, clock = make_meter(window_s=1.0, resolution_s=0.01)
    for _ in range(500):  # 5 s at 1 MB/s
        clock.now += 0.01
        meter.record(10_000)
    for _ in range(200):  # then 2 s at 5 MB/s
        clock.now += 0.01
        meter.record(50_000)
    assert meter.window_bps() == pytest.approx(5_000_000, rel=0.02)
    assert meter.average_bps() == pytest.approx((5_000_000 + 10_000_000) / 7, rel=0.01)


def test_window_shorter_than_elapsed_time_uses_elapsed() -> None:
    meter, clock = make_meter(window_s=10.0)
    clock.now += 0.5
    meter.record(1000)
    assert meter.window_bps() == pytest.approx(2000)


def test_window_after_going_idle_falls_to_zero() -> None:
    meter, clock = make_meter(window_s=1.0)
    for _ in range(100):
        clock.now += 0.01
        meter.record(10_000)
    clock.now += 5.0
    assert meter.window_bps() == 0.0


def test_history_stays_bounded() -> None:
    meter, clock = make_meter(window_s=1.0, resolution_s=0.01)
    for _ in range(100_000):
        clock.now += 0.0001
        meter.record(4096)
    assert len(meter._samples) <= 1.0 / 0.01 + 2
    assert meter.window_bps() == pytest.approx(4096 / 0.0001, rel=0.02)


def test_reset_starts_again() -> None:
    meter, clock = make_meter()
    meter.record(10**9)
    clock.now += 1.0
    meter.reset()
    clock.now += 1.0
    meter.record(100)
    assert meter.total_bytes == 100
    assert meter.average_bps() == pytest.approx(100)
