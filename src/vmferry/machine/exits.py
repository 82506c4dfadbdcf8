"""What a vCPU thread does with each KVM_RUN exit: port I/O and MMIO go to the machine's buses;
the guest's ways of stopping (triple fault, emulation failure, failed entry, HLT with no
in-kernel LAPIC) finish the machine with a status naming the reason — never a hang.

With the in-kernel irqchip (every vmferry-0.1 machine) KVM handles HLT itself: a halted vCPU
waits inside KVM_RUN for an interrupt and is still pausable by the kick. So `cli; hlt` does not
end the machine; guests end through the debug-exit port. KVM_EXIT_HLT is handled for machines
without an in-kernel LAPIC."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmferry.kvm.ioctls import EXIT_IO_OUT, Exit
from vmferry.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from vmferry.machine.machine import Machine

SYSTEM_EVENT_SHUTDOWN, SYSTEM_EVENT_RESET, SYSTEM_EVENT_CRASH = 1, 2, 3
_INTERNAL_SUBERRORS = {
    1: "instruction emulation failed",
    2: "simultaneous exceptions",
    3: "unexpected exit while delivering an event",
    4: "unexpected exit reason",
}


def handle_exit(machine: Machine, vcpu: Vcpu) -> None:
    run = vcpu.run_struct
    reason = run.exit_reason
    if reason == Exit.IO:
        io = run.exit.io
        data = vcpu.io_data()
        for i in range(io.count):  # count > 1 for rep ins/outs
            chunk = data[i * io.size : (i + 1) * io.size]
            if io.direction == EXIT_IO_OUT:
                machine.pio_bus.write(io.port, io.size, int.from_bytes(chunk, "little"))
            else:
                chunk[:] = machine.pio_bus.read(io.port, io.size).to_bytes(io.size, "little")
    elif reason == Exit.MMIO:
        mmio = run.exit.mmio
        n = mmio.len
        if mmio.is_write:
            machine.mmio_bus.write(mmio.phys_addr, n, int.from_bytes(bytes(mmio.data[:n]), "little"))
        else:
            value = machine.mmio_bus.read(mmio.phys_addr, n).to_bytes(n, "little")
            for i in range(n):
                mmio.data[i] = value[i]
    elif reason == Exit.INTR:
        pass
    elif reason == Exit.DIRTY_RING_FULL:
        machine.dirty_ring_full(vcpu)  # the runner then sleeps a dirty limit's share, if any
    elif reason == Exit.HLT:
        machine.guest_halted(vcpu.id)
    elif reason == Exit.SHUTDOWN:
        machine.fail(f"guest triple fault (KVM_EXIT_SHUTDOWN) on vCPU {vcpu.id} {_where(vcpu)}")
    elif reason == Exit.INTERNAL_ERROR:
        sub = run.exit.internal.suberror
        what = _INTERNAL_SUBERRORS.get(sub, "unknown")
        machine.fail(f"KVM internal error on vCPU {vcpu.id}: suberror {sub} ({what}) {_where(vcpu)}")
    elif reason == Exit.FAIL_ENTRY:
        hw = run.exit.fail_entry.hardware_entry_failure_reason
        machine.fail(f"KVM could not enter the guest on vCPU {vcpu.id}: hardware reason {hw:#x}")
    elif reason == Exit.SYSTEM_EVENT:
        kind = run.exit.system_event.type
        if kind == SYSTEM_EVENT_SHUTDOWN:
            machine.power_off(0)
        else:
            machine.fail(f"guest system event {kind} (reset/crash) on vCPU {vcpu.id}: not supported")
    else:
        name = Exit(reason).name if reason in Exit._value2member_map_ else str(reason)
        machine.fail(f"unhandled KVM exit {name} on vCPU {vcpu.id} {_where(vcpu)}")


def _where(vcpu: Vcpu) -> str:
    try:
        return f"at rip {vcpu.get_regs().rip:#x}"
    except Exception:
        return ""
