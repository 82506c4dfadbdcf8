"""`RawImage`: a raw image file as a drive — sparse-aware, locked the way QEMU locks it.

Reads ask the file where its data is (`SEEK_DATA`/`SEEK_HOLE`) and fill holes with zeros without
reading them, so a sparse image stays sparse in the page cache and costs no disk reads; writes go
to the file with `pwrite` (the kernel allocates what they touch and nothing else). `flush` is
`fdatasync`. `write_bulk` (a migration destination filling a copied drive) writes aligned runs
with O_DIRECT, past the page cache: the data is not read back soon, and filling the cache costs
far more than the write on hosts where fresh memory is slow to touch (measured on this project's
2-core VM: 300 MiB/s into fresh page cache, 1.5 GB/s O_DIRECT; bench/RESULTS.md). The image is
opened O_RDWR unless the drive is read-only, and locked (block/lock.py)
before anything is read — except on a migration destination, which opens it unlocked
(`lock=False`) and takes the lock (`lock()`) when it owns the image: before it writes into it, or
before the guest runs on a shared image the source still holds until switchover.
`release_lock()` is the source's side of that hand-over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
import threading
from collections.abc import Iterator

from vmferry.block.backend import BlockError, raw_drive_info
from vmferry.block.lock import LockConflict, lock_image, unlock_image
from vmferry.block.options import DriveSpec

# SEEK_DATA/SEEK_HOLE: os has them on Linux; a filesystem without support answers as if the file
# were all data (lseek(SEEK_DATA) = offset, SEEK_HOLE = size), which is still correct.

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
# O_DIRECT wants offset, length and buffer aligned to the device's logical block; 4 KiB covers
# every device this runs on. Larger writes go through the aligned buffer in pieces of this size.
DIRECT_ALIGN = 4096
DIRECT_CHUNK = 1 << 20


class RawImage:
    def __init__(self, spec: DriveSpec, *, lock: bool = True) -> None:
        self.spec = spec
        self.path = spec.file
        self._readonly = spec.readonly
        self.locked = False
        flags = (os.O_RDONLY if spec.readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(spec.file, flags)
        except OSError as e:
            raise BlockError(self._open_error(e)) from None
        self._direct_fd: int | None = None  # write_bulk's O_DIRECT descriptor, opened at first use
        self._direct_buf: mmap.mmap | None = None  # page-aligned, for O_DIRECT
        self._direct_lock = threading.Lock()
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise BlockError(f"drive {spec.id}: '{spec.file}' is not a regular file")
            self._size = st.st_size
            if lock:
                self.lock()
        except BaseException:
            os.close(self.fd)
            raise

    def lock(self) -> None:
        """Take QEMU's lock bytes (idempotent); a conflict is a BlockError naming the image and
        leaves nothing taken."""
        if self.locked:
            return
        try:
            lock_image(self.fd, self._readonly)
        except LockConflict as e:
            unlock_image(self.fd)
            raise BlockError(f"drive {self.spec.id}: {e} on '{self.path}': is another process "
                             "using the image?") from None
        self.locked = True

    def release_lock(self) -> None:
        """Drop the lock bytes; the image stays open (a migration source at switchover)."""
        if self.locked and self.fd >= 0:
            unlock_image(self.fd)
            self.locked = False

    def _open_error(self, e: OSError) -> str:
        what = f"drive {self.spec.id}: Could not open '{self.spec.file}': {e.strerror}"
        # Readable but not writable: say how to use it anyway.
        if not self.spec.readonly and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and (
                os.access(self.spec.file, os.R_OK) or e.errno != errno.EACCES):
            what += " (the image is not writable; add readonly=on to use it read-only)"
        return what

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self._readonly

    def describe(self) -> dict:
        return raw_drive_info(self.path, self._readonly, self._size, **{"actual-size": self.actual_size()})

    def actual_size(self) -> int:
        """Bytes the file occupies on disk (st_blocks), as qemu-img's "disk size"."""
        return os.fstat(self.fd).st_blocks * 512

    def allocated_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        end = self._size if end is None else min(end, self._size)
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data at or after pos
                    return
                raise
            if data >= end:
                return
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            yield data, hole - data
            pos = hole

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        pos = offset
        for data, length in self.allocated_extents(offset, offset + n):
            if data > pos:
                buf[pos - offset : data - offset] = bytes(data - pos)  # a hole: zeros, not read
            self._pread_full(buf[data - offset : data - offset + length], data)
            pos = data + length
        if pos < offset + n:
            buf[pos - offset :] = bytes(offset + n - pos)

    def _pread_full(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got == 0:  # the file shrank under us: the rest reads as zeros, like a hole
                buf[done:] = bytes(len(buf) - done)
                return
            done += got

    def write(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def write_bulk(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if offset % DIRECT_ALIGN or view.nbytes % DIRECT_ALIGN or self._readonly:
            self.write(offset, view)
            return
        with self._direct_lock:
            fd = self._direct()
            if fd < 0:
                self.write(offset, view)
                return
            buf = self._direct_buf
            assert buf is not None
            done = 0
            while done < view.nbytes:
                n = min(DIRECT_CHUNK, view.nbytes - done)
                buf[:n] = view[done : done + n]
                w = 0
                try:
                    while w < n:
                        w += os.pwrite(fd, memoryview(buf)[w:n], offset + done + w)
                except OSError as e:
                    if e.errno != errno.EINVAL or done or w:
                        raise
                    self._direct_fd = -1  # opened, but this filesystem refuses such writes
                    os.close(fd)
                    self.write(offset, view)
                    return
                done += n

    def _direct(self) -> int:
        """The O_DIRECT descriptor of the same open file (reopened through /proc, so a renamed
        image is still the one written); -1 where the filesystem refuses O_DIRECT (tmpfs before
        Linux 6.6): `write_bulk` then writes through the cache."""
        if self._direct_fd is None:
            try:
                flags = os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC
                self._direct_fd = os.open(f"/proc/self/fd/{self.fd}", flags)
                self._direct_buf = mmap.mmap(-1, DIRECT_CHUNK)
            except OSError:
                self._direct_fd = -1
        return self._direct_fd

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def write_zeroes(self, offset: int, nbytes: int) -> None:
        """Make [offset, +nbytes) read as zeros by deallocating it (a hole), so a run of zeros
        copied from another image stays a hole here. A filesystem that cannot punch holes gets
        the zeros written."""
        if _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, nbytes) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        zeros = bytes(min(nbytes, 1 << 20))
        done = 0
        while done < nbytes:
            n = min(len(zeros), nbytes - done)
            self.write(offset + done, memoryview(zeros)[:n])
            done += n

    def close(self) -> None:
        with self._direct_lock:
            if self._direct_fd is not None and self._direct_fd >= 0:
                os.close(self._direct_fd)
            self._direct_fd = -1
            if self._direct_buf is not None:
                self._direct_buf.close()
                self._direct_buf = None
        if self.fd >= 0:
            os.close(self.fd)  # releases the OFD locks with the open file description
            self.fd = -1

