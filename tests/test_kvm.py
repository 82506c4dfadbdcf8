"""kvm/: struct layouts and ioctl numbers against <linux/kvm.h>; capabilities; every vCPU and VM
state get/set pair round-trips on real KVM."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vmferry.errors import KvmError, KvmUnavailableError
from vmferry.kvm import Kvm
from vmferry.kvm import ioctls as nr
from vmferry.kvm import structs as s

_C_CHECKS = {
    "KvmRegs": "struct kvm_regs", "KvmSregs": "struct kvm_sregs", "KvmFpu": "struct kvm_fpu",
    "KvmXsave": "struct kvm_xsave", "KvmXcrs": "struct kvm_xcrs", "KvmLapicState": "struct kvm_lapic_state",
    "KvmVcpuEvents": "struct kvm_vcpu_events", "KvmDebugregs": "struct kvm_debugregs",
    "KvmIrqchip": "struct kvm_irqchip", "KvmPitState2": "struct kvm_pit_state2",
    "KvmClockData": "struct kvm_clock_data", "KvmUserspaceMemoryRegion": "struct kvm_userspace_memory_region",
    "KvmDirtyLog": "struct kvm_dirty_log", "KvmClearDirtyLog": "struct kvm_clear_dirty_log",
    "KvmEnableCap": "struct kvm_enable_cap", "KvmCpuidEntry2": "struct kvm_cpuid_entry2",
    "KvmMsrEntry": "struct kvm_msr_entry",
}
_IOCTLS = [v for v in vars(nr).values() if isinstance(v, nr.Ioctl)]


HAVE_HEADER = shutil.which("gcc") is not None and Path("/usr/include/linux/kvm.h").exists()


@pytest.mark.skipif(not HAVE_HEADER, reason="no gcc or <linux/kvm.h>")
def test_struct_sizes_and_ioctl_numbers_match_the_header(tmp_path: Path) -> None:
    lines = [f'printf("{n} %zu\\n", sizeof({c}));' for n, c in _C_CHECKS.items()]
    lines += [f'printf("{i.name} %lu\\n", (unsigned long){i.name});' for i in _IOCTLS]
    src = tmp_path / "k.c"
    body = "".join(lines)
    src.write_text(f"#include <stdio.h>\n#include <linux/kvm.h>\nint main(void){{{body}return 0;}}\n")
    subprocess.run(["gcc", "-o", str(tmp_path / "k"), str(src)], check=True)
    run = subprocess.run([str(tmp_path / "k")], capture_output=True, text=True, check=True)
    out = dict(line.split() for line in run.stdout.splitlines())
    for name in _C_CHECKS:
        assert ctypes.sizeof(getattr(s, name)) == int(out[name]), name
    for i in _IOCTLS:
        assert i.number == int(out[i.name]), i.name
    assert nr.SET_IRQCHIP.number == 0x8208AE63
    assert ctypes.sizeof(s.KvmRun) <= 2048 + 32


def test_missing_device_raises_unavailable_with_advice() -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist: load the kvm module"):
        Kvm("/nonexistent/kvm")


@pytest.mark.kvm
def test_capabilities_and_errors() -> None:
    kvm = Kvm()
    assert kvm.check_extension(nr.Cap.USER_MEMORY) and kvm.check_extension(nr.Cap.IRQCHIP)
    kvm.require(nr.Cap.XSAVE, nr.Cap.VCPU_EVENTS)
    assert len(kvm.get_msr_index_list()) > 0 and kvm.get_supported_cpuid().nent > 0
    vm = kvm.create_vm()
    with pytest.raises(KvmError, match="KVM_GET_DIRTY_LOG") as e:
        vm.get_dirty_log(5, np.zeros(1, dtype=np.uint64))  # no such slot
    assert e.value.errno != 0


@pytest.mark.kvm
def test_vcpu_state_round_trips() -> None:
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.set_tss_addr()
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    regs = vcpu.get_regs()
    regs.rbx, regs.rip, regs.r15 = 0x1234, 0xFFF0, 2**64 - 1
    vcpu.set_regs(regs)
    assert bytes(vcpu.get_regs()) == bytes(regs)
    sregs = vcpu.get_sregs()
    sregs.cr0 |= 1
    sregs.gdt.base, sregs.gdt.limit = 0x500, 23
    vcpu.set_sregs(sregs)
    got = vcpu.get_sregs()
    assert (got.cr0 & 1, got.gdt.base, got.gdt.limit) == (1, 0x500, 23)
    # Each state: set(get()) then get() again is identical (time-varying LAPIC/TSC excepted).
    for name in ("sregs", "xsave", "xcrs", "vcpu_events", "mp_state", "debugregs"):
        before = getattr(vcpu, f"get_{name}")()
        getattr(vcpu, f"set_{name}")(before)
        assert bytes(getattr(vcpu, f"get_{name}")()) == bytes(before), name
    dregs = vcpu.get_debugregs()
    dregs.db[0] = 0xABC000
    vcpu.set_debugregs(dregs)
    assert vcpu.get_debugregs().db[0] == 0xABC000
    msrs = vcpu.get_msrs(kvm.get_msr_index_list())
    assert vcpu.set_msrs(msrs) == msrs.nmsrs
    lapic = vcpu.get_lapic()
    vcpu.set_lapic(lapic)
    assert bytes(vcpu.get_lapic())[:0x380] == bytes(lapic)[:0x380]  # 0x390: the timer's current count
    assert vcpu.get_cpuid2().nent == kvm.get_supported_cpuid().nent
    vcpu.close()
    vm.close()


@pytest.mark.kvm
def test_vm_state_round_trips() -> None:
    vm = Kvm().create_vm()
    vm.create_irqchip()
    vm.create_pit2()
    for chip in range(3):
        st = vm.get_irqchip(chip)
        vm.set_irqchip(st)
        assert bytes(vm.get_irqchip(chip)) == bytes(st)
    pit = vm.get_pit2()
    vm.set_pit2(pit)
    assert bytes(vm.get_pit2()).hex()[:16] == bytes(pit).hex()[:16]
    clock = vm.get_clock()
    clock.clock = 10**12
    vm.set_clock(clock)
    assert vm.get_clock().clock >= 10**12
    vm.irq_line(4, 1)
    vm.irq_line(4, 0)
