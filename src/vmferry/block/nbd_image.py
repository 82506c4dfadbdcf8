"""`NbdImage`: an NBD export as a drive (`--drive file=nbd://HOST[:PORT]/EXPORT,format=raw` or
`file=nbd+unix:///EXPORT?socket=PATH`), so a qcow2 image — or any storage a server exports —
reaches the guest through `qemu-storage-daemon` or `qemu-nbd`. The server does the image format;
the drive sees the export's bytes (format=raw, as QEMU spells it for the same URI).

One connection per drive (block/nbd.py), made when the drive opens: a refused connection, an
unknown export, or a read-only export (NBD_FLAG_READ_ONLY) with a writable drive is a BlockError
naming the drive and the server before the guest runs. The calls are the device's I/O thread's
(and a migration's: its reads, its flushes), one round trip at a time; none comes from a vCPU
thread, and `describe()` (query-block, the monitor's thread) asks the server nothing.

Holes: `allocated_extents` asks base:allocation (NBD_CMD_BLOCK_STATUS) when the server offers
it, and a range the server says reads as zeros (NBD_STATE_ZERO) is a hole — a copied drive's
migration skips it; without the context, the whole export counts as allocated (correct, only
slower). Reads of holes come back as OFFSET_HOLE chunks with structured replies: not sent.

Locking: the server locks the image it serves (qemu-storage-daemon and qemu-nbd take QEMU's
locks on the file), so no other QEMU or vmferry opens it *as a file* for writing; between the
server's NBD clients there is no lock, in the protocol or here. `lock()` / `release_lock()`
only record who owns the drive in a migration's hand-over (the source flushes and gives it up
at switchover, the destination takes it before its guest runs), and the source's `cont` after a
completed migration is not refused by the export — two VMs would then write one export.
"""

from __future__ import annotations

from collections.abc import Iterator

from vmferry.block.backend import BlockError, raw_drive_info
from vmferry.block.nbd import (
    STATE_ZERO,
    NbdAddress,
    NbdClient,
    NbdConnectError,
    parse_nbd_uri,
)
from vmferry.block.options import DriveSpec


class NbdImage:
    def __init__(self, spec: DriveSpec, *, lock: bool = True) -> None:
        self.spec = spec
        self.path = spec.file  # the URI: what query-block and error messages show
        self._readonly = spec.readonly
        try:
            self.address: NbdAddress = parse_nbd_uri(spec.file)
        except ValueError as e:
            raise BlockError(f"drive {spec.id}: {e}") from None
        try:
            self.client = NbdClient(self.address)
        except NbdConnectError as e:
            raise BlockError(f"drive {spec.id}: {e}") from None
        if self.client.read_only and not spec.readonly:
            self.client.close()
            raise BlockError(f"drive {spec.id}: NBD export '{self.address.export}' on "
                             f"'{self.address.server}' is read-only (the server says "
                             "NBD_FLAG_READ_ONLY); add readonly=on to use it read-only")
        self.locked = lock

    # --- what the drive is ---

    @property
    def size(self) -> int:
        return self.client.info.size

    @property
    def readonly(self) -> bool:
        return self._readonly

    def describe(self) -> dict:
        # QEMU's -drive file=nbd...,format=raw: a raw format node over an nbd protocol node;
        # query-block's "drv" is the format's ("raw"), "file" the URI. No "actual-size": what
        # the export occupies is the server's to know.
        return raw_drive_info(self.path, self._readonly, self.size)

    # --- I/O ---

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.client.read_into(offset, buf)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        self.client.write(offset, data)

    def write_bulk(self, offset: int, data: memoryview | bytes) -> None:
        self.client.write(offset, data)  # the server's cache is the server's business

    def flush(self) -> None:
        self.client.flush()

    def write_zeroes(self, offset: int, nbytes: int) -> None:
        self.client.write_zeroes(offset, nbytes)

    def allocated_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        end = self.size if end is None else min(end, self.size)
        if start >= end:
            return
        if self.client.allocation_context is None:
            yield start, end - start  # the server cannot say: all of it may hold data
            return
        pos = start
        run: tuple[int, int] | None = None  # a data extent not yet yielded, merged with the next
        while pos < end:
            for length, flags in self.client.block_status(pos, end - pos):
                if not flags & STATE_ZERO:
                    if run is not None and run[0] + run[1] == pos:
                        run = (run[0], run[1] + length)
                    else:
                        if run is not None:
                            yield run
                        run = (pos, length)
                pos += length
        if run is not None:
            yield run

    # --- ownership (module doc: the server holds the image's lock) ---

    def lock(self) -> None:
        self.locked = True

    def release_lock(self) -> None:
        self.locked = False

    def close(self) -> None:
        self.client.close()
