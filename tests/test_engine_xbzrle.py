"""XBZRLE in the migration engine, in memory (the harness of test_engine_sessions.py): the test is
the guest, rewriting a few bytes of pages already sent, so cached pages go as RAM_DELTA records.

On one stream, and on several data channels delivered in any order, with channels breaking:
after the switchover the destination's memory must equal the source's. A delta applied onto a
page that is not its base would break the equality (and its checksum: refused by name).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_engine_sessions import PAGE, MemoryChannels, Pair
from vmferry.errors import MigrationError, StreamError
from vmferry.migration.ram import block_table
from vmferry.migration.xbzrle import XbzrleSource
from vmferry.stream.records import DELTA_ENTRY, RamDelta

# (block, page, offset in the page, value): 8 bytes rewritten, the rest of the page kept. Few
# pages, so that pages are rewritten after they were sent (and cached); a few far ones share
# cache slots with them (64-page cache).
PAGES = st.one_of(st.integers(0, 40), st.integers(60, 110), st.integers(0, 1099))
pokes = st.tuples(st.integers(0, 1), st.integers(0, 12), st.integers(0, PAGE // 8 - 1), st.integers(0, 255))
writes = st.tuples(st.integers(0, 1), PAGES, st.integers(0, 3))
actions = st.lists(st.one_of(
    st.tuples(st.just("poke"), pokes), st.tuples(st.just("poke"), pokes), st.tuples(st.just("write"), writes),
    st.tuples(st.just("step"), st.none()), st.tuples(st.just("deliver"), st.integers(0, 3)),
    st.tuples(st.just("kill"), st.tuples(st.integers(0, 3), st.integers(0, 1 << 20)))), min_size=30,
    max_size=120)


def poke(p: Pair, block: int, page: int, word: int, value: int) -> None:
    b = p.src_blocks[block]
    page %= b.npages
    b.write(b.gpa + page * PAGE + word * 8, bytes([value, 1, 2, 3, 4, 5, 6, value ^ 0xFF]))


def with_xbzrle(p: Pair, cache_pages: int) -> XbzrleSource:
    x = XbzrleSource(cache_pages * PAGE, PAGE, [b.npages for b in p.src_blocks])
    p.ram.xbzrle = x
    return x


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(before=st.lists(writes, min_size=1, max_size=60), during=actions, n=st.integers(0, 3),
       cache_pages=st.sampled_from([64, 4096]), data=st.data())
def test_destination_equals_source_with_deltas_on_one_or_several_channels(
    before: list[tuple[int, int, int]], during: list[tuple[str, object]], n: int, cache_pages: int,
    data: st.DataObject
) -> None:
    """n = 0: the main stream; else n data channels, each chunk's whole pages on one chosen by
    hypothesis, its deltas on their bases' channels, delivered in any order, channels broken at
    any byte (all but one). A 64-page cache makes pages fight for slots."""
    p = Pair(downtime_limit_ms=0)
    try:
        chans = None
        if n:
            chans = MemoryChannels(n, block_table(p.src_blocks), p.ram_loader,
                                   lambda k: data.draw(st.integers(0, k - 1)))
            p.ram.multifd = chans  # type: ignore[assignment]
        x = with_xbzrle(p, cache_pages)
        for block, page, value in before:
            p.write(block, page, value + 1)
        p.setup()
        for kind, arg in during:
            if kind == "poke":
                poke(p, *arg)  # type: ignore[misc]
            elif kind == "write":
                p.write(*arg)  # type: ignore[misc]
            elif kind == "step":
                p.step()
            elif chans is not None and kind == "deliver":
                chans.deliver(arg)  # type: ignore[arg-type]
            elif chans is not None and kind == "kill":
                chans.kill(*arg)  # type: ignore[misc]
        p.switch_over()
        p.assert_equal()
        assert x.counters.pages + x.counters.overflow + x.counters.cache_miss + x.counters.unchanged \
            == x.counters.looked_up
    finally:
        p.close()


def test_sparse_rewrites_go_as_small_deltas(pair: Pair) -> None:
    x = with_xbzrle(pair, 4096)
    for page in range(1100):
        pair.write(0, page, 7)
    pair.setup()
    pair.session.step_budget = 1 << 30
    pair.step()  # pass 1: every page whole, and cached
    sent_after_pass_1 = pair.ram.counters.bytes
    for page in range(0, 1100, 2):
        poke(pair, 0, page, 3, 9)
    pair.ram.sync()
    pair.session.step(pair.out, pair.tick)
    resent = pair.ram.counters.bytes - sent_after_pass_1
    assert x.counters.pages == 550 and x.counters.overflow == 0
    assert resent * 40 < 550 * PAGE  # ~45 bytes a page instead of 4096
    pair.switch_over()
    pair.assert_equal()


@pytest.fixture
def pair() -> Pair:
    p = Pair()
    yield p
    p.close()


def test_a_delta_onto_another_generation_is_refused_naming_ram_delta(pair: Pair) -> None:
    """The destination holds page 3 at generation 2; a delta against generation 1 is refused."""
    pair.setup()
    loader = pair.ram_loader
    page = np.full((1, PAGE), 5, dtype=np.uint8)
    loader.apply_pages(1, np.array([3]), page.tobytes(), 2)
    e = np.zeros(1, dtype=DELTA_ENTRY)
    e["page"], e["base"], e["length"] = 3, 1, 3
    with pytest.raises(MigrationError, match=r"RAM_DELTA for page 3 of RAM block 'pc.ram' is against "
                                             r"generation 1, but this destination holds generation 2"):
        loader.apply_delta(RamDelta(1, e, b"\x00\x01\x07"), 3)
    e["base"] = 2  # the right base, but the result is not what the source checksummed
    with pytest.raises(StreamError, match="RAM_DELTA page 3 does not match its checksum"):
        loader.apply_delta(RamDelta(1, e, b"\x00\x01\x07"), 3)
    assert (np.frombuffer(pair.dst_blocks[0].mem, dtype=np.uint8)[3 * PAGE : 4 * PAGE] == 5).all()
    loader.apply_delta(RamDelta(1, e, b"\x00\x01\x07"), 2)  # not newer than what it holds: skipped
