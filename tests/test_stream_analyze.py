"""`vmferry analyze` as a user runs it: a subprocess on a file the encoder wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmferry.stream import Description, DeviceSection, EndOfStream, SectionPhase
from vmferry.stream.testing import encode_all, sample_stream


def analyze(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmferry", "analyze", *args], input=stdin,
                          capture_output=True, timeout=60)


@pytest.fixture
def stream_file(tmp_path: Path) -> Path:
    path = tmp_path / "snap.vmf"
    path.write_bytes(sample_stream())
    return path


def test_text(stream_file: Path) -> None:
    r = analyze(str(stream_file))
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert "machine type 'vmferry-1.0'" in out
    assert "    divisor = 12" in out and "subsection serial/fifo:" in out
    assert "RAM block pc.ram: base 0x0, 1048576 bytes (256 pages); pages sent 5, zero 200" in out
    # the page list's 3 pages count as sent; bytes = RAM_ZERO (40) + 32 + 16 index + 3 pages + 8
    assert ("RAM block vga.vram: base 0xfd000000, 262144 bytes (64 pages); pages sent 3, zero 64, "
            "2 records (RAM_PAGE_LIST 1, RAM_ZERO 1), 12384 bytes; passes 1,2") in out
    assert "pass 2: pages 4, zero pages 0" in out
    assert "end of stream: 19 records" in out


def test_json_from_stdin(stream_file: Path) -> None:
    r = analyze("--json", "-", stdin=stream_file.read_bytes())
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["error"] is None
    ram = {b["name"]: b for b in doc["ram_blocks"]}
    assert (ram["pc.ram"]["sent"], ram["pc.ram"]["zero"], ram["pc.ram"]["passes"]) == (5, 200, [1, 2])
    vram = ram["vga.vram"]
    assert (vram["sent"], vram["bytes"]) == (3, 12384)
    assert vram["record_types"] == {"RAM_ZERO": 1, "RAM_PAGE_LIST": 1}
    serial = next(d for d in doc["devices"] if d["name"] == "serial")
    assert serial["state"]["fields"]["regs"] == [1, 2, 3, 4]
    assert [p["number"] for p in doc["passes"]] == [1, 2]


def test_verify_ok(stream_file: Path) -> None:
    r = analyze("--verify", str(stream_file))
    assert r.returncode == 0 and r.stdout.startswith(b"OK: ")


def test_verify_names_the_first_bad_record(stream_file: Path) -> None:
    data = bytearray(stream_file.read_bytes())
    data[2000] ^= 0x20  # inside the first RAM_PAGES record's pages
    stream_file.write_bytes(data)
    r = analyze("--verify", str(stream_file))
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.decode() == ("vmferry analyze: checksum mismatch in RAM_PAGES payload (16384 bytes) "
                                 "(at record 6, section 'pc.ram', byte offset 987)\n")


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    r = analyze(str(tmp_path / "nope"))
    assert r.returncode == 1
    missing = tmp_path / "nope"
    assert r.stderr.decode() == f"vmferry analyze: cannot open {missing}: No such file or directory\n"


def test_a_malformed_description_entry_is_reported_not_a_traceback(tmp_path: Path) -> None:
    # Found by tests/fuzz/fuzz_vmstate.py: a DESCRIPTION entry whose field list holds a
    # non-object made the section decoder raise AttributeError (a traceback from analyze).
    bad = {"id": 1, "name": "bad", "instance": 0, "version": 1, "fields": [1], "subsections": []}
    path = tmp_path / "bad.vmf"
    path.write_bytes(encode_all([Description.from_schemas([bad]), DeviceSection(1, SectionPhase.FULL, b"\0"),
                                 EndOfStream()]))
    r = analyze("--json", str(path))
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    device = json.loads(r.stdout)["devices"][0]
    assert device["undecoded"] == "malformed description: a field entry needs a string name"
    r = analyze("--verify", str(path))
    assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr
    assert (b"payload does not match its description: malformed description: a field entry needs a string"
            b" name (at record 1, section 'bad')") in r.stderr
