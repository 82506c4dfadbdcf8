"""Block backends on real files: --drive parsing, sparse reads, QEMU-compatible image locks,
the disk guest's host-side verifier. No KVM needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.block.backend import BlockError
from vmferry.block.opener import open_drive
from vmferry.block.options import DriveSpec, parse_drive, parse_drives
from vmferry.block.stats import BlockStats
from vmferry.guests.verify_disk import verify_disk_image


def _image(tmp_path: Path, size: int = 1 << 20, name: str = "d.img") -> Path:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def test_parse_drive_full_and_defaults() -> None:
    spec = parse_drive("file=/x.img,format=raw,id=disk0,readonly=on")
    assert spec == DriveSpec("disk0", "/x.img", "raw", True)
    assert parse_drive("file=/x.img", 3) == DriveSpec("disk3", "/x.img", "raw", False)
    assert parse_drive("file=a,,b.img,id=d").file == "a,b.img"  # QEMU's doubled comma


@pytest.mark.parametrize(("text", "message"), [
    ("", "'' is not key=value"),
    ("id=d0", "needs file=PATH"),
    ("file=/x,format=qcow2", "format 'qcow2' is not supported"),
    ("file=/x,cache=none", "unknown option 'cache'"),
    ("file=/x,readonly=maybe", "readonly 'maybe' must be on or off"),
    ("file=/x,id=0bad", "id '0bad' must start with a letter"),
    ("file=/x,file=/y", "'file' given twice"),
    ("/x.img", "'/x.img' is not key=value"),
])
def test_parse_drive_refuses_by_name(text: str, message: str) -> None:
    with pytest.raises(BlockError, match=message.replace("(", r"\(")):
        parse_drive(text)


def test_duplicate_drive_ids_are_refused() -> None:
    with pytest.raises(BlockError, match="duplicate id 'd'"):
        parse_drives(["file=/a,id=d", "file=/b,id=d"])


@given(st.text(alphabet="abc,=/.", max_size=30))
def test_parse_drive_never_crashes(text: str) -> None:
    try:
        spec = parse_drive(text)
    except BlockError:
        return
    assert spec.file and spec.format == "raw"


def test_sparse_read_skips_holes_and_reads_data(tmp_path: Path) -> None:
    path = _image(tmp_path, 1 << 20)
    b = open_drive(DriveSpec("d0", str(path)))
    try:
        b.write(64 << 10, b"\xab" * 4096)
        extents = list(b.allocated_extents())
        assert len(extents) == 1 and extents[0][0] <= 64 << 10 < sum(extents[0])
        buf = bytearray(b"\x11" * (128 << 10))
        b.read_into(0, memoryview(buf))
        assert buf[: 64 << 10] == bytes(64 << 10)  # a hole reads as zeros
        assert buf[64 << 10 : (64 << 10) + 4096] == b"\xab" * 4096
        assert buf[(64 << 10) + 4096 :] == bytes(len(buf) - (64 << 10) - 4096)
        assert os.stat(path).st_blocks * 512 < 1 << 20  # still sparse
    finally:
        b.close()


def test_second_writer_is_refused_by_name_and_lock_released_on_close(tmp_path: Path) -> None:
    path = _image(tmp_path)
    first = open_drive(DriveSpec("a", str(path)))
    try:
        with pytest.raises(BlockError, match=r"drive b: Failed to get \"write\" lock on .*d.img"):
            open_drive(DriveSpec("b", str(path)))
        with pytest.raises(BlockError, match=r"drive c: Failed to get shared \"write\" lock"):
            open_drive(DriveSpec("c", str(path), readonly=True))
    finally:
        first.close()
    open_drive(DriveSpec("b", str(path))).close()  # released with the fd


def test_two_readers_coexist_and_refuse_a_writer(tmp_path: Path) -> None:
    path = _image(tmp_path)
    r1 = open_drive(DriveSpec("r1", str(path), readonly=True))
    r2 = open_drive(DriveSpec("r2", str(path), readonly=True))
    try:
        with pytest.raises(BlockError, match=r"Failed to get \"write\" lock"):
            open_drive(DriveSpec("w", str(path)))
    finally:
        r1.close()
        r2.close()


def test_missing_and_non_regular_images(tmp_path: Path) -> None:
    with pytest.raises(BlockError, match=r"drive d0: Could not open '.*nope.img': No such file or directory"):
        open_drive(DriveSpec("d0", str(tmp_path / "nope.img")))
    with pytest.raises(BlockError, match="Is a directory|is not a regular file"):
        open_drive(DriveSpec("d0", str(tmp_path), readonly=True))


def test_stats_count_in_qemu_names() -> None:
    s = BlockStats()
    s.done("rd", 4096, 0, ok=True)
    s.done("wr", 512, 0, ok=True, offset=1024)
    s.done("wr", 512, 0, ok=False)
    s.invalid("rd")
    q = s.query()
    assert (q["rd_bytes"], q["rd_operations"], q["wr_bytes"], q["wr_operations"]) == (4096, 1, 512, 2)
    assert q["failed_wr_operations"] == 1 and q["invalid_rd_operations"] == 1
    assert q["wr_highest_offset"] == 1536 and q["rd_total_time_ns"] > 0 and "idle_time_ns" in q


def _sector(lba: int, gen: int) -> bytes:
    import numpy as np

    from vmferry.guests import verify_disk as vd

    w = np.zeros(64, dtype=np.uint64)
    w[0], w[1], w[2] = vd.SECTOR_MAGIC, lba, gen
    with np.errstate(over="ignore"):
        for i in range(3, 63):
            w[i] = ((np.uint64(lba) * np.uint64(0x9E3779B97F4A7C15))
                    ^ (np.uint64(gen) * np.uint64(0xC2B2AE3D27D4EB4F)) ^ np.uint64(i))
        h = np.uint64(vd.FNV_OFFSET)
        for i in range(63):
            h = (h ^ w[i]) * np.uint64(vd.FNV_PRIME)
    w[63] = h
    return w.astype("<u8").tobytes()


def test_disk_verifier_accepts_good_blocks_and_names_a_bad_sector(tmp_path: Path) -> None:
    path = _image(tmp_path, 1 << 20)
    with open(path, "r+b") as f:
        for block, gen in ((0, 3), (100, 7)):
            f.seek(block * 4096)
            f.write(b"".join(_sector(block * 8 + s, gen) for s in range(8)))
    verdict = verify_disk_image(path)
    assert verdict.ok and verdict.sectors == 16, verdict
    with open(path, "r+b") as f:  # one sector of block 100 from another generation: torn
        f.seek(100 * 4096 + 3 * 512)
        f.write(_sector(803, 8))
    verdict = verify_disk_image(path)
    assert not verdict.ok and verdict.first_bad_lba == 800 and "torn" in verdict.reason
    with open(path, "r+b") as f:  # the right generation back, one payload byte flipped
        f.seek(100 * 4096 + 3 * 512)
        f.write(_sector(803, 7))
        f.seek(100 * 4096 + 3 * 512 + 40)
        f.write(b"\x01")
    verdict = verify_disk_image(path)
    assert not verdict.ok and verdict.first_bad_lba == 803 and "payload" in verdict.reason
