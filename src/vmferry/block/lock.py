"""Image locking the way QEMU's file-posix driver does it, so vmferry and QEMU refuse each other.

QEMU expresses what an opener does and what it lets others do as permission bits (block.h):
bit 0 "consistent read", 1 "write", 2 "write unchanged", 3 "resize". With open file description
(OFD) locks (`F_OFD_SETLK`, Linux >= 3.15), it holds a shared lock on

* byte 100 + i for each permission i it *uses*, and
* byte 200 + i for each permission i it does *not share* with other openers,

and refuses to open when someone holds byte 200 + i for a permission it wants ("Failed to get
"write" lock") or byte 100 + i for one it will not share ("Failed to get shared "write" lock").
Measured with QEMU 7.2 (`/proc/locks`), a virtio-blk drive on a raw image holds bytes 100, 101
and 201 when writable, 100 and 201 when `readonly=on`: neither shares "write". So two writers
refuse each other, a reader refuses a writer and a writer a reader, two readers coexist.

As QEMU does, the locks are taken first and the others' locks tested afterwards, so two openers
racing cannot both succeed. OFD locks belong to the open file description: closing the image's
fd (or the process ending) releases them, and the process's other fds of the file do not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 0, 1, 2, 3
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
# struct flock on x86_64: l_type, l_whence (short), pad, l_start, l_len (off_t), l_pid, pad.
_FLOCK = struct.Struct("hh4xqqi4x")


class LockConflict(Exception):
    """Another opener holds a byte we need; `str()` is QEMU's wording."""


def _flock(kind: int, offset: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)  # l_pid must be 0 for OFD locks


def _held_by_other(fd: int, offset: int) -> bool:
    # F_OFD_GETLK with a write lock asks "would an exclusive lock conflict?"; our own OFD
    # locks never conflict with ourselves.
    out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, offset))
    return _FLOCK.unpack(out)[0] != fcntl.F_UNLCK


def perms_for(readonly: bool) -> tuple[set[int], set[int]]:
    """(permissions used, permissions not shared) of a guest drive, as QEMU's virtio-blk."""
    used = {PERM_CONSISTENT_READ} if readonly else {PERM_CONSISTENT_READ, PERM_WRITE}
    return used, {PERM_WRITE}


def lock_image(fd: int, readonly: bool) -> None:
    """Take QEMU's lock bytes for a drive on `fd`, then check nobody else conflicts. Raises
    LockConflict naming the permission; the caller closes fd, which drops what was taken."""
    used, unshared = perms_for(readonly)
    for perm in sorted(used):
        _set_shared(fd, LOCK_PERM_BASE + perm, PERM_NAMES[perm])
    for perm in sorted(unshared):
        _set_shared(fd, LOCK_SHARED_BASE + perm, PERM_NAMES[perm])
    for perm in sorted(used):
        if _held_by_other(fd, LOCK_SHARED_BASE + perm):
            raise LockConflict(f'Failed to get "{PERM_NAMES[perm]}" lock')
    for perm in sorted(unshared):
        if _held_by_other(fd, LOCK_PERM_BASE + perm):
            raise LockConflict(f'Failed to get shared "{PERM_NAMES[perm]}" lock')


def _set_shared(fd: int, offset: int, name: str) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, offset))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            # Someone holds an exclusive lock on the byte (QEMU never does; another tool may).
            raise LockConflict(f'Failed to get "{name}" lock') from None
        raise


def unlock_image(fd: int) -> None:
    """Drop every lock byte `lock_image` may have taken on `fd` (the image stays open): a
    migration source hands the image to its destination this way at switchover."""
    for base in (LOCK_PERM_BASE, LOCK_SHARED_BASE):
        for perm in PERM_NAMES:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, base + perm))
