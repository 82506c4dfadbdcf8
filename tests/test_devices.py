"""devices/: the 16550's registers and IRQ line (pure logic), chardev backends, and the in-kernel
irqchip/PIT/clock and vCPU state save/restore on real KVM."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from vmferry.devices.chardev import Chardev, FileChardev, UnixServerChardev, open_chardev
from vmferry.devices.cpu import VCPU_STATE_ORDER, restore_vcpu, save_vcpu
from vmferry.devices.irqchip import InKernelIrqchip
from vmferry.devices.pit import InKernelPit, KvmClock
from vmferry.devices.serial import Serial16550
from vmferry.errors import StateLoadError, VmferryError
from vmferry.kvm import Kvm


class Recorder(Chardev):
    def __init__(self) -> None:
        self.out = b""

    def write(self, data: bytes) -> None:
        self.out += data


def make_serial() -> tuple[Serial16550, Recorder, list[int]]:
    rec, levels = Recorder(), []
    return Serial16550(rec, levels.append), rec, levels


def test_polling_thr_empty_and_transmit() -> None:
    uart, rec, levels = make_serial()
    assert uart.read(5, 1) & 0x60 == 0x60  # THRE|TEMT: never busy
    for b in b"hi":
        uart.write(0, 1, b)
    assert rec.out == b"hi" and levels == []


def test_receive_raises_and_reading_lowers_irq() -> None:
    uart, _, levels = make_serial()
    uart.write(1, 1, 0x01)  # IER: received data available
    uart.receive(b"ab")
    assert levels == [1] and uart.read(5, 1) & 1 and uart.read(2, 1) & 0x0F == 0x04
    assert uart.read(0, 1) == ord("a") and uart.read(0, 1) == ord("b")
    assert levels == [1, 0] and not uart.read(5, 1) & 1


def test_thr_interrupt_fires_on_enable_and_clears_on_iir_read() -> None:
    uart, _, levels = make_serial()
    uart.write(1, 1, 0x02)
    assert levels == [1]
    assert uart.read(2, 1) == 0x02
    assert levels == [1, 0] and uart.read(2, 1) == 0x01


def test_divisor_latch_and_state_round_trip() -> None:
    uart, _, _ = make_serial()
    uart.write(3, 1, 0x80)
    uart.write(0, 1, 0x01)
    uart.write(1, 1, 0x00)
    uart.write(3, 1, 0x03)
    uart.write(7, 1, 0x5A)
    uart.receive(b"xyz")
    state = uart.get_state()
    other, _, _ = make_serial()
    other.set_state(state)
    assert other.get_state() == state and state["dll"] == 1 and state["rx_fifo"] == b"xyz"
    assert other.read(0, 1) == ord("x")


def test_chardev_specs(tmp_path: Path) -> None:
    assert type(open_chardev("null")) is Chardev
    f = open_chardev(f"file:{tmp_path / 'out'}")
    assert isinstance(f, FileChardev)
    f.write(b"abc")
    f.close()
    assert (tmp_path / "out").read_bytes() == b"abc"
    with pytest.raises(VmferryError, match="unknown serial backend"):
        open_chardev("tcp:1234")


def test_unix_backend_serves_a_client_both_ways(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    dev = UnixServerChardev(path)
    got: list[bytes] = []
    dev.set_receiver(got.append)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.sendall(b"in")
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [b"in"]
    dev.write(b"out")  # the accept loop registered the client before delivering its input
    assert client.recv(16) == b"out"
    client.close()
    dev.close()


@pytest.mark.kvm
def test_irqchip_pit_clock_and_vcpu_state_restore_into_another_vm() -> None:
    kvm = Kvm()
    vms = []
    for _ in range(2):
        vm = kvm.create_vm()
        vm.set_tss_addr()
        vms.append((vm, InKernelIrqchip(vm), InKernelPit(vm), KvmClock(vm)))
    (src, src_chip, src_pit, src_clock), (dst, dst_chip, dst_pit, dst_clock) = vms
    src_chip.set_irq(4, 1)
    dst_chip.set_state(src_chip.get_state())
    assert dst_chip.get_state() == src_chip.get_state()
    dst_pit.set_state(src_pit.get_state())
    dst_clock.set_state(src_clock.get_state())
    v_src, v_dst = src.create_vcpu(0), dst.create_vcpu(0)
    v_src.set_cpuid2(kvm.get_supported_cpuid())
    regs = v_src.get_regs()
    regs.rax = 0xFEED
    v_src.set_regs(regs)
    state = save_vcpu(v_src, kvm.get_msr_index_list())
    assert tuple(state) == VCPU_STATE_ORDER
    restore_vcpu(v_dst, state)
    assert v_dst.get_regs().rax == 0xFEED
    assert bytes(v_dst.get_sregs()) == bytes(v_src.get_sregs())
    with pytest.raises(StateLoadError, match="regs"):
        restore_vcpu(v_dst, {**state, "regs": b"short"})
