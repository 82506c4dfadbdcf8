"""Postcopy's two discards at the switch (migration/postcopy.py, SwitchDiscards), on the real
engine in memory: a RamSaver in a SourceSession, its bytes through the real StreamDecoder into a
DestSession with the RamLoader and the PostcopyLoader, RAM in plain RamBlocks (real anonymous
mappings; the test is the guest, writing through RamBlock.write, which the dirty log notes).

Precopy runs with writes in between; then the early discard (D1, the guest still "running":
more writes follow), then the stopped sync's discard (D2). Checked before LISTEN:
- every page the destination holds that differs from the source is to come (nothing stale is
  left; the pages written between the two syncs included), and every page not to come has the
  source's contents on the destination;
- a page to come was written during the migration or differs: no clean received copy of a page
  left alone since setup is dropped;
- the destination dropped exactly its populated copies of the pages to come, and D2 carries only
  pages D1 did not.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_engine_sessions import Out
from vmferry.errors import MigrationError
from vmferry.machine.ramblock import RamBlock
from vmferry.migration.dest_session import DestSession
from vmferry.migration.pages import PAGE_SIZE
from vmferry.migration.postcopy import DISCARD_EARLY, PostcopyLoader, SwitchDiscards, bitmap_to_mask
from vmferry.migration.ram import RamLoader, RamSaver
from vmferry.migration.source_session import SourceSession
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Command, CommandCode

BLOCKS = (("pc.ram", 0, 700), ("extra", 1 << 30, 300))


class Pair:
    def __init__(self) -> None:
        self.src = [RamBlock(n, gpa, pages * PAGE_SIZE) for n, gpa, pages in BLOCKS]
        self.dst = [RamBlock(n, gpa, pages * PAGE_SIZE) for n, gpa, pages in BLOCKS]
        self.encoder = StreamEncoder(machine_type="test")
        self.ram = RamSaver(self.src, self.encoder)
        self.session = SourceSession([self.ram], self.encoder, {"smp": 1}, lambda: 0, step_budget=1)
        self.loader = RamLoader(self.dst)
        self.postcopy = PostcopyLoader(self.loader, lambda: True, lambda b, p, n: None, lambda: [],
                                       lambda: None)
        self.dest = DestSession([self.loader, self.postcopy])
        self.dec = StreamDecoder(place=self.loader.place)
        self.now = 0.0
        self.written: list[np.ndarray] = [np.zeros(b.npages, dtype=bool) for b in self.src]
        self.sent_commands: list[Command] = []
        self.out = Out(self.encoder, self.dec, self.dest)

    def tick(self) -> float:
        self.now += 0.001
        return self.now

    def write(self, block: int, page: int, value: int, during: bool = True) -> None:
        b = self.src[block]
        page %= b.npages
        b.write(b.gpa + page * PAGE_SIZE, bytes([value]) * PAGE_SIZE)
        if during:
            self.written[block][page] = True

    def commands(self, cmds: list[Command]) -> None:
        self.sent_commands += cmds
        self.out.send([self.encoder.encode(c) for c in cmds])

    def close(self) -> None:
        self.session.cleanup()
        self.dest.release()
        for b in self.src + self.dst:
            b.close()


def _pages(b: RamBlock) -> np.ndarray:
    return np.frombuffer(b.mem, dtype=np.uint8).reshape(-1, PAGE_SIZE)


writes = st.tuples(st.integers(0, 1), st.integers(0, 699), st.integers(1, 255))
actions = st.lists(st.one_of(st.tuples(st.just("write"), writes), st.tuples(st.just("step"), st.none())),
                   max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(writes, max_size=30), precopy=actions, between=st.lists(writes, max_size=20))
def test_the_two_discards_leave_nothing_stale_and_drop_nothing_clean(
    before: list[tuple[int, int, int]], precopy: list[tuple[str, object]],
    between: list[tuple[int, int, int]],
) -> None:
    p = Pair()
    try:
        for w in before:
            p.write(*w, during=False)  # found by the population scan at setup
        p.session.setup(p.out, p.tick())
        p.commands([Command(CommandCode.POSTCOPY_ADVISE)])
        for kind, arg in precopy:
            if kind == "write":
                p.write(*arg)  # type: ignore[misc]
            else:
                p.session.step(p.out, p.tick)
        held = [_pages(b).copy() for b in p.dst]  # the destination's copies: no page comes from here on
        populated = [b.populated_pages() for b in p.dst]
        switch = SwitchDiscards(p.src)
        p.ram.sync()
        early = switch.early(p.ram.take_pending())
        p.commands(early)
        for w in between:  # the guest still runs on the source while the early discard is applied
            p.write(*w)
        p.ram.sync()  # the vCPUs stopped
        late, pending = switch.final(p.ram.take_pending())
        p.commands(late)
        assert all(c.index == DISCARD_EARLY for c in early) and all(c.index == 0 for c in late)
        for i, (s, d) in enumerate(zip(p.src, p.dst, strict=True)):
            bid = i + 1
            to_come = np.zeros(s.npages, dtype=bool)
            to_come[pending[i]] = True
            stale = (_pages(s) != held[i]).any(axis=1)
            # Nothing stale left behind; what is not to come is the source's page on the destination.
            assert not (stale & ~to_come).any(), np.flatnonzero(stale & ~to_come)[:10]
            # Nothing clean dropped: a page to come differs or was written during the migration.
            needless = to_come & ~stale & ~p.written[i]
            assert not needless.any(), np.flatnonzero(needless)[:10]
            # The destination agrees on the set and dropped exactly its populated copies of it.
            if p.postcopy.dest is None:  # no discard at all: nothing was to come
                assert not to_come.any()
            else:
                assert (p.postcopy.dest.to_come[bid] == to_come).all()
            assert (d.populated_pages() == (populated[i] & ~to_come)).all()
            keep = ~to_come
            assert (_pages(d)[keep] == _pages(s)[keep]).all()
            # D2 carries only what D1 did not.
            d1 = np.zeros(s.npages, dtype=bool)
            for c in early:
                if c.block_id == bid:
                    d1 |= bitmap_to_mask(c.data, s.npages)
            for c in late:
                if c.block_id == bid:
                    assert not (bitmap_to_mask(c.data, s.npages) & d1).any()
        dest = p.postcopy.dest
        if dest is None:
            return
        dropped = sum(int(np.count_nonzero(pop & ~b.populated_pages())) for pop, b in zip(populated, p.dst,
                                                                                          strict=True))
        assert dest.early_pages_discarded + dest.pages_discarded == dropped
    finally:
        p.close()


def test_a_precopy_page_after_a_discard_is_refused() -> None:
    p = Pair()
    try:
        p.write(0, 5, 9, during=False)
        p.session.setup(p.out, p.tick())
        p.commands([Command(CommandCode.POSTCOPY_ADVISE)])
        p.ram.sync()
        p.commands(SwitchDiscards(p.src).early(p.ram.take_pending()))
        p.write(0, 6, 1)
        p.ram.sync()
        with pytest.raises(MigrationError, match="between POSTCOPY_DISCARD and POSTCOPY_LISTEN"):
            p.ram.send_dirty(p.out.send, stable=True, cancelled=lambda: False)
    finally:
        p.close()
