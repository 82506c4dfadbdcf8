"""vmferry.kvm: typed bindings to /dev/kvm, one module per file-descriptor level.

`Kvm` (system fd) -> `Vm` (VM fd) -> `Vcpu` (vCPU fd). ioctl numbers and the capabilities they
need: `ioctls`; struct mirrors: `structs`. Failures raise `vmferry.errors.KvmError(ioctl, errno)`;
a missing or inaccessible device raises `KvmUnavailableError`.
"""

from vmferry.kvm.system import Kvm
from vmferry.kvm.vcpu import Vcpu
from vmferry.kvm.vm import Vm

__all__ = ["Kvm", "Vm", "Vcpu"]
