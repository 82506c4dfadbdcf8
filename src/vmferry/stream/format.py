"""Wire constants and the two fixed-size headers of the vmferry stream (docs/stream-format.md).

Stream header, 80 bytes::

    0 magic(8) | 8 major u16 | 10 minor u16 | 12 page_size u32 | 16 producer(32) | 48 machine(24) |
    72 check u64 = xxh3(bytes 0..71)

Record, 32-byte header + payload + 8-byte trailer::

    0 sync "VMFR" | 4 type u8 | 5 flags u8 | 6 section u16 | 8 length u32 | 12 count u32 |
    16 index u64 | 24 header check u64 = xxh3(bytes 0..23) | payload | trailer u64 = xxh3(payload, seed=check)

Only packing, unpacking and checksums live here; what a record *means* is in `payloads.py`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from vmferry.errors import StreamError

MAGIC = b"\x89VMF\r\n\x1a\n"
SYNC = b"VMFR"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0

STREAM_HEADER = struct.Struct("<8sHHI32s24sQ")
STREAM_HEADER_SIZE = STREAM_HEADER.size  # 80
RECORD_HEADER = struct.Struct("<4sBBHIIQQ")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 32
TRAILER = struct.Struct("<Q")
TRAILER_SIZE = 8

# The spec's hard ceiling; a reader may lower it (StreamLimits) but a record above it is malformed.
MAX_PAYLOAD = 64 << 20
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20

FLAG_SKIPPABLE = 0x01
KNOWN_FLAGS = FLAG_SKIPPABLE

_xxh3 = xxhash.xxh3_64_intdigest


def checksum(data: object, seed: int = 0) -> int:
    """xxh3-64 of any contiguous buffer; releases the GIL on large inputs."""
    return _xxh3(data, seed)  # type: ignore[arg-type]


def chain_digest(digest: int, trailer: int) -> int:
    """One step of the running digest carried by END: d' = xxh3(le_u64(trailer), seed=d)."""
    return _xxh3(TRAILER.pack(trailer), digest)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """What a decoder accepts; checked before anything is allocated."""

    max_payload: int = MAX_PAYLOAD

    def __post_init__(self) -> None:
        if not 0 < self.max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in 1..{MAX_PAYLOAD}, not {self.max_payload}")


def _fixed_text(text: str, size: int, what: str) -> bytes:
    raw = text.encode()
    if len(raw) > size or b"\0" in raw:
        raise ValueError(f"{what} {text!r} must be at most {size} UTF-8 bytes without NUL")
    return raw


def pack_stream_header(page_size: int, producer: str, machine_type: str,
                       major: int = FORMAT_MAJOR, minor: int = FORMAT_MINOR) -> bytes:
    body = STREAM_HEADER.pack(MAGIC, major, minor, page_size, _fixed_text(producer, 32, "producer"),
                              _fixed_text(machine_type, 24, "machine type"), 0)[:-8]
    return body + TRAILER.pack(checksum(body))


def _text(raw: bytes, what: str) -> str:
    raw = raw.rstrip(b"\0")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise StreamError(f"stream header {what} is not UTF-8", offset=0) from None


def unpack_stream_header(buf: object) -> tuple[int, int, int, str, str, int]:
    """-> (major, minor, page_size, producer, machine_type, check), or a StreamError saying why not."""
    magic, major, minor, page_size, producer, machine, check = STREAM_HEADER.unpack(buf)  # type: ignore[arg-type]
    if magic != MAGIC:
        raise StreamError(f"not a vmferry stream: bad magic {magic.hex(' ')} "
                          f"(expected {MAGIC.hex(' ')})", offset=0)
    if checksum(memoryview(buf)[:STREAM_HEADER_SIZE - 8]) != check:  # type: ignore[arg-type]
        raise StreamError("stream header checksum mismatch", offset=0)
    if major != FORMAT_MAJOR:
        newer = "newer than" if major > FORMAT_MAJOR else "not supported by"
        raise StreamError(f"stream format version {major}.{minor} is {newer} this reader "
                          f"({FORMAT_MAJOR}.{FORMAT_MINOR})", offset=8)
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise StreamError(f"page size {page_size} is not a power of two in "
                          f"{MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}", offset=12)
    return major, minor, page_size, _text(producer, "producer"), _text(machine, "machine type"), check


def pack_record_header(rtype: int, flags: int, section: int, length: int, count: int,
                       index: int) -> tuple[bytes, int]:
    """-> (32 header bytes, header check). The check seeds the payload's trailer checksum."""
    head = RECORD_HEADER.pack(SYNC, rtype, flags, section, length, count, index, 0)[:24]
    check = checksum(head)
    return head + TRAILER.pack(check), check
