"""A copied drive's runs read, scanned and compressed ahead of the migration thread, on worker
threads (DriveSaver's pipeline).

The migration thread takes units from a drive's dirty log (a write landing later marks them
again: dirty_log.py's order rule), cuts them into runs of up to 1 MiB and submits each run here,
with its compression plan (`Compressor.plan_chunk`). A worker reads the run through the backend,
finds its zero units and carries the plan out on the data parts: compress, and checksum their
raw bytes (`Compressor.execute`, the worker's own compressor, timed). pread, numpy's scan and the
compressors release the GIL, so the workers run beside the migration thread's sends, and beside
each other, on the host's cores; one thread doing read, scan, compress and send in turn left the
link half idle (bench/RESULTS.md, "Disks first, and compressed blocks"). The migration thread
takes the prepared runs back in the order it submitted them, hands the workers' timings to the
policy (`Compressor.account`), then encodes (one encoder, in order) and sends them. `auto`'s
plans are made on the migration thread because its choice weighs the wire's time, which only
the thread that sends can measure.

At most `depth` runs are in the pipeline; each owns one of `depth` 1 MiB buffers until its
records were sent (`send()` has handed the bytes on when it returns) and `release` gives it back.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmferry.block.backend import SECTOR_SIZE, BlockBackend
from vmferry.devices.virtio_blk import DIRTY_UNIT
from vmferry.stream.compression import Codec, Compressor, Measure, Plan
from vmferry.stream.format import checksum
from vmferry.stream.records import BlockCompressed, BlockData, BlockZero

UNIT = DIRTY_UNIT


@dataclass
class Run:
    """One run of a drive's units, as submitted: `owner` is the caller's (its drive), handed back."""

    owner: Any
    backend: BlockBackend
    disk_id: int
    disk_bytes: int  # the drive's size in whole sectors: a run never reads past it
    first: int  # unit
    count: int
    plan: Plan | None = None  # compress the data parts so (None: raw)


@dataclass
class Prepared:
    """A run read (and compressed): its records, in order, whose data views point into `buf`."""

    run: Run
    records: list[BlockData | BlockZero | BlockCompressed]
    buf: int  # the buffer's index, for release
    data_bytes: int = 0  # raw bytes in data records
    compress_s: float = 0.0  # worker time spent compressing them
    wire_bytes: int = 0  # what the compressed ones came to (raw ones count raw)
    raw_bytes: int = 0  # data bytes that went raw
    codecs: dict[str, int] = field(default_factory=dict)  # data records by codec name
    measures: list[Measure] = field(default_factory=list)  # every compressor run, probes included


def prepare(run: Run, buf: memoryview, compressor: Compressor | None) -> Prepared:
    """Read `run` into `buf`, cut it into data and zero records and carry the run's plan out on
    the data ones with `compressor` (no plan or no compressor: raw). Runs on a worker."""
    offset = run.first * UNIT
    nbytes = min(run.count * UNIT, run.disk_bytes - offset)
    view = buf[: run.count * UNIT]
    run.backend.read_into(offset, view[:nbytes])
    if nbytes < len(view):
        view[nbytes:] = bytes(len(view) - nbytes)
    nonzero = np.frombuffer(view, dtype=np.uint64).reshape(run.count, UNIT // 8).any(axis=1)
    out = Prepared(run, [], -1)
    # Alternating runs of data units and zero units, each one record.
    edges = np.flatnonzero(np.diff(nonzero.astype(np.int8))) + 1
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, run.count], strict=True):
        lo_b = int(lo) * UNIT
        hi_b = min(int(hi) * UNIT, nbytes)
        sector, sectors = (offset + lo_b) // SECTOR_SIZE, (hi_b - lo_b) // SECTOR_SIZE
        if not nonzero[lo]:
            out.records.append(BlockZero(run.disk_id, sector, sectors))
            continue
        raw = view[lo_b:hi_b]
        out.data_bytes += raw.nbytes
        if compressor is None or run.plan is None:
            out.records.append(BlockData(run.disk_id, sector, sectors, raw))
            out.wire_bytes += raw.nbytes
            out.raw_bytes += raw.nbytes
            continue
        # One plan per run; its probes (auto's samples of the codecs not in use) once.
        codec, wire, measures = compressor.execute(run.plan, raw, probe=not out.measures)
        out.measures += measures
        out.wire_bytes += len(wire)
        out.codecs[codec.name] = out.codecs.get(codec.name, 0) + 1
        if codec == Codec.RAW:
            out.records.append(BlockData(run.disk_id, sector, sectors, raw))
            out.raw_bytes += raw.nbytes
        else:
            out.compress_s += measures[-1].seconds
            out.records.append(BlockCompressed(run.disk_id, sector, sectors, codec, checksum(raw), raw, wire))
    return out


class RunPipeline:
    """Runs prepared on `workers` threads, handed back in submission order. `compressor`: a
    fresh Compressor for each worker (None: the workers only read and scan)."""

    def __init__(self, workers: int, depth: int, run_bytes: int,
                 compressor: Callable[[], Compressor] | None = None) -> None:
        self.depth = depth
        self._make_compressor = compressor
        self._bufs = [bytearray(run_bytes) for _ in range(depth)]
        self._free = list(range(depth))
        self._queue: deque[tuple[Future[Prepared], int]] = deque()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="migration-block")
        self.units = 0  # units submitted and not yet handed back

    def room(self) -> bool:
        return bool(self._free)

    def submit(self, run: Run) -> None:
        buf = self._free.pop()
        self._queue.append((self._pool.submit(self._work, run, buf), buf))
        self.units += run.count

    def pop(self) -> Prepared | None:
        """The oldest run, once prepared (a worker's error is raised here); None if none is in
        the pipeline. Its buffer is the caller's until `release`."""
        if not self._queue:
            return None
        fut, buf = self._queue.popleft()
        try:
            prepared = fut.result()
        except BaseException:
            self._free.append(buf)
            raise
        self.units -= prepared.run.count
        prepared.buf = buf
        return prepared

    def release(self, prepared: Prepared) -> None:
        self._free.append(prepared.buf)

    def close(self) -> None:
        """Drop what is queued and stop the workers (a run being read finishes first)."""
        for fut, _ in self._queue:
            fut.cancel()
        self._queue.clear()
        self.units = 0
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _work(self, run: Run, buf: int) -> Prepared:
        comp = None
        if self._make_compressor is not None:
            comp = getattr(self._local, "compressor", None)
            if comp is None:
                comp = self._local.compressor = self._make_compressor()
        return prepare(run, memoryview(self._bufs[buf]), comp)
