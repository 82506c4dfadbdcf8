"""`BlockBackend`: what a block device asks of the storage behind it.

Offsets and lengths are bytes; a device works in 512-byte sectors and checks a request fits in
`size` before calling. Calls come from the device's I/O thread and, while a migration runs, from
its threads too (a copied drive's reads, the pre-flush): a backend must allow calls from several
threads (a file's pread/pwrite/fdatasync do; the NBD client takes one round trip at a time).
`close()` comes after the I/O thread has stopped.

Two backends: `RawImage` (raw.py, an image file) and `NbdImage` (nbd_image.py, an NBD export:
`read_into`/`write` are NBD_CMD_READ/WRITE, `flush` NBD_CMD_FLUSH, `allocated_extents` the
base:allocation metadata context, and the image's lock is the server's business).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from vmferry.errors import VmferryError

SECTOR_SIZE = 512


class BlockError(VmferryError):
    """A drive could not be opened, locked or served; the message names the drive and the image."""


class BlockBackend(Protocol):
    @property
    def size(self) -> int:
        """Bytes the guest may address (the image size)."""
        ...

    @property
    def readonly(self) -> bool: ...

    def describe(self) -> dict:
        """QMP's BlockDeviceInfo shape for query-block's "inserted" member."""
        ...

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill `buf` from the image at `offset`; holes read as zeros without being read."""
        ...

    def write(self, offset: int, data: memoryview | bytes) -> None: ...

    def write_bulk(self, offset: int, data: memoryview | bytes) -> None:
        """A write of data nobody will read back soon (a migration destination filling a copied
        drive): a file writes it past the page cache where it can; otherwise `write`."""
        ...

    def flush(self) -> None:
        """Make every completed write durable (fdatasync for a file)."""
        ...

    def allocated_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """(offset, nbytes) of each range in [start, end) that may hold data; the rest are holes."""
        ...

    def write_zeroes(self, offset: int, nbytes: int) -> None:
        """Make the range read as zeros, deallocated where the storage can (a hole)."""
        ...

    @property
    def locked(self) -> bool:
        """Does this opener hold the image's lock (it may write without a second writer)?"""
        ...

    def lock(self) -> None:
        """Take the image's lock; BlockError naming the image if another opener conflicts."""
        ...

    def release_lock(self) -> None:
        """Give the lock up, keeping the image open (a migration hands the image over)."""
        ...

    def close(self) -> None: ...


def raw_drive_info(path: str, readonly: bool, size: int, **image: object) -> dict:
    """query-block's "inserted" for a raw format node over `path`, as QEMU 7.2 shows it; `image`
    adds fields of "image" (a file's "actual-size")."""
    return {"file": path, "ro": readonly, "drv": "raw", "encrypted": False,
            "backing_file_depth": 0, "detect_zeroes": "off", "bps": 0, "bps_rd": 0,
            "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0, "write_threshold": 0,
            "cache": {"writeback": True, "direct": False, "no-flush": False},
            "image": {"filename": path, "format": "raw", "virtual-size": size, **image}}
