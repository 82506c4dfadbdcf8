"""postcopy-preempt as pure logic: the two senders of the postcopy set (the background push and
the preempt channel's `take_request`) send every page exactly once between them, with its
contents, whatever the interleaving; the preempt channel's hello is checked by name."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import MigrationError
from vmferry.machine.ramblock import RamBlock
from vmferry.migration.pages import PAGE_SIZE
from vmferry.migration.postcopy import PostcopySource
from vmferry.migration.preempt import PreemptReceiver, preempt_hello
from vmferry.migration.ram import block_table
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Command, CommandCode, RamPageList, RamPages, RamZero

NPAGES = 96


class _Stream:
    """One stream's output, decoded back to (block id, page) -> contents."""

    def __init__(self, encoder: StreamEncoder, block: RamBlock) -> None:
        self.decoder = StreamDecoder()
        self.decoder.feed(encoder.header() + encoder.encode(block_table([block])))
        self.pages: list[tuple[int, int, bytes]] = []
        self.lock = threading.Lock()

    def send(self, bufs: list) -> int:
        data = b"".join(bytes(b) for b in bufs)
        with self.lock:
            self.decoder.feed(data)
            while (rec := self.decoder.next_record()) is not None:
                if isinstance(rec, RamPages):
                    raw = bytes(rec.data)
                    for k in range(rec.page_count):
                        page = raw[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
                        self.pages.append((rec.block_id, rec.first_page + k, page))
                elif isinstance(rec, RamPageList):  # the push's scattered pages, one record
                    raw = bytes(rec.data)
                    for k, p in enumerate(rec.pages.tolist()):
                        self.pages.append((rec.block_id, p, raw[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]))
                elif isinstance(rec, RamZero):
                    for k in range(rec.page_count):
                        self.pages.append((rec.block_id, rec.first_page + k, bytes(PAGE_SIZE)))
        return len(data)


def _setup(pending_mask: np.ndarray) -> tuple[RamBlock, PostcopySource, _Stream, StreamEncoder, _Stream]:
    block = RamBlock("pc.ram", 0, NPAGES * PAGE_SIZE)
    rng = np.random.default_rng(7)
    for p in range(NPAGES):
        if p % 3 == 0:
            continue  # every third page zero
        fill = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()
        block.mem[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = fill
    main = StreamEncoder()
    pc = PostcopySource([block], main, [np.flatnonzero(pending_mask)])
    pre_enc = StreamEncoder()
    return block, pc, _Stream(main, block), pre_enc, _Stream(pre_enc, block)


def _check(block: RamBlock, pending_mask: np.ndarray, *streams: _Stream) -> None:
    seen = [(bid, p) for s in streams for bid, p, _ in s.pages]
    assert len(seen) == len(set(seen)), "a page went twice"
    assert sorted(p for _, p in seen) == np.flatnonzero(pending_mask).tolist()
    for s in streams:
        for _, p, data in s.pages:
            assert data == bytes(block.mem[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])


@settings(max_examples=80, deadline=None)
@given(pending=st.lists(st.booleans(), min_size=NPAGES, max_size=NPAGES),
       schedule=st.lists(st.one_of(st.none(), st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 24))),
                         max_size=60))
def test_each_page_goes_once_on_one_of_the_two_streams(pending: list[bool],
                                                      schedule: list[tuple[int, int] | None]) -> None:
    mask = np.array(pending, dtype=bool)
    block, pc, main, pre_enc, pre = _setup(mask)
    requested = 0
    for item in schedule:  # None: a background step; (page, count): a request on the preempt channel
        if item is None:
            pc.step(main.send)
        else:
            # A few pages take the small requests' path, more (with the pages ahead) the vector one.
            first, count = item[0], min(item[1], NPAGES - item[0])
            pc.take_request(1, first, count, send=pre.send, encoder=pre_enc)
            requested += 1
    while not pc.done():
        pc.step(main.send)
    assert pc.left == 0
    assert pc.requests == requested
    assert pc.pages + pc.zero_pages == int(mask.sum())
    _check(block, mask, main, pre)
    block.close()


def test_two_threads_racing_send_each_page_once() -> None:
    mask = np.ones(NPAGES, dtype=bool)
    block, pc, main, pre_enc, pre = _setup(mask)

    def requests() -> None:
        for p in range(NPAGES - 1, -1, -2):
            pc.take_request(1, p, 1, send=pre.send, encoder=pre_enc)

    t = threading.Thread(target=requests)
    t.start()
    while not pc.done():
        pc.step(main.send)
    t.join()
    _check(block, mask, main, pre)
    block.close()


def _receiver_hello(doc: dict) -> None:
    rx = PreemptReceiver(loader=None, expect_migration="m1")  # type: ignore[arg-type]
    enc = StreamEncoder()
    rx.feed(enc.header() + enc.encode(Command(CommandCode.CHANNEL, data=json.dumps(doc).encode())))


def test_the_preempt_channel_hello_is_checked_by_name() -> None:
    _receiver_hello(json.loads(preempt_hello("m1").data))
    with pytest.raises(MigrationError, match="expected the postcopy-preempt channel, got channel 0"):
        _receiver_hello({"migration": "m1", "channel": 0, "channels": 1})
    with pytest.raises(MigrationError, match="belongs to migration 'm2'"):
        _receiver_hello({"migration": "m2", "channel": "postcopy-preempt"})
