"""The one way vmferry calls ioctl(2) on a KVM file descriptor.

We call libc's ioctl through ctypes rather than fcntl.ioctl because fcntl.ioctl passes an int
argument as a C int (KVM_SET_TSS_ADDR's 0xfffbd000 overflows) and copies buffers of up to 1 KiB
through a temporary. ctypes releases the GIL for the call, which matters for KVM_RUN: other
Python threads keep running while a vCPU is inside the guest.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as errno_mod
import os

from vmferry.errors import KvmError
from vmferry.kvm.ioctls import Ioctl

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

Arg = ctypes.Structure | ctypes.Array | int | None


def ioctl(fd: int, req: Ioctl, arg: Arg = None) -> int:
    """Issue `req` on `fd`; return the ioctl's non-negative result or raise KvmError.

    `arg` is a ctypes object (passed by address: the caller owns it and it only has to live
    for this call) or an int (passed by value, as the full 64-bit register). EINTR is raised
    as KvmError too; KVM_RUN's caller handles it through `ioctl_run`.
    """
    if arg is None:
        value: int | None = 0
    elif isinstance(arg, int):
        value = arg
    else:
        value = ctypes.addressof(arg)
    rc = _libc.ioctl(fd, req.number, value)
    if rc < 0:
        raise KvmError(req.name, ctypes.get_errno())
    return rc


def ioctl_errno(fd: int, req: Ioctl, arg: Arg = None) -> tuple[int, int]:
    """Like `ioctl` but returns (rc, errno) instead of raising: for calls whose failure is
    part of the protocol (E2BIG size probes, EINTR from KVM_RUN)."""
    value = arg if isinstance(arg, int) else (0 if arg is None else ctypes.addressof(arg))
    rc = _libc.ioctl(fd, req.number, value)
    return rc, (ctypes.get_errno() if rc < 0 else 0)


class KvmFd:
    """An owned KVM file descriptor; closed by close() or when the owner is collected."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ioctl(self, req: Ioctl, arg: Arg = None) -> int:
        return ioctl(self.fd, req, arg)

    def close(self) -> None:
        # getattr: __del__ may run on an object whose __init__ failed before fd was set.
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


EINTR = errno_mod.EINTR
E2BIG = errno_mod.E2BIG
