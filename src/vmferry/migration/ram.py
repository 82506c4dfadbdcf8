"""RAM: the saver on the source and the loader on the destination (migration/saver.py).

Source: each RamBlock gets a "migration" consumer of its dirty log. Setup marks every page that
was ever populated (mincore: known without reading a page) and starts logging; pages never
populated cost nothing on the wire because a destination's fresh RAM is zero too. A pass claims
the pages set in the consumer's bitmap into a queue and sends them, within each step's budget,
block by block, as runs of consecutive pages: zero pages as one RAM_ZERO record per run, others
as RAM_PAGES (scattered ones as RAM_PAGE_LIST).

While vCPUs run, a run is first copied into a scratch buffer: the record's checksum must cover
exactly the bytes that go on the wire, and the guest may write the page between checksum and
send. The copy runs at memory speed (numpy, GIL released); a write racing it is caught by the
dirty log (the page was re-protected at the sync that put it in our bitmap) and resent. With the
vCPUs paused (switchover) the pages are stable and go straight from guest memory.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vmferry.errors import MigrationError
from vmferry.machine.ramblock import RamBlock
from vmferry.migration.multifd import MultifdSender, PageChunk
from vmferry.migration.pages import (
    PAGE_SIZE,
    WORDS_PER_PAGE,
    count_dirty,
    dirty_page_indexes,
    runs,
    segments,
    zero_pages,
)
from vmferry.migration.saver import Buffer, Handler, Loader, Saver, SaverOutput, Send
from vmferry.migration.xbzrle import XbzrleSource, apply_deltas
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import (
    Command,
    CommandCode,
    RamBlockInfo,
    RamBlocks,
    RamDelta,
    RamPageList,
    RamPages,
    RamZero,
)

if TYPE_CHECKING:
    from vmferry.migration.postcopy import PostcopyDestination

log = logging.getLogger("vmferry.migration")
CONSUMER = "migration"
# Dirty pages handled per step: 2 MiB, one sendmsg, and the longest record. At most 3 buffers a
# record keeps a step's vector within IOV_MAX for any mix of runs (the channel splits it anyway).
CHUNK_PAGES = 512
PREFAULT_PAGES = 512  # 2 MiB per madvise: fine-grained enough to stay just ahead of the data
# From this many runs in a chunk on, its non-zero pages go as one RAM_PAGE_LIST record instead
# of a RAM_PAGES record per run (a record costs ~15 us of Python on each side).
SCATTERED_RUNS = 8


@dataclass
class PassCounters:
    pages: int = 0
    zero_pages: int = 0
    bytes: int = 0


def block_table(blocks: Sequence[RamBlock]) -> RamBlocks:
    """The RAM_BLOCKS record: ids are 1-based positions, so both sides agree on them."""
    return RamBlocks(tuple(RamBlockInfo(i + 1, b.name, b.gpa, b.nbytes) for i, b in enumerate(blocks)))


def _merge_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two ascending index arrays -> one ascending array without duplicates. Plain numpy
    (concatenate, sort, drop repeats): np.union1d's first call imports a submodule, which once
    cost 15-23 ms inside a downtime."""
    both = np.concatenate((a, b))
    both.sort(kind="stable")
    if both.size < 2:
        return both
    keep = np.empty(both.size, dtype=bool)
    keep[0] = True
    np.not_equal(both[1:], both[:-1], out=keep[1:])
    return both[keep]


def _scattered(chunk: np.ndarray, is_zero: np.ndarray) -> bool:
    """Do the chunk's pages fall into more runs than are worth a record each?"""
    breaks = (np.diff(chunk) != 1) | (is_zero[1:] != is_zero[:-1])
    return int(np.count_nonzero(breaks)) >= SCATTERED_RUNS


