"""Round trips through the stream encoder and decoder, and the zero-copy paths."""

from __future__ import annotations

import io

import numpy as np
import pytest

from vmferry import __version__
from vmferry.stream import RamPageList, RamPages, StreamDecoder, StreamEncoder, StreamHeader
from vmferry.stream.format import checksum
from vmferry.stream.records import EndOfStream
from vmferry.stream.testing import PAGE, sample_records, sample_stream


def decode(data: bytes, chunk: int) -> list:
    dec = StreamDecoder()
    for i in range(0, len(data), chunk):
        dec.feed(data[i:i + chunk])
    dec.feed_eof()
    return list(dec.records())


def without_end(records: list) -> list:
    return [r for r in records if not isinstance(r, EndOfStream)]


@pytest.mark.parametrize("chunk", [1, 3, 32, 33, 4096, 1 << 30])
def test_round_trip_in_any_chunk_size(chunk: int) -> None:
    out = decode(sample_stream(), chunk)
    assert out[0] == StreamHeader(PAGE, f"vmferry {__version__}", "vmferry-1.0")
    assert without_end(out[1:]) == without_end(sample_records())
    assert isinstance(out[-1], EndOfStream) and out[-1].record_count == len(sample_records()) - 1


def test_ram_payload_is_a_view_of_the_fed_chunk_not_a_copy() -> None:
    data = bytearray(sample_stream())
    dec = StreamDecoder()
    dec.feed(data)
    pages = next(r for r in dec.records() if isinstance(r, RamPages))
    assert isinstance(pages.data, memoryview) and pages.data.obj is data


def test_encode_ram_pages_passes_the_callers_buffer_through() -> None:
    guest = bytearray(8 * PAGE)
    enc = StreamEncoder()
    head, payload, trailer = enc.encode_ram_pages(1, 2, memoryview(guest)[2 * PAGE:6 * PAGE])
    assert len(head) == 32 and len(trailer) == 8
    assert payload.obj is guest and payload.nbytes == 4 * PAGE


def test_encode_ram_pages_refuses_a_partial_page() -> None:
    with pytest.raises(ValueError, match="whole number of 4096-byte pages"):
        StreamEncoder().encode_ram_pages(1, 0, b"x" * 100)


def _recv_loop(data: bytes, dec: StreamDecoder, max_read: int) -> list[int]:
    """Drive get_buffer/buffer_updated the way a socket loader would with recv_into."""
    src, sizes = io.BytesIO(data), []
    while not dec.ended:
        buf = dec.get_buffer()
        sizes.append(len(buf))
        n = src.readinto(buf[:max_read])
        if not n:
            dec.feed_eof()
            break
        dec.buffer_updated(n)
    return sizes


@pytest.mark.parametrize("max_read", [1, 7, 1 << 20])
def test_pages_are_placed_straight_into_guest_memory(max_read: int) -> None:
    guest = bytearray(256 * PAGE)
    asked = []

    def place(block_id: int, first: int, count: int) -> memoryview | None:
        asked.append((block_id, first, count))
        return memoryview(guest)[first * PAGE:(first + count) * PAGE] if block_id == 1 else None

    dec = StreamDecoder(place=place)
    _recv_loop(sample_stream(), dec, max_read)
    out = list(dec.records())
    placed = [r for r in out if isinstance(r, RamPages)]
    assert asked == [(1, 0, 4), (1, 1, 1)]
    assert all(r.placed and r.data.obj is guest for r in placed)
    sent = [r for r in sample_records() if isinstance(r, RamPages)]
    assert guest[:4 * PAGE] == sent[0].data[:PAGE] + sent[1].data + sent[0].data[2 * PAGE:]
    # the first run's page 1 was overwritten in place by the second pass's copy
    assert [(r.block_id, r.first_page, r.page_count) for r in placed] == [(1, 0, 4), (1, 1, 1)]
    others = [r for r in sample_records() if not isinstance(r, RamPages | EndOfStream)]
    assert [r for r in out[1:] if not isinstance(r, RamPages | EndOfStream)] == others


def test_get_buffer_never_reads_ahead_into_page_data() -> None:
    data = sample_stream()
    dec = StreamDecoder(place=lambda b, f, c: memoryview(bytearray(c * PAGE)))
    sizes = _recv_loop(data, dec, 1 << 30)
    # stream header, then headers (32) or trailer + next header (40), or exactly a payload
    assert sizes[0] == 80 and all(s in (32, 40) or s >= 4 for s in sizes[1:])
    assert dec.bytes_consumed == len(data)


def test_placed_pages_with_a_bad_checksum_are_refused() -> None:
    data = bytearray(sample_stream())
    first_ram = data.index(b"VMFR" + bytes([32]))
    data[first_ram + 32 + 100] ^= 1
    dec = StreamDecoder(place=lambda b, f, c: memoryview(bytearray(c * PAGE)))
    _recv_loop(bytes(data), dec, 1 << 30)
    with pytest.raises(Exception, match="checksum mismatch in RAM_PAGES payload"):
        list(dec.records())


def test_place_must_return_the_right_size() -> None:
    dec = StreamDecoder(place=lambda b, f, c: memoryview(bytearray(1)))
    with pytest.raises(ValueError, match="writable view of 16384 bytes"):
        dec.feed(sample_stream())


def test_nothing_may_be_encoded_after_end() -> None:
    enc = StreamEncoder()
    enc.end()
    with pytest.raises(ValueError, match="nothing may follow END"):
        enc.end()


# -- RAM_PAGE_LIST -----------------------------------------------------------------------------------


