"""Pure logic of the RAM saver: bitmaps to runs, zero detection, and the state machine."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import MigrationError
from vmferry.migration.convergence import convergence_verdict, expected_downtime_ms, switch_now
from vmferry.migration.pages import PAGE_SIZE, count_dirty, dirty_page_indexes, runs, segments, zero_pages
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


@given(st.sets(st.integers(0, 2000)), st.data())
def test_segments_cover_exactly_the_pages(pages: set[int], data: st.DataObject) -> None:
    idx = np.array(sorted(pages), dtype=np.int64)
    zero = np.array(data.draw(st.lists(st.booleans(), min_size=idx.size, max_size=idx.size)), dtype=bool)
    covered: list[int] = []
    for pos, first, count, is_zero in segments(idx, zero):
        assert idx[pos] == first and count >= 1
        assert list(range(first, first + count)) == idx[pos : pos + count].tolist()
        assert (zero[pos : pos + count] == is_zero).all()
        covered.extend(range(first, first + count))
    assert covered == sorted(pages)


@given(st.sets(st.integers(0, 2000)), st.integers(1, 50))
def test_runs_cover_exactly_the_pages(pages: set[int], max_run: int) -> None:
    covered: list[int] = []
    for first, count in runs(np.array(sorted(pages), dtype=np.int64), max_run):
        assert 0 < count <= max_run
        covered.extend(range(first, first + count))
    assert covered == sorted(pages)


def test_segments_merge_consecutive_pages_of_one_kind() -> None:
    idx = np.array([1, 2, 3, 7, 8, 20])
    zero = np.array([False, False, True, True, True, False])
    expected = [(0, 1, 2, False), (2, 3, 1, True), (3, 7, 2, True), (5, 20, 1, False)]
    assert list(segments(idx, zero)) == expected


def test_zero_pages() -> None:
    buf = bytearray(PAGE_SIZE * 6)
    buf[PAGE_SIZE * 2 + 4095] = 1  # last byte of page 2
    buf[PAGE_SIZE * 3] = 7  # first byte of page 3
    z = zero_pages(np.frombuffer(buf, dtype=np.uint64).reshape(-1, 512))
    assert z.tolist() == [True, True, False, False, True, True]


def test_expected_downtime_and_verdict() -> None:
    assert expected_downtime_ms(0, 0) == 0
    assert expected_downtime_ms(100, 0) == float("inf")
    assert expected_downtime_ms(1_000_000, 1e9) == pytest.approx(1.0)
    assert convergence_verdict(2e9, 1e9).startswith("not converging")
    assert convergence_verdict(0.5e9, 1e9).startswith("converging")


def test_switch_over_only_within_the_limit_and_when_more_passes_do_not_pay() -> None:
    # above the limit: never, however little the last pass left
    assert not switch_now(301, 300, pages_sent=1000, dirty_after=999, extra_passes=50)
    # within the goal (a twentieth of the limit): at once
    assert switch_now(15, 300, pages_sent=1000, dirty_after=10, extra_passes=0)
    assert not switch_now(30, 300, pages_sent=1000, dirty_after=10, extra_passes=0)
    # within the limit but the last pass more than halved the backlog: one more pass
    assert not switch_now(200, 300, pages_sent=1000, dirty_after=300, extra_passes=0)
    # the last pass no longer halves the backlog (guest dirties at half the bandwidth): stop
    assert switch_now(200, 300, pages_sent=1000, dirty_after=600, extra_passes=0)
    # extra passes are bounded
    assert switch_now(200, 300, pages_sent=1000, dirty_after=300, extra_passes=8)


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


def test_populated_hint_allocates_exactly_the_hinted_pages() -> None:
    """The destination's prefault thread allocates what the source said pass 1 will send, and
    nothing else (a 4 GiB guest that used 100 MiB must still cost ~100 MiB there)."""
    from vmferry.machine.ramblock import RamBlock
    from vmferry.migration.ram import RamLoader
    from vmferry.stream.records import RamBlockInfo, RamBlocks

    block = RamBlock("pc.ram", 0, 64 << 20)
    loader = RamLoader([block])
    loader.check_layout(RamBlocks((RamBlockInfo(1, "pc.ram", 0, 64 << 20),)))
    hinted = np.zeros(block.npages, dtype=bool)
    hinted[10:600] = True
    hinted[5000] = True
    loader.prefault(1, np.packbits(hinted, bitorder="little").tobytes())
    loader.wait_prefaulted()
    assert (block.populated_pages() == hinted).all()
    loader.release()
    block.close()
