"""Several channels (capability `multifd`): RAM pages on N data connections beside the main stream.

Each data connection carries a vmferry stream of its own (docs/stream-format.md, "Data channels"):
stream header, COMMAND CHANNEL (JSON: the migration's id, this channel's id, the channel count),
RAM_BLOCKS, then PASS/page records, then END with that channel's record count and running digest.
Device state and control stay on the main stream.

No barrier between passes: a PASS record on a data channel carries a *generation* — the RAM
saver's claim counter, which grows each time it takes pages from the dirty bitmaps — and applies
to the page records after it. A page is sent at most once per generation, and its newest contents
are in its highest generation, so the destination keeps, per page, the generation it holds
(numpy, u32) and applies a record only to pages it holds older copies of: a late record of an
earlier pass never overwrites a newer page.

Switchover: the RAM saver's `complete` hands the last pages to the channels and `flush`es them —
each channel's sender writes END and finishes — before the main stream goes on to device state and
END. The destination starts the guest only after every data channel's END was verified and its
pages applied.

Sans-I/O cores (`DataChannelEncoder`, `DataChannelReceiver`) plus the threaded `MultifdSender`,
which owns one thread and one compressor per channel, so no lock or thread serialises channels.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import queue
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vmferry.errors import MigrationError, StreamError, VmferryError
from vmferry.migration.pages import PAGE_SIZE, segments
from vmferry.migration.saver import Handler, Loader
from vmferry.stream.compression import Codec, Compressor
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.format import checksum
from vmferry.stream.payloads import delta_table_size
from vmferry.stream.records import (
    Buffer,
    Command,
    CommandCode,
    EndOfStream,
    PassStart,
    RamBlocks,
    RamCompressed,
    RamDelta,
    RamPageList,
    RamPages,
    RamZero,
    StreamHeader,
    record_type_name,
)

# Chunks waiting per channel: enough to keep each sender busy, little enough that `pending`
# stays honest (2 MiB a chunk).
QUEUE_CHUNKS = 4
# From this many runs in a chunk on, its non-zero pages go as one list record (as ram.py).
SCATTERED_RUNS = 8
FLUSH_TIMEOUT_S = 60.0
DIRECT_BYTES = 64 << 10  # a payload this large is received straight into its assembly buffer


@dataclass
class PageChunk:
    """Pages of one RAM block read at one generation: the saver's private copy, never guest memory."""

    block_id: int
    generation: int
    pages: np.ndarray  # ascending page indexes (uint32)
    data: np.ndarray  # (len(pages), PAGE_SIZE // 8) uint64: the pages' contents, copied
    is_zero: np.ndarray  # bool per page
    # XBZRLE: the pages as one RAM_DELTA record instead (data and is_zero then empty); it must go
    # on the channel that carried the pages' bases (docs/migration.md, "XBZRLE")
    delta: RamDelta | None = None

    @property
    def raw_bytes(self) -> int:
        """What the chunk weighs against a step's budget: its non-zero pages (a delta: its
        payload), plus a record's worth so that a chunk of zero pages counts too."""
        if self.delta is not None:
            return delta_table_size(len(self.delta.entries)) + memoryview(self.delta.data).nbytes + 64
        return int(np.count_nonzero(~self.is_zero)) * PAGE_SIZE + 64


def channel_hello(migration_id: str, channel_id: int, channels: int) -> Command:
    doc = {"migration": migration_id, "channel": channel_id, "channels": channels}
    return Command(CommandCode.CHANNEL, data=json.dumps(doc, separators=(",", ":")).encode())


