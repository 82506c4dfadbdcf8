"""Record <-> (header fields, payload): how each record type lays out its payload.

Pure functions, no state: the order rules (which ids exist, which sections are open) live in
`rules.py`. Parsers raise StreamError without a location; the decoder adds offset and record index.
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

import numpy as np

from vmferry.errors import StreamError
from vmferry.stream.compression import Codec, decompress
from vmferry.stream.format import checksum
from vmferry.stream.records import (
    ADVISORY_COMMANDS,
    DELTA_ENTRY,
    DISK_SHARED,
    BlockCompressed,
    BlockData,
    BlockDevices,
    BlockZero,
    Buffer,
    Command,
    CommandCode,
    Config,
    Description,
    DeviceSection,
    DiskInfo,
    EndOfStream,
    PassStart,
    RamBlockInfo,
    RamBlocks,
    RamCompressed,
    RamDelta,
    RamPageList,
    RamPages,
    RamZero,
    Record,
    RecordType,
    SectionInfo,
    SectionPhase,
)

DESCRIPTION_FORMAT = "vmferry-description/1"
_LIST_HEAD = struct.Struct("<HH")
_LIST_ENTRY = struct.Struct("<HHIQQ")  # id, name_len, unit, base, size; then the name
_COMMAND_HEAD = struct.Struct("<HH")
_END = struct.Struct("<QQ")
# RAM_COMPRESSED: u8 codec, u8 layout (0 run, 1 list), u16 0, u32 raw length, u64 xxh3 of the raw bytes
COMPRESSED_HEAD = struct.Struct("<BBHIQ")
LAYOUT_RUN, LAYOUT_LIST = 0, 1
# RAM_DELTA: u8 encoding (1 xbzrle), u8 0, u16 0, u32 0; then count DELTA_ENTRY, then the encodings
DELTA_HEAD = struct.Struct("<BBHI")
DELTA_XBZRLE = 1
T = RecordType
_LE_U32 = np.dtype("<u4")


def page_list_index_size(count: int) -> int:
    """Bytes of a RAM_PAGE_LIST's index area: `count` u32 indexes, zero-padded to a multiple of 8
    so the page data after it stays 8-byte aligned within the payload."""
    return (4 * count + 7) & ~7


def page_list_index_bytes(pages: np.ndarray) -> bytes:
    """The index area for `pages` (any integer array): checked and padded. A copy (4 bytes a page),
    so the caller may reuse its index array while the record's buffers wait to be sent."""
    idx = np.asarray(pages)
    if idx.ndim != 1 or not idx.size:
        raise ValueError(f"RAM_PAGE_LIST needs a non-empty 1-d array of page indexes, got shape {idx.shape}")
    if idx.dtype.kind not in "ui":
        raise ValueError(f"RAM_PAGE_LIST page indexes must be integers, not {idx.dtype}")
    if idx.dtype != _LE_U32:
        if idx[0] < 0 or idx.max() > 0xFFFFFFFF:
            raise ValueError("RAM_PAGE_LIST page indexes must fit in u32")
        idx = idx.astype(_LE_U32)
    # Compare neighbours rather than np.diff: a uint32 diff of a decreasing pair wraps to a huge
    # positive number and would pass a `> 0` test.
    if not np.all(idx[1:] > idx[:-1]):
        raise ValueError("RAM_PAGE_LIST page indexes must be strictly increasing")
    raw = idx.tobytes()
    return raw + bytes(page_list_index_size(idx.size) - len(raw))


class Frame(NamedTuple):
    """The generic header fields of one record, before or after its payload."""

    rtype: int
    section: int = 0
    count: int = 0
    index: int = 0


