"""Write the seed corpus of every fuzz target under tests/fuzz/corpus/<target>/ (committed).

    PYTHONPATH=src python tests/fuzz/make_corpus.py [--out DIR]

Seeds are small valid inputs made by the project's own encoders, plus a few near-misses; the
fuzzer mutates them. Rerun after a format change and commit the result (keep it well under 1 MiB):
the vmstate seeds follow the newest machine type's section versions, so a new section version
changes them. The output depends on the code alone (no clock, no unseeded randomness, no hash
order): tests/test_fuzz_corpus.py regenerates it and fails when the committed corpus is stale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import fuzz_vmstate  # noqa: E402

from vmferry.migration.xbzrle import encode_page  # noqa: E402
from vmferry.stream import (  # noqa: E402
    Command,
    CommandCode,
    Config,
    Description,
    DeviceSection,
    EndOfStream,
    PassStart,
    RamBlockInfo,
    RamBlocks,
    RamPageList,
    RamPages,
    RamZero,
    SectionPhase,
)
from vmferry.stream.format import checksum  # noqa: E402
from vmferry.stream.records import DELTA_ENTRY, RamDelta  # noqa: E402
from vmferry.stream.sections import encode_section  # noqa: E402
from vmferry.stream.testing import RAMSAVE, SERIAL, SERIAL_VALUE, encode_all, sample_stream  # noqa: E402
from vmferry.vmstate.state import Section  # noqa: E402

HERE = Path(__file__).parent / "corpus"
SMALL_PAGE = 512


def small_stream() -> bytes:
    """Every common record type with 512-byte pages: a seed the fuzzer can mutate quickly."""
    page = bytes(range(256)) * 2
    return encode_all([
        Config({"memory": 8 * SMALL_PAGE, "smp": 1}),
        Description.from_schemas([SERIAL, RAMSAVE]),
        RamBlocks((RamBlockInfo(1, "pc.ram", 0, 8 * SMALL_PAGE),)),
        DeviceSection(2, SectionPhase.START, b"s"),
        PassStart(1),
        RamPages(1, 1, 1, page),
        RamZero(1, 2, 3),
        DeviceSection(2, SectionPhase.END, b"e"),
        DeviceSection(1, SectionPhase.FULL, encode_section(SERIAL, SERIAL_VALUE)),
        Command(CommandCode.SHUT, index=1, data=b"bye"),
        RamPageList(1, np.array([0, 5, 7], dtype=np.uint32), page * 3),
        EndOfStream(),
    ], page_size=SMALL_PAGE)


def delta_stream() -> bytes:
    """A RAM_DELTA record (XBZRLE) of two 512-byte pages, each with two changed runs."""
    old = bytes(range(256)) * 2
    new = old[:10] + b"delta!" + old[16:500] + b"stamp" + old[505:]
    enc = encode_page(old, new, SMALL_PAGE)
    assert enc
    entries = np.zeros(2, dtype=DELTA_ENTRY)
    entries["page"], entries["base"], entries["length"], entries["check"] = [1, 6], 1, len(enc), checksum(new)
    return encode_all([
        RamBlocks((RamBlockInfo(1, "pc.ram", 0, 8 * SMALL_PAGE),)),
        PassStart(1),
        RamDelta(1, entries, enc * 2),
        EndOfStream(),
    ], page_size=SMALL_PAGE)


def stream_seeds() -> list[bytes]:
    small, sample = small_stream(), sample_stream()
    # Byte 0: how it is fed (1 repair, 2 get_buffer, 4 place); byte 1: chunk size (0: whole).
    return [b"\x00\x00" + small, b"\x01\x00" + small, b"\x03\x07" + small, b"\x05\x40" + small,
            b"\x07\x01" + small[:400], b"\x00\x00" + sample, b"\x06\xff" + sample,
            b"\x01\x00" + delta_stream()]


def _default_payload(cls: type, version: int) -> bytes:
    values = {f.name: f.default_value() for f in cls.fields if f.type.carries_value and f.since <= version}
    return cls.encode(Section(cls.name, version, values))


def vmstate_seeds() -> list[bytes]:
    out = []
    for i, cls in enumerate(fuzz_vmstate.CLASSES):
        for version in range(cls.minimum_version, cls.version + 1):
            mode = 2 * (version - cls.minimum_version)
            payload = _default_payload(cls, version)
            out.append(bytes([mode, i]) + payload)
            if version == cls.version:  # the same, with its description as fuzzable text
                text = json.dumps(cls.stream_description(version)).encode()
                out.append(bytes([1, i]) + text + b"\0" + payload)
    return out


def _qmp(*msgs: object) -> bytes:
    return b"".join(json.dumps(m).encode() for m in msgs)


def qmp_seeds() -> list[bytes]:
    caps = {"execute": "qmp_capabilities"}
    echo = {"execute": "echo", "arguments": {"a": [1, 2.5, None, True, "x\\\"y"], "b": {"c": {}}}, "id": 7}
    return [
        b"\x00" + _qmp(caps, echo),
        b"\x01" + _qmp(caps, {"execute": "nope", "id": "x"}) + b"\n",
        b"\x05" + _qmp(echo, caps, {"exec-oob": "echo", "id": 1}),
        b"\x03" + b'{"execute": 1}[1,2] 123 "str" ]} , : nul {"a": NaN} {"x": 1e400} [[[[[]]]]]',
        b"\x00" + b'{"execute":"qmp_capabilities","arguments":{},"id":{"deep":[1,{"k":"\\u00e9"}]}}',
        b"\x10" + b"\xff\xfe" + b'"\xc3\x28"' + b"[" * 70 + b"]" * 70,
        b"\x00" + b'{"execute": "echo", "arguments": {"s": "' + b"A" * 300 + b'"}}' + _qmp(caps),
    ]


TARGETS = {"stream": stream_seeds, "vmstate": vmstate_seeds, "qmp": qmp_seeds}


def write_corpus(root: Path) -> None:
    """Every target's seeds under root/<target>/, each named by its SHA-1 (what was there goes)."""
    for name, make in TARGETS.items():
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for seed in make():
            (folder / hashlib.sha1(seed).hexdigest()).write_bytes(seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=HERE, help=f"where to write (default {HERE})")
    root = ap.parse_args().out
    write_corpus(root)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"wrote {sum(1 for p in root.rglob('*') if p.is_file())} seeds, {total} bytes, under {root}")


if __name__ == "__main__":
    main()
