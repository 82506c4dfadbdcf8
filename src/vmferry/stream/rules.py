"""The stream's order rules: what a record header may say given the records before it.

`check_header` runs on a verified record header *before* its payload is buffered or placed, so
a destination never allocates for, or writes pages to, anything the stream has not declared.
`apply` runs after the payload's checksum passed and records what the record declared.
"""

from __future__ import annotations

from vmferry.errors import StreamError
from vmferry.stream.format import FLAG_SKIPPABLE, KNOWN_FLAGS
from vmferry.stream.payloads import delta_table_size, page_list_index_size
from vmferry.stream.records import (
    RESERVED_TYPES,
    BlockDevices,
    Config,
    Description,
    DeviceSection,
    DiskInfo,
    PassStart,
    RamBlockInfo,
    RamBlocks,
    RamCompressed,
    RamDelta,
    RamPageList,
    Record,
    RecordType,
    SectionInfo,
    SectionPhase,
)

T = RecordType
_SECTION_TYPES = (T.SECTION_FULL, T.SECTION_START, T.SECTION_PART, T.SECTION_END)
_RUN_TYPES = (T.RAM_PAGES, T.RAM_ZERO, T.BLOCK_DATA, T.BLOCK_ZERO, T.BLOCK_COMPRESSED)
_BLOCK_TYPES = (T.BLOCK_DATA, T.BLOCK_ZERO, T.BLOCK_COMPRESSED)
# Which generic header fields each type uses (s = section, c = count, i = index); the rest must be 0.
_USES = {T.CONFIG: "", T.DESCRIPTION: "", T.RAM_BLOCKS: "", T.BLOCK_DEVICES: "", T.END: "",
         T.PASS: "i", T.COMMAND: "sci", **dict.fromkeys(_SECTION_TYPES, "s"),
         **dict.fromkeys(_RUN_TYPES, "sci"), T.RAM_PAGE_LIST: "sc", T.RAM_COMPRESSED: "sci",
         T.RAM_DELTA: "sc"}
_RAM_TYPES = (T.RAM_PAGES, T.RAM_ZERO, T.RAM_PAGE_LIST, T.RAM_COMPRESSED, T.RAM_DELTA)
COMPRESSED_HEAD_SIZE = 16
END_PAYLOAD = 16
# Plain dicts on the per-record path: an IntEnum lookup costs more than the rest of a header check.
_NAMES = {t.value: t.name for t in RecordType}
_USES_S = {int(t) for t, u in _USES.items() if "s" in u}
_USES_C = {int(t) for t, u in _USES.items() if "c" in u}
_USES_I = {int(t) for t, u in _USES.items() if "i" in u}


_TYPE = {RamPageList: T.RAM_PAGE_LIST, RamCompressed: T.RAM_COMPRESSED, RamDelta: T.RAM_DELTA}


def type_name(rtype: int) -> str:
    return _NAMES.get(rtype, f"type {rtype}")


