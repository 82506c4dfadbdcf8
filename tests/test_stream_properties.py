"""Property tests: random record sequences round-trip in random chunkings; damaged streams only
ever raise StreamError."""

from __future__ import annotations

import io
import struct

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vmferry.errors import StreamError
from vmferry.stream import (
    BlockData,
    BlockZero,
    Command,
    CommandCode,
    DeviceSection,
    EndOfStream,
    PassStart,
    RamPageList,
    RamPages,
    RamZero,
    SectionPhase,
    StreamDecoder,
    StreamEncoder,
)
from vmferry.stream.testing import PAGE, encode_all, sample_records, sample_stream

PROLOGUE = sample_records()[:4]  # config, description (ids 1, 2), RAM blocks 1 (256 pages), 2 (64), disk 1
BLOCK_PAGES = {1: 256, 2: 64}


@st.composite
def ram_run(draw: st.DrawFn) -> RamPages | RamZero:
    block = draw(st.sampled_from([1, 2]))
    count = draw(st.integers(1, 4))
    first = draw(st.integers(0, BLOCK_PAGES[block] - count))
    if draw(st.booleans()):
        return RamZero(block, first, count)
    return RamPages(block, first, count, draw(st.binary(min_size=8, max_size=8)) * (count * PAGE // 8))


@st.composite
def page_list(draw: st.DrawFn) -> RamPageList:
    block = draw(st.sampled_from([1, 2]))
    pages = sorted(draw(st.sets(st.integers(0, BLOCK_PAGES[block] - 1), min_size=1, max_size=6)))
    fill = draw(st.binary(min_size=8, max_size=8))
    return RamPageList(block, np.array(pages, dtype=np.uint32), fill * (len(pages) * PAGE // 8))


@st.composite
def record_sequences(draw: st.DrawFn) -> list:
    body = draw(st.lists(st.one_of(
        ram_run(),
        page_list(),
        st.builds(BlockData, st.just(1), st.integers(0, 60), st.just(2),
                  st.binary(min_size=1024, max_size=1024)),
        st.builds(BlockZero, st.just(1), st.integers(0, 60), st.integers(1, 4)),
        st.builds(DeviceSection, st.just(2), st.just(SectionPhase.FULL), st.binary(max_size=64)),
        st.builds(Command, st.sampled_from(list(CommandCode)[1:]), st.integers(0, 9),
                  st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=32)),
        st.just("pass"),
    ), max_size=20))
    passes = iter(range(1, 100))
    return PROLOGUE + [PassStart(next(passes)) if r == "pass" else r for r in body] + [EndOfStream()]


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos:pos + n])
        pos, i = pos + n, i + 1
    return out


def body(records: list) -> list:
    return [r for r in records if not isinstance(r, EndOfStream)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_sequences(), st.lists(st.integers(1, 5000), min_size=1, max_size=8))
def test_round_trip_in_random_chunks(records: list, sizes: list[int]) -> None:
    dec = StreamDecoder()
    for chunk in chunked(encode_all(records), sizes):
        dec.feed(chunk)
    dec.feed_eof()
    out = list(dec.records())
    assert body(out[1:]) == body(records)
    assert out[-1].record_count == len(records) - 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_sequences(), st.lists(st.integers(1, 5000), min_size=1, max_size=8))
def test_round_trip_through_get_buffer_with_placement(records: list, sizes: list[int]) -> None:
    guest = {1: bytearray(256 * PAGE), 2: bytearray(64 * PAGE)}
    dec = StreamDecoder(place=lambda b, f, c: memoryview(guest[b])[f * PAGE:(f + c) * PAGE])
    src, i, out = io.BytesIO(encode_all(records)), 0, []
    while not dec.ended:
        n = src.readinto(dec.get_buffer()[:sizes[i % len(sizes)]])
        i += 1
        if not n:
            break
        dec.buffer_updated(n)
        for rec in dec.records():  # page lists are scattered by the caller, in stream order
            if isinstance(rec, RamPageList):
                rec.scatter_into(guest[rec.block_id], PAGE)
            out.append(rec)
    expect = {1: bytearray(256 * PAGE), 2: bytearray(64 * PAGE)}
    for r in records:
        if isinstance(r, RamPages):
            expect[r.block_id][r.first_page * PAGE:(r.first_page + r.page_count) * PAGE] = r.data
        elif isinstance(r, RamPageList):
            for k, p in enumerate(r.pages.tolist()):
                expect[r.block_id][p * PAGE:(p + 1) * PAGE] = r.data[k * PAGE:(k + 1) * PAGE]
    assert guest == expect
    assert [r for r in out[1:] if not isinstance(r, RamPages)] == [
        r for r in records if not isinstance(r, RamPages)][:-1] + [out[-1]]


def decode_damaged(data: bytes, chunk: int) -> None:
    dec = StreamDecoder()
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i:i + chunk])
        dec.feed_eof()
        list(dec.records())
    except StreamError:
        pass  # the only acceptable failure


SAMPLE = sample_stream()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]),
                          st.integers(0, len(SAMPLE) - 1), st.binary(min_size=1, max_size=8)),
                min_size=1, max_size=3),
       st.integers(1, 3000))
def test_damaged_streams_only_raise_stream_error(mutations: list, chunk: int) -> None:
    data = bytearray(SAMPLE)
    for kind, pos, blob in mutations:
        pos %= max(len(data), 1)
        if kind == "flip" and data:
            data[pos] ^= 1 << (blob[0] % 8)
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = blob
        else:
            del data[pos:pos + len(blob)]
    decode_damaged(bytes(data), chunk)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2]),
       # mostly near the blocks' sizes (64, 256 pages), so both verdicts are common
       st.one_of(st.lists(st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)), min_size=1, max_size=8),
                 st.sets(st.integers(0, 300), min_size=1, max_size=8).map(sorted)),
       st.one_of(st.just(bytes(4)), st.binary(min_size=4, max_size=4)),
       st.sampled_from([0, 0, 0, -1, 1]), st.integers(1, 3000))
def test_any_page_list_is_valid_or_a_stream_error(block: int, indexes: list[int], pad: bytes,
                                                  extra_pages: int, chunk: int) -> None:
    """Checksums are correct here (the encoder's raw_record computes them), so every structural
    check is what stands between these bytes and guest memory: either the record is good (indexes
    strictly increasing, inside the block) or the decoder says why not."""
    enc = StreamEncoder()
    n = len(indexes)
    raw = struct.pack(f"<{n}I", *indexes) + (pad if n % 2 else b"")
    raw += bytes(PAGE * max(n + extra_pages, 0))
    body = b"".join(enc.encode(r) for r in PROLOGUE) + enc.raw_record(36, raw, section=block, count=n)
    data = enc.header() + body + enc.end()
    dec = StreamDecoder()
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i:i + chunk])
        dec.feed_eof()
        out = [r for r in dec.records() if isinstance(r, RamPageList)]
    except StreamError:
        event("refused")
        return
    event("accepted")
    (rec,) = out
    p = rec.pages.astype(np.int64)
    assert np.all(np.diff(p) > 0) and p[-1] < BLOCK_PAGES[block] and extra_pages == 0
    assert (n % 2 == 0 or pad == bytes(4)) and rec.pages.tolist() == indexes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_after_a_valid_header_only_raises_stream_error(tail: bytes) -> None:
    decode_damaged(SAMPLE[:80] + tail, 7)