class DataChannelEncoder:
    """What one data channel sends, as buffers (sans-I/O)."""

    def __init__(self, migration_id: str, channel_id: int, channels: int, blocks: RamBlocks,
                 compressor: Compressor, machine_type: str = "") -> None:
        self.channel_id = channel_id
        self.encoder = StreamEncoder(machine_type=machine_type)
        self.compressor = compressor
        self._hello = channel_hello(migration_id, channel_id, channels)
        self._blocks = blocks
        self._generation = 0

    def start(self) -> bytes:
        return b"".join((self.encoder.header(), self.encoder.encode(self._hello),
                         self.encoder.encode(self._blocks)))

    def encode(self, chunk: PageChunk) -> list[Buffer]:
        bufs: list[Buffer] = []
        enc = self.encoder
        if chunk.generation != self._generation:
            if chunk.generation < self._generation:
                raise ValueError(f"generation {chunk.generation} after {self._generation} on channel "
                                 f"{self.channel_id}")
            self._generation = chunk.generation
            bufs.append(enc.encode(PassStart(chunk.generation)))
        if chunk.delta is not None:
            return bufs + enc.encode_buffers(chunk.delta)
        raw = memoryview(chunk.data).cast("B")
        bid, pages, is_zero = chunk.block_id, chunk.pages, chunk.is_zero
        breaks = (np.diff(pages.astype(np.int64)) != 1) | (is_zero[1:] != is_zero[:-1])
        as_list = int(np.count_nonzero(breaks)) >= SCATTERED_RUNS
        if as_list and not is_zero.all():
            keep = ~is_zero
            data = chunk.data[keep]
            bufs += self._pages(bid, pages[keep], memoryview(data).cast("B"), listed=True)
        for pos, first, count, zero in segments(pages, is_zero):
            if zero:
                bufs += enc.encode_buffers(RamZero(bid, first, count))
            elif not as_list:
                bufs += self._pages(bid, pages[pos:pos + count],
                                    raw[pos * PAGE_SIZE:(pos + count) * PAGE_SIZE], listed=False)
        return bufs

    def _pages(self, bid: int, pages: np.ndarray, raw: memoryview, *, listed: bool) -> list[Buffer]:
        codec, wire = self.compressor.compress(raw)
        if codec == Codec.RAW:
            if listed:
                return self.encoder.encode_ram_page_list(bid, pages, raw)
            return self.encoder.encode_ram_pages(bid, int(pages[0]), raw)
        rec = RamCompressed(bid, 0 if listed else int(pages[0]), len(pages), codec, checksum(raw), b"",
                            pages if listed else None, wire)
        return self.encoder.encode_buffers(rec)

    def end(self) -> bytes:
        return self.encoder.end()


class GenerationalPages:
    """The destination's side of generations: what a RamLoader must offer the receivers."""

    def apply_pages(self, block_id: int, pages: np.ndarray, data: Buffer, generation: int) -> None: ...
    def apply_zero(self, block_id: int, first: int, count: int, generation: int) -> None: ...
    def apply_delta(self, rec: RamDelta, generation: int) -> None: ...
    def check_layout(self, table: RamBlocks) -> None: ...


class ChannelLosses(Loader):
    """The main stream's COMMAND CHANNEL_LOST records, on the destination: which data channels
    the source gave up on (their pages went again on the others)."""

    name = "multifd"

    def __init__(self) -> None:
        self.declared: dict[int, str] = {}

    def handlers(self) -> Mapping[type | CommandCode, Handler]:
        return {CommandCode.CHANNEL_LOST: self._on_lost}

    def _on_lost(self, cmd: Command) -> None:
        self.declared[cmd.index] = cmd.message


class DataChannelLost(MigrationError):
    """A data channel's connection ended before its END (or failed): the source may have lost it
    too and re-sent its pages on the others (COMMAND CHANNEL_LOST on the main stream)."""


