"""auto-converge and dirty-limit as pure logic (migration/throttle.py, machine/dirty_limit.py) and
the vCPU throttle's arithmetic (machine/vcpu_runner.py): QEMU's rules, each parameter, the
sleeping share; `--accel` parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import QmpError, VmferryError
from vmferry.machine.dirty_limit import THROTTLE_PCT_MAX, adjust_throttle_us, tolerance_mb_s
from vmferry.machine.vcpu_runner import THROTTLE_TIMESLICE_NS, throttle_period_ns, throttle_sleep_ns
from vmferry.migration.pages import PAGE_SIZE
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.throttle import (
    PERIOD_S,
    AutoConverge,
    DirtyLimitConverge,
    ThrottleParams,
    next_percentage,
)
from vmferry.options import parse_accel

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


# --- dirty-limit: the capability, its parameters, the trigger, the limiter's arithmetic ---

def test_dirty_limit_needs_the_ring_and_excludes_auto_converge() -> None:
    """QEMU 8.1's checks and messages (migrate_caps_check)."""
    no_ring = "^dirty-limit requires KVM with accelerator property 'dirty-ring-size' set$"
    with pytest.raises(QmpError, match=no_ring):
        MigrationCapabilities().set([{"capability": "dirty-limit", "state": True}])
    caps = MigrationCapabilities(dirty_ring=True)
    caps.set([{"capability": "dirty-limit", "state": True}])
    assert caps.enabled("dirty-limit")
    with pytest.raises(QmpError, match="^dirty-limit conflicts with auto-converge"):
        caps.set([{"capability": "auto-converge", "state": True}])
    assert not caps.enabled("auto-converge")  # all or nothing
    caps.set([{"capability": "dirty-limit", "state": False}, {"capability": "auto-converge", "state": True}])
    assert caps.enabled("auto-converge") and not caps.enabled("dirty-limit")


def test_dirty_limit_parameters_qemu_defaults_and_bounds() -> None:
    p = MigrationParameters()
    assert (p.vcpu_dirty_limit, p.x_vcpu_dirty_limit_period) == (1, 1000)  # QEMU 8.1's defaults
    for name, bad in (("vcpu-dirty-limit", 0), ("x-vcpu-dirty-limit-period", 0),
                      ("x-vcpu-dirty-limit-period", 1001)):
        with pytest.raises(QmpError, match=f"^Parameter '{name}' expects"):
            p.apply({name: bad})
    p.apply({"vcpu-dirty-limit": 200, "x-vcpu-dirty-limit-period": 1})
    assert (p.vcpu_dirty_limit, p.x_vcpu_dirty_limit_period) == (200, 1)


def test_dirty_limit_trigger_sets_the_quota_once_per_value() -> None:
    """The auto-converge trigger: the second high period sets vcpu-dirty-limit; a further firing
    with the same quota changes nothing; a changed parameter is applied at the next firing."""
    dl = DirtyLimitConverge()
    dl.start(0.0, 0)
    high = 1000  # pages dirtied per period, against 1 byte sent: always high
    assert dl.on_sync(1.0, high, 1, 50, 7) is None  # first high period
    assert dl.on_sync(2.0, high, 2, 50, 7) == 7
    assert dl.on_sync(3.0, high, 3, 50, 7) is None
    assert dl.on_sync(4.0, high, 4, 50, 7) is None  # fired again, same quota: nothing to do
    assert dl.on_sync(5.0, high, 5, 50, 9) is None
    assert dl.on_sync(6.0, high, 6, 50, 9) == 9
    assert dl.history == [7, 9]
    low = DirtyLimitConverge()
    low.start(0.0, 0)
    for t in range(1, 10):  # dirty below the threshold: never fires
        assert low.on_sync(float(t), 1, t * 10 * PAGE_SIZE, 50, 1) is None


mbs = st.integers(0, 100_000)


@given(st.integers(0, 10**9), st.integers(1, 100_000), mbs, st.integers(0, 10**7))
def test_limiter_adjustment_properties(throttle: int, quota: int, current: int, ring_full: int) -> None:
    """QEMU's dirtylimit adjustment: within the tolerance nothing changes; above the quota the
    sleep never shrinks, below it never grows (but for the cap); never negative, never above
    99 ring-full times; a vCPU that dirtied nothing (outside the tolerance) sleeps 0."""
    throttle = min(throttle, ring_full * THROTTLE_PCT_MAX)
    new = adjust_throttle_us(throttle, quota, current, ring_full)
    if abs(current - quota) <= tolerance_mb_s(quota):
        assert new == throttle
        return
    assert 0 <= new <= ring_full * THROTTLE_PCT_MAX
    if current == 0:
        assert new == 0
    elif current > quota:
        assert new >= throttle
    else:
        assert new <= throttle


def test_limiter_adjustment_examples() -> None:
    # 130 MB/s against a quota of 1: relative error 99 % -> the linear step, pct 99: +99 ring-full
    # times, which is also the cap.
    assert adjust_throttle_us(0, 1, 130, 1000) == 99_000
    # 150 against 100: error 33 % -> the fixed step, a tenth of the ring-full time.
    assert adjust_throttle_us(5000, 100, 150, 1000) == 5100
    assert adjust_throttle_us(5000, 150, 100, 1000) == 4900
    assert adjust_throttle_us(5000, 100, 120, 1000) == 5000  # within 25 MB/s: done
    # The dead band: QEMU's 25 MB/s for large quotas, a quarter of small ones (at least 1 MB/s),
    # so the default quota of 1 MB/s does slow a vCPU writing 9 MB/s.
    assert [tolerance_mb_s(q) for q in (1, 8, 40, 100, 1000)] == [1, 2, 10, 25, 25]
    assert adjust_throttle_us(0, 1, 9, 1000) == 1000 * 88 // 12
    assert adjust_throttle_us(0, 1, 2, 1000) == 0


@pytest.mark.parametrize(("text", "ring"), [("kvm", 0), ("kvm,dirty-ring-size=4096", 4096),
                                            ("accel=kvm,dirty-ring-size=1024", 1024)])
def test_accel_option(text: str, ring: int) -> None:
    assert parse_accel(text) == ring


@pytest.mark.parametrize(("text", "error"), [
    ("tcg", "accelerator 'tcg' is not supported"),
    ("kvm,dirty-ring=4096", "property 'dirty-ring' is not supported"),
    ("kvm,dirty-ring-size=1000", "dirty-ring-size must be a power of two"),
    ("kvm,dirty-ring-size=lots", "dirty-ring-size 'lots' is not a number"),
])
def test_accel_option_refused_by_name(text: str, error: str) -> None:
    with pytest.raises(VmferryError, match=error):
        parse_accel(text)