class RamSaver(Saver):
    """Guest RAM as a saver. Pages waiting to be sent live in two places: the consumer's dirty
    bitmap (what syncs found) and the claimed queue (what this pass took from the bitmap and has
    not sent yet). `iterate` claims the bitmap when the queue is empty, then sends from the queue
    within its budget; `complete` sends both, straight from guest memory."""

    name = "ram"

    def __init__(self, blocks: Sequence[RamBlock], encoder: StreamEncoder) -> None:
        self.blocks = list(blocks)
        self.encoder = encoder
        self.final_sync: tuple[int, float] = (0, 0.0)  # the stopped sync: pages found, ms
        self._scratch_pages = np.empty((CHUNK_PAGES, WORDS_PER_PAGE), dtype=np.uint64)
        self._list_pages = np.empty((CHUNK_PAGES, WORDS_PER_PAGE), dtype=np.uint64)
        self._started = False
        # The claimed queue: per block, the page indexes taken from its bitmap and how many of
        # them have gone out.
        self._queue: list[np.ndarray] = []
        self._queue_pos: list[int] = []
        self.populated: list[np.ndarray] = []
        self.unpopulated = 0
        self.counters = PassCounters()  # everything sent so far
        # multifd: pages go to the data channels (migration/multifd.py) instead of `out`, each
        # chunk tagged with the claim generation it was read at.
        self.multifd: MultifdSender | None = None
        self.generation = 0
        # XBZRLE (capability xbzrle): pages sent before go as deltas against the cached copy.
        self.xbzrle: XbzrleSource | None = None
        # The migration's bandwidth, bytes/s (the session's), for weighing XBZRLE's CPU time.
        self.bandwidth: Callable[[], float] | None = None

    def setup(self, out: SaverOutput | None = None) -> None:
        """Start dirty logging and mark what must be sent first: every page ever populated.
        With `out`, announce the block table and the POPULATED_HINTs. `unpopulated` is then the
        pages skipped for free."""
        self.unpopulated = 0
        self.populated = []
        if out is not None:
            out.send([out.encoder.encode(block_table(self.blocks))])
        for b in self.blocks:
            b.add_dirty_consumer(CONSUMER)
            # Logging first, then the population scan: a page first touched in between is in
            # the log; one touched before is seen by mincore. Nothing falls between.
            b.start_dirty_log()
            populated = b.populated_pages()
            b.mark_dirty(CONSUMER, populated)
            self.populated.append(populated)
            self.unpopulated += int(b.npages - np.count_nonzero(populated))
        self._queue = [np.empty(0, dtype=np.int64) for _ in self.blocks]
        self._queue_pos = [0] * len(self.blocks)
        self._started = True
        if out is not None:
            out.send([out.encoder.encode(hint) for hint in self.populated_hints()])

    def populated_hints(self) -> list[Command]:
        """POPULATED_HINT commands: which pages pass 1 will send, block by block, so the
        destination can allocate them on another thread ahead of the data."""
        return [
            Command(CommandCode.POPULATED_HINT, block_id=bid, count=int(np.count_nonzero(mask)),
                    data=np.packbits(mask, bitorder="little").tobytes())
            for bid, mask in enumerate(self.populated, start=1) if mask.any()
        ]

    def sync(self) -> None:
        """Fold KVM's dirty log into our bitmaps."""
        for b in self.blocks:
            b.sync_dirty()

    def remaining(self) -> int:
        """Pages waiting: set in the bitmaps or claimed and not sent yet."""
        queued = sum(q.size - pos for q, pos in zip(self._queue, self._queue_pos, strict=True))
        return queued + sum(count_dirty(b.dirty_bitmap(CONSUMER)) for b in self.blocks)

    def pending(self) -> int:
        """Bytes to send: with XBZRLE a dirty page weighs what pages cost on the wire last pass
        (deltas are small), the unit the bandwidth is measured in."""
        queued = self.multifd.queued_bytes() if self.multifd is not None else 0
        if self.xbzrle is None:
            return self.remaining() * PAGE_SIZE + queued
        # A page weighs what it costs on the wire, or what the time the saver spends on it would
        # carry at the bandwidth, whichever is more: the expected downtime then holds the
        # encoding of the pages left, not just their few bytes.
        per_page = self.xbzrle.bytes_per_page
        bandwidth = self.bandwidth() if self.bandwidth is not None else 0.0
        per_page = max(per_page, self.xbzrle.secs_per_page * bandwidth)
        return int(self.remaining() * per_page) + queued

    def sent_elsewhere(self) -> int:
        """multifd: page bytes sent, uncompressed — the unit of the destination's PROGRESS for
        data channels and of `pending`, so plans hold whatever the compression ratio."""
        return self.multifd.page_bytes_sent() if self.multifd is not None else 0

    def page_counts(self) -> tuple[int, int, int]:
        return self.counters.pages, self.counters.zero_pages, self.remaining()

    def iterate(self, out: SaverOutput, budget_bytes: int) -> int:
        self._requeue_lost(out)
        if not any(q.size - pos for q, pos in zip(self._queue, self._queue_pos, strict=True)):
            self._claim()
        c = self._send_queue(out.send, stable=False, cancelled=out.cancelled, budget=budget_bytes)
        return c.bytes

    def complete(self, out: SaverOutput) -> None:
        """The vCPUs are paused: the last sync, then the queue and the bitmaps straight from
        guest memory."""
        t = time.monotonic()
        self.sync()
        self.final_sync = (self.remaining(), (time.monotonic() - t) * 1000)  # pages, ms: for traces
        self._claim()
        self._send_queue(out.send, stable=True, cancelled=out.cancelled, budget=None)
        if self.multifd is not None:
            # Every data channel's last pages are out, re-sending what a lost channel carried,
            # then END on each, before device state.
            while True:
                self.multifd.drain()
                if not self._requeue_lost(out):
                    break
                self._claim()
                self._send_queue(out.send, stable=True, cancelled=out.cancelled, budget=None)
            self.multifd.finish()

    def _requeue_lost(self, out: SaverOutput) -> bool:
        """multifd: a data channel was lost. Every page ever handed to it is marked dirty again
        (the next generation sends it on the others; the destination keeps the newest copy), and
        the main stream tells the destination the channel is gone (COMMAND CHANNEL_LOST)."""
        if self.multifd is None:
            return False
        lost = self.multifd.take_lost()
        for channel, why, handed in lost:
            for bid, mask in handed.items():
                if mask.any():
                    self.blocks[bid - 1].mark_dirty(CONSUMER, mask)
                    if self.xbzrle is not None:
                        self.xbzrle.forget(bid - 1, mask)
            log.warning("multifd channel %d lost (%s): its pages go again on the others", channel, why)
            out.send([out.encoder.encode(Command(CommandCode.CHANNEL_LOST, index=channel,
                                                 data=why.encode()[:1024]))])
        return bool(lost)

    def take_pending(self) -> list[np.ndarray]:
        """Postcopy's switch (vCPUs stopped, after the last sync): per block, every page still to
        send — queued or set in the bitmap — taken out of the saver, ascending."""
        self._claim()
        out = [q[pos:].copy() for q, pos in zip(self._queue, self._queue_pos, strict=True)]
        self._queue = [np.empty(0, dtype=np.int64) for _ in self.blocks]
        self._queue_pos = [0] * len(self.blocks)
        return out

    def send_dirty(self, send: Send, *, stable: bool, cancelled: Callable[[], bool]) -> PassCounters:
        """Claim and send every page set in the bitmaps (and any still queued), in one go."""
        self._claim()
        return self._send_queue(send, stable=stable, cancelled=cancelled, budget=None)

    def _claim(self) -> None:
        """Move every page set in the bitmaps into the queue. From here a guest write
        re-dirties a page through the dirty log; the bitmap is taken and cleared in one step, so
        a sync by another consumer's thread (calc-dirty-rate) cannot lose a bit in between. Each
        claim is a new generation: a page is queued at most once per generation."""
        self.generation += 1
        if self.xbzrle is not None:
            self.xbzrle.new_generation()
        for i, b in enumerate(self.blocks):
            taken = b.take_dirty(CONSUMER)
            if taken is None:
                continue
            rest = self._queue[i][self._queue_pos[i]:]
            fresh = dirty_page_indexes(taken, b.npages)
            self._queue[i] = fresh if rest.size == 0 else _merge_sorted(rest, fresh)
            self._queue_pos[i] = 0

    def _send_queue(self, send: Send, *, stable: bool, cancelled: Callable[[], bool],
                    budget: int | None) -> PassCounters:
        """Send claimed pages, CHUNK_PAGES at a time, until the queue is empty or `budget`
        bytes went out. `stable`: the vCPUs are paused, so a run of consecutive pages goes
        straight from guest memory without the scratch copy.

        Each chunk is held in the scratch buffer (one numpy copy; or, paused and consecutive,
        a view of guest memory), scanned for zero pages, cut into records, and sent with one
        sendmsg — a sparse dirty set makes many one-page records, and a system call or a numpy
        call per page would cost more than the copy."""
        c = PassCounters()
        for i, b in enumerate(self.blocks):
            bid = i + 1
            indexes = self._queue[i]
            if self._queue_pos[i] >= indexes.size:
                continue
            guest_pages = np.frombuffer(b.mem, dtype=np.uint64).reshape(-1, WORDS_PER_PAGE)
            while self._queue_pos[i] < indexes.size:
                if budget is not None and c.bytes >= budget:
                    break
                if cancelled():
                    raise MigrationError("migration cancelled")
                at = self._queue_pos[i]
                chunk = indexes[at : at + CHUNK_PAGES]
                self._queue_pos[i] = at + chunk.size
                t0 = time.perf_counter()
                if self.multifd is not None:
                    c.bytes += self._to_channels(bid, guest_pages, chunk, c)
                    if self.xbzrle is not None:
                        self.xbzrle.timed(chunk.size, time.perf_counter() - t0)
                    continue
                held = self._hold(guest_pages, chunk, stable)
                is_zero = zero_pages(held)
                bufs: list[bytes | memoryview] = []
                if self.xbzrle is not None:
                    n = chunk.size
                    chunk, held, is_zero = self._deltas(i, chunk, held, is_zero, bufs, c)
                    if not chunk.size:
                        c.bytes += send(bufs)
                        self.xbzrle.timed(n, time.perf_counter() - t0)
                        continue
                held_bytes = memoryview(held).cast("B")
                # Scattered non-zero pages go as one RAM_PAGE_LIST; runs of them as RAM_PAGES.
                as_list = _scattered(chunk, is_zero)
                if as_list:
                    c.pages += self._page_list(bid, chunk, is_zero, held, bufs)
                for pos, first, count, zero in segments(chunk, is_zero):
                    if zero:
                        bufs.extend(self.encoder.encode_buffers(RamZero(bid, first, count)))
                        c.zero_pages += count
                    elif not as_list:
                        data = held_bytes[pos * PAGE_SIZE : (pos + count) * PAGE_SIZE]
                        bufs.extend(self.encoder.encode_ram_pages(bid, first, data))
                        c.pages += count
                c.bytes += send(bufs)
                if self.xbzrle is not None:
                    self.xbzrle.timed(chunk.size, time.perf_counter() - t0)
                del bufs, held_bytes, held
            del guest_pages
            if budget is not None and c.bytes >= budget:
                break
        self.counters.pages += c.pages
        self.counters.zero_pages += c.zero_pages
        self.counters.bytes += c.bytes
        return c

    def _deltas(self, i: int, chunk: np.ndarray, held: np.ndarray, is_zero: np.ndarray,
                bufs: list[bytes | memoryview], c: PassCounters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """XBZRLE on the main stream: the chunk's cached pages as one RAM_DELTA record (into
        `bufs`), the cache updated from `held` (the copy that is sent; guest memory only while
        paused). -> the chunk's pages still to send the usual way (zero pages and whole ones)."""
        assert self.xbzrle is not None
        u8 = held.view(np.uint8).reshape(-1, PAGE_SIZE)
        plan = self.xbzrle.plan(i, chunk, u8, is_zero)
        rows = [plan.whole]
        for (_, drows, entries), data in zip(plan.deltas, plan.delta_data, strict=True):
            bufs.extend(self.encoder.encode_buffers(RamDelta(i + 1, entries, data)))
            c.pages += drows.size
            rows.append(drows)
        sent = np.sort(np.concatenate(rows))
        if sent.size == chunk.size:  # every page sent (no zero or unchanged one): no gather
            self.xbzrle.sent(i, chunk, u8, self.generation, 0)
        else:
            self.xbzrle.sent(i, chunk[sent], u8[sent], self.generation, 0)
        keep = is_zero.copy()
        keep[plan.whole] = True
        if keep.all():
            return chunk, held, is_zero
        return chunk[keep], held[keep], is_zero[keep]

    def _to_channels(self, bid: int, guest_pages: np.ndarray, chunk: np.ndarray, c: PassCounters) -> int:
        """multifd: copy the chunk's pages (the sender threads compress and send the copy, never
        guest memory) and hand it to the least busy data channel. XBZRLE: cached pages go as
        RAM_DELTA records, each on the channel its pages' bases went on."""
        first = int(chunk[0])
        if int(chunk[-1]) - first == chunk.size - 1:
            data = guest_pages[first : first + chunk.size].copy()
        else:
            data = np.take(guest_pages, chunk, axis=0)
        is_zero = zero_pages(data)
        nzero = int(np.count_nonzero(is_zero))
        c.zero_pages += nzero
        assert self.multifd is not None
        pages = chunk.astype(np.uint32)
        if self.xbzrle is None:
            c.pages += chunk.size - nzero
            return self.multifd.submit(PageChunk(bid, self.generation, pages, data, is_zero))[0]
        x = self.xbzrle
        u8 = data.view(np.uint8).reshape(-1, PAGE_SIZE)
        plan = x.plan(bid - 1, chunk, u8, is_zero)
        weight = 0
        for (channel, drows, entries), ddata in zip(plan.deltas, plan.delta_data, strict=True):
            rec = RamDelta(bid, entries, ddata)
            none = np.zeros(0, dtype=bool)
            n, went = self.multifd.submit(PageChunk(bid, self.generation, pages[drows], data[:0], none, rec),
                                          channel=channel)
            if went is not None:  # else its channel is lost, and the pages go again anyway
                x.sent(bid - 1, chunk[drows], u8[drows], self.generation, went)
                c.pages += drows.size
            weight += n
        keep = is_zero.copy()
        keep[plan.whole] = True
        if keep.any():
            whole = PageChunk(bid, self.generation, pages[keep], data[keep], is_zero[keep])
            n, went = self.multifd.submit(whole)
            assert went is not None
            x.sent(bid - 1, chunk[plan.whole], u8[plan.whole], self.generation, went)
            c.pages += plan.whole.size
            weight += n
        return weight

    def _hold(self, guest_pages: np.ndarray, chunk: np.ndarray, stable: bool) -> np.ndarray:
        """The chunk's pages, in chunk order, as a (pages, 512) u64 array. A run of consecutive
        pages (the common case in a first pass) is a plain slice — a view of guest memory when
        the vCPUs are paused, else copied (~2x faster than a gather by index); scattered pages are
        gathered into the scratch buffer."""
        first = int(chunk[0])
        held = self._scratch_pages[: chunk.size]
        if int(chunk[-1]) - first == chunk.size - 1:
            run = guest_pages[first : first + chunk.size]
            if stable:
                return run
            held[:] = run
        else:
            np.take(guest_pages, chunk, axis=0, out=held)
        return held

    def _page_list(self, bid: int, chunk: np.ndarray, is_zero: np.ndarray, held: np.ndarray,
                   bufs: list[bytes | memoryview]) -> int:
        """The chunk's non-zero pages as one RAM_PAGE_LIST record: one header and checksum for
        hundreds of scattered pages. Returns the page count."""
        keep = ~is_zero
        n = int(np.count_nonzero(keep))
        if n == 0:
            return 0
        pages, data = chunk, held
        if n < chunk.size:  # leave the zero pages out (they go as RAM_ZERO runs)
            pages, data = chunk[keep], self._list_pages[:n]
            np.compress(keep, held, axis=0, out=data)
        bufs.extend(self.encoder.encode_ram_page_list(bid, pages.astype(np.uint32),
                                                      memoryview(data).cast("B")))
        return n

    def cleanup(self) -> None:
        if not self._started:
            return
        for b in self.blocks:
            b.release_dirty_consumer(CONSUMER)  # the log keeps running for other consumers
        self._queue = []
        self._queue_pos = []
        self._started = False


class RamLoader(Loader):
    """Places incoming pages straight into guest RAM (the decoder's `place` callback) and applies
    zero runs, writing zeros only over pages this migration already filled (fresh RAM is zero)."""

    name = "ram"

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        self.blocks = list(blocks)
        self._by_id: dict[int, RamBlock] = {}
        self._received: dict[int, np.ndarray] = {}
        self._views: dict[int, memoryview] = {}
        self.pages = 0
        self.zero_pages = 0
        self._done = threading.Event()
        self._prefaulters: list[threading.Thread] = []
        # multifd: per page, the generation of the copy it holds (0: none). Data channels apply
        # on threads of their own, so the check-and-copy is under one lock.
        self._generations: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        # Postcopy (migration/postcopy.py): from POSTCOPY_ADVISE on nothing is placed straight
        # into guest RAM; from POSTCOPY_LISTEN on, pages go through `placer` (UFFDIO_COPY).
        self.no_placing = False
        self.placer: PostcopyDestination | None = None
        # From the first POSTCOPY_DISCARD to LISTEN no page may arrive: the discard dropped the
        # stale copies, and a precopy page written now would sit unregistered as current.
        self.discarding = False

    def handlers(self) -> Mapping[type | CommandCode, Handler]:
        return {
            RamBlocks: self.check_layout,
            RamPages: self._on_pages,
            RamPageList: lambda rec: self.store_list(rec.block_id, rec),
            RamZero: lambda rec: self.zero(rec.block_id, rec.first_page, rec.page_count),
            RamDelta: self.store_delta,
            CommandCode.POPULATED_HINT: lambda cmd: self.prefault(cmd.block_id, cmd.data),
        }

    def _on_pages(self, rec: RamPages) -> None:
        if not rec.placed:  # placed payloads were received straight into guest memory
            self.store(rec.block_id, rec.first_page, memoryview(rec.data))

    def check_layout(self, table: RamBlocks) -> None:
        """The stream's RAM blocks must match ours by name, address and size."""
        with self._lock:
            self._check_layout(table)

    def _check_layout(self, table: RamBlocks) -> None:
        ours = {b.name: b for b in self.blocks}
        for info in table.blocks:
            b = ours.get(info.name)
            if b is None:
                raise MigrationError(
                    f"the stream has RAM block '{info.name}' which this machine does not have "
                    f"(ours: {', '.join(ours)}); start the destination with the same -m and -M"
                )
            if b.nbytes != info.size or b.gpa != info.gpa:
                raise MigrationError(
                    f"RAM block '{info.name}' is {info.size >> 20} MiB at {info.gpa:#x} in the stream "
                    f"but {b.nbytes >> 20} MiB at {b.gpa:#x} here; start the destination with the same -m"
                )
            known = self._by_id.get(info.id)
            if known is not None:  # the main stream and each data channel list the blocks
                if known is not b:
                    raise MigrationError(f"RAM block id {info.id} is '{known.name}' on one channel and "
                                         f"'{b.name}' on another")
                continue
            self._by_id[info.id] = b
            self._received[info.id] = np.zeros(b.npages, dtype=bool)
            self._generations[info.id] = np.zeros(b.npages, dtype=np.uint32)
            self._views[info.id] = memoryview(b.mem)

    def apply_pages(self, block_id: int, pages: np.ndarray, data: Buffer, generation: int) -> None:
        """multifd: pages read at `generation`; only those this destination holds an older copy
        of (or none) are written."""
        view, gens = self._views.get(block_id), self._generations.get(block_id)
        if view is None or gens is None:
            raise MigrationError(f"pages for unknown RAM block id {block_id}")
        src = np.frombuffer(data, dtype=np.uint8).reshape(len(pages), PAGE_SIZE)
        dest = np.frombuffer(view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        with self._lock:
            newer = gens[pages] < generation
            if newer.all():
                if int(pages[-1]) - int(pages[0]) == len(pages) - 1:
                    dest[int(pages[0]) : int(pages[-1]) + 1] = src
                else:
                    dest[pages] = src
                gens[pages] = generation
                self._received[block_id][pages] = True
            elif newer.any():
                take = pages[newer]
                dest[take] = src[newer]
                gens[take] = generation
                self._received[block_id][take] = True
            self.pages += len(pages)

    def apply_delta(self, rec: RamDelta, generation: int) -> None:
        """multifd: a RAM_DELTA read at `generation`. A page held at that generation or newer
        skips it (a newer copy won); any other must be held at exactly the delta's base
        generation, which travelled before it on the same channel (the source sends a page's
        delta on the channel its base went on), so anything else is refused."""
        block_id = rec.block_id
        view, gens = self._views.get(block_id), self._generations.get(block_id)
        if view is None or gens is None:
            raise MigrationError(f"RAM_DELTA for unknown RAM block id {block_id}")
        pages = rec.entries["page"]
        dest = np.frombuffer(view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        with self._lock:
            held = gens[pages]
            fresh = held < generation
            wrong = fresh & (held != rec.entries["base"])
            if wrong.any():
                k = int(np.flatnonzero(wrong)[0])
                raise MigrationError(
                    f"RAM_DELTA for page {int(pages[k])} of RAM block '{self._by_id[block_id].name}' is "
                    f"against generation {int(rec.entries['base'][k])}, but this destination holds "
                    f"generation {int(held[k])} of it")
            rows = np.flatnonzero(fresh)
            apply_deltas(dest, rec.entries, rec.offsets(), bytes(rec.data), rows)
            gens[pages[rows]] = generation
            self._received[block_id][pages[rows]] = True
            self.pages += len(pages)

    def store_delta(self, rec: RamDelta) -> None:
        """A RAM_DELTA on the main stream: in order, so each page holds its base; applied and
        checked page by page (migration/xbzrle.py)."""
        view = self._views.get(rec.block_id)
        if view is None:
            raise MigrationError(f"RAM_DELTA for unknown RAM block id {rec.block_id}")
        dest = np.frombuffer(view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        apply_deltas(dest, rec.entries, rec.offsets(), bytes(rec.data))
        self._received[rec.block_id][rec.entries["page"]] = True
        self.pages += len(rec.entries)

    def apply_zero(self, block_id: int, first: int, count: int, generation: int) -> None:
        """multifd: a zero run read at `generation`, applied like `apply_pages`."""
        b, gens = self._by_id.get(block_id), self._generations.get(block_id)
        if b is None or gens is None:
            raise MigrationError(f"zero pages for unknown RAM block id {block_id}")
        with self._lock:
            g = gens[first : first + count]
            newer = g < generation
            filled = self._received[block_id][first : first + count] & newer
            for off in np.flatnonzero(filled).tolist():
                ctypes.memset(b.host_addr + (first + off) * PAGE_SIZE, 0, PAGE_SIZE)
            g[newer] = generation
            self.zero_pages += count

    def place(self, block_id: int, first_page: int, page_count: int) -> memoryview | None:
        """Where a RAM_PAGES payload goes: the guest pages themselves. The decoder has verified
        the record header (and that the run lies inside the block) before calling this.

        None once postcopy was advised: the decoder parses ahead of the records it has handed
        on, so a payload it placed could land in guest RAM after POSTCOPY_LISTEN was read but
        before it was applied — on pages then dropped as stale, or missing (a copy that faults
        holding the GIL). Such payloads go through `store`, which postcopy routes to `placer`."""
        if self.no_placing:
            return None
        return self._where(block_id, first_page, page_count)

    def _where(self, block_id: int, first_page: int, page_count: int) -> memoryview | None:
        view = self._views.get(block_id)
        if view is None:
            return None
        self._received[block_id][first_page : first_page + page_count] = True
        self.pages += page_count
        return view[first_page * PAGE_SIZE : (first_page + page_count) * PAGE_SIZE]

    def store(self, block_id: int, first_page: int, data: memoryview) -> None:
        """A RAM_PAGES payload that was not placed (fed in a chunk): copy it in."""
        if self.placer is not None:
            self.pages += self.placer.place_pages(block_id, first_page, data)
            return
        self._not_discarding()
        target = self._where(block_id, first_page, len(data) // PAGE_SIZE)
        if target is None:
            raise MigrationError(f"pages for unknown RAM block id {block_id}")
        target[:] = data

    def store_list(self, block_id: int, rec: RamPageList) -> None:
        """A RAM_PAGE_LIST: scatter its pages to their places in one numpy copy."""
        b = self._by_id.get(block_id)
        if b is None:
            raise MigrationError(f"pages for unknown RAM block id {block_id}")
        if self.placer is not None:
            self.pages += self.placer.place_list(block_id, rec.pages, rec.data)
            return
        self._not_discarding()
        rec.scatter_into(self._views[block_id], PAGE_SIZE)
        self._received[block_id][rec.pages] = True
        self.pages += len(rec.pages)

    def zero(self, block_id: int, first_page: int, page_count: int) -> None:
        b = self._by_id.get(block_id)
        if b is None:
            raise MigrationError(f"zero pages for unknown RAM block id {block_id}")
        if self.placer is not None:
            self.placer.place_zero(block_id, first_page, page_count)
            self.zero_pages += page_count
            return
        self._not_discarding()
        got = self._received[block_id][first_page : first_page + page_count]
        for off in np.flatnonzero(got).tolist():
            ctypes.memset(b.host_addr + (first_page + off) * PAGE_SIZE, 0, PAGE_SIZE)
        self.zero_pages += page_count

    def _not_discarding(self) -> None:
        if self.discarding:
            raise MigrationError("RAM pages between POSTCOPY_DISCARD and POSTCOPY_LISTEN: the stream "
                                 "sends no precopy page once the switch to postcopy began")

    def prefault(self, block_id: int, bitmap: bytes) -> None:
        """A POPULATED_HINT: allocate those pages on a thread of their own, in the order pass 1
        sends them, while this thread receives. First-touch faults are most of a destination's
        cost on fresh RAM; done ahead, in bulk, they overlap the network (measured: a 1 GiB load
        from a file 0.6-0.8 s instead of 1.7 s). Pages already received are skipped."""
        b = self._by_id.get(block_id)
        if b is None:
            raise MigrationError(f"populated hint for unknown RAM block id {block_id}")
        mask = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")[: b.npages]
        received = self._received[block_id]
        t = threading.Thread(target=self._prefault, args=(b, mask.astype(bool), received),
                             name=f"prefault-{b.name}", daemon=True)
        self._prefaulters.append(t)
        t.start()

    def _prefault(self, b: RamBlock, mask: np.ndarray, received: np.ndarray) -> None:
        for first, count in runs(np.flatnonzero(mask), PREFAULT_PAGES):
            if self._done.is_set():
                return
            if received[first + count - 1]:
                continue  # the receiver got here first
            if not b.populate(first, count):
                return  # kernel without MADV_POPULATE_WRITE: faults will do

    def stop_prefaulting(self) -> None:
        """Stop the prefault threads and wait for them (postcopy's LISTEN: nothing may populate
        guest RAM once pages are dropped and registered as missing)."""
        self._done.set()
        for t in self._prefaulters:
            t.join()

    @property
    def blocks_by_id(self) -> dict[int, RamBlock]:
        return dict(self._by_id)

    @property
    def received(self) -> dict[int, np.ndarray]:
        """Per block id, a bool per page: holds a copy sent with contents (live arrays)."""
        return self._received

    def wait_prefaulted(self) -> None:
        """Block until every prefault thread has finished its hinted pages."""
        for t in self._prefaulters:
            t.join()

    def release(self) -> None:
        self._done.set()
        for t in self._prefaulters:
            t.join()
        for v in self._views.values():
            v.release()
        self._views.clear()