def encode_payload(rec: Record, page_size: int) -> tuple[Frame, list[Buffer]]:
    """-> the record's header fields and its payload as parts to send back to back (page data is
    passed through, not copied; only RAM_PAGE_LIST has more than one part)."""
    if isinstance(rec, RamPageList):
        return page_list_payload(rec.block_id, rec.pages, rec.data, page_size)
    if isinstance(rec, RamCompressed):
        return compressed_payload(rec, page_size)
    if isinstance(rec, RamDelta):
        return delta_payload(rec)
    if isinstance(rec, BlockCompressed):
        return block_compressed_payload(rec)
    frame, payload = _encode_one(rec, page_size)
    return frame, [payload]


def page_list_payload(block_id: int, pages: np.ndarray, data: Buffer,
                      page_size: int) -> tuple[Frame, list[Buffer]]:
    """RAM_PAGE_LIST: [index area, the caller's page data itself]."""
    index = page_list_index_bytes(pages)
    view = data if isinstance(data, memoryview) else memoryview(data)
    count = len(pages)
    if view.nbytes != count * page_size:
        raise ValueError(f"RAM_PAGE_LIST data is {view.nbytes} bytes, expected {count} pages of "
                         f"{page_size} bytes ({count * page_size})")
    return Frame(T.RAM_PAGE_LIST, block_id, count, 0), [index, view]


def compressed_payload(rec: RamCompressed, page_size: int) -> tuple[Frame, list[Buffer]]:
    """RAM_COMPRESSED: [head (+ index area for a list), the compressed bytes (`rec.wire`)]."""
    if rec.codec not in (Codec.ZSTD, Codec.ZLIB, Codec.LZ4):
        raise ValueError(f"RAM_COMPRESSED needs a compressing codec, not {rec.codec}")
    raw_length = rec.page_count * page_size
    if rec.pages is None:
        head = COMPRESSED_HEAD.pack(rec.codec, LAYOUT_RUN, 0, raw_length, rec.raw_check)
        return Frame(T.RAM_COMPRESSED, rec.block_id, rec.page_count, rec.first_page), [head, rec.wire]
    if len(rec.pages) != rec.page_count:
        raise ValueError(f"RAM_COMPRESSED lists {len(rec.pages)} pages but counts {rec.page_count}")
    head = COMPRESSED_HEAD.pack(rec.codec, LAYOUT_LIST, 0, raw_length, rec.raw_check)
    return (Frame(T.RAM_COMPRESSED, rec.block_id, rec.page_count, 0),
            [head + page_list_index_bytes(rec.pages), rec.wire])


def block_compressed_payload(rec: BlockCompressed) -> tuple[Frame, list[Buffer]]:
    """BLOCK_COMPRESSED: [head, the compressed bytes (`rec.wire`)]; the head is RAM_COMPRESSED's
    with layout 0 (a run) and raw length = the raw bytes `rec.data` (the reader checks it is
    `count` sectors of the disk's listed sector size)."""
    if rec.codec not in (Codec.ZSTD, Codec.ZLIB, Codec.LZ4):
        raise ValueError(f"BLOCK_COMPRESSED needs a compressing codec, not {rec.codec}")
    raw_length = memoryview(rec.data).nbytes
    if not rec.sector_count or raw_length % rec.sector_count:
        raise ValueError(f"BLOCK_COMPRESSED of {rec.sector_count} sectors has {raw_length} raw bytes")
    head = COMPRESSED_HEAD.pack(rec.codec, LAYOUT_RUN, 0, raw_length, rec.raw_check)
    return Frame(T.BLOCK_COMPRESSED, rec.disk_id, rec.sector_count, rec.first_sector), [head, rec.wire]


def delta_payload(rec: RamDelta) -> tuple[Frame, list[Buffer]]:
    """RAM_DELTA: [head + entries, the encodings (`rec.data`, not copied)]."""
    entries = np.asarray(rec.entries)
    if entries.dtype != DELTA_ENTRY or entries.ndim != 1 or not entries.size:
        raise ValueError("RAM_DELTA needs a non-empty 1-d DELTA_ENTRY array")
    pages = entries["page"]
    if not np.all(pages[1:] > pages[:-1]):
        raise ValueError("RAM_DELTA page indexes must be strictly increasing")
    lengths = entries["length"]
    if int(lengths.min()) < 2 or int(lengths.sum(dtype=np.int64)) != memoryview(rec.data).nbytes:
        raise ValueError("RAM_DELTA encodings must be at least 2 bytes each and fill `data` exactly")
    head = DELTA_HEAD.pack(rec.encoding, 0, 0, 0) + entries.tobytes()
    return Frame(T.RAM_DELTA, rec.block_id, entries.size, 0), [head, rec.data]


