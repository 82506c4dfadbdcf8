"""Bad input gets a precise StreamError, and nothing else. One test per class of damage."""

from __future__ import annotations

import struct

import pytest

from vmferry.errors import StreamError
from vmferry.stream import DeviceSection, RamZero, SectionPhase, StreamDecoder, StreamEncoder, StreamLimits
from vmferry.stream.format import pack_stream_header
from vmferry.stream.testing import encode_all, sample_records, sample_stream


def decode_all(data: bytes, limits: StreamLimits | None = None) -> list:
    dec = StreamDecoder(limits)
    dec.feed(data)
    dec.feed_eof()
    return list(dec.records())


def error_of(data: bytes, limits: StreamLimits | None = None) -> StreamError:
    with pytest.raises(StreamError) as info:
        decode_all(data, limits)
    return info.value


def spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each record after the 80-byte stream header."""
    out, pos = [], 80
    while pos < len(data):
        length = struct.unpack_from("<I", data, pos + 8)[0]
        out.append((pos, pos + 32 + length + 8))
        pos = out[-1][1]
    return out


def prologue(enc: StreamEncoder) -> bytes:
    """Header + the first four records of the sample (config, description, RAM blocks, disks)."""
    return enc.header() + b"".join(enc.encode(r) for r in sample_records()[:4])


# -- the classes the issue names -------------------------------------------------------------------


def test_truncation_is_reported_with_where_it_happened() -> None:
    data = sample_stream()
    cut = spans(data)[6][0] + 32 + 500  # 500 bytes into the pages of the first RAM_PAGES record
    e = error_of(data[:cut])
    assert str(e) == ("stream truncated inside a RAM_PAGES record (500 of 16392 payload and trailer bytes) "
                      f"(at record 6, section 'pc.ram', byte offset {cut})")
    assert (e.offset, e.record_index, e.section) == (cut, 6, "pc.ram")


def interesting_offsets(data: bytes) -> list[int]:
    """Every offset outside bulk data, every 61st inside it (page bytes are all alike to a decoder)."""
    bulk = set()
    for start, end in spans(data):
        if end - start > 1000:
            bulk.update(range(start + 40, end - 40))
    return [pos for pos in range(len(data)) if pos not in bulk or pos % 61 == 0]


def test_truncation_at_every_offset_is_an_error() -> None:
    data = sample_stream()
    for cut in interesting_offsets(data):
        with pytest.raises(StreamError, match=r"^(stream truncated|empty input)"):
            decode_all(data[:cut])


def test_stream_without_end_record() -> None:
    data = sample_stream()
    cut = spans(data)[-1][0]
    assert str(error_of(data[:cut])) == (
        f"stream truncated: no END record after 19 records (at record 19, byte offset {cut})")


def test_flipped_bit_in_a_record_header() -> None:
    data = bytearray(sample_stream())
    data[80 + 8] ^= 0x10  # CONFIG's length
    assert str(error_of(bytes(data))) == "record header checksum mismatch (at record 0, byte offset 80)"


def test_flipped_bit_in_a_payload() -> None:
    data = bytearray(sample_stream())
    start, end = spans(bytes(data))[15]  # the serial device section
    data[start + 40] ^= 0x01
    assert str(error_of(bytes(data))) == (
        f"checksum mismatch in SECTION_FULL payload (46 bytes) (at record 15, section 'serial', "
        f"byte offset {start})")


def test_flipped_bit_anywhere_is_caught() -> None:
    data = sample_stream()
    for pos in interesting_offsets(data):
        bad = bytearray(data)
        bad[pos] ^= 1 << (pos % 8)
        with pytest.raises(StreamError):
            decode_all(bytes(bad))


def test_wrong_magic() -> None:
    assert str(error_of(b"QEVM\x00\x00\x00\x03" + sample_stream()[8:])) == (
        "not a vmferry stream: bad magic 51 45 56 4d 00 00 00 03 (expected 89 56 4d 46 0d 0a 1a 0a) "
        "(at byte offset 0)")


def test_newer_format_version() -> None:
    data = pack_stream_header(4096, "vmferry 9.0", "vmferry-9.0", major=2, minor=1)
    assert str(error_of(data)) == (
        "stream format version 2.1 is newer than this reader (1.0) (at byte offset 8)")


def test_newer_minor_version_is_read() -> None:
    dec = StreamDecoder()
    dec.feed(pack_stream_header(4096, "p", "m", minor=7))
    assert dec.next_record().minor == 7


def test_unknown_record_type() -> None:
    enc = StreamEncoder()
    data = prologue(enc) + enc.raw_record(99, b"xyz")
    assert str(error_of(data)) == "unknown record type 99 (at record 4, byte offset 902)"


def test_unknown_record_type_flagged_skippable_is_skipped() -> None:
    enc = StreamEncoder()
    data = prologue(enc) + enc.raw_record(99, b"xyz", flags=1) + enc.end()
    assert [type(r).__name__ for r in decode_all(data)[-2:]] == ["Skipped", "EndOfStream"]


def test_a_malformed_block_compressed_record_is_refused_by_name() -> None:
    """Type 50, reserved in 1.0 and defined since (BLOCK_COMPRESSED): a payload shorter than its
    head is refused naming the type, before it is buffered."""
    enc = StreamEncoder()
    data = prologue(enc) + enc.raw_record(50, b"\x01", section=1, count=1)
    assert "BLOCK_COMPRESSED payload length 1, shorter than its 16-byte head" in str(error_of(data))


def test_unknown_section_id() -> None:
    enc = StreamEncoder()
    data = prologue(enc) + enc.encode(DeviceSection(5, SectionPhase.FULL, b""))
    assert str(error_of(data)) == (
        "unknown section id 5 (not in any DESCRIPTION) (at record 4, byte offset 902)")


def test_absurd_length_is_refused_before_allocating() -> None:
    enc = StreamEncoder()
    data = prologue(enc) + enc.raw_record(1)
    data = data[:-40] + _header(1, 0, 0xFFFFFFFF, 0, 0)
    assert str(error_of(data)) == (
        "payload length 4294967295 exceeds the limit of 67108864 bytes (at record 4, byte offset 902)")


def test_lowered_limit_is_enforced() -> None:
    e = error_of(sample_stream(), StreamLimits(max_payload=4096))
    assert e.reason == "payload length 16384 exceeds the limit of 4096 bytes" and e.record_index == 6


# -- the order rules and the end record ------------------------------------------------------------


def test_dropped_record_is_caught_by_the_count() -> None:
    data = sample_stream()
    start, end = spans(data)[11]  # a SECTION_PART: dropping it breaks no order rule
    assert error_of(data[:start] + data[end:]).reason == "END says 19 records but 18 were read"


def test_reordered_records_are_caught_by_the_digest() -> None:
    data = sample_stream()
    (a0, a1), (b0, b1) = spans(data)[7], spans(data)[8]  # two zero runs of different blocks
    swapped = data[:a0] + data[b0:b1] + data[a0:a1] + data[b1:]
    assert error_of(swapped).reason == "running digest mismatch: records were dropped, reordered or altered"


def test_bytes_after_end() -> None:
    assert str(error_of(sample_stream() + b"junk")) == (
        "4 bytes after the end of stream (at record 20, byte offset 35435)")


def test_run_outside_its_block() -> None:
    enc = StreamEncoder()
    data = prologue(enc) + enc.encode(RamZero(2, 60, 10))
    assert error_of(data).reason == (
        "RAM_ZERO pages 60..69 lie outside RAM block 'vga.vram' (64 pages of 4096 bytes)")


def test_unused_header_field_must_be_zero() -> None:
    enc = StreamEncoder()
    data = prologue(enc) + enc.raw_record(80, index=1, count=3)
    assert error_of(data).reason == "PASS record has count 3, must be 0"


def test_section_left_open_at_end() -> None:
    records = [r for r in sample_records()
               if not (isinstance(r, DeviceSection) and r.phase == SectionPhase.END)]
    assert error_of(encode_all(records)).reason == (
        "end of stream while section(s) ramsave still open (START without END)")


def test_bad_sync_word() -> None:
    data = bytearray(sample_stream())
    data[80:84] = b"XXXX"
    assert error_of(bytes(data)).reason == (
        "bad sync word 58 58 58 58 (expected 56 4d 46 52 'VMFR'): stream corrupt or misaligned")


# -- RAM_PAGE_LIST: every check, each with a stream the encoder would refuse to write --------------


def page_list(indexes: list[int], *, block: int = 2, count: int | None = None, pad: bytes | None = None,
              pages: int | None = None, index: int = 0) -> str:
    """The error for a prologue + one hand-built RAM_PAGE_LIST (block 2 = 'vga.vram', 64 pages)."""
    enc = StreamEncoder()
    raw = struct.pack(f"<{len(indexes)}I", *indexes)
    raw += bytes(-len(raw) % 8) if pad is None else pad
    raw += bytes(4096 * (len(indexes) if pages is None else pages))
    count = len(indexes) if count is None else count
    data = prologue(enc) + enc.raw_record(36, raw, section=block, count=count, index=index) + enc.end()
    e = error_of(data)
    assert e.record_index == 4 and e.offset == 902  # names the record, wherever the check ran
    return str(e)


def test_page_list_indexes_not_increasing() -> None:
    assert page_list([3, 9, 9]) == (
        "RAM_PAGE_LIST page indexes are not strictly increasing: entry 2 is page 9 after page 9 "
        "(at record 4, section 'vga.vram', byte offset 902)")


def test_page_list_indexes_decreasing() -> None:
    # 3 - 5 wraps to 4294967294 in uint32: a check written as np.diff(p) > 0 would let this through
    assert "entry 1 is page 3 after page 5" in page_list([5, 3])


def test_page_list_index_beyond_its_block() -> None:
    assert page_list([3, 64]) == (
        "RAM_PAGE_LIST page 64 lies outside RAM block 'vga.vram' (64 pages of 4096 bytes) "
        "(at record 4, section 'vga.vram', byte offset 902)")


def test_page_list_nonzero_padding() -> None:
    assert page_list([3], pad=b"\0\0\0\x01").startswith(
        "RAM_PAGE_LIST padding after the page indexes is not zero (at record 4")


def test_page_list_wrong_length() -> None:
    # checked at the header, before the payload is buffered
    assert page_list([3, 4], pages=1).startswith("RAM_PAGE_LIST payload length 4104, expected 8200 (")
    assert page_list([3], pad=b"").startswith("RAM_PAGE_LIST payload length 4100, expected 4104 (")


def test_page_list_count_zero() -> None:
    assert page_list([], count=0, pages=0).startswith("RAM_PAGE_LIST with count 0 (at record 4")


def test_page_list_header_checks() -> None:
    assert page_list([3], index=5).startswith("RAM_PAGE_LIST record has index 5, must be 0 (")
    assert page_list([3], block=7).startswith(
        "RAM_PAGE_LIST for unknown RAM block id 7 (not listed before) (")
    assert page_list(list(range(65))).startswith(
        "RAM_PAGE_LIST of 65 pages, more than RAM block 'vga.vram' has (64) (")


def test_page_list_bad_after_a_placed_run_writes_nothing_of_its_own() -> None:
    """A page list is never placed: a bad one leaves guest memory exactly as the placed runs left it."""
    enc = StreamEncoder()
    bad = enc.raw_record(36, struct.pack("<2I", 5, 3) + bytes(2 * 4096), section=1, count=2)
    data = prologue(enc) + bad + enc.end()
    guest = bytearray(256 * 4096)
    dec = StreamDecoder(place=lambda b, f, c: memoryview(guest)[f * 4096:(f + c) * 4096])
    dec.feed(data)
    with pytest.raises(StreamError, match="not strictly increasing"):
        list(dec.records())
    assert not any(guest)


def _header(rtype: int, section: int, length: int, count: int, index: int) -> bytes:
    from vmferry.stream.format import pack_record_header

    return pack_record_header(rtype, 0, section, length, count, index)[0]
