"""postcopy-preempt's request path in one process, over a real socket pair and a real userfaultfd
(migration/preempt.py): the destination's fault resolver writes each PAGE_REQUEST on the preempt
connection and places the pages the source's preempt thread sends back; nothing goes on the
return path while the connection is up; when it breaks, the pages still waited on are asked for
again on the return path. Threads that fault read guest RAM through calls that release the GIL
(RamBlock.read), as device emulation does."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from polling import wait_for
from vmferry.machine.ramblock import RamBlock
from vmferry.migration.pages import PAGE_SIZE
from vmferry.migration.postcopy import PostcopyDestination, PostcopySource, SwitchDiscards
from vmferry.migration.preempt import PreemptLink, PreemptPages, PreemptReceiver, PreemptSender
from vmferry.migration.ram import RamLoader, block_table
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import RamPageList, RamPages, RamZero
from vmferry.transport.channel import SocketChannel

NPAGES = 256
MID = "m1"


@dataclass
class _Pair:
    src: RamBlock
    dst: RamBlock
    content: np.ndarray
    source: PostcopySource
    dest: PostcopyDestination
    sender: PreemptSender
    link: PreemptLink
    sink: PreemptPages
    main: StreamDecoder  # the main stream's, past its header and RAM_BLOCKS
    on_return_path: list[tuple[int, int, int]] = field(default_factory=list)
    lost: list[BaseException] = field(default_factory=list)

    def expected(self, page: int) -> bytes:
        return bytes(self.content[page].tolist()) * (PAGE_SIZE // 8)


@pytest.fixture
def pair() -> Iterator[_Pair]:
    """Pages 64..199 to come (200.. never populated: zero); the source's preempt thread running;
    the destination's resolver polling the userfaultfd and the preempt connection."""
    src = RamBlock("r", 0, NPAGES * PAGE_SIZE)
    dst = RamBlock("r", 0, NPAGES * PAGE_SIZE)
    a, b = socket.socketpair()
    src_ch, dst_ch = SocketChannel(a, "preempt-src"), SocketChannel(b, "preempt-dst")
    rng = np.random.default_rng(3)
    content = rng.integers(1, 255, size=(NPAGES, 8), dtype=np.uint8)
    content[::5] = 0  # some zero pages
    for p in range(NPAGES):
        src.write(p * PAGE_SIZE, bytes(content[p].tolist()) * (PAGE_SIZE // 8))
    for p in range(64):
        dst.write(p * PAGE_SIZE, bytes(content[p].tolist()) * (PAGE_SIZE // 8))
    received = {1: np.zeros(NPAGES, dtype=bool)}
    received[1][:64] = True
    on_rp: list[tuple[int, int, int]] = []
    dest = PostcopyDestination({1: dst}, received, lambda bid, p, n: on_rp.append((bid, p, n)), lambda: [])
    enc = StreamEncoder()
    main = StreamDecoder()
    main.feed(enc.header() + enc.encode(block_table([src])))
    main.next_record()
    main.next_record()
    late, to_come = SwitchDiscards([src]).final([np.arange(64, 200)])  # no early discard here
    source = PostcopySource([src], enc, to_come)
    sender = PreemptSender(src_ch, MID, block_table([src]), "")
    loader = RamLoader([dst])  # checks the preempt channel's RAM_BLOCKS against this "VM"
    sink = PreemptPages(loader, lambda: dest)
    rx = PreemptReceiver(sink, MID)
    chunk = memoryview(bytearray(1 << 16))
    while rx.records < 2:  # hello and RAM_BLOCKS, as the destination's hello thread reads them
        assert rx.read_from(dst_ch.recv_into, chunk)
    counted: list[int] = []
    link = PreemptLink(dst_ch, rx, lambda: counted.append(1))
    p = _Pair(src, dst, content, source, dest, sender, link, sink, main, on_rp)
    dest.attach_preempt(link, p.lost.append)
    for cmd in late:
        dest.discard(cmd.block_id, cmd.data)
    dest.listen()
    sender.start(source)
    try:
        yield p
    finally:
        dest.close()  # wakes a reader still blocked, whatever failed
        sender.close()
        dst_ch.close()
        loader.release()
        src.close()
        dst.close()


def _read_in_thread(p: _Pair, pages: list[int]) -> tuple[threading.Thread, dict[int, bytes]]:
    reads: dict[int, bytes] = {}

    def reader() -> None:  # a device thread reading guest RAM mid-postcopy
        for page in pages:
            reads[page] = p.dst.read(page * PAGE_SIZE, PAGE_SIZE)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    return t, reads


def test_requests_and_their_pages_go_on_the_preempt_connection_only(pair: _Pair) -> None:
    p = pair
    pages = [150, 3, 230, 100, 101, 65, 199, 120]  # 3: here already; 230: never populated (zero)
    t, reads = _read_in_thread(p, pages)
    t.join(60)
    assert not t.is_alive(), (p.dest.error, p.lost, reads.keys())
    for page in pages:
        want = p.expected(page) if page < 200 else bytes(PAGE_SIZE)
        assert reads[page] == want, page
    assert p.on_return_path == [] and p.lost == []  # nothing went on the return path
    # 150, 100 (101 came with it), 65, 199, 120: requested once each, served on the preempt thread.
    assert p.dest.requests == p.source.requests == 5
    assert p.sink.pages + p.sink.zero_pages == p.dest.pages_placed > 0
    assert p.link.rx.page_bytes > 0 and p.dest.local_zero >= 1
    # The rest on the main stream, then END on the preempt connection: the resolver reads it,
    # answers with END and lets the connection go.
    while not p.source.done():
        _push_step(p)
    p.sender.finish()
    wait_for(lambda: p.link.ended.is_set() and p.link.released.is_set(), "the preempt END to be read", 30)
    assert p.dest.all_placed()
    got = np.frombuffer(p.dst.read(0, 200 * PAGE_SIZE), dtype=np.uint8).reshape(200, PAGE_SIZE)
    assert (got[:, :8] == p.content[:200]).all()


def _place_records(p: _Pair, sent: list[bytes]) -> None:
    """The main stream, short-circuited: what the push sent is decoded and placed."""
    for data in sent:
        p.main.feed(data)
    sent.clear()
    while (rec := p.main.next_record()) is not None:
        if isinstance(rec, RamPages):
            p.dest.place_pages(rec.block_id, rec.first_page, memoryview(rec.data))
        elif isinstance(rec, RamPageList):  # the push sends a chunk's scattered pages as one record
            p.dest.place_list(rec.block_id, rec.pages, memoryview(rec.data))
        elif isinstance(rec, RamZero):
            p.dest.place_zero(rec.block_id, rec.first_page, rec.page_count)


def _push_step(p: _Pair, background: bool = True) -> None:
    sent: list[bytes] = []
    p.source.step(lambda bufs: sent.append(b"".join(bytes(b) for b in bufs)) or len(sent[-1]), background)
    _place_records(p, sent)


def test_a_broken_preempt_connection_asks_again_on_the_return_path(pair: _Pair) -> None:
    p = pair
    p.sender.close()  # the source's side of the preempt connection goes away
    t, reads = _read_in_thread(p, [170])
    wait_for(lambda: p.on_return_path, "the request for page 170 on the return path", 30)
    assert (1, 170, 1) in p.on_return_path
    assert p.lost  # the destination's driver was told
    assert p.link.released.is_set()
    # The source serves it on the main stream, as without postcopy-preempt.
    p.source.request(1, 170, 1)
    _push_step(p, background=False)
    t.join(30)
    assert not t.is_alive()
    assert reads[170] == p.expected(170)