def delta_table_size(count: int) -> int:
    """RAM_DELTA's head and entries: what its payload holds before the encodings."""
    return DELTA_HEAD.size + count * DELTA_ENTRY.itemsize


def _encode_one(rec: Record, page_size: int) -> tuple[Frame, Buffer]:
    match rec:
        case RamPages(block_id, first_page, page_count, data):
            return Frame(T.RAM_PAGES, block_id, page_count, first_page), data
        case RamZero(block_id, first_page, page_count):
            return Frame(T.RAM_ZERO, block_id, page_count, first_page), b""
        case DeviceSection(section_id, phase, data):
            return Frame(int(phase), section_id), data
        case BlockData(disk_id, first_sector, sector_count, data):
            return Frame(T.BLOCK_DATA, disk_id, sector_count, first_sector), data
        case BlockZero(disk_id, first_sector, sector_count):
            return Frame(T.BLOCK_ZERO, disk_id, sector_count, first_sector), b""
        case Command(code, block_id, index, count, data):
            return Frame(T.COMMAND, block_id, count, index), _COMMAND_HEAD.pack(code, 0) + data
        case PassStart(pass_number):
            return Frame(T.PASS, 0, 0, pass_number), b""
        case EndOfStream(record_count, digest):
            return Frame(T.END), _END.pack(record_count, digest)
        case Config(settings):
            return Frame(T.CONFIG), json.dumps(settings, separators=(",", ":")).encode()
        case Description():
            return Frame(T.DESCRIPTION), rec.to_json()
        case RamBlocks(blocks):
            return Frame(T.RAM_BLOCKS), _pack_list([(b.id, b.name, page_size, b.gpa, b.size) for b in blocks])
        case BlockDevices(devices):
            return Frame(T.BLOCK_DEVICES), _pack_list([(d.id, d.name, d.sector_size,
                                                        DISK_SHARED if d.shared else 0, d.size)
                                                       for d in devices])
    raise TypeError(f"cannot encode {type(rec).__name__}")


def _pack_list(entries: list[tuple[int, str, int, int, int]]) -> bytes:
    out = [_LIST_HEAD.pack(len(entries), 0)]
    for ident, name, unit, base, size in entries:
        raw = name.encode()
        out += [_LIST_ENTRY.pack(ident, len(raw), unit, base, size), raw]
    return b"".join(out)


