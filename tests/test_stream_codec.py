"""Round trips through the stream encoder and decoder, and the zero-copy paths."""

from __future__ import annotations

import io

import pytest

from vmferry.stream import RamPages, StreamDecoder, StreamEncoder, StreamHeader
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
    assert out[0] == StreamHeader(PAGE, "vmferry 0.1.0", "vmferry-1.0")
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
