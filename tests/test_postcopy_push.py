"""The postcopy push's pure parts (migration/postcopy.py): the destination's grouping of a
record's pages into UFFDIO_COPY runs, and the source's background chunk, which a request halves
(never below MIN_CHUNK_PAGES) and each chunk sent doubles back (up to MAX_CHUNK_PAGES)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from vmferry.machine.ramblock import RamBlock
from vmferry.migration.pages import PAGE_SIZE
from vmferry.migration.postcopy import MAX_CHUNK_PAGES, MIN_CHUNK_PAGES, PostcopySource, _runs_at
from vmferry.migration.ram import block_table
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import RamPageList, RamPages, RamZero


@given(st.lists(st.integers(0, 400), unique=True, max_size=80), st.data())
def test_runs_at_covers_each_wanted_position_once_in_consecutive_runs(pages: list[int],
                                                                     data: st.DataObject) -> None:
    pages_a = np.array(sorted(pages), dtype=np.int64)
    want = np.array(data.draw(st.lists(st.booleans(), min_size=len(pages), max_size=len(pages))), dtype=bool)
    positions = np.flatnonzero(want)
    got = _runs_at(pages_a, positions)
    covered = [p for first, n in got for p in range(first, first + n)]
    assert covered == positions.tolist()
    for first, n in got:  # one run = consecutive positions and consecutive page numbers
        assert (np.diff(pages_a[first : first + n]) == 1).all()
    for (f1, n1), (f2, _) in zip(got, got[1:], strict=False):  # maximal: no two runs could merge
        assert not (f2 == f1 + n1 and pages_a[f2] == pages_a[f1 + n1 - 1] + 1)


def test_a_request_halves_the_chunk_and_the_push_grows_it_back() -> None:
    npages = 4096
    block = RamBlock("r", 0, npages * PAGE_SIZE)
    try:
        block.write(0, b"\x01" * (npages * PAGE_SIZE))
        pending = np.arange(0, npages, 3)  # scattered: RAM_PAGE_LIST records
        enc = StreamEncoder()
        pc = PostcopySource([block], enc, [pending])
        dec = StreamDecoder()
        dec.feed(enc.header() + enc.encode(block_table([block])))
        dec.next_record()
        dec.next_record()
        got: list[int] = []

        def send(bufs: list) -> int:
            raw = b"".join(bytes(b) for b in bufs)
            dec.feed(raw)
            while (rec := dec.next_record()) is not None:
                if isinstance(rec, RamPageList):
                    got.extend(rec.pages.tolist())
                elif isinstance(rec, RamPages | RamZero):
                    got.extend(range(rec.first_page, rec.first_page + rec.page_count))
            return len(raw)

        for _ in range(4):
            pc.step(send)
        assert pc._chunk == MAX_CHUNK_PAGES
        pc.request(1, 3000, 1)
        pc.step(send, background=False)
        assert pc._chunk == MAX_CHUNK_PAGES // 2
        for _ in range(5):
            pc.request(1, int(pending[-1]), 1)
            pc.step(send, background=False)
        assert pc._chunk == MIN_CHUNK_PAGES
        pc.step(send)
        assert pc._chunk == 2 * MIN_CHUNK_PAGES
        while not pc.done():
            pc.step(send)
        assert sorted(got) == pending.tolist()  # every page once, none else
    finally:
        block.close()
