"""Coverage-guided fuzzing of the stream decoder (stream/decoder.py). Not collected by pytest;
run by tests/fuzz/fuzz.py.

    python tests/fuzz/fuzz.py stream -max_total_time=60 tests/fuzz/corpus/stream

Contract: any input yields records or raises StreamError — never another exception, never a hang —
and a stream that did not raise after feed_eof() has ended with END. Decoding must not depend on
how the input was split: the same input fed whole and in chunks gives the same records and the
same error. Device sections that decode as records are also handed to the description-driven
section decoder (stream/sections.py `decode_section`, which raises only StreamError).

The first input byte picks how the input is fed (bit 0: repair checksums, bit 1: through
get_buffer()/buffer_updated(), bit 2: with a place() callback taking RAM_PAGES into a "guest
memory" buffer); the second byte is the chunk size (0: all at once). Repairing recomputes every
checksum the input's framing allows (stream header, record header checks, trailers, END's count
and digest), so mutations get past the checksums into the order rules and payload parsers.
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Iterator

from vmferry.errors import StreamError
from vmferry.stream import DeviceSection, EndOfStream, SectionPhase, StreamDecoder
from vmferry.stream.format import (
    RECORD_HEADER_SIZE,
    STREAM_HEADER_SIZE,
    TRAILER,
    TRAILER_SIZE,
    chain_digest,
    checksum,
)
from vmferry.stream.records import RecordType
from vmferry.stream.sections import decode_section

REPAIR, BUFFERED, PLACE = 1, 2, 4
_TRAILING = re.compile(r"^\d+ bytes after the end of stream")
_U32 = struct.Struct("<I")
_END = struct.Struct("<QQ")


def repair_checksums(data: bytes) -> bytes:
    """The same bytes with every checksum (and END's record count and digest) made right, as far
    as the record lengths in the input frame it. Sync words, lengths and payloads stay as they are."""
    buf = bytearray(data)
    if len(buf) < STREAM_HEADER_SIZE:
        return bytes(buf)
    digest = checksum(bytes(buf[:STREAM_HEADER_SIZE - 8]))
    buf[STREAM_HEADER_SIZE - 8:STREAM_HEADER_SIZE] = TRAILER.pack(digest)
    pos, count = STREAM_HEADER_SIZE, 0
    while pos + RECORD_HEADER_SIZE <= len(buf):
        hcheck = checksum(bytes(buf[pos:pos + 24]))
        buf[pos + 24:pos + 32] = TRAILER.pack(hcheck)
        rtype, length = buf[pos + 4], _U32.unpack_from(buf, pos + 8)[0]
        start = pos + RECORD_HEADER_SIZE
        end = start + length
        if end + TRAILER_SIZE > len(buf):
            break
        if rtype == RecordType.END and length == _END.size:
            buf[start:end] = _END.pack(count, digest)
        trailer = checksum(bytes(buf[start:end]), hcheck)
        buf[end:end + TRAILER_SIZE] = TRAILER.pack(trailer)
        digest = chain_digest(digest, trailer)
        count += 1
        pos = end + TRAILER_SIZE
    return bytes(buf)


def _chunks(body: bytes, size: int) -> Iterator[bytes]:
    size = size or max(len(body), 1)
    for i in range(0, len(body), size):
        yield body[i:i + size]


def _placer(dec_ref: list[StreamDecoder]):  # noqa: ANN202 - a closure over the decoder
    def place(block_id: int, first_page: int, page_count: int) -> memoryview | None:
        if (first_page + block_id) % 3 == 0:  # some runs arrive the normal way
            return None
        dec = dec_ref[0]
        assert dec.header is not None
        return memoryview(bytearray(page_count * dec.header.page_size))
    return place


def decode(body: bytes, mode: int, chunk: int) -> tuple[list[str], str | None, StreamDecoder]:
    """Decode `body` as `mode` and `chunk` say -> (a summary of each record, the error, decoder)."""
    ref: list[StreamDecoder] = []
    dec = StreamDecoder(place=_placer(ref) if mode & PLACE else None)
    ref.append(dec)
    out: list[str] = []
    try:
        if mode & BUFFERED:
            pos = 0
            while pos < len(body) and not dec.ended:
                target = dec.get_buffer()
                n = min(len(target), chunk or len(body), len(body) - pos)
                target[:n] = body[pos:pos + n]
                del target  # let go of the export before the decoder hands the buffer on
                dec.buffer_updated(n)
                pos += n
                _take(dec, out)
            if pos < len(body):  # bytes after END: the plain feed path must refuse them
                dec.feed(body[pos:])
        else:
            for piece in _chunks(body, chunk):
                dec.feed(piece)
                _take(dec, out)
        dec.feed_eof()
        _take(dec, out)
    except StreamError as e:
        # Bytes after END are counted as far as the chunk holding them goes: how many more follow,
        # a streaming decoder cannot know. The offset (where they start) does not depend on it.
        reason = _TRAILING.sub("bytes after the end of stream", e.reason)
        return out, f"{reason} @{e.record_index}:{e.offset}", dec
    return out, None, dec


def _take(dec: StreamDecoder, out: list[str]) -> None:
    """Append a summary of each ready record to `out` (in place: the error after them raises)."""
    for rec in dec.records():
        out.append(type(rec).__name__)
        if isinstance(rec, DeviceSection) and rec.phase == SectionPhase.FULL and dec.rules is not None:
            _decode_section(dec.rules.sections[rec.section_id].schema, bytes(rec.data))


def _decode_section(schema: object, payload: bytes) -> None:
    with contextlib.suppress(StreamError):
        decode_section(schema, payload)


def check(data: bytes) -> None:
    """The decoder's contract on one input; raises (AssertionError or the escaping exception) if broken."""
    if len(data) < 2:
        return
    mode, chunk, body = data[0], data[1], data[2:]
    if mode & REPAIR:
        body = repair_checksums(body)
    records, error, dec = decode(body, mode, chunk)
    if error is None:
        assert dec.ended and records and records[-1] == EndOfStream.__name__, "no error, yet no END"
    whole = decode(body, mode & ~(BUFFERED | PLACE), 0)[:2]
    assert (records, error) == whole, f"chunked {(records, error)} != whole {whole}"


def one_input(data: bytes) -> None:
    check(data)

