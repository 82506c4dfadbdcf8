"""`RamBlock`: one named range of guest RAM — its host mapping, its KVM memory slot, and its
dirty log (a `DirtyLog` of 4 KiB pages).

The dirty log has two producers: KVM's dirty log for the slot (guest writes; a harvester polled
at each sync: the slot's dirty bitmap, or with the VM's dirty ring on, the vCPUs' rings,
machine/dirty_ring.py) and every write the VMM itself makes to the block — `write()` notes the
pages it wrote, and a writer that goes through `view()` (a device doing DMA from its own thread) calls
`note_written(gpa, nbytes)` right after writing. A block without a VM (no KVM slot) has the VMM
producer only. Consumers (migration) each keep their own bitmap, filled at `sync_dirty()`.

Bitmap layout everywhere: bit i of little-endian u64 word j = page 64*j+i (KVM_GET_DIRTY_LOG
layout); page numbers are offsets inside the block, not guest addresses.

Order for a consumer that wants every page that may hold data (migration's "stage 1"):
`start_dirty_log()` first, then `add_dirty_consumer()` and `mark_dirty(name, populated_pages())`.
A page written after the dirty log started is then either populated when scanned or logged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading

import numpy as np

from vmferry.errors import VmferryError
from vmferry.kvm import ioctls as nr
from vmferry.kvm.vm import Vm
from vmferry.machine.dirty_log import DirtyLog
from vmferry.machine.dirty_ring import DirtyRing

PAGE_SIZE = 4096
# Python 3.11's mmap module lacks the constant; 0x4000 is its value on Linux (all arches).
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
MADV_POPULATE_WRITE = 23  # Linux 5.14
MADV_DONTNEED = 4
SYS_PIDFD_OPEN = 434  # x86_64 (and the generic table)
SYS_PROCESS_MADVISE = 440
IOV_MAX = 1024  # UIO_MAXIOV: ranges per process_madvise call


class _BatchedMadvise:
    """MADV_DONTNEED on many ranges per system call: process_madvise(2) on this process's own
    pidfd (the kernel takes MADV_DONTNEED there since Linux 6.13). Measured here (Linux 6.18,
    nested KVM): 60 000 ranges cost ~210 ms as one ctypes madvise call each, ~57 ms as 59
    process_madvise calls. Where the kernel refuses it (older kernels: EINVAL; no syscall:
    ENOSYS; a seccomp filter: EPERM), madvise per range."""

    def __init__(self) -> None:
        self._pid = -1
        self._pidfd = -1
        self.supported = True
        self._lock = threading.Lock()

    def _fd(self) -> int:
        with self._lock:
            if self._pid != os.getpid():  # a pidfd names one process: not a forked child's
                self._pid, self._pidfd = os.getpid(), int(_libc.syscall(SYS_PIDFD_OPEN, os.getpid(), 0))
                if self._pidfd < 0:
                    self.supported = False
            return self._pidfd

    def dontneed(self, iov: np.ndarray) -> bool:
        """iov: (n, 2) uint64 rows of (address, length), n <= IOV_MAX. False if the kernel did
        not do all of it this way (the caller then uses madvise per range)."""
        if not self.supported or not iov.shape[0]:
            return not iov.shape[0]
        fd = self._fd()
        if fd < 0:
            return False
        iov = np.ascontiguousarray(iov, dtype=np.uint64)
        done = _libc.syscall(SYS_PROCESS_MADVISE, fd, ctypes.c_void_p(iov.ctypes.data),
                             ctypes.c_size_t(iov.shape[0]), MADV_DONTNEED, 0)
        if done < 0:
            if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EBADF):
                self.supported = False
            return False
        return done == int(iov[:, 1].sum())  # short: some range failed; madvise says which


_batched_madvise = _BatchedMadvise()


class RamBlock:
    """Guest RAM [gpa, gpa+nbytes) backed by an anonymous private mapping, allocated lazily
    (MAP_NORESERVE: a page costs host memory only once something touches it).

    Private, not shared: first-touch faults on private anonymous memory cost half what shmem's
    do (measured), and a page the guest only ever read maps the kernel's zero page."""

    page_size = PAGE_SIZE

    def __init__(self, name: str, gpa: int, nbytes: int, vm: Vm | None = None, slot: int = -1,
                 ring: DirtyRing | None = None) -> None:
        if nbytes <= 0 or nbytes % PAGE_SIZE or gpa % PAGE_SIZE:
            raise VmferryError(f"RAM block {name}: size and address must be positive multiples of 4 KiB")
        self.name = name
        self.gpa = gpa
        self.nbytes = nbytes
        self.npages = nbytes // PAGE_SIZE
        self.mem = mmap.mmap(
            -1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        # The address is stable for the mapping's life; the temporary ctypes export is dropped
        # at once so the mmap can still be closed.
        anchor = ctypes.c_char.from_buffer(self.mem)
        self.host_addr: int = ctypes.addressof(anchor)
        del anchor
        self.vm: Vm | None = None
        self.slot = slot
        self._flags = 0
        self._lock = threading.RLock()  # the slot's registration (re-entered by release_dirty_consumer)
        self.dirty = DirtyLog(self.npages, f"RAM block {name}")
        self.ring: DirtyRing | None = None
        if vm is not None:
            self.attach(vm, slot, ring)

    @property
    def hva(self) -> int:
        return self.host_addr

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, gpa={self.gpa:#x}, nbytes={self.nbytes:#x}, slot={self.slot})"

    # --- mapping into the guest ---

    def attach(self, vm: Vm, slot: int, ring: DirtyRing | None = None) -> None:
        """Register the block as KVM memory slot `slot` of `vm`. With the VM's dirty ring on,
        guest writes come from the vCPUs' rings (`ring`), else from the slot's dirty bitmap."""
        self.vm, self.slot, self.ring = vm, slot, ring
        self._register(0)
        if ring is not None:
            ring.add_slot(slot, self.npages)
            self.dirty.add_harvester("kvm", self._harvest_kvm_ring)
        else:
            self.dirty.add_harvester("kvm", self._harvest_kvm_log)

    def _register(self, flags: int) -> None:
        assert self.vm is not None, "RAM block not attached to a VM"
        self.vm.set_user_memory_region(self.slot, self.gpa, self.nbytes, self.host_addr, flags)
        self._flags = flags

    def contains_gpa(self, gpa: int, nbytes: int = 1) -> bool:
        return self.gpa <= gpa and gpa + nbytes <= self.gpa + self.nbytes

    def view(self) -> memoryview:
        """A writable view of the whole block (byte 0 = guest physical `gpa`). Release it before
        close(). Touching a page through it populates that page."""
        return memoryview(self.mem)

    def write(self, gpa: int, data: bytes) -> None:
        """Copy `data` into guest RAM at guest physical `gpa` (must lie inside this block)."""
        if not self.contains_gpa(gpa, len(data)):
            raise VmferryError(f"{self.name}: write of {len(data)} bytes at {gpa:#x} outside the block")
        off = gpa - self.gpa
        # ctypes.memmove releases the GIL: during postcopy a page may still be missing, and a
        # thread that faults holding the GIL would stop the fault resolver (a deadlock).
        src = (ctypes.c_char * len(data)).from_buffer_copy(data) if data else None
        if src is not None:
            ctypes.memmove(self.host_addr + off, src, len(data))
        self._note(off, len(data))

    def note_written(self, gpa: int, nbytes: int) -> None:
        """Someone on the host side wrote [gpa, gpa+nbytes) through `view()` (a device doing DMA,
        a loader): record it in the dirty log. Call right after the write, never before."""
        if not self.contains_gpa(gpa, nbytes):
            raise VmferryError(f"{self.name}: {nbytes} bytes written at {gpa:#x} lie outside the block")
        self._note(gpa - self.gpa, nbytes)

    def _note(self, off: int, nbytes: int) -> None:
        if nbytes > 0:
            first = off // PAGE_SIZE
            self.dirty.note(first, (off + nbytes - 1) // PAGE_SIZE - first + 1)

    def read(self, gpa: int, nbytes: int) -> bytes:
        """Bytes of guest RAM at guest physical `gpa`. Like write(), safe on pages that are still
        missing under postcopy: the copy runs without the GIL."""
        if not self.contains_gpa(gpa, nbytes):
            raise VmferryError(f"{self.name}: read of {nbytes} bytes at {gpa:#x} outside the block")
        off = gpa - self.gpa
        out = ctypes.create_string_buffer(nbytes)
        ctypes.memmove(out, self.host_addr + off, nbytes)  # GIL released: see write()
        return out.raw

    def populate(self, first_page: int, npages: int) -> bool:
        """Allocate pages in one call instead of a fault per page (MADV_POPULATE_WRITE; the data
        already there is kept). False where the kernel cannot. ctypes releases the GIL: this is
        meant for a helper thread running ahead of a writer."""
        addr = self.host_addr + first_page * PAGE_SIZE
        return _libc.madvise(addr, npages * PAGE_SIZE, MADV_POPULATE_WRITE) == 0

    def discard(self, first_page: int, npages: int) -> None:
        """Drop pages (MADV_DONTNEED): on this private anonymous mapping they read as zero again
        and, under a userfaultfd in missing mode, are missing again (postcopy's discard)."""
        addr = self.host_addr + first_page * PAGE_SIZE
        if _libc.madvise(addr, npages * PAGE_SIZE, MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), f"madvise(DONTNEED) on RAM block {self.name}")

    def discard_mask(self, mask: np.ndarray) -> int:
        """Drop every page set in `mask` (bool per page) that is populated here: the runs of
        such pages, up to IOV_MAX of them per system call (_BatchedMadvise). Pages never
        touched are already missing and cost nothing. Returns the pages dropped."""
        drop = mask & self.populated_pages()
        edges = np.diff(drop.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts = np.flatnonzero(edges == 1)
        if not starts.size:
            return 0
        lengths = np.flatnonzero(edges == -1) - starts
        iov = np.empty((starts.size, 2), dtype=np.uint64)
        iov[:, 0] = self.host_addr + starts.astype(np.uint64) * PAGE_SIZE
        iov[:, 1] = lengths.astype(np.uint64) * PAGE_SIZE
        for at in range(0, starts.size, IOV_MAX):
            if not _batched_madvise.dontneed(iov[at : at + IOV_MAX]):
                for first, count in zip(starts[at : at + IOV_MAX].tolist(),
                                        lengths[at : at + IOV_MAX].tolist(), strict=True):
                    self.discard(first, count)
        return int(lengths.sum())

    def populated_pages(self) -> np.ndarray:
        """Bool per page: has anything ever touched it (guest or host)? From mincore(2), which
        reports the mapping's page-cache residency without reading (or populating) a page."""
        vec = np.zeros(self.npages, dtype=np.uint8)
        if _libc.mincore(self.host_addr, self.nbytes, vec.ctypes.data) != 0:
            raise OSError(ctypes.get_errno(), f"mincore on RAM block {self.name}")
        return (vec & 1).astype(bool)

    # --- dirty tracking: the block's DirtyLog (KVM's log + VMM writes -> consumers) ---

    @property
    def dirty_log_active(self) -> bool:
        return self.dirty.active

    def start_dirty_log(self) -> None:
        """Start the dirty log: with a VM, re-register the slot with KVM_MEM_LOG_DIRTY_PAGES.
        The log starts empty: with manual protect KVM pre-sets every bit (INITIALLY_SET), so that
        first harvest is discarded — consumers decide themselves which pages to start from (see
        the module docstring)."""
        with self._lock:
            if self.dirty.active:
                return
            if self.vm is not None:
                self._register(self._flags | nr.MEM_LOG_DIRTY_PAGES)
            self.dirty.start()

    def stop_dirty_log(self) -> None:
        """Stop the dirty log (and KVM's, re-registering the slot without it). Call sync_dirty()
        first to keep what was logged until now."""
        with self._lock:
            self.dirty.stop()
            if self.vm is not None and self._flags & nr.MEM_LOG_DIRTY_PAGES:
                self._register(self._flags & ~nr.MEM_LOG_DIRTY_PAGES)

    def add_dirty_consumer(self, name: str) -> None:
        """A new consumer: it sees the pages dirtied from now on (see DirtyLog.add_consumer)."""
        self.dirty.add_consumer(name)

    def remove_dirty_consumer(self, name: str) -> None:
        self.dirty.remove_consumer(name)

    def release_dirty_consumer(self, name: str) -> None:
        """Remove the consumer and, if it was the last, stop the dirty log — atomically, so a
        consumer that another thread adds meanwhile never finds the log stopped under it."""
        with self._lock:
            if self.dirty.remove_consumer(name) == 0 and self.dirty.active:
                self.stop_dirty_log()

    def dirty_bitmap(self, name: str) -> np.ndarray:
        """The consumer's own u64 bitmap, live: the consumer clears bits in it as it goes
        (bit i of little-endian u64 word j = page 64*j+i)."""
        return self.dirty.bitmap(name)

    def take_dirty(self, name: str) -> np.ndarray | None:
        """Copy and clear the consumer's bitmap in one step (None if no page is set)."""
        return self.dirty.take(name)

    def mark_dirty(self, name: str, page_mask: np.ndarray) -> None:
        """OR a bool-per-page mask into a consumer's bitmap (e.g. populated_pages())."""
        self.dirty.mark(name, page_mask)

    def dirty_pages(self, name: str) -> np.ndarray:
        """Indexes of the pages set in the consumer's bitmap."""
        return self.dirty.units(name)

    def sync_dirty(self) -> int:
        """Harvest KVM's dirty log for this slot (resetting it) and the VMM's noted writes, and
        OR them into every consumer's bitmap. Returns the number of pages found dirty. No-op
        while the log is not started."""
        return self.dirty.sync()

    def _harvest_kvm_log(self, out: np.ndarray) -> None:
        """KVM's log -> out, and reset KVM's log. With manual protect GET does not reset, so the
        same bitmap is handed to CLEAR_DIRTY_LOG over the whole slot (first page 0 is 64-aligned
        as CLEAR requires). A write racing between GET and CLEAR hits a page already in the
        harvest, so nothing is lost."""
        vm = self.vm
        if vm is None or not self._flags & nr.MEM_LOG_DIRTY_PAGES:
            return
        vm.get_dirty_log(self.slot, out)
        if vm.manual_dirty_protect and out.any():
            vm.clear_dirty_log(self.slot, 0, self.npages, out)

    def _harvest_kvm_ring(self, out: np.ndarray) -> None:
        """The ring producer: what the vCPUs' dirty rings logged for this slot -> out (the
        rings are reaped and reset first; machine/dirty_ring.py)."""
        if self.ring is not None and self._flags & nr.MEM_LOG_DIRTY_PAGES:
            self.ring.take_slot(self.slot, out)

    def close(self) -> None:
        """Remove the slot from the VM and unmap the RAM."""
        self.dirty.remove_harvester("kvm")
        if self.ring is not None:
            self.ring.remove_slot(self.slot)
        if self.vm is not None and self.vm.fd >= 0:
            self.vm.set_user_memory_region(self.slot, self.gpa, 0, self.host_addr, 0)
        self.vm = None
        self.mem.close()
