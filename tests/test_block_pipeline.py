"""The copied drives' pipeline (migration/block_pipeline.py): runs read from a real image file on
worker threads come back in the order they were submitted, whatever order the workers finish in;
zero units become BLOCK_ZERO records; a fixed codec compresses on the workers, and what it sends
decompresses to the image's bytes; a worker's read error reaches the migration thread at `pop`."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from vmferry.block.options import DriveSpec
from vmferry.block.raw import RawImage
from vmferry.migration.block_pipeline import UNIT, Run, RunPipeline
from vmferry.stream.compression import Codec, Compressor, Plan, decompress
from vmferry.stream.records import BlockCompressed, BlockData, BlockZero

SIZE = 64 * UNIT


class SlowFirst:
    """A real image whose reads at offset 0 wait until a later read has finished: the workers
    finish out of order."""

    def __init__(self, image: RawImage) -> None:
        self.image = image
        self.later_done = threading.Event()
        self.size = image.size

    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset == 0:
            assert self.later_done.wait(10)
        self.image.read_into(offset, buf)
        if offset:
            self.later_done.set()


class Failing:
    size = SIZE

    def read_into(self, offset: int, buf: memoryview) -> None:
        raise OSError(5, "Input/output error")


@pytest.fixture
def image(tmp_path: Path) -> RawImage:
    path = tmp_path / "d.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    img = RawImage(DriveSpec("disk0", str(path)))
    img.write(0, os.urandom(8 * UNIT))
    img.write(10 * UNIT, os.urandom(2 * UNIT))  # units 8-9 stay zero, 10-11 data
    yield img
    img.close()


def _bytes(rec: BlockData | BlockZero | BlockCompressed) -> bytes:
    if isinstance(rec, BlockZero):
        return bytes(rec.sector_count * 512)
    if isinstance(rec, BlockCompressed):
        raw = decompress(rec.codec, memoryview(rec.wire), rec.sector_count * 512, "BLOCK_COMPRESSED")
        assert raw == bytes(rec.data)
        return raw
    return bytes(rec.data)


def test_runs_come_back_in_submission_order_though_the_workers_finish_out_of_order(image: RawImage) -> None:
    slow = SlowFirst(image)
    pipe = RunPipeline(workers=2, depth=3, run_bytes=8 * UNIT)
    try:
        pipe.submit(Run("a", slow, 1, SIZE, 0, 8))  # type: ignore[arg-type]
        pipe.submit(Run("b", slow, 1, SIZE, 8, 4))  # type: ignore[arg-type]
        assert pipe.units == 12 and pipe.room()
        first = pipe.pop()
        assert first is not None and first.run.owner == "a" and pipe.units == 4
        assert b"".join(_bytes(r) for r in first.records) == _read(image, 0, 8)
        pipe.release(first)
        second = pipe.pop()
        assert second is not None and second.run.owner == "b"
        # units 8-9 read as zeros: one BLOCK_ZERO, then the data of 10-11
        assert [type(r) for r in second.records] == [BlockZero, BlockData]
        assert b"".join(_bytes(r) for r in second.records) == _read(image, 8 * UNIT, 4)
        pipe.release(second)
        assert pipe.pop() is None and pipe.units == 0
    finally:
        pipe.close()


def test_a_plan_is_carried_out_on_the_workers(image: RawImage) -> None:
    image.write(16 * UNIT, b"\x07" * (8 * UNIT))  # compressible
    pipe = RunPipeline(workers=2, depth=2, run_bytes=8 * UNIT, compressor=lambda: Compressor("zstd"))
    try:
        pipe.submit(Run(None, image, 1, SIZE, 16, 8, Plan(Codec.ZSTD, (Codec.LZ4,))))
        p = pipe.pop()
        assert p is not None and [type(r) for r in p.records] == [BlockCompressed]
        assert p.codecs == {"ZSTD": 1} and p.wire_bytes < p.data_bytes == 8 * UNIT and p.compress_s > 0
        # the probe of lz4 on a sample, then zstd on the whole run, each timed for the policy
        assert [(m.codec, m.raw) for m in p.measures] == [(Codec.LZ4, 8 * UNIT), (Codec.ZSTD, 8 * UNIT)]
        assert p.raw_bytes == 0
        assert _bytes(p.records[0]) == b"\x07" * (8 * UNIT)
        pipe.release(p)
    finally:
        pipe.close()


def test_a_raw_plan_and_no_plan_send_the_data_as_it_is(image: RawImage) -> None:
    pipe = RunPipeline(workers=1, depth=2, run_bytes=8 * UNIT, compressor=lambda: Compressor("auto"))
    try:
        pipe.submit(Run(None, image, 1, SIZE, 0, 8, Plan(Codec.RAW)))
        pipe.submit(Run(None, image, 1, SIZE, 0, 8))
        for _ in range(2):
            p = pipe.pop()
            assert p is not None and [type(r) for r in p.records] == [BlockData]
            assert p.raw_bytes == p.wire_bytes == 8 * UNIT and not p.measures
            pipe.release(p)
    finally:
        pipe.close()


def test_the_buffers_bound_what_is_in_flight_and_come_back(image: RawImage) -> None:
    pipe = RunPipeline(workers=1, depth=2, run_bytes=8 * UNIT)
    try:
        pipe.submit(Run(None, image, 1, SIZE, 0, 8))
        pipe.submit(Run(None, image, 1, SIZE, 8, 8))
        assert not pipe.room()
        p = pipe.pop()
        assert p is not None and not pipe.room()  # popped but not yet sent: still the caller's
        pipe.release(p)
        assert pipe.room()
    finally:
        pipe.close()


def test_a_read_error_on_a_worker_is_raised_at_pop_and_frees_its_buffer() -> None:
    pipe = RunPipeline(workers=1, depth=1, run_bytes=8 * UNIT)
    try:
        pipe.submit(Run(None, Failing(), 1, SIZE, 0, 8))  # type: ignore[arg-type]
        with pytest.raises(OSError, match="Input/output error"):
            pipe.pop()
        assert pipe.room()
    finally:
        pipe.close()


def _read(image: RawImage, offset: int, units: int) -> bytes:
    buf = bytearray(units * UNIT)
    image.read_into(offset, memoryview(buf))
    return bytes(buf)