def _prologue(enc: StreamEncoder) -> list[bytes]:
    """Header, config, description, RAM blocks (1: 256 pages, 2: 64 pages), disks."""
    return [enc.header(), *(enc.encode(r) for r in sample_records()[:4])]


def _scattered(n: int, npages: int = 256, seed: int = 1) -> tuple[np.ndarray, bytearray]:
    rng = np.random.default_rng(seed)
    pages = np.sort(rng.choice(npages, size=n, replace=False)).astype(np.uint32)
    return pages, bytearray(rng.integers(0, 256, n * PAGE, dtype=np.uint8).tobytes())


def test_encode_ram_page_list_passes_the_callers_buffer_through() -> None:
    pages, data = _scattered(5)
    view = memoryview(data)
    enc = StreamEncoder()
    head, index, payload, trailer = enc.encode_ram_page_list(1, pages, view)
    assert len(head) == 32 and len(trailer) == 8
    assert payload is view  # the page data is the caller's own memoryview, not a copy
    assert index == pages.astype("<u4").tobytes() + bytes(4)  # 5 indexes: 20 bytes, padded to 24
    # the streaming xxh3 over [index, pages] is the one-call digest of the whole payload
    hcheck = int.from_bytes(head[24:], "little")
    assert int.from_bytes(trailer, "little") == checksum(index + bytes(data), hcheck)


def test_encode_buffers_of_a_ram_page_list_is_the_fast_path() -> None:
    pages, data = _scattered(4)
    fast = b"".join(StreamEncoder().encode_ram_page_list(2, pages, data))
    assert StreamEncoder().encode(RamPageList(2, pages, data)) == fast
    assert len(fast) == 32 + 16 + 4 * PAGE + 8  # an even count needs no padding


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 30])
def test_ram_page_list_round_trip(chunk: int) -> None:
    pages, data = _scattered(100)
    enc = StreamEncoder()
    wire = b"".join([*_prologue(enc), *enc.encode_ram_page_list(1, pages, data), enc.end()])
    out = [r for r in decode(wire, chunk) if isinstance(r, RamPageList)]
    assert out == [RamPageList(1, pages, data)]
    assert out[0].pages.dtype == np.uint32 and out[0].data.nbytes == 100 * PAGE


def test_ram_page_list_pages_are_a_copy_and_data_a_view_of_the_fed_chunk() -> None:
    pages, data = _scattered(3)
    enc = StreamEncoder()
    wire = bytearray(b"".join([*_prologue(enc), *enc.encode_ram_page_list(1, pages, data), enc.end()]))
    dec = StreamDecoder()
    dec.feed(wire)
    rec = next(r for r in dec.records() if isinstance(r, RamPageList))
    assert rec.data.obj is wire  # no copy of the page data
    assert rec.pages.flags.owndata and not np.shares_memory(rec.pages, np.frombuffer(wire, np.uint8))
    wire[:] = bytes(len(wire))  # the caller reuses its buffer: the indexes survive, the data does not
    assert rec.pages.tolist() == pages.tolist() and not any(rec.data)


def test_ram_page_list_is_never_placed_and_the_caller_scatters_it() -> None:
    pages, data = _scattered(40)
    enc = StreamEncoder()
    wire = b"".join([*_prologue(enc), *enc.encode_ram_page_list(1, pages, data), enc.end()])
    guest, asked = bytearray(256 * PAGE), []

    def place(block_id: int, first: int, count: int) -> memoryview:
        asked.append(first)
        return memoryview(guest)[first * PAGE:(first + count) * PAGE]

    dec = StreamDecoder(place=place)
    _recv_loop(wire, dec, 1 << 20)
    rec = next(r for r in dec.records() if isinstance(r, RamPageList))
    assert asked == [] and not any(guest)
    assert isinstance(rec.data.obj, bytearray) and rec.data.obj is not guest  # the assembly buffer
    rec.scatter_into(guest, PAGE)
    expect = bytearray(256 * PAGE)
    for i, p in enumerate(pages.tolist()):
        expect[p * PAGE:(p + 1) * PAGE] = data[i * PAGE:(i + 1) * PAGE]
    assert guest == expect


@pytest.mark.parametrize(("pages", "nbytes", "match"), [
    (np.array([1, 2], np.uint32), 3 * PAGE, r"data is 12288 bytes, expected 2 pages of 4096 bytes \(8192\)"),
    (np.array([], np.uint32), 0, "non-empty 1-d array"),
    (np.array([[1, 2]], np.uint32), 2 * PAGE, "non-empty 1-d array"),
    (np.array([1.0, 2.0]), 2 * PAGE, "must be integers"),
    (np.array([-1, 2], np.int64), 2 * PAGE, "must fit in u32"),
    (np.array([1, 1 << 32], np.int64), 2 * PAGE, "must fit in u32"),
    (np.array([2, 2], np.uint32), 2 * PAGE, "strictly increasing"),
    (np.array([5, 3], np.uint32), 2 * PAGE, "strictly increasing"),  # np.diff would wrap to 2**32-2
])
def test_encode_ram_page_list_refuses_bad_input(pages: np.ndarray, nbytes: int, match: str) -> None:
    enc = StreamEncoder()
    with pytest.raises(ValueError, match=match):
        enc.encode_ram_page_list(1, pages, bytes(nbytes))
    assert enc.record_count == 0  # nothing was counted into the running digest


def test_encode_ram_page_list_accepts_other_integer_dtypes() -> None:
    data = bytes(2 * PAGE)
    wide = StreamEncoder().encode_ram_page_list(1, np.array([7, 9], np.int64), data)
    assert wide[1] == np.array([7, 9], "<u4").tobytes()
