"""The migration engine's two protocol objects wired together in memory: a SourceSession's bytes
go through the real StreamDecoder into a DestSession. RAM is plain RamBlocks without a VM: the
test is the guest, writing pages through RamBlock.write (whose writes the dirty log notes and a
sync folds in, as it does KVM's) before and during passes. Device state is a test-only "blob"
saver and loader, plugged in without touching either session — the proof that a new kind of
state is one saver, one loader and a table entry.

After every switchover — wherever it falls — the destination's memory and blob must equal the
source's.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmferry.errors import MigrationError
from vmferry.machine.ramblock import RamBlock
from vmferry.migration.convergence import EndToEndRate
from vmferry.migration.dest_session import DestSession
from vmferry.migration.multifd import ChannelLosses, DataChannelEncoder, DataChannelReceiver, PageChunk
from vmferry.migration.ram import RamLoader, RamSaver, block_table
from vmferry.migration.return_path import ReturnPathReader, ReturnPathWriter
from vmferry.migration.saver import Handler, Loader, Saver, SaverOutput
from vmferry.migration.source_session import SourceSession
from vmferry.stream.compression import Compressor
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import (
    BlockData,
    Command,
    CommandCode,
    Description,
    DeviceSection,
    RamBlocks,
    SectionInfo,
    SectionPhase,
)
from vmferry.transport.channel import SocketChannel

PAGE = 4096
# Two blocks, each larger than the RAM saver's 512-page step, so a pass spans several steps and
# the guest writes land mid-pass, in pages already sent, queued and not yet claimed.
BLOCKS = (("pc.ram", 0, 1100), ("extra", 1 << 30, 700))


class BlobSaver(Saver):
    """Test-only state: a byte string the "guest" changes while it runs, sent whole at the end."""

    name = "blob"

    def __init__(self) -> None:
        self.value = b"initial"

    def setup(self, out: SaverOutput) -> None:
        schema = {"id": 1, "name": "blob", "instance": 0, "version": 1, "fields": [], "subsections": []}
        out.send([out.encoder.encode(Description((SectionInfo(1, "blob", 0, 1, schema),)))])

    def pending(self) -> int:
        return len(self.value)

    def complete(self, out: SaverOutput) -> None:
        out.send([out.encoder.encode(DeviceSection(1, SectionPhase.FULL, self.value))])


class BlobLoader(Loader):
    name = "blob"

    def __init__(self) -> None:
        self.staged: bytes | None = None
        self.value: bytes | None = None

    def handlers(self) -> Mapping[type | CommandCode, Handler]:
        return {Description: lambda rec: None, DeviceSection: self._stage}

    def _stage(self, rec: DeviceSection) -> None:
        self.staged = bytes(rec.data)

    def complete(self) -> None:
        self.value = self.staged


@dataclass
class Out:
    """The in-memory channel: what the source sends is decoded and applied at once."""

    encoder: StreamEncoder
    dec: StreamDecoder
    dest: DestSession

    def send(self, bufs: Sequence[bytes | bytearray | memoryview]) -> int:
        data = b"".join(bytes(b) for b in bufs)
        self.dec.feed(data)
        while (rec := self.dec.next_record()) is not None:
            self.dest.feed(rec)
        return len(data)

    def cancelled(self) -> bool:
        return False


class Pair:
    def __init__(self, downtime_limit_ms: int = 300, end_to_end: bool = False) -> None:
        self.src_blocks = [RamBlock(n, gpa, pages * PAGE) for n, gpa, pages in BLOCKS]
        self.dst_blocks = [RamBlock(n, gpa, pages * PAGE) for n, gpa, pages in BLOCKS]
        self.encoder = StreamEncoder(machine_type="test")
        self.blob = BlobSaver()
        self.ram = RamSaver(self.src_blocks, self.encoder)
        self.session = SourceSession([self.ram, self.blob], self.encoder, {"smp": 1},
                                     lambda: downtime_limit_ms, end_to_end=end_to_end, step_budget=1)
        self.ram_loader = RamLoader(self.dst_blocks)
        self.blob_loader = BlobLoader()
        self.losses = ChannelLosses()  # multifd's CHANNEL_LOST on the main stream
        self.dest = DestSession([self.ram_loader, self.blob_loader, self.losses])
        self.dec = StreamDecoder(place=self.ram_loader.place)
        self.out = Out(self.encoder, self.dec, self.dest)
        self.now = 0.0

    def tick(self) -> float:
        self.now += 0.001
        return self.now

    def write(self, block: int, page: int, value: int) -> None:
        """A write to a page (value 0 makes it a zero page) through the block's own writer: the
        dirty log's VMM producer notes it, and the next sync folds it in, as KVM's log would."""
        b = self.src_blocks[block]
        page %= b.npages
        b.write(b.gpa + page * PAGE, bytes([value]) * PAGE)

    def setup(self) -> None:
        self.session.setup(self.out, self.tick())

    def step(self) -> bool:
        if self.session.end_to_end:
            self.session.progress(self.dec.bytes_consumed, self.session.sent, self.now)
        s = self.session.step(self.out, self.tick)
        return s.switchover and self.session.confirm_switchover()

    def switch_over(self) -> None:
        """The guest is paused from here: no more writes."""
        self.session.complete(self.out, self.tick)
        self.session.end(self.out)
        assert self.dest.ended, "END did not arrive"
        self.dest.complete()

    def assert_equal(self) -> None:
        for s, d in zip(self.src_blocks, self.dst_blocks, strict=True):
            a = np.frombuffer(s.mem, dtype=np.uint8).reshape(-1, PAGE)
            b = np.frombuffer(d.mem, dtype=np.uint8).reshape(-1, PAGE)
            bad = np.flatnonzero((a != b).any(axis=1))
            assert bad.size == 0, f"{s.name}: {bad.size} pages differ, first {bad[:5].tolist()}"
            del a, b
        assert self.blob_loader.value == self.blob.value

    def close(self) -> None:
        self.session.cleanup()
        self.dest.release()
        for b in self.src_blocks + self.dst_blocks:
            b.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


writes = st.tuples(st.integers(0, 1), st.integers(0, 1099), st.integers(0, 3))
actions = st.lists(st.one_of(st.tuples(st.just("write"), writes), st.tuples(st.just("step"), st.none()),
                             st.tuples(st.just("blob"), st.binary(max_size=64))), max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(writes, max_size=40), during=actions, end_to_end=st.booleans(),
       limit=st.sampled_from([0, 1, 300]))
def test_destination_equals_source_after_any_switchover(
    before: list[tuple[int, int, int]], during: list[tuple[str, object]], end_to_end: bool, limit: int
) -> None:
    """Writes before setup (found by the population scan), then steps interleaved with writes
    and blob changes; the switchover falls where the session decides or where the actions end,
    whichever is first."""
    p = Pair(downtime_limit_ms=limit, end_to_end=end_to_end)
    try:
        for block, page, value in before:
            p.write(block, page, value)
        p.setup()
        for kind, arg in during:
            if kind == "write":
                p.write(*arg)  # type: ignore[misc]
            elif kind == "blob":
                p.blob.value = arg  # type: ignore[assignment]
            elif p.step():
                break
        p.switch_over()
        p.assert_equal()
    finally:
        p.close()


def test_a_pass_spans_steps_and_a_session_switches_over_by_itself(pair: Pair) -> None:
    for page in range(0, 1100, 3):
        pair.write(0, page, 1 + page % 5)
    pair.setup()
    starts = []
    for _ in range(100):
        s = pair.session.step(pair.out, pair.tick)
        starts += [s.pass_started] if s.pass_started else []
        if s.switchover and pair.session.confirm_switchover():
            break
    else:
        pytest.fail("the session never switched over on an idle guest")
    assert starts == [1] and len(pair.session.passes) == 1
    assert pair.session.passes[0].pages_sent == len(range(0, 1100, 3))
    assert pair.dest.passes == 1
    pair.switch_over()
    pair.assert_equal()


def test_a_destination_without_progress_reports_does_not_stall_the_switchover() -> None:
    """end_to_end but no PROGRESS ever arrives (an older destination): the session falls back
    to what the channel accepted instead of waiting for a backlog that never drains."""
    p = Pair(end_to_end=True)
    try:
        p.write(0, 1, 7)
        p.setup()
        for _ in range(20):
            s = p.session.step(p.out, p.tick)
            if s.switchover and p.session.confirm_switchover():
                break
        else:
            pytest.fail("never switched over")
        assert p.session.backlog() == 0
        p.switch_over()
        p.assert_equal()
    finally:
        p.close()


def test_backlog_in_flight_holds_the_switchover_back() -> None:
    """The destination reported little applied: what is in flight counts in the expected
    downtime, and the session does not confirm a switchover it would not fit."""
    p = Pair(downtime_limit_ms=300, end_to_end=True)
    try:
        p.setup()
        p.session.progress(0, p.session.sent, 0.0)
        p.session.progress(1 << 20, p.session.sent + (1 << 30), 1.0)  # 1 MiB/s, 1 GiB in flight
        p.session.sent += 1 << 30
        assert p.session.backlog() >= (1 << 30) - (1 << 20)
        assert p.session.expected_downtime() > 300
        assert not p.session.confirm_switchover()
    finally:
        p.close()


def test_a_record_without_a_loader_is_refused_by_name(pair: Pair) -> None:
    pair.setup()
    with pytest.raises(MigrationError, match=r"BLOCK_DATA record \(record \d+\) has no loader"):
        pair.dest.feed(BlockData(1, 0, 1, b"\0" * 512))


def test_an_unknown_command_is_refused_and_an_advisory_one_ignored(pair: Pair) -> None:
    pair.setup()
    pair.dest.feed(Command(0x8123))
    with pytest.raises(MigrationError, match=r"COMMAND PAGE_REQUEST \(record \d+\) is not supported"):
        pair.dest.feed(Command(CommandCode.PAGE_REQUEST))


def test_two_loaders_cannot_claim_one_record_type() -> None:
    with pytest.raises(ValueError, match="both handle"):
        DestSession([BlobLoader(), BlobLoader()])


def test_end_to_end_rate_counts_only_busy_time() -> None:
    r = EndToEndRate()
    r.report(0.0, 0, 10 << 20)  # 10 MiB in flight
    r.report(0.01, 1 << 20, 10 << 20)  # 1 MiB applied in 10 ms
    r.report(0.02, 2 << 20, 2 << 20)  # caught up
    r.report(5.0, 2 << 20, 2 << 20)  # idle for seconds: not counted
    assert r.rate() == pytest.approx((2 << 20) / 0.02)
    assert r.applied == 2 << 20


def test_return_path_carries_progress_ack_timings_and_end() -> None:
    a, b = socket.socketpair()
    dst, src = SocketChannel(a, "dst"), SocketChannel(b, "src")
    try:
        reader = ReturnPathReader(src, sent=lambda: 12345)
        reader.start()
        w = ReturnPathWriter(dst)
        w.progress(4096)
        w.ack(7, {"apply": 1.5, "start": 0.25})
        w.end()
        assert reader.closed.wait(10)
        assert reader.ended and reader.ack_index == 7
        assert reader.ack_timings == {"apply": 1.5, "start": 0.25}
        assert [(applied, sent) for applied, sent, _ in reader.take_progress()] == [(4096, 12345)]
    finally:
        dst.close()
        src.close()


class UnitsSaver(Saver):
    """Test-only state counted in 4 KiB units, as a copied drive is: no pages, so only
    `units()` tells the session what it sent and what is left."""

    def __init__(self, name: str, bulk_first: bool, order: list[str], send_units: int,
                 left_units: int) -> None:
        self.name, self.bulk_first, self.order = name, bulk_first, order
        self.to_send, self.left, self.sent_units = send_units, left_units, 0

    def setup(self, out: SaverOutput) -> None:
        pass

    def pending(self) -> int:
        return (self.to_send + self.left) * PAGE

    def iterate(self, out: SaverOutput, budget_bytes: int) -> int:
        self.order.append(self.name)
        n = min(self.to_send, max(budget_bytes // PAGE, 1))
        self.to_send -= n
        self.sent_units += n
        return out.send([bytes(n * PAGE)]) if n else 0

    def units(self) -> tuple[int, int]:
        return self.sent_units, self.to_send + self.left

    def complete(self, out: SaverOutput) -> None:
        pass


class CountingSink:
    encoder = StreamEncoder(machine_type="test")

    def send(self, bufs: Sequence[bytes | bytearray | memoryview]) -> int:
        return sum(len(b) for b in bufs)

    def cancelled(self) -> bool:
        return False


def test_a_pass_of_disk_blocks_that_shrank_the_backlog_pays_and_bulk_state_goes_first() -> None:
    """A pass that sent 1000 blocks and left 100 halved the backlog: within the downtime limit
    but above its goal, the session makes another pass (counting pages alone, it saw 0 sent and
    0 left and switched over). The first pass holds the other saver back (the disk's backlog is
    large and nothing is measured yet); the next one lets it go, after the bulk-first saver."""
    order: list[str] = []
    late = UnitsSaver("ram-like", False, order, 0, 0)
    disk = UnitsSaver("disk-like", True, order, 1000, 100)
    session = SourceSession([late, disk], CountingSink.encoder, {}, lambda: 300)
    times = iter([0.0, 1.0, 1.0, 1.0, 1.5, 1.5])  # pass start, pass end, after the sync (x2)
    session.setup(CountingSink(), 0.0)
    step = session.step(CountingSink(), lambda: next(times))
    assert step.held == ("ram-like",) and "ram-like" not in order
    assert step.report is not None and step.report.held == ("ram-like",)
    # 100 blocks left at 1000 blocks/s: ~100 ms + the fixed part, within 300 ms, above 15 ms
    assert 15 < step.report.expected_downtime_ms <= 300
    assert not step.switchover
    assert step.report.dirty_rate_bps == 100 * PAGE / 1.0
    # 100 blocks fit the limit at the measured bandwidth: let go, the disk still first
    step = session.step(CountingSink(), lambda: next(times))
    assert step.held == () and order[-2:] == ["disk-like", "ram-like"]


class ShrinkingDisk(UnitsSaver):
    """A bulk-first saver whose every pass leaves `keep` of what it sent waiting again (the
    guest rewriting that share of the disk meanwhile)."""

    def __init__(self, order: list[str], units: int, keep: float) -> None:
        super().__init__("disk-like", True, order, units, 0)
        self.keep = keep

    def sync(self) -> None:
        self.to_send = int(self.sent_now * self.keep)
        self.sent_now = 0

    sent_now = 0

    def iterate(self, out: SaverOutput, budget_bytes: int) -> int:
        before = self.to_send
        n = super().iterate(out, budget_bytes)
        self.sent_now += before - self.to_send
        return n


def test_hold_back_rule() -> None:
    from vmferry.migration.convergence import MAX_HELD_PASSES, hold_back

    mib = 1 << 20
    assert hold_back(512 * mib, None, 0.0, 300, 0)  # the bulk copy ahead, nothing measured
    assert not hold_back(0, None, 0.0, 300, 0)  # no disk backlog: nothing to wait for
    assert hold_back(86 * mib, 512 * mib, 119e6, 300, 1)  # 0.76 s of disk left, still shrinking
    assert not hold_back(14 * mib, 86 * mib, 119e6, 300, 2)  # 0.12 s: fits the limit
    assert not hold_back(60 * mib, 100 * mib, 119e6, 300, 1)  # no longer halved: never alone
    assert not hold_back(86 * mib, 512 * mib, 119e6, 300, MAX_HELD_PASSES)


@settings(max_examples=300, deadline=None)
@given(left=st.integers(0, 1 << 40), sent=st.none() | st.integers(0, 1 << 40),
       bw=st.floats(0, 1e10), limit=st.integers(0, 10**6), held=st.integers(0, 20),
       slower=st.floats(0, 1))
def test_hold_back_properties(left: int, sent: int | None, bw: float, limit: int, held: int,
                              slower: float) -> None:
    from vmferry.migration.convergence import MAX_HELD_PASSES, SHRINK_RATIO, hold_back

    h = hold_back(left, sent, bw, limit, held)
    if h:
        assert left > 0 and held < MAX_HELD_PASSES
        assert sent is None or left < sent * SHRINK_RATIO
        assert bw == 0 or left / bw * 1000 > limit
        # a slower link only makes the backlog weigh more; a larger limit less
        assert hold_back(left, sent, bw * slower, limit, held)
    else:
        assert not hold_back(left, sent, bw, limit + 1, held)


@settings(max_examples=100, deadline=None)
@given(units=st.integers(0, 5000), keep=st.floats(0.0, 1.5), ram=st.integers(0, 3000),
       limit=st.integers(0, 2000), pass_s=st.floats(0.01, 10.0))
def test_ram_is_held_only_while_the_disk_backlog_is_large_and_only_once(
        units: int, keep: float, ram: int, limit: int, pass_s: float) -> None:
    """Whatever the disk does: RAM is held in at most MAX_HELD_PASSES passes, all of them at
    the start (once let go, never held again), never in a pass that switched over, and a held
    pass leaves RAM's whole backlog in the expected downtime."""
    from vmferry.migration.convergence import MAX_HELD_PASSES

    order: list[str] = []
    ram_like = UnitsSaver("ram-like", False, order, ram, 0)
    disk = ShrinkingDisk(order, units, keep)
    session = SourceSession([ram_like, disk], CountingSink.encoder, {}, lambda: limit,
                            step_budget=1 << 40)
    clock = iter(float(i) * pass_s for i in range(10_000))
    session.setup(CountingSink(), 0.0)
    held = []
    for _ in range(MAX_HELD_PASSES + 3):
        step = session.step(CountingSink(), lambda: next(clock))
        assert step.report is not None  # the budget is unbounded: one step, one pass
        held.append(bool(step.held))
        if step.held:
            assert not step.switchover
            assert session.pending() >= ram * PAGE  # RAM's backlog stays in the one figure
            assert ram_like.to_send == ram  # sent nothing
    assert sum(held) <= MAX_HELD_PASSES
    assert held == sorted(held, reverse=True)  # the held passes come first, then never again
    assert held[0] == (units > 0)  # a first pass with a disk backlog holds RAM (nothing measured)


