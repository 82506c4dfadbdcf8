"""What a stream holds, gathered record by record: the model behind `vmferry analyze`.

Pure bookkeeping over decoded records (no I/O), so it works on a stream of any size: page data is
counted, never kept. Definitions: "pages sent" = pages carried in RAM_PAGES, RAM_PAGE_LIST,
RAM_COMPRESSED and RAM_DELTA records (a delta counts as its page); "zero pages" = pages covered by
RAM_ZERO runs; "bytes" = bytes on the wire for that block's records (headers, payloads including
a page list's index area, and trailers); "passes" =
the passes (PASS markers; pass 0 = before the first marker) in which the block appeared.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vmferry.errors import StreamError
from vmferry.stream.compression import Codec
from vmferry.stream.format import RECORD_HEADER_SIZE, TRAILER_SIZE
from vmferry.stream.payloads import COMPRESSED_HEAD, delta_table_size, page_list_index_size
from vmferry.stream.records import (
    BlockCompressed,
    BlockData,
    BlockDevices,
    BlockZero,
    Command,
    CommandCode,
    Config,
    Description,
    DeviceSection,
    EndOfStream,
    PassStart,
    RamBlocks,
    RamCompressed,
    RamDelta,
    RamPageList,
    RamPages,
    RamZero,
    Record,
    SectionPhase,
    Skipped,
    StreamHeader,
)
from vmferry.stream.sections import decode_section

_FRAMING = RECORD_HEADER_SIZE + TRAILER_SIZE
HEX_PREVIEW = 64


@dataclass
class RunStats:
    """Per RAM block or disk."""

    name: str
    base: int
    size: int
    unit: int
    sent: int = 0  # units carried with data
    zero: int = 0  # units covered by zero runs
    records: int = 0
    nbytes: int = 0
    passes: set[int] = field(default_factory=set)
    # records by type name (RAM_PAGES, RAM_PAGE_LIST, ...): shows how a sender split its pages
    types: Counter[str] = field(default_factory=Counter)
    shared: bool = False  # a disk whose contents stay in its image (BLOCK_DEVICES flag)
    # BLOCK_COMPRESSED: raw bytes it carried, and its compressed bytes (the ratio analyze shows)
    raw_compressed: int = 0
    wire_compressed: int = 0

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "base": self.base, "size": self.size, "unit": self.unit,
               "sent": self.sent, "zero": self.zero, "records": self.records,
               "record_types": dict(self.types), "bytes": self.nbytes, "passes": sorted(self.passes)}
        if self.shared:
            out["shared"] = True
        if self.raw_compressed:
            out["compressed"] = {"raw_bytes": self.raw_compressed, "wire_bytes": self.wire_compressed}
        return out


@dataclass
class PassStats:
    number: int
    pages: int = 0
    zero_pages: int = 0
    nbytes: int = 0


@dataclass
class StreamSummary:
    strict: bool = False  # --verify: a section payload that does not match its description is an error
    header: StreamHeader | None = None
    config: dict[str, Any] | None = None
    sections: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> description entry
    devices: list[dict[str, Any]] = field(default_factory=list)  # one per device section record
    ram: dict[int, RunStats] = field(default_factory=dict)
    disks: dict[int, RunStats] = field(default_factory=dict)
    passes: list[PassStats] = field(default_factory=lambda: [PassStats(0)])
    commands: Counter[str] = field(default_factory=Counter)
    skipped: Counter[int] = field(default_factory=Counter)
    records: int = 0
    end: EndOfStream | None = None

    def add(self, rec: Record | StreamHeader) -> None:
        """Fold in the next record, in stream order (the StreamHeader first)."""
        if isinstance(rec, StreamHeader):
            self.header = rec
            return
        record_index = self.records
        self.records += 1
        current = self.passes[-1]
        match rec:
            case RamPages(block_id, _, count, data):
                self._run(self.ram[block_id], "RAM_PAGES", count, 0, len(data), current)
            case RamPageList(block_id, pages, data):
                n = len(pages)
                self._run(self.ram[block_id], "RAM_PAGE_LIST", n, 0, page_list_index_size(n) + len(data),
                          current)
            case RamCompressed(block_id, _, count, codec, pages=pages, wire=wire):
                index_area = 0 if pages is None else page_list_index_size(count)
                self._run(self.ram[block_id], f"RAM_COMPRESSED {Codec(codec).name.lower()}", count, 0,
                          COMPRESSED_HEAD.size + index_area + len(wire), current)
            case RamDelta(block_id, entries, data):
                n = len(entries)
                self._run(self.ram[block_id], "RAM_DELTA xbzrle", n, 0, delta_table_size(n) + len(data),
                          current)
            case RamZero(block_id, _, count):
                self._run(self.ram[block_id], "RAM_ZERO", 0, count, 0, current)
            case BlockData(disk_id, _, count, data):
                self._run(self.disks[disk_id], "BLOCK_DATA", count, 0, len(data), current, pages=False)
            case BlockZero(disk_id, _, count):
                self._run(self.disks[disk_id], "BLOCK_ZERO", 0, count, 0, current, pages=False)
            case BlockCompressed(disk_id, _, count, codec, wire=wire):
                stats = self.disks[disk_id]
                self._run(stats, f"BLOCK_COMPRESSED {Codec(codec).name.lower()}", count, 0,
                          COMPRESSED_HEAD.size + len(wire), current, pages=False)
                stats.raw_compressed += count * stats.unit
                stats.wire_compressed += len(wire)
            case DeviceSection():
                self._device(rec, record_index)
            case PassStart(number):
                self.passes.append(PassStats(number))
            case Command(code):
                known = code in CommandCode._value2member_map_
                self.commands[CommandCode(code).name if known else f"advisory-{code:#x}"] += 1
            case Description(sections):
                self.sections.update({s.id: dict(s.schema) for s in sections})
            case RamBlocks(blocks):
                self.ram.update({b.id: RunStats(b.name, b.gpa, b.size, self.header.page_size)  # type: ignore[union-attr]
                                 for b in blocks})
            case BlockDevices(devices):
                self.disks.update({d.id: RunStats(d.name, 0, d.size, d.sector_size, shared=d.shared)
                                   for d in devices})
            case Config(settings):
                self.config = dict(settings)
            case EndOfStream():
                self.end = rec
                self.records -= 1  # END is not counted among the records it counts
            case Skipped(type_code):
                self.skipped[type_code] += 1

    def _run(self, stats: RunStats, rtype: str, sent: int, zero: int, payload: int, current: PassStats,
             pages: bool = True) -> None:
        stats.sent += sent
        stats.zero += zero
        stats.records += 1
        stats.types[rtype] += 1
        stats.nbytes += payload + _FRAMING
        stats.passes.add(current.number)
        if pages:  # a pass's page counts are RAM pages only; disks count sectors
            current.pages += sent
            current.zero_pages += zero
            current.nbytes += payload + _FRAMING

    def _device(self, rec: DeviceSection, record_index: int) -> None:
        schema = self.sections[rec.section_id]
        entry: dict[str, Any] = {"record": record_index, "id": rec.section_id, "name": schema["name"],
                                 "instance": schema["instance"], "version": schema["version"],
                                 "phase": rec.phase.name, "bytes": len(rec.data)}
        if rec.phase == SectionPhase.FULL:
            try:
                entry["state"] = decode_section(schema, rec.data).to_json()
            except StreamError as e:
                if self.strict:
                    raise StreamError(f"payload does not match its description: {e.reason}",
                                      record_index=record_index, section=schema["name"]) from None
                entry["undecoded"] = e.reason
        if "state" not in entry:
            entry["hex"] = rec.data[:HEX_PREVIEW].hex()
        self.devices.append(entry)

    def to_json(self) -> dict[str, Any]:
        h = self.header
        return {
            "header": None if h is None else {"format": f"{h.major}.{h.minor}", "page_size": h.page_size,
                                              "producer": h.producer, "machine_type": h.machine_type},
            "config": self.config,
            "description": list(self.sections.values()),
            "devices": self.devices,
            "ram_blocks": [s.to_json() for s in self.ram.values()],
            "disks": [s.to_json() for s in self.disks.values()],
            "passes": [vars(p) for p in self.passes if p.number or p.pages or p.zero_pages],
            "commands": dict(self.commands),
            "skipped_types": {str(k): v for k, v in self.skipped.items()},
            "records": self.records,
            "end": None if self.end is None else {"record_count": self.end.record_count,
                                                  "digest": f"{self.end.digest:016x}", "verified": True},
        }
