"""Drives on the migration engine without a VM: a SourceSession with the DriveSaver sends through
the real StreamDecoder into a DestSession with the DriveLoader, between two real image files.
The test is the guest: it writes into the source image and notes the write in the drive's dirty
log, as the device does, before and during passes. After any switchover the destination image
must equal the source's, with no data where the source has holes; bad input is refused by name
before a byte is written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_engine_sessions import Out
from vmferry.block.digest import sample_offsets, sampled_digest
from vmferry.block.options import DriveSpec
from vmferry.block.raw import DIRECT_CHUNK, RawImage
from vmferry.devices.virtio_blk import DIRTY_UNIT, VirtioBlk
from vmferry.errors import MigrationError
from vmferry.migration.block import DriveLoader, DriveSaver, select_copied
from vmferry.migration.dest_session import DestSession
from vmferry.migration.source_session import SourceSession
from vmferry.stream.compression import Compressor
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder

SIZE = 1 << 20  # 256 units


class NoMemory:
    """The devices serve no request here; guest RAM is never touched."""

    def read_gpa(self, gpa: int, nbytes: int) -> bytes:
        raise AssertionError("no guest RAM in this test")

    def write_gpa(self, gpa: int, data: bytes) -> None:
        raise AssertionError("no guest RAM in this test")


def _image(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _device(path: Path, drive_id: str = "disk0", *, lock: bool = True) -> VirtioBlk:
    return VirtioBlk(drive_id, RawImage(DriveSpec(drive_id, str(path)), lock=lock), NoMemory(),
                     lambda level: None)


def _allocated(path: Path) -> set[int]:
    """The 4 KiB units holding data."""
    units, pos = set(), 0
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            units.update(range(data // DIRTY_UNIT, -(-hole // DIRTY_UNIT)))
            pos = hole
    return units


class Pair:
    def __init__(self, tmp: Path, limit: int = 300, dst_size: int = SIZE, dst_id: str = "disk0",
                 compression: str = "none") -> None:
        self.src_img, self.dst_img = _image(tmp / "src.img"), _image(tmp / "dst.img", dst_size)
        self.src = _device(self.src_img)
        self.dst = _device(self.dst_img, dst_id, lock=False)
        self.encoder = StreamEncoder(machine_type="test")
        self.saver = DriveSaver([self.src], copy=["disk0"], compressor=Compressor(compression))
        self.session = SourceSession([self.saver], self.encoder, {}, lambda: limit, step_budget=DIRTY_UNIT)
        self.loader = DriveLoader([self.dst])
        self.dest = DestSession([self.loader])
        self.out = Out(self.encoder, StreamDecoder(), self.dest)
        self.now = 0.0

    def tick(self) -> float:
        self.now += 0.001
        return self.now

    def write(self, unit: int, value: int, sectors: int = 8) -> None:
        """The guest writes `sectors` of a unit (value 0: zeros), noted as the device notes it."""
        off = (unit % (SIZE // DIRTY_UNIT)) * DIRTY_UNIT
        self.src.backend.write(off, bytes([value]) * (sectors * 512))
        self.src.dirty.note(off // DIRTY_UNIT, 1)

    def close(self) -> None:
        self.session.cleanup()
        self.dest.release()
        self.src.close()
        self.dst.close()


units = st.integers(0, SIZE // DIRTY_UNIT - 1)
writes = st.tuples(units, st.integers(0, 3), st.sampled_from([1, 8]))
actions = st.lists(st.one_of(st.tuples(st.just("write"), writes), st.tuples(st.just("step"), st.none())),
                   max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(writes, max_size=30), during=actions, limit=st.sampled_from([0, 300]),
       junk=st.lists(units, max_size=5), compression=st.sampled_from(["none", "zstd", "auto"]))
def test_destination_image_equals_the_source_and_holes_stay_holes(
    before: list[tuple[int, int, int]], during: list[tuple[str, object]], limit: int, junk: list[int],
    compression: str,
) -> None:
    """With the runs read (and, zstd, compressed) on the pipeline's workers while the test keeps
    writing between steps, and with `auto` compressing on the sending thread."""
    with tempfile.TemporaryDirectory() as d:
        p = Pair(Path(d), limit, compression=compression)
        try:
            for u in junk:  # old data on the destination where the source may have a hole
                p.dst.backend.write(u * DIRTY_UNIT, b"\xee" * DIRTY_UNIT)
            for args in before:
                p.write(*args)
            p.session.setup(p.out, p.tick())
            for kind, arg in during:
                if kind == "write":
                    p.write(*arg)  # type: ignore[misc]
                else:
                    s = p.session.step(p.out, p.tick)
                    if s.switchover and p.session.confirm_switchover():
                        break
            p.session.complete(p.out, p.tick)
            p.session.end(p.out)
            assert p.dest.ended
            p.dest.complete()
            assert p.src_img.read_bytes() == p.dst_img.read_bytes()
            assert _allocated(p.dst_img) <= _allocated(p.src_img)
            assert p.saver.pending() == 0
            assert p.src.backend.locked is False and p.dst.backend.locked is True  # handed over
        finally:
            p.close()


def test_wrong_size_on_the_destination_is_refused_before_a_byte_is_written(tmp_path: Path) -> None:
    p = Pair(tmp_path, dst_size=SIZE // 2)
    try:
        p.write(3, 7)
        with pytest.raises(MigrationError, match=r"drive disk0: the source's image is 1048576 bytes but "
                                                 r"this destination's '.*dst.img' is 524288 bytes"):
            p.session.setup(p.out, p.tick())
        assert _allocated(p.dst_img) == set()
        assert p.dst.backend.locked is False
    finally:
        p.close()


def test_a_drive_the_destination_lacks_is_refused_by_name(tmp_path: Path) -> None:
    p = Pair(tmp_path, dst_id="other")
    try:
        with pytest.raises(MigrationError, match="the source copies drive 'disk0', but this destination "
                                                 r"has no such drive \(drives: other\)"):
            p.session.setup(p.out, p.tick())
    finally:
        p.close()


def test_a_locked_destination_image_is_refused_by_name(tmp_path: Path) -> None:
    p = Pair(tmp_path)
    other = RawImage(DriveSpec("other", str(p.dst_img)))
    try:
        with pytest.raises(Exception, match='drive disk0: Failed to get "write" lock'):
            p.session.setup(p.out, p.tick())
        assert p.dst.backend.locked is False
    finally:
        other.close()
        p.close()


def test_select_copied_refuses_unknown_and_read_only_drives(tmp_path: Path) -> None:
    rw = _device(_image(tmp_path / "a.img"), "a")
    ro = VirtioBlk("b", RawImage(DriveSpec("b", str(_image(tmp_path / "b.img")), readonly=True)),
                   NoMemory(), lambda level: None)
    try:
        assert select_copied([rw, ro], True, []) == ["a"]
        assert select_copied([rw, ro], False, ["a"]) == ["a"]
        assert select_copied([rw, ro], False, []) == []
        with pytest.raises(MigrationError, match="this VM has no drive 'c' \\(drives: a, b\\)"):
            select_copied([rw, ro], False, ["c"])
        with pytest.raises(MigrationError, match="drive 'b' is read-only"):
            select_copied([rw, ro], True, ["b"])
    finally:
        rw.close()
        ro.close()


def test_the_sampled_digest_sees_a_sampled_block_change(tmp_path: Path) -> None:
    dev = _device(_image(tmp_path / "d.img", 64 << 20))
    try:
        offsets = sample_offsets(64 << 20)
        assert len(offsets) == 64 and offsets[0] == 0 and offsets[-1] == (64 << 20) - 4096
        before = sampled_digest(dev.backend)
        dev.backend.write(offsets[10] + 100, b"x")
        assert sampled_digest(dev.backend) != before
    finally:
        dev.close()


def test_write_bulk_writes_aligned_runs_past_the_cache_and_the_rest_through_it(tmp_path: Path) -> None:
    """A copied drive's destination writes its runs with write_bulk: what reads back is what was
    written, aligned (O_DIRECT where the filesystem takes it, in pieces of the aligned buffer) or
    not, and a buffered write over the same bytes afterwards wins (two descriptors, one file)."""
    size = 4 * DIRECT_CHUNK
    img = RawImage(DriveSpec("disk0", str(_image(tmp_path / "d.img", size))))
    try:
        aligned = os.urandom(3 * DIRTY_UNIT)
        img.write_bulk(DIRTY_UNIT, memoryview(aligned))
        odd = os.urandom(1000)
        img.write_bulk(5 * DIRTY_UNIT + 512, odd)
        img.write(2 * DIRTY_UNIT, b"\x55" * 512)
        big = os.urandom(DIRECT_CHUNK + 2 * DIRTY_UNIT)  # more than one aligned buffer's worth
        img.write_bulk(8 * DIRTY_UNIT, big)
        buf = bytearray(size)
        img.read_into(0, memoryview(buf))
        expect = bytearray(size)
        expect[DIRTY_UNIT : 4 * DIRTY_UNIT] = aligned
        expect[5 * DIRTY_UNIT + 512 : 5 * DIRTY_UNIT + 1512] = odd
        expect[2 * DIRTY_UNIT : 2 * DIRTY_UNIT + 512] = b"\x55" * 512
        expect[8 * DIRTY_UNIT : 8 * DIRTY_UNIT + len(big)] = big
        assert buf == expect
        assert (tmp_path / "d.img").read_bytes() == expect  # another opener sees the same
    finally:
        img.close()