# --- several channels (multifd): pages on data channels, delivered in any order -------------------


class MemoryChannels:
    """multifd's data channels in memory: each chunk is encoded at once on the channel `pick`
    names; what a channel sent waits in its queue until the test delivers it, so channels
    overtake each other in any interleaving. Within one channel bytes keep their order (TCP)."""

    def __init__(self, n: int, blocks: RamBlocks, loader: RamLoader, pick: Callable[[int], int],
                 compression: str = "none") -> None:
        self.encoders = [DataChannelEncoder("m1", i, n, blocks, Compressor(compression)) for i in range(n)]
        self.receivers = [DataChannelReceiver(loader, "m1") for _ in range(n)]
        self.waiting: list[list[bytes]] = [[enc.start()] for enc in self.encoders]
        self.pick = pick
        self.sent = 0
        self.alive = [True] * n
        self.handed = [{i + 1: np.zeros(b.size // PAGE, dtype=bool) for i, b in enumerate(blocks.blocks)}
                       for _ in range(n)]
        self.lost: list[int] = []
        self.page_bytes = 0

    def submit(self, chunk: PageChunk, channel: int | None = None) -> tuple[int, int | None]:
        """As MultifdSender.submit: `channel` fixed (an XBZRLE delta follows its base), or one
        the test picks among the live ones."""
        if channel is not None:
            if not self.alive[channel]:
                return 0, None
            i = channel
        else:
            live = [k for k, a in enumerate(self.alive) if a]
            i = live[self.pick(len(live))]
        data = b"".join(bytes(b) for b in self.encoders[i].encode(chunk))
        self.waiting[i].append(data)
        self.handed[i][chunk.block_id][chunk.pages] = True
        self.sent += len(data)
        self.page_bytes += int(np.count_nonzero(~chunk.is_zero)) * PAGE
        return chunk.raw_bytes, i

    def deliver(self, i: int) -> None:
        i %= len(self.waiting)
        if self.waiting[i]:
            self.receivers[i].feed(self.waiting[i].pop(0))

    def kill(self, i: int, keep_bytes: int) -> None:
        """Channel i's connection breaks: of what it had not delivered, only the first
        `keep_bytes` arrive (perhaps half a record); the rest is gone. The last live channel
        is never killed."""
        i %= len(self.waiting)
        if not self.alive[i] or sum(self.alive) == 1:
            return
        rest = b"".join(self.waiting[i])
        self.waiting[i] = []
        self.receivers[i].feed(rest[:keep_bytes])
        self.alive[i] = False
        self.lost.append(i)

    def drain(self) -> None:
        for i in range(len(self.waiting)):
            while self.alive[i] and self.waiting[i]:
                self.deliver(i)

    def take_lost(self) -> list[tuple[int, str, dict[int, np.ndarray]]]:
        lost, self.lost = self.lost, []
        return [(i, "cut by the test", self.handed[i]) for i in lost]

    def finish(self) -> None:
        for i, enc in enumerate(self.encoders):
            if self.alive[i]:
                self.waiting[i].append(enc.end())
        while any(self.waiting):
            self.deliver(self.pick(len(self.waiting)))
        assert all(r.ended for r, a in zip(self.receivers, self.alive, strict=True) if a)

    def queued_bytes(self) -> int:
        return 0

    def sent_bytes(self) -> int:
        return self.sent

    def page_bytes_sent(self) -> int:
        return self.page_bytes


channel_actions = st.lists(st.one_of(
    st.tuples(st.just("write"), writes), st.tuples(st.just("step"), st.none()),
    st.tuples(st.just("deliver"), st.integers(0, 3)),
    st.tuples(st.just("kill"), st.tuples(st.integers(0, 3), st.integers(0, 3 << 20)))), max_size=80)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(writes, max_size=30), during=channel_actions, n=st.integers(1, 4),
       compression=st.sampled_from(["none", "lz4", "zstd", "zlib"]), data=st.data())
def test_multifd_destination_equals_source_whatever_order_channels_deliver(
    before: list[tuple[int, int, int]], during: list[tuple[str, object]], n: int, compression: str,
    data: st.DataObject
) -> None:
    """Pages go on N data channels, each channel chosen by hypothesis and delivered whenever it
    says: an older copy of a page may arrive after a newer one. Channels may break (all but one),
    losing what they had not delivered, perhaps mid-record: their pages go again on the others.
    After the switchover (every live channel drained and ended) the destination's memory equals
    the source's."""
    p = Pair(downtime_limit_ms=0)
    try:
        chans = MemoryChannels(n, block_table(p.src_blocks), p.ram_loader,
                               lambda k: data.draw(st.integers(0, k - 1)), compression)
        p.ram.multifd = chans  # type: ignore[assignment]
        for block, page, value in before:
            p.write(block, page, value)
        p.setup()
        for kind, arg in during:
            if kind == "write":
                p.write(*arg)  # type: ignore[misc]
            elif kind == "deliver":
                chans.deliver(arg)  # type: ignore[arg-type]
            elif kind == "kill":
                chans.kill(*arg)  # type: ignore[misc]
            else:
                p.step()
        p.switch_over()
        p.assert_equal()
        assert set(p.losses.declared) == {i for i, a in enumerate(chans.alive) if not a}
    finally:
        p.close()


def test_a_late_page_from_an_earlier_generation_never_overwrites_a_newer_one(pair: Pair) -> None:
    """Deterministic: page 7 goes in generation 1 on channel 0, is rewritten and goes again in
    generation 2 on channel 1; channel 1 delivers first, then channel 0's stale copy arrives."""
    order = iter([0, 1])
    chans = MemoryChannels(2, block_table(pair.src_blocks), pair.ram_loader, lambda k: next(order))
    pair.ram.multifd = chans  # type: ignore[assignment]
    pair.write(0, 7, 1)
    pair.setup()
    pair.session.step_budget = 1 << 30
    pair.step()  # generation 1: the populated pages, channel 0
    pair.write(0, 7, 2)
    pair.ram.sync()
    pair.session.step(pair.out, pair.tick)  # generation 2: page 7 again, channel 1
    chans.deliver(1)
    chans.deliver(1)  # the channel's start, then generation 2's page
    chans.deliver(0)
    chans.deliver(0)  # generation 1's stale page arrives last
    view = np.frombuffer(pair.dst_blocks[0].mem, dtype=np.uint8)
    assert view[7 * PAGE] == 2


def test_a_data_channel_of_another_migration_is_refused_by_name() -> None:
    blocks = [RamBlock("pc.ram", 0, 16 * PAGE)]
    loader = RamLoader(blocks)
    table = block_table(blocks)
    enc = DataChannelEncoder("other", 0, 1, table, Compressor())
    rx = DataChannelReceiver(loader, "mine")
    with pytest.raises(MigrationError, match="data channel 0 belongs to migration 'other', not this one"):
        rx.feed(enc.start())
    loader.release()
    blocks[0].close()


def test_a_truncated_data_channel_is_refused_naming_the_channel() -> None:
    blocks = [RamBlock("pc.ram", 0, 16 * PAGE)]
    loader = RamLoader(blocks)
    enc = DataChannelEncoder("m", 3, 4, block_table(blocks), Compressor())
    rx = DataChannelReceiver(loader, "m")
    rx.feed(enc.start())
    with pytest.raises(MigrationError, match="data channel 3: stream truncated"):
        rx.feed_eof()
    loader.release()
    blocks[0].close()


def test_bandwidth_never_exceeds_max_bandwidth() -> None:
    """Under max-bandwidth the destination idles while the limiter waits, and idle time is left
    out of the end-to-end rate: the measured rate is a burst's. The expected downtime must use
    the cap, or a capped migration switches over with seconds of backlog (as one did: several
    channels each burst a chunk, then waited)."""
    p = Pair(downtime_limit_ms=300, end_to_end=True)
    try:
        p.setup()
        p.session.progress(0, p.session.sent + (4 << 20), 0.0)
        p.session.progress(4 << 20, p.session.sent + (4 << 20), 0.01)  # a 4 MiB burst in 10 ms
        burst = p.session.bandwidth()
        assert burst == pytest.approx((4 << 20) / 0.01)
        p.session.bandwidth_cap = lambda: float(1 << 20)  # max-bandwidth 1 MiB/s
        assert p.session.bandwidth() == 1 << 20
        p.session.bandwidth_cap = lambda: float(1 << 30)  # a cap above the rate changes nothing
        assert p.session.bandwidth() == burst
    finally:
        p.close()


@settings(max_examples=200, deadline=None)
@given(raw=st.integers(0, 1 << 40), ratio=st.floats(0.01, 1.2), cost=st.floats(0, 1e-6),
       bw=st.just(0.0) | st.floats(1.0, 1e10))
def test_a_compressing_drive_weighs_its_compression_time_in_the_expected_downtime(
        raw: int, ratio: float, cost: float, bw: float) -> None:
    """What a compressing drive has left, divided by the bandwidth, is never less than the time
    its compressed bytes take on the wire, nor than the time compressing them takes (the
    pipeline's workers compress while the migration thread sends: the slower counts)."""
    from vmferry.migration.block import compressed_pending

    pending = compressed_pending(raw, ratio, cost, bw)
    if bw > 0:
        assert pending / bw >= max(raw * ratio / bw, raw * cost) * (1 - 1e-9) - 1 / bw
        assert pending / bw <= (raw * ratio / bw + raw * cost) * (1 + 1e-9)
    assert compressed_pending(raw, ratio, 0.0, bw) == int(raw * ratio)
    assert compressed_pending(raw, ratio, cost, 0.0) == int(raw * ratio)