def parse_payload(frame: Frame, payload: Buffer, page_size: int, sector_size: int = 512) -> Record:
    """The record for a checked frame and payload; StreamError if the payload is malformed.
    `sector_size`: the listed sector size of the disk a BLOCK_* record is about."""
    rtype, section, count, index = frame
    if rtype == T.RAM_PAGES:
        return RamPages(section, index, count, payload)
    if rtype == T.RAM_ZERO:
        return RamZero(section, index, count)
    if rtype == T.RAM_PAGE_LIST:
        return _parse_page_list(section, count, payload)
    if rtype == T.RAM_COMPRESSED:
        return _parse_compressed(frame, payload, page_size)
    if rtype == T.RAM_DELTA:
        return _parse_delta(frame, payload, page_size)
    if T.SECTION_FULL <= rtype <= T.SECTION_END:
        return DeviceSection(section, SectionPhase(rtype), bytes(payload))
    if rtype == T.BLOCK_DATA:
        return BlockData(section, index, count, payload)
    if rtype == T.BLOCK_ZERO:
        return BlockZero(section, index, count)
    if rtype == T.BLOCK_COMPRESSED:
        return parse_block_compressed(frame, payload, sector_size)
    if rtype == T.PASS:
        return PassStart(index)
    if rtype == T.COMMAND:
        return _parse_command(frame, bytes(payload))
    if rtype == T.END:
        if len(payload) != _END.size:
            raise StreamError(f"END payload is {len(payload)} bytes, expected {_END.size}")
        return EndOfStream(*_END.unpack(payload))
    if rtype == T.CONFIG:
        settings = _json(payload, "CONFIG")
        if not isinstance(settings, dict):
            raise StreamError("CONFIG payload is not a JSON object")
        return Config(settings)
    if rtype == T.DESCRIPTION:
        return _parse_description(_json(payload, "DESCRIPTION"))
    if rtype == T.RAM_BLOCKS:
        blocks = []
        for ident, name, unit, base, size in _parse_list(bytes(payload), "RAM_BLOCKS"):
            if unit != page_size:
                raise StreamError(f"RAM block '{name}' has unit {unit}, not the stream page size {page_size}")
            blocks.append(RamBlockInfo(ident, name, base, size))
        return RamBlocks(tuple(blocks))
    if rtype == T.BLOCK_DEVICES:
        disks = []
        for ident, name, unit, base, size in _parse_list(bytes(payload), "BLOCK_DEVICES"):
            if unit not in (512, 4096) or base & ~DISK_SHARED:
                raise StreamError(f"disk '{name}' has sector size {unit} and flags {base} "
                                  f"(need 512|4096, flags 0 or {DISK_SHARED})")
            disks.append(DiskInfo(ident, name, size, unit, shared=bool(base & DISK_SHARED)))
        return BlockDevices(tuple(disks))
    raise AssertionError(f"parse_payload called for type {rtype}")  # rules.check_header let it through


def _parse_page_list(block_id: int, count: int, payload: Buffer) -> RamPageList:
    """Layout checks only (the header check already fixed the length; rules.py checks the indexes
    against the block). `pages` is copied: 4 bytes a page, and it then outlives the input."""
    view = memoryview(payload)
    index_size = page_list_index_size(count)
    pages = _parse_page_indexes(count, view[:index_size], "RAM_PAGE_LIST")
    return RamPageList(block_id, pages, view[index_size:])


def _parse_page_indexes(count: int, area: memoryview, what: str = "RAM_COMPRESSED") -> np.ndarray:
    """A page-list index area (u32 indexes, zero padding): checked, copied to native uint32."""
    pages = np.frombuffer(area, dtype=_LE_U32, count=count).astype(np.uint32)
    if any(area[4 * count:]):
        raise StreamError(f"{what} padding after the page indexes is not zero")
    if count > 1 and not np.all(pages[1:] > pages[:-1]):  # not np.diff: uint32 differences wrap
        i = int(np.flatnonzero(pages[1:] <= pages[:-1])[0])
        raise StreamError(f"{what} page indexes are not strictly increasing: entry {i + 1} is "
                          f"page {pages[i + 1]} after page {pages[i]}")
    return pages