class DataChannelReceiver:
    """One data channel on the destination (sans-I/O): bytes in, pages applied by generation.

    `expect_migration` is the migration id the main stream's CONFIG announced (None: not known
    yet, accept any). `ended` once END arrived (count and digest verified by the decoder)."""

    def __init__(self, loader: GenerationalPages, expect_migration: str | None = None) -> None:
        self.loader = loader
        self.expect_migration = expect_migration
        self.decoder = StreamDecoder()
        self.channel_id: int | None = None
        self.generation = 0
        self.ended = False
        self.records = 0
        self.bytes_received = 0
        self.lost: str | None = None  # why the connection ended before END (set by the driver)
        self.maybe_caught_up = False  # after read_from: might nothing more be waiting?
        # Page bytes applied, uncompressed (zero pages not counted): the unit the source plans in,
        # whatever the compression ratio of each record was.
        self.page_bytes = 0

    def feed(self, data: Buffer) -> None:
        self.decoder.feed(data)
        self._drain()

    def feed_eof(self) -> None:
        self.decoder.feed_eof()
        self._drain()

    def read_from(self, recv_into: Callable[[memoryview], int], chunk: memoryview) -> int:
        """One read with `recv_into` (a socket's): a large payload straight into the decoder's
        buffer, anything else into `chunk` (reused: every record is applied, i.e. copied out,
        before this returns). Returns the bytes read; 0 is the end of input (fed as such)."""
        target = self.decoder.get_buffer()
        self.maybe_caught_up = True  # a read into a payload's buffer, done or not: perhaps all there was
        if len(target) >= DIRECT_BYTES:
            n = recv_into(target)
            if n:
                self.decoder.buffer_updated(n)
        else:
            n = recv_into(chunk)
            self.maybe_caught_up = n < len(chunk)  # a full chunk: more is coming
            if n:
                self.decoder.feed(chunk[:n])
        self.bytes_received += n
        self._drain()
        if n == 0 and not self.ended:
            try:
                self.decoder.feed_eof()
                self._drain()
            except MigrationError as e:
                raise DataChannelLost(str(e)) from None
        return n

    def _where(self) -> str:
        return "a data channel" if self.channel_id is None else f"data channel {self.channel_id}"

    def _drain(self) -> None:
        try:
            while (rec := self.decoder.next_record()) is not None:
                self._apply(rec)
        except StreamError as e:
            raise MigrationError(f"{self._where()}: {e}") from None

    def _apply(self, rec: object) -> None:
        if isinstance(rec, StreamHeader):
            return
        first = self.records == 0
        self.records += 1
        if first:
            self._hello(rec)
            return
        loader = self.loader
        match rec:
            case PassStart(number):
                self.generation = number
            case RamPages(block_id, first_page, count, data):
                idx = np.arange(first_page, first_page + count)
                loader.apply_pages(block_id, idx, data, self.generation)
                self.page_bytes += count * PAGE_SIZE
            case RamPageList(block_id, pages, data):
                loader.apply_pages(block_id, pages, data, self.generation)
                self.page_bytes += len(pages) * PAGE_SIZE
            case RamCompressed(block_id, first_page, count, pages=pages, data=data):
                idx = np.arange(first_page, first_page + count) if pages is None else pages
                loader.apply_pages(block_id, idx, data, self.generation)
                self.page_bytes += count * PAGE_SIZE
            case RamZero(block_id, first_page, count):
                loader.apply_zero(block_id, first_page, count, self.generation)
            case RamDelta(_, entries, data):
                loader.apply_delta(rec, self.generation)
                self.page_bytes += delta_table_size(len(entries)) + len(data)
            case RamBlocks():
                loader.check_layout(rec)
            case EndOfStream():
                self.ended = True
            case _:
                raise MigrationError(f"{self._where()}: a {record_type_name(rec)} record has no place "
                                     "on a data channel")

    def _hello(self, rec: object) -> None:
        if not (isinstance(rec, Command) and rec.code == CommandCode.CHANNEL):
            raise MigrationError(f"a data channel began with {record_type_name(rec)}, not COMMAND CHANNEL")
        try:
            doc = json.loads(rec.data)
            mid, cid = doc["migration"], doc["channel"]
        except (ValueError, KeyError, TypeError):
            raise MigrationError("a data channel's COMMAND CHANNEL is not {migration, channel} "
                                 "JSON") from None
        if self.expect_migration is not None and mid != self.expect_migration:
            raise MigrationError(f"data channel {cid} belongs to migration {mid!r}, not this one "
                                 f"({self.expect_migration!r})")
        self.channel_id = int(cid)