class StreamRules:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.sections: dict[int, SectionInfo] = {}
        self.ram: dict[int, RamBlockInfo] = {}
        self.disks: dict[int, DiskInfo] = {}
        self.open_sections: set[int] = set()
        self.last_pass = 0
        self.config_seen = False

    def subject(self, rtype: int, section: int) -> str | None:
        """The name of what a record is about (device section, RAM block, disk), for error messages."""
        if rtype in _SECTION_TYPES and section in self.sections:
            return self.sections[section].name
        if rtype in _RAM_TYPES and section in self.ram:
            return self.ram[section].name
        if rtype in _BLOCK_TYPES and section in self.disks:
            return self.disks[section].name
        return None

    def sector_size(self, disk_id: int) -> int:
        """The listed sector size of a disk (512 for an id that is none: no BLOCK_* record gets
        past check_header for it)."""
        disk = self.disks.get(disk_id)
        return disk.sector_size if disk is not None else 512

    def check_header(self, rtype: int, flags: int, section: int, length: int, count: int, index: int,
                     max_payload: int) -> bool:
        """Raise StreamError if this header cannot come next; -> False for a skippable unknown type."""
        if flags & ~KNOWN_FLAGS:
            raise StreamError(f"reserved flag bits 0x{flags & ~KNOWN_FLAGS:02x} set")
        if length > max_payload:
            raise StreamError(f"payload length {length} exceeds the limit of {max_payload} bytes")
        if rtype == T.INVALID:
            raise StreamError("record type 0 is invalid")
        if rtype in RESERVED_TYPES:
            raise StreamError(f"record type {_NAMES[rtype]} is reserved in format 1.0")
        if rtype not in _USES:
            if flags & FLAG_SKIPPABLE:
                return False
            raise StreamError(f"unknown record type {rtype}")
        name = _NAMES[rtype]
        for uses, field, value in ((_USES_S, "section", section), (_USES_C, "count", count),
                                   (_USES_I, "index", index)):
            if value and rtype not in uses:
                raise StreamError(f"{name} record has {field} {value}, must be 0")
        if rtype == T.RAM_PAGES:  # the bulk of every stream: checked first
            self._check_run(name, "RAM block", "pages", self.ram.get(section), section, index, count,
                            self.page_size)
            if length != count * self.page_size:
                self._check_length(name, length, count * self.page_size)
        elif rtype == T.RAM_PAGE_LIST:
            self._check_page_list_header(name, section, length, count)
        elif rtype == T.RAM_DELTA:
            self._check_delta_header(name, section, length, count)
        elif rtype == T.RAM_COMPRESSED:
            # A run (index = first page) must lie inside the block; a list (index 0) is checked
            # like RAM_PAGE_LIST's in `apply`. The payload's head says which.
            self._check_run(name, "RAM block", "pages", self.ram.get(section), section, index, count,
                            self.page_size)
            if length < COMPRESSED_HEAD_SIZE:
                raise StreamError(f"{name} payload length {length}, shorter than its "
                                  f"{COMPRESSED_HEAD_SIZE}-byte head")
        elif rtype in _SECTION_TYPES:
            self._check_section(rtype, section)
        elif rtype in (T.RAM_PAGES, T.RAM_ZERO):
            unit = self.page_size
            self._check_run(name, "RAM block", "pages", self.ram.get(section), section, index, count, unit)
            self._check_length(name, length, count * unit if rtype == T.RAM_PAGES else 0)
        elif rtype in _BLOCK_TYPES:
            disk = self.disks.get(section)
            unit = disk.sector_size if disk else 0
            self._check_run(name, "disk", "sectors", disk, section, index, count, unit)
            if disk is not None and disk.shared:
                raise StreamError(f"{name} for disk '{disk.name}', which is listed as shared "
                                  "(its contents stay in its image)")
            if rtype == T.BLOCK_COMPRESSED:
                if length < COMPRESSED_HEAD_SIZE:
                    raise StreamError(f"{name} payload length {length}, shorter than its "
                                      f"{COMPRESSED_HEAD_SIZE}-byte head")
            else:
                self._check_length(name, length, count * unit if rtype == T.BLOCK_DATA else 0)
        elif rtype == T.PASS:
            self._check_length(name, length, 0)
            if index <= self.last_pass:
                raise StreamError(f"pass {index} after pass {self.last_pass}: pass numbers must increase")
        elif rtype == T.END:
            self._check_length(name, length, END_PAYLOAD)
            if self.open_sections:
                names = ", ".join(sorted(self.sections[s].name for s in self.open_sections))
                raise StreamError(f"end of stream while section(s) {names} still open (START without END)")
        elif rtype == T.CONFIG and self.config_seen:
            raise StreamError("a second CONFIG record")
        return True

    def _check_page_list_header(self, name: str, section: int, length: int, count: int) -> None:
        """What the header alone can say, before the payload is buffered: a listed block, 1..pages
        of it, and the exact length. The indexes themselves are checked in `apply`."""
        block = self.ram.get(section)
        if block is None:
            raise StreamError(f"{name} for unknown RAM block id {section} (not listed before)")
        if count == 0:
            raise StreamError(f"{name} with count 0")
        npages = block.size // self.page_size
        if count > npages:  # n strictly increasing indexes below npages: at most npages of them
            raise StreamError(f"{name} of {count} pages, more than RAM block '{block.name}' has ({npages})")
        self._check_length(name, length, page_list_index_size(count) + count * self.page_size)

    def _check_delta_header(self, name: str, section: int, length: int, count: int) -> None:
        """A listed block, 1..pages of it, and room for the head, the entries and at least the
        shortest encoding (2 bytes) of each page, at most a page each."""
        block = self.ram.get(section)
        if block is None:
            raise StreamError(f"{name} for unknown RAM block id {section} (not listed before)")
        npages = block.size // self.page_size
        if not 1 <= count <= npages:
            raise StreamError(f"{name} of {count} pages: RAM block '{block.name}' has {npages}")
        table = delta_table_size(count)
        if not table + 2 * count <= length <= table + count * self.page_size:
            raise StreamError(f"{name} payload length {length}, outside {table + 2 * count}.."
                              f"{table + count * self.page_size} for {count} pages")

    def _check_section(self, rtype: int, section: int) -> None:
        if section not in self.sections:
            raise StreamError(f"unknown section id {section} (not in any DESCRIPTION)")
        is_open = section in self.open_sections
        if rtype in (T.SECTION_FULL, T.SECTION_START) and is_open:
            raise StreamError(f"{RecordType(rtype).name} while the section is open (START without END)")
        if rtype in (T.SECTION_PART, T.SECTION_END) and not is_open:
            raise StreamError(f"{RecordType(rtype).name} without a SECTION_START")

    @staticmethod
    def _check_run(name: str, what: str, word: str, info: RamBlockInfo | DiskInfo | None, ident: int,
                   first: int, count: int, unit: int) -> None:
        if info is None:
            raise StreamError(f"{name} for unknown {what} id {ident} (not listed before)")
        if count == 0:
            raise StreamError(f"{name} with count 0")
        units = info.size // unit
        if first + count > units:
            raise StreamError(f"{name} {word} {first}..{first + count - 1} lie outside {what} "
                              f"'{info.name}' ({units} {word} of {unit} bytes)")

    @staticmethod
    def _check_length(name: str, length: int, expected: int) -> None:
        if length != expected:
            raise StreamError(f"{name} payload length {length}, expected {expected}")

    def apply(self, rec: Record) -> None:
        match rec:
            case RamPageList(block_id, pages) | RamCompressed(block_id, pages=pages) | RamDelta(
                    block_id, pages=pages) if pages is not None:
                # The payload layout (increasing, zero padding) was checked by the parser; whether
                # the indexes lie inside the block is an order rule: it needs the declared block.
                block = self.ram[block_id]
                npages = block.size // self.page_size
                if pages[-1] >= npages:
                    raise StreamError(f"{type_name(_TYPE[type(rec)])} page {pages[-1]} lies outside "
                                      f"RAM block "
                                      f"'{block.name}' ({npages} pages of {self.page_size} bytes)")
            case DeviceSection(section_id, phase):
                if phase == SectionPhase.START:
                    self.open_sections.add(section_id)
                elif phase == SectionPhase.END:
                    self.open_sections.discard(section_id)
            case PassStart(pass_number):
                self.last_pass = pass_number
            case Description(sections):
                for s in sections:
                    if s.id in self.sections:
                        raise StreamError(f"section id {s.id} ('{s.name}') redefined")
                    self.sections[s.id] = s
            case RamBlocks(blocks):
                self._declare(self.ram, blocks, "RAM block")
            case BlockDevices(devices):
                self._declare(self.disks, devices, "disk")
            case Config():
                self.config_seen = True

    @staticmethod
    def _declare(table: dict, items: tuple, what: str) -> None:
        for item in items:
            if item.id in table:
                raise StreamError(f"{what} id {item.id} ('{item.name}') listed twice")
            table[item.id] = item
