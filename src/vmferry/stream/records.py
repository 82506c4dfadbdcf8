"""What a stream holds: the record types, the command enum, and one dataclass per record.

Records are plain values: the encoder turns them into bytes, the decoder yields them. Page and
sector payloads are any contiguous buffer (bytes or memoryview) so neither side has to copy them.
Numbers and layouts: docs/stream-format.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

Buffer = bytes | bytearray | memoryview


class RecordType(IntEnum):
    INVALID = 0
    CONFIG = 1
    DESCRIPTION = 2
    RAM_BLOCKS = 3
    BLOCK_DEVICES = 4
    SECTION_FULL = 16
    SECTION_START = 17
    SECTION_PART = 18
    SECTION_END = 19
    RAM_PAGES = 32
    RAM_ZERO = 33
    RAM_COMPRESSED = 34
    RAM_DELTA = 35  # defined from vmferry 0.2 on (XBZRLE)
    RAM_PAGE_LIST = 36
    BLOCK_DATA = 48
    BLOCK_ZERO = 49
    BLOCK_COMPRESSED = 50  # defined from vmferry 0.2 on (x-block-compression)
    COMMAND = 64
    PASS = 80
    END = 255


# Defined so later minors can use them; a 1.0 reader refuses them by name. None left: BLOCK_COMPRESSED
# was the last (a reader from before it refuses it as "reserved in format 1.0").
RESERVED_TYPES: frozenset[RecordType] = frozenset()


class SectionPhase(IntEnum):
    """A device section record's phase; the value is its record type."""

    FULL = RecordType.SECTION_FULL
    START = RecordType.SECTION_START
    PART = RecordType.SECTION_PART
    END = RecordType.SECTION_END


class CommandCode(IntEnum):
    """Return path and postcopy commands. 10..0x7FFF reserved; 0x8000.. advisory (ignorable)."""

    INVALID = 0
    ACK = 1
    PING = 2
    PAGE_REQUEST = 3
    RESUME = 4
    SHUT = 5
    POSTCOPY_ADVISE = 6
    POSTCOPY_LISTEN = 7
    POSTCOPY_RUN = 8
    RECEIVED_BITMAP = 9
    CHANNEL = 10  # first record of a multifd data channel: which migration, which channel (JSON)
    CHANNEL_LOST = 11  # main stream: data channel `index` is gone; its pages were sent again
    POSTCOPY_DISCARD = 12  # src -> dst: section = block, data = bitmap of the pages still to come
    POSTCOPY_RESUMED = 13  # src -> dst, first command of a recovered stream: continue postcopy
    POPULATED_HINT = 0x8001  # advisory: the pages pass 1 will send, so a destination can prefault
    PROGRESS = 0x8002  # advisory, return path: stream bytes the destination has applied
    DEVICE_PROPERTIES = 0x8003  # advisory: the source's device properties (machine type vmferry-0.2 on)
    HEARTBEAT = 0x8004  # advisory, either direction: the sender is alive (migration/heartbeat.py)


ADVISORY_COMMANDS = 0x8000


@dataclass(frozen=True, slots=True)
class StreamHeader:
    page_size: int
    producer: str
    machine_type: str
    major: int = 1
    minor: int = 0


@dataclass(frozen=True, slots=True)
class Config:
    settings: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SectionInfo:
    """One entry of a DESCRIPTION: a device section's id, identity and field schema."""

    id: int
    name: str
    instance: int
    version: int
    schema: Mapping[str, Any]  # the whole JSON entry: fields, subsections, any extra keys


@dataclass(frozen=True, slots=True)
class Description:
    sections: tuple[SectionInfo, ...]

    @classmethod
    def from_schemas(cls, schemas: list[Mapping[str, Any]]) -> Description:
        """From JSON section entries (each with id, name, instance, version, fields, subsections)."""
        return cls(tuple(SectionInfo(s["id"], s["name"], s.get("instance", 0), s.get("version", 0),
                                     _with_defaults(s))
                         for s in schemas))

    def to_json(self) -> bytes:
        doc = {"format": "vmferry-description/1", "sections": [dict(s.schema) for s in self.sections]}
        return json.dumps(doc, separators=(",", ":")).encode()


def _with_defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(schema)
    for key, default in (("instance", 0), ("version", 0), ("fields", []), ("subsections", [])):
        out.setdefault(key, default)
    return out


@dataclass(frozen=True, slots=True)
class RamBlockInfo:
    id: int
    name: str
    gpa: int
    size: int  # bytes, a multiple of the stream's page size