class MultifdSender:
    """The source's data channels: one sender thread per channel, each with its own encoder and
    compressor. `submit` puts a chunk on the least busy live channel (blocking while all are full).

    A channel that fails is *lost*, not fatal: its thread ends, the driver shuts its connection,
    and `take_lost` hands the migration thread every page ever given to that channel (a mask per
    RAM block), which the RAM saver marks dirty again so the next generation re-sends them on the
    other channels. Only losing every channel, or one while the channels are writing END, fails
    the migration.

    A *stalled* channel is lost too: with heartbeats on (`stall_limit_s` returns their limit, 3
    intervals), a channel whose socket has had the same non-zero number of unsent bytes for that
    long — the peer or something between stopped reading it — is shut down and re-sent. A slow
    link is not stalled: its send queue shrinks as the peer acknowledges."""

    def __init__(self, channels: Sequence[object], encoders: Sequence[DataChannelEncoder],
                 send: Callable[[int, Sequence[Buffer]], int], cancelled: Callable[[], bool],
                 block_pages: dict[int, int], shutdown: Callable[[int], None] = lambda i: None,
                 on_wait: Callable[[], None] = lambda: None,
                 stall_limit_s: Callable[[], float | None] = lambda: None) -> None:
        """`send(channel index, buffers) -> bytes accepted` writes on channel i; `block_pages`:
        RAM block id -> its page count; `shutdown(i)` cuts channel i's connection; `on_wait`
        runs on the migration thread while it waits for the channels (the source beats there,
        so a destination reading only the quiet main stream does not time it out)."""
        self.channels = list(channels)
        self.encoders = list(encoders)
        n = len(self.encoders)
        self._send = send
        self._cancelled = cancelled
        self._shutdown = shutdown
        self._on_wait = on_wait
        self._queues: list[queue.Queue[PageChunk | None]] = [queue.Queue(QUEUE_CHUNKS) for _ in range(n)]
        # Raw bytes handed to each channel and sent by it: each list has one writer thread.
        self._submitted = [0] * n
        self._done = [0] * n
        self._sent = [0] * n  # wire bytes accepted per channel
        self._pages_sent = [0] * n  # page bytes (uncompressed, zero pages not counted) sent per channel
        # Pages handed to each channel, per block (written by the migration thread only).
        self._handed = [{bid: np.zeros(count, dtype=bool) for bid, count in block_pages.items()}
                        for _ in range(n)]
        self.alive = [True] * n
        self.lost: list[tuple[int, str]] = []  # every channel lost so far, with why
        self._lost_new: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self.error: str | None = None
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"multifd-send-{i}", daemon=True)
                         for i in range(n)]
        self._finishing = False
        self._stall_limit_s = stall_limit_s
        self._unsent: list[tuple[int, float]] = [(0, time.monotonic())] * n  # (unsent bytes, since)

    def start(self) -> None:
        for i, enc in enumerate(self.encoders):
            self._sent[i] += self._send(i, [enc.start()])
        for t in self._threads:
            t.start()

    def sent_bytes(self) -> int:
        """Wire bytes every channel accepted."""
        return sum(self._sent)

    def page_bytes_sent(self) -> int:
        """Page bytes (uncompressed; zero pages not counted) the live channels sent: what the
        destination's PROGRESS counts for the data channels (DataChannelReceiver.page_bytes)."""
        return sum(b for b, a in zip(self._pages_sent, self.alive, strict=True) if a)

    def queued_bytes(self) -> int:
        return sum(s - d for s, d, a in zip(self._submitted, self._done, self.alive, strict=True) if a)

    def _check(self) -> None:
        """Called on the migration thread only, at every wait."""
        self._on_wait()
        self._check_stalls()
        if self.error is not None:
            raise MigrationError(self.error)
        if self._cancelled():
            raise MigrationError("migration cancelled")
        if not any(self.alive):
            why = "; ".join(f"channel {i}: {r}" for i, r in self.lost)
            raise MigrationError(f"every multifd data channel was lost ({why})")

    def _check_stalls(self) -> None:
        limit = self._stall_limit_s()
        if limit is None:
            return
        now = time.monotonic()
        for i, ch in enumerate(self.channels):
            if not self.alive[i]:
                continue
            unsent = _unsent_bytes(ch)
            last, since = self._unsent[i]
            if unsent == 0 or unsent != last:
                self._unsent[i] = (unsent, now)
            elif now - since > limit:
                self._lose(i, f"stalled: {unsent} bytes unsent for {now - since:.1f} s (limit {limit:.1f} s, "
                              "x-heartbeat-ms)")

    def _lose(self, i: int, why: str) -> None:
        """Channel i is gone (its sender failed, or it stalled): a loss, or while the channels
        write END, the migration's failure. Its connection is shut down, which also ends a send
        blocked on it. Once per channel."""
        with self._lock:
            if not self.alive[i]:
                return
            self.alive[i] = False
            if self._finishing or self._cancelled():
                if self.error is None:
                    self.error = f"multifd channel {i} failed: {why}"
            else:
                self.lost.append((i, why))
                self._lost_new.append((i, why))
        with contextlib.suppress(VmferryError, OSError):
            self._shutdown(i)

    def take_lost(self) -> list[tuple[int, str, dict[int, np.ndarray]]]:
        """Channels lost since the last call: (channel, why, pages handed to it per block)."""
        with self._lock:
            new, self._lost_new = self._lost_new, []
        return [(i, why, self._handed[i]) for i, why in new]

    def submit(self, chunk: PageChunk, channel: int | None = None) -> tuple[int, int | None]:
        """Queue a chunk on the least busy live channel, or on `channel` (XBZRLE deltas follow
        their bases). -> (its weight in bytes, the channel it went on); (0, None) when `channel`
        is lost: its pages were handed to it before, so they are sent again anyway."""
        n = chunk.raw_bytes
        while True:
            self._check()
            if channel is not None:
                if not self.alive[channel]:
                    return 0, None
                i = channel
            else:
                live = [k for k in range(len(self._queues)) if self.alive[k]]
                i = min(live, key=lambda k: self._queues[k].qsize())
            try:
                self._queues[i].put(chunk, timeout=0.05)
            except queue.Full:
                continue
            self._handed[i][chunk.block_id][chunk.pages] = True
            self._submitted[i] += n
            return n, i

    def drain(self) -> None:
        """Wait until every live channel has sent all it was given (or was lost meanwhile)."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while True:
            self._check()
            busy = [i for i in range(len(self._queues))
                    if self.alive[i] and self._done[i] < self._submitted[i]]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise MigrationError(f"multifd channel {busy[0]} did not send its pages within "
                                     f"{FLUSH_TIMEOUT_S:.0f} s")
            time.sleep(0.001)

    def finish(self) -> None:
        """Every live channel writes END; returns when all have. A loss now is fatal: the
        others may have ended already."""
        self._finishing = True
        for i, q in enumerate(self._queues):
            while self.alive[i]:
                self._check()
                try:
                    q.put(None, timeout=0.05)
                    break
                except queue.Full:
                    continue
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        for i, t in enumerate(self._threads):
            while t.is_alive():
                self._check()
                if time.monotonic() > deadline:
                    raise MigrationError(f"multifd channel {i} did not finish within {FLUSH_TIMEOUT_S:.0f} s")
                t.join(0.05)
        self._check()

    def flush(self) -> None:
        """drain, then finish (no loss can be repaired in between: for callers without a saver)."""
        self.drain()
        if self.lost:
            i, why = self.lost[0]
            raise MigrationError(f"multifd channel {i} was lost: {why}")
        self.finish()

    def stop(self) -> None:
        """After a failure or cancel: wake the senders so they end."""
        self._finishing = True
        for q in self._queues:
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)
        for t in self._threads:
            if t.is_alive():
                t.join(1.0)

    def _run(self, i: int) -> None:
        enc = self.encoders[i]
        q = self._queues[i]
        try:
            while True:
                chunk = q.get()
                if chunk is None:
                    if self.error is None and not self._cancelled():
                        self._sent[i] += self._send(i, [enc.end()])
                    return
                bufs = enc.encode(chunk)
                t = time.perf_counter()
                n = self._send(i, bufs)
                dt = time.perf_counter() - t
                self._sent[i] += n
                self._pages_sent[i] += chunk.raw_bytes - 64
                self._done[i] += chunk.raw_bytes
                enc.compressor.sent(dt)  # the wire's cost, which `auto` weighs compression against
        except (VmferryError, OSError, ValueError) as e:
            self._lose(i, str(e))


def _unsent_bytes(channel: object) -> int:
    """Bytes in a socket's send queue not yet acknowledged by the peer (SIOCOUTQ); 0 when it
    cannot be told."""
    try:
        fd = channel.fileno()  # type: ignore[attr-defined]
        buf = bytearray(4)
        fcntl.ioctl(fd, termios.TIOCOUTQ, buf)
    except (AttributeError, NotImplementedError, OSError, ValueError, VmferryError):
        return 0
    return int.from_bytes(buf, "little", signed=True)
