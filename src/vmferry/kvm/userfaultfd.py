"""userfaultfd(2) bindings: missing-page faults of a mapping delivered to a thread that resolves
them (postcopy's destination).

A range registered in MISSING mode makes any access to a page that has no page-table entry
block the accessing thread — a vCPU inside KVM_RUN as well as any host thread — until someone
places the page (`copy`, `zeropage`) or wakes it (`wake`: the access retries). Closing the fd
unregisters everything and wakes every blocked access: they then fault in fresh zero pages.
That is the exit path that must come before closing the VM: a vCPU blocked on a page that
never comes would otherwise be stuck in the kernel (docs/migration.md, "Postcopy").

Numbers as measured on this host (shared/KVM-FACTS.md): syscall 323, UFFDIO_API 0xC018AA3F,
UFFDIO_REGISTER 0xC020AA00, UFFDIO_COPY 0xC028AA03, UFFDIO_ZEROPAGE 0xC020AA04; a fault message
is 32 bytes: event at 0, flags at 8, address at 16, the faulting thread id at 24 (with the
THREAD_ID feature).

Every call here releases the GIL (ctypes calls, os.read): a Python thread must never touch a
still-missing page any other way — it would block holding the GIL and the resolver could never
run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
from dataclasses import dataclass

from vmferry.errors import VmferryError

SYS_USERFAULTFD = 323  # x86-64
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1
MSG_SIZE = 32
PAGE_SIZE = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_MSG = struct.Struct("<B7xQQI4x")


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _Zeropage(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


@dataclass(frozen=True, slots=True)
class Fault:
    address: int  # the faulting host address (not page-aligned)
    write: bool
    thread_id: int  # the faulting thread's id as in /proc (0 without the THREAD_ID feature)


class UserfaultfdError(VmferryError):
    pass


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise UserfaultfdError(f"userfaultfd {what}: {os.strerror(err)}") from OSError(err, what)


class Userfaultfd:
    """One userfaultfd: non-blocking, close-on-exec, with thread ids in fault messages."""

    def __init__(self) -> None:
        fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            raise UserfaultfdError(f"userfaultfd is not available here: {os.strerror(err)} (postcopy "
                                   "needs it: root, or vm.unprivileged_userfaultfd=1)")
        self.fd = int(fd)
        api = _Api(UFFD_API, UFFD_FEATURE_THREAD_ID, 0)
        try:
            _check(_libc.ioctl(self.fd, UFFDIO_API, ctypes.byref(api)), "UFFDIO_API")
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        # Woken by close() so a reader blocked in wait() returns.
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        self._poll.register(self._stop_r, select.POLLIN)
        self._buf = bytearray(MSG_SIZE * 64)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def register(self, addr: int, nbytes: int) -> None:
        """Missing-page mode over [addr, addr+nbytes): page-aligned, one whole mapping or part."""
        reg = _Register(_Range(addr, nbytes), UFFDIO_REGISTER_MODE_MISSING, 0)
        _check(_libc.ioctl(self.fd, UFFDIO_REGISTER, ctypes.byref(reg)), f"register {addr:#x}+{nbytes:#x}")

    def unregister(self, addr: int, nbytes: int) -> None:
        """Stop catching faults there; still-missing pages then fault in as zero pages."""
        rng = _Range(addr, nbytes)
        _check(_libc.ioctl(self.fd, UFFDIO_UNREGISTER, ctypes.byref(rng)), "unregister")

    def wake(self, addr: int, nbytes: int) -> None:
        """Wake threads blocked on faults in the range (they retry the access)."""
        rng = _Range(addr, nbytes)
        _check(_libc.ioctl(self.fd, UFFDIO_WAKE, ctypes.byref(rng)), "wake")

    def copy(self, dst: int, src: int, nbytes: int) -> bool:
        """Place `nbytes` from host address `src` at missing pages [dst, dst+nbytes) atomically
        and wake whoever waits on them. False if a page there already exists (EEXIST: placed
        before; the range is left as it was from that page on)."""
        c = _Copy(dst, src, nbytes, 0, 0)
        while True:
            if _libc.ioctl(self.fd, UFFDIO_COPY, ctypes.byref(c)) == 0:
                return True
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                return False
            if err == errno.EAGAIN and c.copy > 0:  # partial: go on from where it stopped
                c.dst, c.src, c.len = c.dst + c.copy, c.src + c.copy, c.len - c.copy
                c.copy = 0
                continue
            raise UserfaultfdError(f"userfaultfd copy to {dst:#x}+{nbytes:#x}: {os.strerror(err)}")

    def zeropage(self, dst: int, nbytes: int) -> bool:
        """Map zero pages at missing pages [dst, dst+nbytes) and wake; False on EEXIST."""
        z = _Zeropage(_Range(dst, nbytes), 0, 0)
        if _libc.ioctl(self.fd, UFFDIO_ZEROPAGE, ctypes.byref(z)) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        raise UserfaultfdError(f"userfaultfd zeropage at {dst:#x}+{nbytes:#x}: {os.strerror(err)}")

    def wait(self, timeout_s: float | None = None) -> list[Fault]:
        """Block (GIL released) until faults arrive, close() is called or `timeout_s` passes;
        returns the faults read (empty on timeout or close)."""
        ms = -1 if timeout_s is None else max(0, round(timeout_s * 1000))
        try:
            ready = self._poll.poll(ms)
        except (OSError, ValueError):
            return []
        if self.fd < 0 or not any(fd == self.fd for fd, _ in ready):
            return []
        return self.read()

    def wait_with(self, other_fd: int, timeout_s: float) -> tuple[list[Fault], bool]:
        """wait() on the userfaultfd and `other_fd` at once (one thread serves both: postcopy's
        preempt channel): the faults read, and whether `other_fd` is readable (or hung up)."""
        if other_fd < 0:
            return self.wait(timeout_s), False
        poll = select.poll()
        for fd in (self.fd, self._stop_r, other_fd):
            if fd >= 0:
                poll.register(fd, select.POLLIN)
        try:
            ready = poll.poll(max(0, round(timeout_s * 1000)))
        except (OSError, ValueError):
            return [], False
        other = any(fd == other_fd for fd, _ in ready)
        if self.fd < 0 or not any(fd == self.fd for fd, _ in ready):
            return [], other
        return self.read(), other

    def read(self) -> list[Fault]:
        """The fault messages waiting now (none if there are none)."""
        if self.fd < 0:
            return []
        try:
            n = os.readv(self.fd, [self._buf])
        except BlockingIOError:
            return []
        out = []
        for off in range(0, n - n % MSG_SIZE, MSG_SIZE):
            event, flags, address, tid = _MSG.unpack_from(self._buf, off)
            if event == UFFD_EVENT_PAGEFAULT:
                out.append(Fault(address, bool(flags & UFFD_PAGEFAULT_FLAG_WRITE), tid))
        return out

    def close(self) -> None:
        """Unregister everything and wake every blocked access (they fault in zero pages), and
        wake a thread blocked in wait(). Idempotent."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        os.write(self._stop_w, b"x")
        os.close(fd)

    def release(self) -> None:
        """close() and the wake-up pipe; only once no thread waits in wait() any more."""
        self.close()
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1
