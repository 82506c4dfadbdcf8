"""Drives on the saver contract (migration/saver.py): who owns each image, and the contents of
the drives that are copied.

Every drive is either *shared* (the default: source and destination open the same image) or
*copied* (QMP `migrate` with `blk: true`, all writable drives, or the `x-block-drives`
parameter): its contents travel in the stream, on the same passes and the same expected-downtime
figure as RAM.

Source (`DriveSaver`):

    setup      BLOCK_DEVICES: every drive (id, drive id, size), the shared ones flagged shared,
               so the destination checks them all before the guest's RAM arrives (and a
               snapshot records which drives it needs); copied drives' dirty logs start (the
               device notes each completed write, 4 KiB units); every allocated unit is marked
               to send, and each hole goes out at once as a BLOCK_ZERO run, so the
               destination's image gets the same holes
    iterate    (before RAM's in each pass: `bulk_first`; while their backlog is large, RAM
               waits: convergence.hold_back) runs of marked units, up to 1 MiB each, read
               through the backend: BLOCK_DATA, or BLOCK_ZERO for 4 KiB units that read as
               zeros (the destination punches them); with `x-block-compression` a data run
               goes through the stream's compressor (stream/compression.py: zstd, zlib, lz4,
               or `auto`, which sends raw unless compressing measurably finishes sooner) and,
               compressed, as BLOCK_COMPRESSED with the xxh3 of its raw bytes. Two workers
               read (and compress) the runs ahead of the sends (block_pipeline.py)
    sync       fold the drives' dirty logs in; start an fdatasync of every writable image on a
               thread (the pre-flush), so the one in the pause has only the last writes to write
    complete   (vCPUs paused, drives quiesced) the rest; then, once a pre-flush under way has
               ended, every drive, copied or shared, is flushed and its image lock given up
               (`VirtioBlk.release_image`): the destination may take it. A failed migration
               takes it back when the source resumes.
    pending    marked units x 4 KiB (compressing: the larger of what they shrink to and the
               compression time in bytes the link carries meanwhile, from what was sent lately:
               `compressed_pending`): the session's one expected downtime covers RAM and disks
    units      (units sent, units marked): with RAM's pages, what the switchover rule weighs

Destination (`DriveLoader`): BLOCK_DEVICES is checked before any byte is written — each drive
exists here (by id) and has exactly the source's size, and a copied one is writable — and the
copied drives' images are locked at once (they are written from now on). BLOCK_DATA is written,
BLOCK_ZERO punched, BLOCK_COMPRESSED written once the decoder has decompressed it and checked its
raw bytes against the record's checksum; a flusher thread fdatasyncs the copied images while the
stream arrives, so the flush
`complete` makes (END verified, before the device state is applied and the guest runs: the
guest's earlier FLUSHes must hold here too) covers only what came last — measured, a 4.5 MB
copy's fdatasync at END was ~50 ms of downtime. `complete` also locks the shared images, which
the source released at switchover.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vmferry.block.backend import SECTOR_SIZE, BlockBackend
from vmferry.devices.virtio_blk import DIRTY_UNIT, VirtioBlk
from vmferry.errors import MigrationError
from vmferry.machine.dirty_log import bitmap_to_units, units_to_bitmap
from vmferry.migration.block_pipeline import Prepared, Run, RunPipeline
from vmferry.migration.saver import Buffer, Handler, Loader, Saver, SaverOutput
from vmferry.stream.compression import Compressor, Estimate
from vmferry.stream.records import BlockCompressed, BlockData, BlockDevices, BlockZero, CommandCode, DiskInfo

CONSUMER = "migration"
RUN_UNITS = 256  # units per BLOCK_DATA record at most (1 MiB)
RATIO_WINDOW = 64 << 20  # pending's wire/raw ratio weighs about the last this many raw bytes
SECTORS_PER_UNIT = DIRTY_UNIT // SECTOR_SIZE
# The pipeline (block_pipeline.py): workers reading and compressing runs, and the runs in it at
# most. Two workers keep this host's 2 cores busy compressing while the migration thread sends;
# six runs give each worker one to do while another waits to be sent.
PIPELINE_WORKERS = 2
PIPELINE_DEPTH = 6


def select_copied(drives: Sequence[VirtioBlk], blk: bool, ids: Iterable[str]) -> list[str]:
    """The drive ids a migration copies: every writable drive with `blk`, plus those named in
    `x-block-drives`. A name that is not a drive, or a read-only drive, is refused by name."""
    by_id = {d.drive_id: d for d in drives}
    chosen: list[str] = [d.drive_id for d in drives if blk and not d.backend.readonly]
    for name in ids:
        dev = by_id.get(name)
        if dev is None:
            have = ", ".join(by_id) or "none"
            raise MigrationError(f"x-block-drives: this VM has no drive '{name}' (drives: {have})")
        if dev.backend.readonly:
            raise MigrationError(f"x-block-drives: drive '{name}' is read-only; only writable drives "
                                 "are copied (a read-only image is shared)")
        if name not in chosen:
            chosen.append(name)
    return [d.drive_id for d in drives if d.drive_id in chosen]


@dataclass
class _Copied:
    disk_id: int
    dev: VirtioBlk
    nbytes: int  # whole sectors: what the stream can carry
    nunits: int
    sent_bytes: int = 0  # of BLOCK_DATA payload
    sent_units: int = 0  # 4 KiB units sent (data or zero)
    # Units taken from the dirty log (DirtyLog.take, atomic against any sync) and not yet sent;
    # only the migration thread touches it.
    todo: np.ndarray | None = None


class DriveSaver(Saver):
    name = "drives"
    bulk_first = True  # a disk is rewritten far more slowly than RAM for its size

    def __init__(self, drives: Sequence[VirtioBlk], copy: Sequence[str] = (),
                 compressor: Compressor | None = None) -> None:
        """`compressor`: x-block-compression's (None or setting "none": every data run raw)."""
        self.drives = list(drives)
        self.compressor = compressor if compressor is not None and compressor.setting != "none" else None
        self._ratio = Estimate(RATIO_WINDOW)  # stream bytes per raw byte sent, lately
        self._cost = Estimate(RATIO_WINDOW)  # compressing: seconds per raw byte compressed, lately
        self.bandwidth: Callable[[], float] = lambda: 0.0  # the session's (bytes/s), set by the driver
        # Disk ids 1..n in drive order; the copied ones carry their contents.
        self.copied = [
            _Copied(i, d, _sectors_bytes(d), -(-_sectors_bytes(d) // DIRTY_UNIT))
            for i, d in enumerate(drives, start=1) if d.drive_id in copy
        ]
        self.transferred = 0  # stream bytes of BLOCK_* records
        self._tracking = False
        # The pipeline's workers compress, each with a compressor of its own; the plans (and
        # `auto`'s policy) are this compressor's, on the migration thread (block_pipeline.py).
        comp = self.compressor
        make = None
        if comp is not None:
            comp.policy.workers = PIPELINE_WORKERS
            make = lambda: Compressor(comp.setting, comp.zlib_level, comp.zstd_level)  # noqa: E731
        self.workers = PIPELINE_WORKERS
        self._pipe = RunPipeline(self.workers, PIPELINE_DEPTH, RUN_UNITS * DIRTY_UNIT, make)
        # fdatasync of every image at each sync, in the background, so the one at switchover
        # (in the pause) finds only what the guest wrote since the last sync.
        self._preflush = _Flusher()

    # --- progress (query-migrate's disk section) ---

    def total(self) -> int:
        return sum(c.nbytes for c in self.copied)

    def progress(self) -> dict[str, int]:
        return {"transferred": self.transferred, "remaining": self.remaining(), "total": self.total()}

    def compressed(self) -> dict[str, int]:
        """How often each codec carried a data run (query-migrate's disk `compression`)."""
        return dict(self.compressor.chosen) if self.compressor is not None else {}

    # --- the contract ---

    def setup(self, out: SaverOutput) -> None:
        if not self.drives:
            return  # a machine without drives sends what it sent before drives migrated
        enc = out.encoder
        copied = {c.dev.drive_id for c in self.copied}
        self.transferred += out.send([enc.encode(BlockDevices(tuple(
            DiskInfo(i, d.drive_id, _sectors_bytes(d), shared=d.drive_id not in copied)
            for i, d in enumerate(self.drives, start=1))))])
        for c in self.copied:
            log = c.dev.dirty
            log.start()
            log.add_consumer(CONSUMER)
            self._tracking = True
            mask = np.zeros(log.nunits, dtype=bool)
            holes: list[tuple[int, int]] = []
            pos = 0
            for off, length in c.dev.backend.allocated_extents(0, c.nbytes):
                mask[off // DIRTY_UNIT : -(-(off + length) // DIRTY_UNIT)] = True
                if off > pos:
                    holes.append((pos, off - pos))
                pos = off + length
            if pos < c.nbytes:
                holes.append((pos, c.nbytes - pos))
            log.mark(CONSUMER, mask)
            recs = []
            for off, length in holes:
                # Whole units only: a unit shared with data goes as data.
                first = -(-off // DIRTY_UNIT) * DIRTY_UNIT
                end = (off + length) // DIRTY_UNIT * DIRTY_UNIT if off + length < c.nbytes else c.nbytes
                if end > first:
                    recs.append(enc.encode(BlockZero(c.disk_id, first // SECTOR_SIZE,
                                                     (end - first) // SECTOR_SIZE)))
            for i in range(0, len(recs), 256):
                self.transferred += out.send(recs[i : i + 256])

    def sync(self) -> None:
        for c in self.copied:
            c.dev.dirty.sync()
        for d in self.drives:
            if not d.backend.readonly:
                self._preflush.mark(d.backend)

    def pending(self) -> int:
        """What the marked units will cost, in stream bytes: raw, or (compressing) what
        `compressed_pending` makes of the last RATIO_WINDOW raw bytes' ratio and compression
        time."""
        raw = self.remaining()
        if self.compressor is None or not self._ratio.known:
            return raw
        cost = self._cost.cost if self._cost.known else 0.0
        return compressed_pending(raw, self._ratio.ratio, cost, self.bandwidth())

    def remaining(self) -> int:
        """Bytes of marked units (taken from the logs or not) still to send."""
        if not self._tracking:
            return 0
        n = 0
        for c in self.copied:
            n += int(np.bitwise_count(c.dev.dirty.bitmap(CONSUMER)).sum())
            if c.todo is not None:
                n += int(np.bitwise_count(c.todo).sum())
        return (n + self._pipe.units) * DIRTY_UNIT

    def iterate(self, out: SaverOutput, budget_bytes: int) -> int:
        sent = 0
        for c in self.copied:
            if sent >= budget_bytes:
                break
            sent += self._send(out, c, budget_bytes - sent)
        return sent

    def units(self) -> tuple[int, int]:
        return sum(c.sent_units for c in self.copied), self.remaining() // DIRTY_UNIT

    def complete(self, out: SaverOutput) -> None:
        for c in self.copied:
            c.dev.dirty.sync()
        for c in self.copied:
            while self._send(out, c, 1 << 62):
                pass
        self._pipe.close()
        self._preflush.stop()  # a background flush under way ends; release_image flushes the rest
        for d in self.drives:
            d.release_image()

    def cleanup(self) -> None:
        self._pipe.close()
        self._preflush.stop()
        if not self._tracking:
            return
        for c in self.copied:
            c.dev.dirty.remove_consumer(CONSUMER)
            c.dev.dirty.stop()
        self._tracking = False

    # --- sending ---

    def _send(self, out: SaverOutput, c: _Copied, budget: int) -> int:
        """Send marked units of one drive, run by run, until `budget` bytes went out or none is
        left (of this drive, nor in the pipeline); returns the bytes sent. A unit is taken from
        the dirty log before it is read: a write landing meanwhile marks it again (dirty_log.py's
        order rule), so it is sent again, never lost. The runs are read (and compressed) on the
        pipeline's workers a few runs ahead of the sends."""
        taken = c.dev.dirty.take(CONSUMER)
        if c.todo is None:
            c.todo = np.zeros(c.dev.dirty.nwords, dtype=np.uint64)
        if taken is not None:
            c.todo |= taken
        units = bitmap_to_units(c.todo, c.nunits)
        c.todo[:] = 0  # all taken; what is not submitted is marked again below
        runs = _runs(units)
        submitted = submitted_units = 0
        sent = 0
        while True:
            while submitted < len(runs) and self._pipe.room():
                first, count = runs[submitted]
                plan = self.compressor.plan_chunk() if self.compressor is not None else None
                self._pipe.submit(Run(c, c.dev.backend, c.disk_id, c.nbytes, first, count, plan))
                submitted += 1
                submitted_units += count
            if sent >= budget or out.cancelled():
                break
            prepared = self._pipe.pop()
            if prepared is None:
                break
            try:
                sent += self._send_prepared(out, prepared)
            finally:
                self._pipe.release(prepared)
        if submitted_units < len(units):
            rest = np.zeros(c.nunits, dtype=bool)
            rest[units[submitted_units:]] = True
            c.todo |= units_to_bitmap(rest)
        return sent

    def _send_prepared(self, out: SaverOutput, p: Prepared) -> int:
        c: _Copied = p.run.owner
        enc = out.encoder
        bufs: list[Buffer] = []
        for rec in p.records:
            bufs += enc.encode_buffers(rec)
        if self.compressor is not None:
            self.compressor.account(p.measures, p.raw_bytes, p.codecs)
            if p.compress_s:
                self._cost.add(p.compress_s / self.workers, p.data_bytes, p.wire_bytes)
        t = time.perf_counter()
        n = out.send(bufs)
        if self.compressor is not None:
            # `auto` measures the wire on raw runs, and decides
            self.compressor.sent(time.perf_counter() - t, p.run.plan)
            self._ratio.add(0.0, p.run.count * DIRTY_UNIT, n)
        c.sent_bytes += p.data_bytes
        self.transferred += n
        c.sent_units += p.run.count
        return n


def _runs(units: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unit indexes -> (first, count) runs of consecutive units, RUN_UNITS at most each."""
    runs: list[tuple[int, int]] = []
    if len(units) == 0:
        return runs
    breaks = np.flatnonzero(np.diff(units) != 1) + 1
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(units)], strict=True):
        first, count = int(units[lo]), int(hi - lo)
        for i in range(0, count, RUN_UNITS):
            runs.append((first + i, min(RUN_UNITS, count - i)))
    return runs


def compressed_pending(raw: int, ratio: float, secs_per_byte: float, bandwidth_bps: float) -> int:
    """`raw` bytes of a drive still to send, as stream bytes the expected downtime can divide by
    the bandwidth: the larger of what they shrink to (`ratio`, stream bytes per raw byte) and the
    time compressing them takes (`secs_per_byte`, the pipeline's workers together) counted in
    the bytes the link would carry meanwhile — the workers compress while the migration thread
    sends, so the slower of the two is what counts, and a codec slower than the link weighs more
    than raw, never less (as XBZRLE's pages do in ram.py)."""
    compress = secs_per_byte * max(bandwidth_bps, 0.0)
    return int(raw * max(ratio, compress))


def _sectors_bytes(dev: VirtioBlk) -> int:
    """The drive's size in whole sectors (what the guest sees and the stream carries)."""
    return dev.backend.size // SECTOR_SIZE * SECTOR_SIZE


class _Flusher:
    """fdatasync of the images written since the last one, on a thread of its own."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._dirty: dict[int, BlockBackend] = {}
        self._busy = False
        self._stop = False
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def mark(self, backend: BlockBackend) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="migration-flush", daemon=True)
                self._thread.start()
            self._dirty[id(backend)] = backend
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                todo, self._dirty = list(self._dirty.values()), {}
                self._busy = True
            for backend in todo:
                try:
                    backend.flush()
                except OSError as e:
                    self.error = f"flushing '{getattr(backend, 'path', '?')}': {e.strerror}"
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def stop(self) -> None:
        """Let a flush under way finish and stop; what it did not cover, the caller flushes."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()


class DriveLoader(Loader):
    name = "drives"

    def __init__(self, drives: Sequence[VirtioBlk]) -> None:
        self.drives = list(drives)
        self._by_disk: dict[int, VirtioBlk] = {}
        self.received = 0  # bytes of BLOCK_DATA written
        self.total = 0
        self._flusher = _Flusher()

    def handlers(self) -> Mapping[type | CommandCode, Handler]:
        return {BlockDevices: self._on_devices, BlockData: self._on_data, BlockZero: self._on_zero,
                BlockCompressed: self._on_data}

    def _on_devices(self, rec: BlockDevices) -> None:
        by_id = {d.drive_id: d for d in self.drives}
        # Every check first, then the locks: a refused stream writes nothing and locks nothing.
        for info in rec.devices:
            dev = by_id.get(info.name)
            if dev is None:
                have = ", ".join(by_id) or "none"
                how = "shares" if info.shared else "copies"
                raise MigrationError(f"the source {how} drive '{info.name}', but this destination "
                                     f"has no such drive (drives: {have}): add --drive ...,id={info.name}")
            if info.sector_size != SECTOR_SIZE:
                raise MigrationError(f"drive {info.name}: the stream's sector size is "
                                     f"{info.sector_size}; this drive's is {SECTOR_SIZE}")
            ours = dev.backend.size // SECTOR_SIZE * SECTOR_SIZE
            if info.size != ours:
                raise MigrationError(
                    f"drive {info.name}: the source's image is {info.size} bytes but this destination's "
                    f"'{getattr(dev.backend, 'path', '?')}' is {ours} bytes; create it with the same "
                    f"size (truncate -s {info.size} IMAGE)")
            if dev.backend.readonly and not info.shared:
                raise MigrationError(f"drive {info.name}: the source copies it, but it is read-only here")
        for info in rec.devices:
            if info.shared:
                continue  # the source holds the image until switchover: locked in complete()
            dev = by_id[info.name]
            dev.backend.lock()  # BlockError naming the image if another VMM holds it
            self._by_disk[info.id] = dev
            self.total += info.size

    def _drive(self, disk_id: int) -> VirtioBlk:
        # The decoder checked the id was listed and the run lies inside the disk.
        return self._by_disk[disk_id]

    def _on_data(self, rec: BlockData | BlockCompressed) -> None:
        backend = self._drive(rec.disk_id).backend
        backend.write_bulk(rec.first_sector * SECTOR_SIZE, rec.data)
        self.received += len(rec.data)
        self._flusher.mark(backend)

    def _on_zero(self, rec: BlockZero) -> None:
        backend = self._drive(rec.disk_id).backend
        backend.write_zeroes(rec.first_sector * SECTOR_SIZE, rec.sector_count * SECTOR_SIZE)
        self._flusher.mark(backend)

    def complete(self) -> None:
        self._flusher.stop()
        if self._flusher.error:
            raise MigrationError(f"a copied drive could not be flushed: {self._flusher.error}")
        for dev in self._by_disk.values():
            dev.backend.flush()  # what came last; the flusher covered the rest
        for dev in self.drives:
            dev.backend.lock()  # the shared images: the source released them at switchover

    def release(self) -> None:
        self._flusher.stop()
