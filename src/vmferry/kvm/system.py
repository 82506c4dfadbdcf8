"""`Kvm`: the system-level fd (/dev/kvm): API version, capabilities, supported CPUID, MSR list,
VM creation."""

from __future__ import annotations

import ctypes
import errno
import os

from vmferry.errors import KvmError, KvmUnavailableError
from vmferry.kvm import ioctls as nr
from vmferry.kvm import structs as s
from vmferry.kvm.fd import E2BIG, KvmFd, ioctl_errno
from vmferry.kvm.vm import Vm

KVM_API_VERSION = 12
# Tests (and unusual hosts) point vmferry at another device node through this variable.
DEVICE_ENV = "VMFERRY_KVM_DEVICE"


def default_device() -> str:
    return os.environ.get(DEVICE_ENV, "/dev/kvm")


def _unavailable(path: str, err: OSError) -> KvmUnavailableError:
    if err.errno == errno.ENOENT:
        hint = "load the kvm module (modprobe kvm_intel or kvm_amd) or enable virtualization"
        return KvmUnavailableError(f"{path} does not exist: {hint}")
    if err.errno in (errno.EACCES, errno.EPERM):
        return KvmUnavailableError(
            f"{path} is not accessible: run as root or add your user to group kvm (usermod -aG kvm $USER)"
        )
    return KvmUnavailableError(f"cannot open {path}: {os.strerror(err.errno or 0)}")


class Kvm(KvmFd):
    """Handle on /dev/kvm. Raises KvmUnavailableError (one line, says what to do) if unusable."""

    def __init__(self, path: str | None = None) -> None:
        path = path or default_device()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise _unavailable(path, e) from None
        super().__init__(fd)
        self.path = path
        try:
            version = self.ioctl(nr.GET_API_VERSION)
        except KvmError as e:
            self.close()
            raise KvmUnavailableError(f"{path} is not a KVM device ({e})") from None
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(f"{path}: KVM API version {version}, vmferry needs {KVM_API_VERSION}")
        self.vcpu_mmap_size = self.ioctl(nr.GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: nr.Cap | int) -> int:
        """KVM_CHECK_EXTENSION: 0 if absent, else a positive (sometimes meaningful) value."""
        return self.ioctl(nr.CHECK_EXTENSION, int(cap))

    def require(self, *caps: nr.Cap) -> None:
        missing = [c.name for c in caps if not self.check_extension(c)]
        if missing:
            raise KvmUnavailableError(f"{self.path} lacks required KVM capabilities: {', '.join(missing)}")

    def get_supported_cpuid(self) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID as a `structs.cpuid2(n)` instance sized to what KVM returned."""
        n = 64
        while True:
            buf = s.cpuid2(n)()
            buf.nent = n
            rc, err = ioctl_errno(self.fd, nr.GET_SUPPORTED_CPUID, buf)
            if rc >= 0:
                out = s.cpuid2(buf.nent)()
                ctypes.memmove(ctypes.addressof(out), ctypes.addressof(buf), ctypes.sizeof(out))
                return out
            if err != E2BIG or n >= 4096:
                raise KvmError(nr.GET_SUPPORTED_CPUID.name, err)
            n *= 2

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs a VMM must save and restore. The first call with
        nmsrs=0 fails with E2BIG and reports the count."""
        probe = s.msr_list(0)()
        rc, err = ioctl_errno(self.fd, nr.GET_MSR_INDEX_LIST, probe)
        if rc < 0 and err != E2BIG:
            raise KvmError(nr.GET_MSR_INDEX_LIST.name, err)
        buf = s.msr_list(probe.nmsrs)()
        buf.nmsrs = probe.nmsrs
        self.ioctl(nr.GET_MSR_INDEX_LIST, buf)
        return list(buf.indices[: buf.nmsrs])

    def create_vm(self) -> Vm:
        return Vm(self, self.ioctl(nr.CREATE_VM, 0))

