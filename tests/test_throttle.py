"""auto-converge as pure logic (migration/throttle.py) and the vCPU throttle's arithmetic
(machine/vcpu_runner.py): QEMU's rule, each parameter, the sleeping share."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.machine.vcpu_runner import THROTTLE_TIMESLICE_NS, throttle_period_ns, throttle_sleep_ns
from vmferry.migration.pages import PAGE_SIZE
from vmferry.migration.throttle import PERIOD_S, AutoConverge, ThrottleParams, next_percentage

pct = st.integers(1, 99)
params = st.builds(ThrottleParams, throttle_trigger_threshold=st.integers(1, 100), cpu_throttle_initial=pct,
                   cpu_throttle_increment=pct, cpu_throttle_tailslow=st.booleans(), max_cpu_throttle=pct)


def _period(ac: AutoConverge, t: float, dirty_pages: int, sent: int, p: ThrottleParams) -> int | None:
    """One evaluated period: a sync PERIOD_S after the previous one."""
    return ac.on_sync(t + PERIOD_S, dirty_pages, sent, p)


# --- the vCPU throttle: it sleeps its share ---

@given(st.integers(0, 99))
def test_sleep_share_is_the_percentage(p: int) -> None:
    sleep = throttle_sleep_ns(p)
    assert throttle_period_ns(p) == THROTTLE_TIMESLICE_NS + sleep
    # Sleep over (run + sleep) is p %, to within the nanosecond the integer division drops.
    assert abs(sleep / throttle_period_ns(p) - p / 100) < 1e-6


def test_sleep_values() -> None:
    assert throttle_sleep_ns(0) == 0
    assert throttle_sleep_ns(50) == THROTTLE_TIMESLICE_NS
    assert throttle_sleep_ns(99) == 99 * THROTTLE_TIMESLICE_NS
    for bad in (-1, 100):
        with pytest.raises(ValueError, match="not within 0..99"):
            throttle_sleep_ns(bad)


# --- the trigger ---

def test_second_high_period_starts_at_initial_then_increments() -> None:
    p = ThrottleParams(throttle_trigger_threshold=50, cpu_throttle_initial=30, cpu_throttle_increment=15)
    ac = AutoConverge()
    ac.start(0.0, 0)
    high = 1000  # pages dirtied per period, far above half of what is sent
    sent = 0
    seen = []
    for i in range(8):
        sent += 100 * PAGE_SIZE
        seen.append(_period(ac, float(i), high, sent, p))
    assert seen == [None, 30, None, 45, None, 60, None, 75]


def test_low_periods_never_throttle_and_do_not_reset_the_count() -> None:
    p = ThrottleParams(throttle_trigger_threshold=50)
    ac = AutoConverge()
    ac.start(0.0, 0)
    # dirty 50 pages against 100 sent at 50 %: exactly the threshold is not above it.
    assert _period(ac, 0, 50, 100 * PAGE_SIZE, p) is None
    assert _period(ac, 1, 51, 200 * PAGE_SIZE, p) is None  # high #1
    assert _period(ac, 2, 10, 300 * PAGE_SIZE, p) is None  # low: the count stays at 1 (QEMU)
    assert _period(ac, 3, 51, 400 * PAGE_SIZE, p) == 20  # high #2


def test_threshold_is_effective() -> None:
    """The same period is low at 100 % and high at 10 %."""
    for threshold, throttles in ((100, False), (10, True)):
        p = ThrottleParams(throttle_trigger_threshold=threshold)
        ac = AutoConverge()
        ac.start(0.0, 0)
        _period(ac, 0, 50, 100 * PAGE_SIZE, p)
        assert (_period(ac, 1, 50, 200 * PAGE_SIZE, p) is not None) == throttles


def test_syncs_within_a_second_add_up_into_one_period() -> None:
    p = ThrottleParams()
    ac = AutoConverge()
    ac.start(0.0, 0)
    for i in range(1, 10):  # 0.1 s apart: no evaluation yet
        assert ac.on_sync(i * 0.1, 100, i * 10 * PAGE_SIZE, p) is None
    assert ac.evaluations == 0
    ac.on_sync(1.0, 100, 100 * PAGE_SIZE, p)  # 1000 dirty against 100 sent: high
    assert ac.evaluations == 1 and ac.high_count == 1


def test_max_cpu_throttle_caps() -> None:
    p = ThrottleParams(cpu_throttle_initial=40, cpu_throttle_increment=30, max_cpu_throttle=50)
    ac = AutoConverge()
    ac.start(0.0, 0)
    out = [_period(ac, float(i), 1000, (i + 1) * PAGE_SIZE, p) for i in range(6)]
    assert out == [None, 40, None, 50, None, None]  # at the cap nothing changes
    assert ac.percentage == 50


def test_tailslow_adds_only_what_the_threshold_needs() -> None:
    # Throttle at 20: cpu_now 80. Dirty 4/3 of the threshold -> ideal 80 * 3/4 = 60 -> +20,
    # but the increment is 10: +10. Dirty 1.05x the threshold -> ideal floor(76.19) = 76 -> +4.
    p = ThrottleParams(cpu_throttle_increment=10, cpu_throttle_tailslow=True)
    assert next_percentage(20, 400, 300, p) == 30
    assert next_percentage(20, 105, 100, p) == 24
    assert next_percentage(20, 105, 100, ThrottleParams(cpu_throttle_increment=10)) == 30


@given(params, st.integers(0, 99), st.integers(1, 10**12), st.integers(0, 10**12))
def test_next_percentage_bounds(p: ThrottleParams, current: int, dirty: int, threshold: int) -> None:
    new = next_percentage(current, dirty, threshold, p)
    if current == 0:
        assert new == p.cpu_throttle_initial
    else:
        # Never more than one increment up, never above the cap unless it was already there.
        assert new <= max(current, min(current + p.cpu_throttle_increment, p.max_cpu_throttle))
        if not p.cpu_throttle_tailslow:
            assert new == max(1, min(current + p.cpu_throttle_increment, p.max_cpu_throttle))


@given(params, st.lists(st.tuples(st.floats(0.01, 3.0), st.integers(0, 10**6), st.integers(0, 10**9)),
                        max_size=40))
def test_trigger_never_changes_twice_in_a_row_and_respects_its_parameters(
        p: ThrottleParams, syncs: list[tuple[float, int, int]]) -> None:
    ac = AutoConverge()
    ac.start(0.0, 0)
    t, sent = 0.0, 0
    changes: list[int] = []
    last_change_eval = -2
    for dt, dirty, more in syncs:
        t += dt
        sent += more
        new = ac.on_sync(t, dirty, sent, p)
        if new is not None:
            assert ac.evaluations - last_change_eval >= 2  # two high periods per change
            last_change_eval = ac.evaluations
            changes.append(new)
    assert ac.history == changes
    if changes:
        assert changes[0] == p.cpu_throttle_initial
        assert all(1 <= c <= 99 for c in changes)
        assert all(c <= max(p.max_cpu_throttle, p.cpu_throttle_initial) for c in changes)


def test_dirty_limit_is_refused_by_name() -> None:
    """QEMU 8.1's dirty-limit is not offered (docs/migration.md says why): refused as 7.2 does."""
    from vmferry.errors import QmpError
    from vmferry.migration.params import MigrationCapabilities, MigrationParameters

    with pytest.raises(QmpError, match="does not accept value 'dirty-limit'"):
        MigrationCapabilities().set([{"capability": "dirty-limit", "state": True}])
    for name in ("vcpu-dirty-limit", "x-vcpu-dirty-limit-period"):
        with pytest.raises(QmpError, match=f"^Parameter '{name}' is unexpected$"):
            MigrationParameters().apply({name: 1})
