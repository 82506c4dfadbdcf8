"""A small valid stream with every record type, for tests, the fuzzer's seed and the docs.

Deterministic (seeded page contents), so a test can compare a decoded stream with what went in.
"""

from __future__ import annotations

import random

import numpy as np

from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import (
    BlockData,
    BlockDevices,
    BlockZero,
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
    RamPageList,
    RamPages,
    RamZero,
    Record,
    SectionPhase,
)
from vmferry.stream.sections import SectionValue, encode_section

PAGE = 4096
SERIAL = {"id": 1, "name": "serial", "instance": 0, "version": 3,
          "fields": [{"name": "ier", "type": "u8"}, {"name": "divisor", "type": "u16"},
                     {"name": "regs", "type": "u32", "count": 4}, {"name": "rx", "type": "vbytes"},
                     {"name": "requests", "type": "list",
                      "fields": [{"name": "head", "type": "u16"}, {"name": "ok", "type": "bool"}]}],
          "subsections": [{"name": "serial/fifo", "version": 1,
                           "fields": [{"name": "fifo", "type": "bytes", "size": 4}], "subsections": []}]}
RAMSAVE = {"id": 2, "name": "ramsave", "instance": 0, "version": 1, "fields": [], "subsections": []}
SERIAL_VALUE = SectionValue({"ier": 5, "divisor": 12, "regs": [1, 2, 3, 4], "rx": b"hi",
                             "requests": [{"head": 7, "ok": True}]},
                            {"serial/fifo": SectionValue({"fifo": b"abcd"})})


def sample_records(seed: int = 0) -> list[Record]:
    """One of each record type, in an order the rules accept, ending with END."""
    rng = random.Random(seed)
    pages = bytes(rng.getrandbits(8) for _ in range(4 * PAGE))
    return [
        Config({"memory": 1 << 20, "smp": 1}),
        Description.from_schemas([SERIAL, RAMSAVE]),
        RamBlocks((RamBlockInfo(1, "pc.ram", 0, 1 << 20),
                   RamBlockInfo(2, "vga.vram", 0xFD000000, 64 * PAGE))),
        BlockDevices((DiskInfo(1, "disk0", 64 * 512),)),
        DeviceSection(2, SectionPhase.START, b"start"),
        PassStart(1),
        RamPages(1, 0, 4, pages),
        RamZero(1, 4, 200),
        RamZero(2, 0, 64),
        BlockData(1, 0, 2, pages[:1024]),
        BlockZero(1, 2, 62),
        DeviceSection(2, SectionPhase.PART, b"part"),
        PassStart(2),
        RamPages(1, 1, 1, pages[PAGE:2 * PAGE]),
        DeviceSection(2, SectionPhase.END, b"end"),
        DeviceSection(1, SectionPhase.FULL, encode_section(SERIAL, SERIAL_VALUE)),
        Command(CommandCode.POSTCOPY_RUN),
        Command(CommandCode.SHUT, index=1, data=b"bye"),
        # Last before END so the record numbers and offsets of everything before it stay put. An
        # odd count, so the index area carries padding; the block's last page, so the bound is tight.
        RamPageList(2, np.array([3, 17, 63], dtype=np.uint32), pages[PAGE:]),
        EndOfStream(),
    ]


def encode_all(records: list[Record], page_size: int = PAGE, machine_type: str = "vmferry-1.0") -> bytes:
    enc = StreamEncoder(page_size=page_size, machine_type=machine_type)
    return enc.header() + b"".join(enc.encode(r) for r in records)


def sample_stream(seed: int = 0) -> bytes:
    return encode_all(sample_records(seed))