@dataclass(frozen=True, slots=True)
class RamBlocks:
    blocks: tuple[RamBlockInfo, ...]


# BLOCK_DEVICES flags (the entry's `base` field): the disk's contents stay in its image (shared
# storage, or a snapshot's image left in place); no BLOCK_DATA/BLOCK_ZERO of it may follow.
DISK_SHARED = 1


@dataclass(frozen=True, slots=True)
class DiskInfo:
    id: int
    name: str
    size: int  # bytes
    sector_size: int = 512
    shared: bool = False


@dataclass(frozen=True, slots=True)
class BlockDevices:
    devices: tuple[DiskInfo, ...]


@dataclass(frozen=True, slots=True)
class DeviceSection:
    section_id: int
    phase: SectionPhase
    data: bytes


@dataclass(frozen=True, slots=True)
class RamPages:
    block_id: int
    first_page: int
    page_count: int
    data: Buffer  # page_count * page_size bytes; a memoryview of the input where possible
    placed: bool = False  # True: data is the caller's own target, already written in place


# eq=False: the generated __eq__ would compare `pages` with `==`, whose array result has no truth
# value; ours compares contents so decoded records can be checked against what went in.
@dataclass(frozen=True, slots=True, eq=False)
class RamPageList:
    """Many non-contiguous pages of one RAM block in one record (sparse dirty sets).

    `pages`: strictly increasing uint32 page indexes inside the block. Decoded records hold a
    private copy (native uint32, aligned, 4 bytes a page), so it outlives the input buffer.
    `data`: len(pages) * page_size bytes, page i of it belongs at page `pages[i]`. Decoded records
    hold a memoryview of the fed chunk (valid while the caller does not overwrite that object) or
    of the decoder's assembly buffer (owned by the record from then on); never copied.
    """

    block_id: int
    pages: np.ndarray
    data: Buffer

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RamPageList):
            return NotImplemented
        return (self.block_id == other.block_id and np.array_equal(self.pages, other.pages)
                and memoryview(self.data).cast("B") == memoryview(other.data).cast("B"))

    __hash__ = None  # type: ignore[assignment]  # holds an array and a buffer: not hashable

    def scatter_into(self, block: Buffer, page_size: int) -> None:
        """Copy each page to its place in `block` (the whole RAM block's writable memory): one
        vectorised copy, no per-page Python."""
        dest = np.frombuffer(block, dtype=np.uint8).reshape(-1, page_size)
        dest[self.pages] = np.frombuffer(self.data, dtype=np.uint8).reshape(len(self.pages), page_size)


@dataclass(frozen=True, slots=True, eq=False)
class RamCompressed:
    """Compressed RAM pages: a run (`pages` None, from `first_page`) or a list (`pages`, strictly
    increasing uint32 indexes, as RAM_PAGE_LIST). `data` is the raw page bytes (decoded records:
    already decompressed and checked against `raw_check`, xxh3-64 of the raw bytes); `codec` is a
    compression.Codec; `wire` the compressed bytes (decoded records: a view of the input, valid
    as long as RamPages.data would be)."""

    block_id: int
    first_page: int
    page_count: int
    codec: int
    raw_check: int
    data: Buffer
    pages: np.ndarray | None = None
    wire: Buffer = b""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RamCompressed):
            return NotImplemented
        same_pages = (self.pages is None and other.pages is None) or (
            self.pages is not None and other.pages is not None and np.array_equal(self.pages, other.pages))
        return (same_pages and (self.block_id, self.first_page, self.page_count, self.codec, self.raw_check)
                == (other.block_id, other.first_page, other.page_count, other.codec, other.raw_check)
                and bytes(self.data) == bytes(other.data))

    __hash__ = None  # type: ignore[assignment]


# RAM_DELTA's per-page entry: page index, base generation, encoding length, reserved 0, xxh3-64
# of the page once the delta is applied (docs/stream-format.md).
DELTA_ENTRY = np.dtype([("page", "<u4"), ("base", "<u4"), ("length", "<u4"), ("zero", "<u4"),
                        ("check", "<u8")])


