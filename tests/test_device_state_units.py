"""Device state descriptions that need no KVM: the UART's registers and its FIFO subsection, and
the debug-exit port's wiring check."""

from __future__ import annotations

import pytest

from vmferry.devices.chardev import open_chardev
from vmferry.devices.debug_exit import DebugExit, DebugExitState
from vmferry.devices.serial import Serial16550, SerialState
from vmferry.errors import StateLoadError
from vmferry.vmstate import registry


def uart() -> tuple[Serial16550, list[int]]:
    levels: list[int] = []
    return Serial16550(open_chardev("null"), levels.append), levels


def test_idle_uart_sends_no_fifo_subsection() -> None:
    dev, _ = uart()
    sec = SerialState.snapshot(dev)
    assert sec.subsections == {}
    assert SerialState.save(dev).endswith(b"\x00\x00")  # the subsection block: none present


def test_uart_registers_and_pending_input_round_trip_and_raise_the_line() -> None:
    src, _ = uart()
    src.write(3, 1, 0x83)  # DLAB on
    src.write(0, 1, 0x01)  # divisor 1: 115200 baud
    src.write(3, 1, 0x03)  # 8N1, DLAB off
    src.write(1, 1, 0x01)  # receive interrupt on
    src.receive(b"ok")
    payload = SerialState.save(src)
    dst, levels = uart()
    sec = SerialState.load(dst, payload)
    assert sec.subsections["serial/fifo"].fields == {"fifo": b"ok"}
    assert dst.get_state() == src.get_state()
    # The loaded irq_level is 1, so post_load drives nothing: the irqchip state that came with
    # the stream already has the line up.
    assert levels == []
    assert dst.read(0, 1) == ord("o")


def test_uart_fifo_longer_than_the_limit_is_refused() -> None:
    src, _ = uart()
    src.receive(b"x")
    payload = bytearray(SerialState.save(src))
    # The subsection body is the FIFO's u32 length, its 1 byte, and the body's own (empty) u16
    # subsection count: the length is 7 bytes from the end. Set it above max.
    payload[-7:-3] = (1 << 20).to_bytes(4, "little")
    with pytest.raises(StateLoadError, match="section 'serial/fifo', field 'fifo': length 1048576 exceeds"):
        SerialState.load(uart()[0], bytes(payload))


def test_debug_exit_at_another_port_is_refused() -> None:
    dev = DebugExit(lambda status: None)
    assert DebugExitState.decode(DebugExitState.save(dev)).fields == {"iobase": 0xF4, "iosize": 4}
    moved = (0x501).to_bytes(2, "little") + (2).to_bytes(2, "little") + b"\x00\x00"
    with pytest.raises(StateLoadError,
                       match="section 'debug-exit', field 'iobase': .*0x501, this machine's 0xf4"):
        DebugExitState.load(dev, moved)


def test_every_device_section_is_registered_for_vmferry_0_1() -> None:
    registry.load_device_registrations()
    names = [e.cls.name for e in registry.entries("vmferry-0.1")]
    assert names == ["clock", "cpu", "debug-exit", "irqchip", "pit", "serial"]
    assert all(e.version == 1 and not e.load_only for e in registry.entries("vmferry-0.1"))