def _parse_compressed(frame: Frame, payload: Buffer, page_size: int) -> RamCompressed:
    """Head checks, then decompression, then the raw bytes against the record's raw checksum: a
    page is handed on only as it was when the source read it."""
    _, section, count, index = frame
    view = memoryview(payload)
    if view.nbytes < COMPRESSED_HEAD.size:
        raise StreamError(f"RAM_COMPRESSED payload is {view.nbytes} bytes, shorter than its "
                          f"{COMPRESSED_HEAD.size}-byte head")
    codec, layout, zero, raw_length, raw_check = COMPRESSED_HEAD.unpack_from(view)
    if zero:
        raise StreamError("RAM_COMPRESSED reserved field is not 0")
    if codec not in (Codec.ZSTD, Codec.ZLIB, Codec.LZ4):
        raise StreamError(f"RAM_COMPRESSED has unknown codec {codec}")
    if raw_length != count * page_size:
        raise StreamError(f"RAM_COMPRESSED raw length {raw_length}, expected {count} pages of "
                          f"{page_size} bytes")
    pos = COMPRESSED_HEAD.size
    pages: np.ndarray | None = None
    if layout == LAYOUT_LIST:
        if index:
            raise StreamError(f"RAM_COMPRESSED page list has index {index}, must be 0")
        end = pos + page_list_index_size(count)
        if view.nbytes < end:
            raise StreamError("RAM_COMPRESSED page list runs past the payload")
        pages = _parse_page_indexes(count, view[pos:end])
        pos = end
    elif layout != LAYOUT_RUN:
        raise StreamError(f"RAM_COMPRESSED has unknown layout {layout}")
    raw = decompress(codec, view[pos:], raw_length)
    if checksum(raw) != raw_check:
        raise StreamError(f"RAM_COMPRESSED pages do not match their checksum after "
                          f"{Codec(codec).name.lower()} decompression")
    return RamCompressed(section, index, count, codec, raw_check, raw, pages, view[pos:])


def parse_block_compressed(frame: Frame, payload: Buffer, sector_size: int) -> BlockCompressed:
    """Head checks, decompression, then the raw bytes against the record's raw checksum: a block
    is written only as it was when the source read it."""
    _, section, count, index = frame
    view = memoryview(payload)
    what = "BLOCK_COMPRESSED"
    codec, layout, zero, raw_length, raw_check = COMPRESSED_HEAD.unpack_from(view)
    if zero:
        raise StreamError(f"{what} reserved field is not 0")
    if layout != LAYOUT_RUN:
        raise StreamError(f"{what} has layout {layout}; only 0 (a run of sectors) is defined")
    if codec not in (Codec.ZSTD, Codec.ZLIB, Codec.LZ4):
        raise StreamError(f"{what} has unknown codec {codec}")
    if raw_length != count * sector_size:
        raise StreamError(f"{what} raw length {raw_length}, expected {count} sectors of {sector_size} bytes")
    wire = view[COMPRESSED_HEAD.size:]
    raw = decompress(codec, wire, raw_length, what)
    if checksum(raw) != raw_check:
        raise StreamError(f"{what} sectors do not match their checksum after "
                          f"{Codec(codec).name.lower()} decompression")
    return BlockCompressed(section, index, count, codec, raw_check, raw, wire)


def _parse_delta(frame: Frame, payload: Buffer, page_size: int) -> RamDelta:
    """Head and entry checks (rules.py checked the length against the count and checks the
    indexes against the block); the encodings themselves are checked as they are applied."""
    _, section, count, _ = frame
    view = memoryview(payload)
    encoding, zero1, zero2, zero3 = DELTA_HEAD.unpack_from(view)
    if encoding != DELTA_XBZRLE:
        raise StreamError(f"RAM_DELTA has unknown encoding {encoding}")
    if zero1 or zero2 or zero3:
        raise StreamError("RAM_DELTA reserved field is not 0")
    table = delta_table_size(count)
    entries = np.frombuffer(view[DELTA_HEAD.size:table], dtype=DELTA_ENTRY).copy()
    pages = entries["page"]
    if count > 1 and not np.all(pages[1:] > pages[:-1]):
        i = int(np.flatnonzero(pages[1:] <= pages[:-1])[0])
        raise StreamError(f"RAM_DELTA page indexes are not strictly increasing: entry {i + 1} is "
                          f"page {pages[i + 1]} after page {pages[i]}")
    if entries["zero"].any():
        raise StreamError("RAM_DELTA entry reserved field is not 0")
    lengths = entries["length"]
    if int(lengths.min()) < 2 or int(lengths.max()) > page_size:
        raise StreamError(f"RAM_DELTA encoding length outside 2..{page_size} bytes")
    if int(lengths.sum(dtype=np.int64)) != view.nbytes - table:
        raise StreamError(f"RAM_DELTA encodings add up to {int(lengths.sum(dtype=np.int64))} bytes, "
                          f"but {view.nbytes - table} follow the entries")
    return RamDelta(section, entries, view[table:], encoding)


