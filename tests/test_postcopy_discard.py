"""Postcopy's discard at LISTEN on real RAM (a real anonymous mapping, mincore(2) as the judge):
the destination drops exactly its stale copies of the pages to come (re-dirtied on the source),
keeps every clean page with its contents, and leaves never-touched pages alone; batched through
process_madvise(2) and through the per-range madvise fallback alike."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmferry.machine import ramblock
from vmferry.machine.ramblock import RamBlock
from vmferry.migration.pages import PAGE_SIZE
from vmferry.migration.postcopy import PostcopyDestination, mask_to_bitmap


def _page(p: int) -> bytes:
    return (p % 251 + 1).to_bytes(1, "little") * PAGE_SIZE


def _fill(block: RamBlock, populated: np.ndarray) -> None:
    for p in np.flatnonzero(populated).tolist():
        block.write(p * PAGE_SIZE, _page(p))


def _check(block: RamBlock, populated: np.ndarray, to_come: np.ndarray) -> None:
    now = block.populated_pages()
    # Dropped: exactly the populated pages to come; never-touched pages stay untouched.
    assert (now == (populated & ~to_come)).all(), np.flatnonzero(now != (populated & ~to_come))[:10]
    for p in np.flatnonzero(now).tolist():  # every clean page keeps its data
        assert block.read(p * PAGE_SIZE, PAGE_SIZE) == _page(p), p


@pytest.fixture(params=["process_madvise", "madvise"])
def batching(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "madvise":  # as on a kernel that refuses MADV_DONTNEED in process_madvise
        monkeypatch.setattr(ramblock._batched_madvise, "supported", False)
    return request.param


def test_discard_drops_exactly_the_populated_pages_to_come(batching: str) -> None:
    npages = 3000  # > IOV_MAX runs below: several system calls
    block = RamBlock("r", 0, npages * PAGE_SIZE)
    try:
        populated = np.zeros(npages, dtype=bool)
        populated[: npages - 200] = True
        populated[100:150] = False  # a hole never touched
        to_come = np.zeros(npages, dtype=bool)
        to_come[::2] = True  # 1 500 runs of one page
        to_come[120:130] = True  # to come but never populated here: nothing to drop
        _fill(block, populated)
        dropped = block.discard_mask(to_come)
        assert dropped == int(np.count_nonzero(populated & to_come))
        _check(block, populated, to_come)
    finally:
        block.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_discard_matches_the_mask_for_any_pages(batching: str, data: st.DataObject) -> None:
    npages = data.draw(st.integers(1, 300))
    populated = np.array(data.draw(st.lists(st.booleans(), min_size=npages, max_size=npages)), dtype=bool)
    to_come = np.array(data.draw(st.lists(st.booleans(), min_size=npages, max_size=npages)), dtype=bool)
    block = RamBlock("r", 0, npages * PAGE_SIZE)
    try:
        _fill(block, populated)
        assert block.discard_mask(to_come) == int(np.count_nonzero(populated & to_come))
        _check(block, populated, to_come)
    finally:
        block.close()


def test_listen_drops_the_re_dirtied_pages_the_destination_had_and_no_clean_one() -> None:
    npages = 512
    block = RamBlock("r", 0, npages * PAGE_SIZE)
    received = {1: np.zeros(npages, dtype=bool)}
    dest = PostcopyDestination({1: block}, received, lambda b, p, n: None, lambda: [])
    try:
        populated = np.zeros(npages, dtype=bool)
        populated[:400] = True  # arrived in precopy
        received[1][:400] = True
        _fill(block, populated)
        to_come = np.zeros(npages, dtype=bool)
        to_come[np.random.default_rng(3).choice(400, 150, replace=False)] = True  # re-dirtied
        to_come[450:460] = True  # never sent in precopy: nothing here to drop
        dest.discard(1, mask_to_bitmap(to_come))
        dest.listen()
        assert dest.pages_to_come == 160 and dest.pages_discarded == 150
        assert not received[1][to_come].any()
        _check(block, populated, to_come)  # mincore and reads of clean pages: no fault taken
    finally:
        dest.close()
        block.close()
