"""Pure logic of the RAM saver: bitmaps to runs, zero detection, and the state machine."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import MigrationError
from vmferry.migration.convergence import convergence_verdict, expected_downtime_ms, should_switch_over
from vmferry.migration.pages import PAGE_SIZE, count_dirty, dirty_page_indexes, runs, split_zero, zero_pages
from vmferry.migration.state import MigrationState, MigrationStatus


def _bitmap(pages: set[int], npages: int) -> np.ndarray:
    bm = np.zeros((npages + 63) // 64, dtype=np.uint64)
    for p in pages:
        bm[p // 64] |= np.uint64(1) << np.uint64(p % 64)
    return bm


@given(st.integers(1, 700).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_dirty_page_indexes_match_set_bits(case: tuple[int, set[int]]) -> None:
    npages, pages = case
    bm = _bitmap(pages, npages)
    assert dirty_page_indexes(bm, npages).tolist() == sorted(pages)
    assert count_dirty(bm) == len(pages)


@given(st.sets(st.integers(0, 2000)), st.integers(1, 50))
def test_runs_cover_exactly_the_pages(pages: set[int], max_run: int) -> None:
    idx = np.array(sorted(pages), dtype=np.int64)
    covered: list[int] = []
    for first, count in runs(idx, max_run):
        assert 1 <= count <= max_run
        covered.extend(range(first, first + count))
    assert covered == sorted(pages)


def test_runs_merge_consecutive_pages() -> None:
    assert list(runs(np.array([1, 2, 3, 7, 8, 20]), 64)) == [(1, 3), (7, 2), (20, 1)]
    assert list(runs(np.array([0, 1, 2, 3, 4]), 2)) == [(0, 2), (2, 2), (4, 1)]


def test_zero_pages_and_split() -> None:
    buf = bytearray(PAGE_SIZE * 6)
    buf[PAGE_SIZE * 2 + 4095] = 1  # last byte of page 2
    buf[PAGE_SIZE * 3] = 7  # first byte of page 3
    z = zero_pages(memoryview(buf))
    assert z.tolist() == [True, True, False, False, True, True]
    assert list(split_zero(z)) == [(0, 2, True), (2, 2, False), (4, 2, True)]


def test_expected_downtime_and_switch_over() -> None:
    assert expected_downtime_ms(0, 0) == 0
    assert expected_downtime_ms(100, 0) == float("inf")
    assert expected_downtime_ms(1_000_000, 1e9) == pytest.approx(1.0)
    assert should_switch_over(1_000_000, 1e9, 300)
    assert not should_switch_over(10**9, 1e9, 300)
    assert convergence_verdict(2e9, 1e9).startswith("not converging")
    assert convergence_verdict(0.5e9, 1e9).startswith("converging")


def test_state_machine_refuses_missing_transitions() -> None:
    seen: list[MigrationStatus] = []
    st_ = MigrationState(seen.append)
    st_.set(MigrationStatus.SETUP)
    st_.set(MigrationStatus.ACTIVE)
    with pytest.raises(MigrationError, match="cannot go from 'active' to 'cancelled'"):
        st_.set(MigrationStatus.CANCELLED)
    assert not st_.try_set(MigrationStatus.SETUP, MigrationStatus.ACTIVE)
    st_.set(MigrationStatus.COMPLETED)
    assert seen == ["setup", "active", "completed"]