@dataclass(frozen=True, slots=True, eq=False)
class RamDelta:
    """Pages of one RAM block as deltas against the copies sent before (XBZRLE). `entries`: a
    DELTA_ENTRY array, pages strictly increasing; `data`: the encodings back to back, entry i's at
    `offsets()[i]`. Decoded records hold a private copy of the entries and a view of the input
    for `data` (valid as long as RamPages.data would be). Applying needs the destination's pages:
    migration/xbzrle.py."""

    block_id: int
    entries: np.ndarray
    data: Buffer
    encoding: int = 1

    @property
    def pages(self) -> np.ndarray:
        return self.entries["page"]

    def offsets(self) -> np.ndarray:
        """Where each page's encoding starts in `data`, plus the end."""
        lengths = self.entries["length"].astype(np.int64)
        return np.concatenate(([0], np.cumsum(lengths)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RamDelta):
            return NotImplemented
        return (self.block_id == other.block_id and self.encoding == other.encoding
                and np.array_equal(self.entries, other.entries) and bytes(self.data) == bytes(other.data))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class RamZero:
    block_id: int
    first_page: int
    page_count: int


@dataclass(frozen=True, slots=True)
class BlockData:
    disk_id: int
    first_sector: int
    sector_count: int
    data: Buffer


@dataclass(frozen=True, slots=True)
class BlockZero:
    disk_id: int
    first_sector: int
    sector_count: int


@dataclass(frozen=True, slots=True, eq=False)
class BlockCompressed:
    """Compressed sectors of one disk, a run from `first_sector`, as RAM_COMPRESSED's run layout.
    `data` is the raw sector bytes (decoded records: already decompressed and checked against
    `raw_check`, xxh3-64 of the raw bytes); `codec` a compression.Codec; `wire` the compressed
    bytes (decoded records: a view of the input)."""

    disk_id: int
    first_sector: int
    sector_count: int
    codec: int
    raw_check: int
    data: Buffer
    wire: Buffer = b""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockCompressed):
            return NotImplemented
        return ((self.disk_id, self.first_sector, self.sector_count, self.codec, self.raw_check)
                == (other.disk_id, other.first_sector, other.sector_count, other.codec, other.raw_check)
                and bytes(self.data) == bytes(other.data))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Command:
    code: int  # a CommandCode, or an unknown advisory code (>= 0x8000)
    block_id: int = 0
    index: int = 0
    count: int = 0
    data: bytes = b""  # SHUT: UTF-8 reason; RECEIVED_BITMAP: the bitmap

    @property
    def message(self) -> str:
        return self.data.decode(errors="replace")


@dataclass(frozen=True, slots=True)
class PassStart:
    pass_number: int  # 1, 2, ... strictly increasing


@dataclass(frozen=True, slots=True)
class EndOfStream:
    record_count: int = 0  # filled in by the encoder
    digest: int = 0


@dataclass(frozen=True, slots=True)
class Skipped:
    """A record of a type this reader does not know, flagged SKIPPABLE: checked, then passed over."""

    type_code: int
    length: int


Record = (Config | Description | RamBlocks | BlockDevices | DeviceSection | RamPages | RamPageList
          | RamCompressed | RamDelta | RamZero
          | BlockData | BlockZero | BlockCompressed | Command | PassStart | EndOfStream | Skipped)


_TYPE_OF: dict[type, RecordType] = {
    Config: RecordType.CONFIG, Description: RecordType.DESCRIPTION, RamBlocks: RecordType.RAM_BLOCKS,
    BlockDevices: RecordType.BLOCK_DEVICES, RamPages: RecordType.RAM_PAGES,
    RamPageList: RecordType.RAM_PAGE_LIST, RamCompressed: RecordType.RAM_COMPRESSED,
    RamDelta: RecordType.RAM_DELTA,
    RamZero: RecordType.RAM_ZERO, BlockData: RecordType.BLOCK_DATA,
    BlockZero: RecordType.BLOCK_ZERO, BlockCompressed: RecordType.BLOCK_COMPRESSED,
    Command: RecordType.COMMAND, PassStart: RecordType.PASS,
    EndOfStream: RecordType.END,
}


def record_type_name(rec: object) -> str:
    """The spec's name of a record's type (RAM_PAGES, SECTION_FULL, COMMAND POPULATED_HINT...),
    for messages that must say which record was refused."""
    if isinstance(rec, DeviceSection):
        return rec.phase.name.join(("SECTION_", ""))
    if isinstance(rec, Command):
        try:
            return f"COMMAND {CommandCode(int(rec.code)).name}"
        except ValueError:
            return f"COMMAND 0x{int(rec.code):04x}"
    if isinstance(rec, Skipped):
        return f"type {rec.type_code}"
    rtype = _TYPE_OF.get(type(rec))
    return rtype.name if rtype is not None else type(rec).__name__
