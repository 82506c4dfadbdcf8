"""Postcopy's pure parts and its RAM path in one process (migration/postcopy.py): blocktime and
fault-latency arithmetic; and a source push feeding a destination whose pages are missing under
a real userfaultfd, while a reader thread faults on them (requests are served first, every page
ends up with the source's contents, zero pages that never come are resolved locally)."""

from __future__ import annotations

import threading

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from polling import wait_for
from vmferry.machine.ramblock import RamBlock
from vmferry.migration.pages import PAGE_SIZE
from vmferry.migration.postcopy import (
    Blocktime,
    FaultLatency,
    PostcopyDestination,
    PostcopySource,
    bitmap_to_mask,
    mask_to_bitmap,
)
from vmferry.migration.ram import block_table
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Command, RamPageList, RamPages, RamZero


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_page_bitmaps_round_trip(bits: list[bool]) -> None:
    mask = np.array(bits, dtype=bool)
    assert (bitmap_to_mask(mask_to_bitmap(mask), mask.size) == mask).all()


def test_blocktime_counts_per_vcpu_and_the_time_all_were_blocked() -> None:
    bt = Blocktime(2)
    bt.blocked(0, 1.0)
    bt.blocked(1, 2.0)  # both blocked from 2.0
    bt.blocked(1, 2.5)  # a repeated fault message changes nothing
    bt.unblocked(0, 3.0)  # all-blocked ends at 3.0
    bt.unblocked(1, 6.0)
    bt.unblocked(1, 7.0)  # not blocked: nothing
    assert bt.per_vcpu == [2.0, 4.0]
    assert bt.total == 1.0


@given(st.lists(st.floats(min_value=0, max_value=1e7), min_size=1, max_size=200))
def test_fault_latency_histogram_holds_every_sample_and_percentiles_are_samples(xs: list[float]) -> None:
    lat = FaultLatency()
    for x in xs:
        lat.add(x)
    assert sum(lat.histogram) == len(xs)
    assert lat.percentile(50) in xs and lat.percentile(99) in xs
    assert lat.percentile(50) <= lat.percentile(99) <= lat.max_us == max(xs)
    for k, n in enumerate(lat.histogram):
        inside = [x for x in xs if (k == 0 and x < 2) or (1 << k) <= x < (1 << (k + 1))
                  or (k == len(lat.histogram) - 1 and x >= (1 << k))]
        assert n == len(inside)


def test_source_push_and_destination_faults_place_every_page_right() -> None:
    npages = 256
    src = RamBlock("r", 0, npages * PAGE_SIZE)
    dst = RamBlock("r", 0, npages * PAGE_SIZE)
    received = {1: np.zeros(npages, dtype=bool)}
    source: PostcopySource | None = None
    dest = PostcopyDestination({1: dst}, received,
                               lambda b, p, n: source.request(b, p, n) if source else None, lambda: [])
    try:
        rng = np.random.default_rng(1)
        content = rng.integers(1, 255, size=(npages, 8), dtype=np.uint8)
        content[::7] = 0  # some zero pages
        for p in range(npages):
            src.write(p * PAGE_SIZE, bytes(content[p].tolist()) * (PAGE_SIZE // 8))
        # Pages 0..63 arrived in precopy; the rest is to come, but 200.. were never populated
        # on the source (zero there, not in the postcopy set).
        for p in range(64):
            dst.write(p * PAGE_SIZE, bytes(content[p].tolist()) * (PAGE_SIZE // 8))
        pending = np.arange(64, 200)
        received[1][:64] = True
        enc = StreamEncoder()
        source = PostcopySource([src], enc, [pending])
        for cmd in source.discard_commands():
            dest.discard(cmd.block_id, cmd.data)
        dest.listen()
        reads: dict[int, bytes] = {}

        def reader() -> None:  # a device thread reading guest RAM mid-postcopy
            for p in (150, 3, 230, 199, 100):
                reads[p] = dst.read(p * PAGE_SIZE, PAGE_SIZE)

        t = threading.Thread(target=reader)
        t.start()
        wait_for(lambda: dest.requests, "the reader's fault on page 150 to be requested", 30)
        dec = StreamDecoder()
        first_placed: list[int] = []
        dec.feed(enc.header() + enc.encode(block_table([src])))
        dec.next_record()
        dec.next_record()
        sent: list[bytes] = []
        while not source.done():
            source.step(lambda bufs: sent.append(b"".join(bytes(b) for b in bufs)) or len(sent[-1]))
            while sent:
                dec.feed(sent.pop(0))
            while (rec := dec.next_record()) is not None:
                if isinstance(rec, RamPages | RamZero):
                    first_placed.append(rec.first_page)
                elif isinstance(rec, RamPageList):
                    first_placed.append(int(rec.pages[0]))
                if isinstance(rec, RamPages):
                    dest.place_pages(rec.block_id, rec.first_page, memoryview(rec.data))
                elif isinstance(rec, RamPageList):
                    dest.place_list(rec.block_id, rec.pages, memoryview(rec.data))
                elif isinstance(rec, RamZero):
                    dest.place_zero(rec.block_id, rec.first_page, rec.page_count)
                else:
                    assert isinstance(rec, Command)
            if t.is_alive() and not source.done():
                source.wakeup.wait(0.001)
        t.join(30)
        assert not t.is_alive(), (dest.error, reads.keys(), dest.local_zero, dest.requests, dest._waiting)
        assert dest.all_placed() and dest.pages_placed == 136
        for p, data in reads.items():
            want = bytes(content[p].tolist()) * (PAGE_SIZE // 8) if p < 200 else bytes(PAGE_SIZE)
            assert data == want, p
        dest.close()  # the rest: never-populated pages read as zero
        got = np.frombuffer(dst.read(0, npages * PAGE_SIZE), dtype=np.uint8).reshape(npages, PAGE_SIZE)
        assert (got[:200, :8] == content[:200]).all() and not got[200:].any()
        assert first_placed[0] == 150  # the requested page went before the background push
        assert source.requests >= 1 and dest.local_zero >= 1  # page 230 was resolved locally
    finally:
        dest.close()  # wakes a reader still blocked, whatever failed
        src.close()
        dst.close()


def test_the_automatic_switch_goes_when_precopy_cannot_make_it_in_the_budget() -> None:
    from vmferry.migration.postcopy import precopy_overruns

    mib = 1 << 20
    # Dirtying faster than the link: never converges, whatever the budget.
    why = precopy_overruns(1.0, 64 * mib, 200 * mib, 110 * mib, 300, 1024 * mib, 10**9)
    assert why is not None and "does not converge" in why
    # Converging, but not within the budget: 1 GiB at 100 MiB/s is ~10 s.
    why = precopy_overruns(0.0, 1024 * mib, 1 * mib, 100 * mib, 300, 1024 * mib, 5000)
    assert why is not None and "beyond x-postcopy-after-ms 5000" in why
    # Within the budget, off (0), or nothing measured yet: no switch.
    assert precopy_overruns(0.0, 1024 * mib, 1 * mib, 100 * mib, 300, 1024 * mib, 60_000) is None
    assert precopy_overruns(1.0, 64 * mib, 200 * mib, 110 * mib, 300, 1024 * mib, 0) is None
    assert precopy_overruns(1.0, 64 * mib, 200 * mib, 0.0, 300, 1024 * mib, 1000) is None