def _parse_command(frame: Frame, payload: bytes) -> Command:
    if len(payload) < _COMMAND_HEAD.size:
        raise StreamError(f"COMMAND payload is {len(payload)} bytes, shorter than its 4-byte head")
    code, zero = _COMMAND_HEAD.unpack_from(payload)
    if zero:
        raise StreamError("COMMAND reserved field is not 0")
    if code < ADVISORY_COMMANDS:
        try:
            code = CommandCode(code)
        except ValueError:
            raise StreamError(f"unknown command {code}") from None
        if code == CommandCode.INVALID:
            raise StreamError("command 0 is invalid")
    return Command(code, frame.section, frame.index, frame.count, payload[_COMMAND_HEAD.size:])


def _json(payload: Buffer, what: str) -> Any:
    try:
        return json.loads(bytes(payload).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StreamError(f"{what} payload is not valid JSON: {str(e).splitlines()[0][:80]}") from None


def _parse_description(doc: Any) -> Description:
    if not isinstance(doc, dict) or doc.get("format") != DESCRIPTION_FORMAT:
        raise StreamError(f"DESCRIPTION is not a {DESCRIPTION_FORMAT!r} JSON object")
    sections = doc.get("sections")
    if not isinstance(sections, list):
        raise StreamError("DESCRIPTION has no 'sections' list")
    out: list[SectionInfo] = []
    for n, s in enumerate(sections):
        ok = (isinstance(s, dict) and _is_int(s.get("id")) and 1 <= s["id"] <= 0xFFFF
              and isinstance(s.get("name"), str) and s["name"]
              and _is_int(s.get("instance")) and _is_int(s.get("version"))
              and isinstance(s.get("fields"), list) and isinstance(s.get("subsections"), list))
        if not ok:
            raise StreamError(f"DESCRIPTION section entry {n} needs id (1..65535), name, instance, "
                              "version, fields and subsections")
        if any(i.id == s["id"] for i in out):
            raise StreamError(f"DESCRIPTION defines section id {s['id']} twice")
        out.append(SectionInfo(s["id"], s["name"], s["instance"], s["version"], s))
    return Description(tuple(out))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_list(payload: bytes, what: str) -> list[tuple[int, str, int, int, int]]:
    if len(payload) < _LIST_HEAD.size:
        raise StreamError(f"{what} payload is {len(payload)} bytes, shorter than its 4-byte head")
    n, zero = _LIST_HEAD.unpack_from(payload)
    if zero:
        raise StreamError(f"{what} reserved field is not 0")
    pos, out, seen = _LIST_HEAD.size, [], set()
    for i in range(n):
        if pos + _LIST_ENTRY.size > len(payload):
            raise StreamError(f"{what} entry {i} of {n} runs past the payload")
        ident, name_len, unit, base, size = _LIST_ENTRY.unpack_from(payload, pos)
        pos += _LIST_ENTRY.size
        raw = payload[pos:pos + name_len]
        pos += name_len
        if len(raw) != name_len:
            raise StreamError(f"{what} entry {i} of {n}: name runs past the payload")
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            raise StreamError(f"{what} entry {i}: name is not UTF-8") from None
        if ident == 0 or ident in seen:
            raise StreamError(f"{what} entry {i} ('{name}') has id {ident}: ids are 1..65535 and unique")
        if unit == 0 or size % unit:
            raise StreamError(f"{what} entry '{name}': size {size} is not a multiple of its unit {unit}")
        seen.add(ident)
        out.append((ident, name, unit, base, size))
    if pos != len(payload):
        raise StreamError(f"{what} has {len(payload) - pos} bytes after its {n} entries")
    return out
