"""Device state descriptions that need no KVM: the UART's registers and its FIFO subsection, and
the debug-exit port's wiring check."""

from __future__ import annotations

import threading

import pytest

from vmferry.devices.chardev import open_chardev
from vmferry.devices.debug_exit import DebugExit, DebugExitState
from vmferry.devices.serial import LSR_OE, RX_PENDING_MAX, Serial16550, SerialState
from vmferry.errors import StateLoadError
from vmferry.machine.machine_type import get_machine_type, section_registry


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


def test_every_device_section_is_in_the_vmferry_0_1_table() -> None:
    entries = section_registry().entries("vmferry-0.1")
    assert [e.cls.name for e in entries] == ["clock", "cpu", "debug-exit", "irqchip", "pit", "serial"]
    assert all(e.version == 1 and not e.load_only for e in entries)
    # The apply order the destination uses comes from the table.
    table = sorted(get_machine_type("vmferry-0.1").devices, key=lambda spec: spec.order)
    assert [spec.section.name for spec in table] == ["cpu", "irqchip", "pit", "clock", "serial", "debug-exit"]


def test_a_uart_whose_property_says_so_keeps_its_input_out_of_the_stream() -> None:
    # The subsection's needed() follows the device's property (a machine type can pin it off).
    dev = Serial16550(open_chardev("null"), None, {"migrate-rx-fifo": False})
    dev.receive(b"pending")
    assert SerialState.snapshot(dev).subsections == {}
    dev.properties["migrate-rx-fifo"] = True
    assert SerialState.snapshot(dev).subsections["serial/fifo"].fields == {"fifo": b"pending"}


def test_a_uart_refuses_a_property_it_does_not_have() -> None:
    with pytest.raises(ValueError, match="unknown properties \\['baud'\\]"):
        Serial16550(open_chardev("null"), None, {"baud": 9600})


def test_a_uart_snapshot_is_consistent_while_input_and_guest_reads_race() -> None:
    # The input thread pushes, a "vCPU" pops; with the receive interrupt on, the IRQ level the
    # registers record must agree with the FIFO subsection captured in the same snapshot.
    dev, _ = uart()
    dev.write(1, 1, 0x01)  # IER: receive interrupt on
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            dev.receive(b"ab")

    def drain() -> None:
        while not stop.is_set():
            dev.read(0, 1)

    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=drain, daemon=True)]
    for t in threads:
        t.start()
    try:
        for _ in range(2000):
            sec = SerialState.snapshot(dev)
            fifo = sec.subsections.get("serial/fifo")
            assert sec.fields["irq_level"] == (1 if fifo else 0)
            assert fifo is None or fifo.fields["fifo"]
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def test_a_quiesced_uart_holds_input_until_unquiesced() -> None:
    dev, _ = uart()
    dev.quiesce()
    feeder = threading.Thread(target=dev.receive, args=(b"hi",), daemon=True)
    feeder.start()
    assert dev.get_state()["rx_fifo"] == b""  # if the feeder ran already, it is waiting
    dev.unquiesce()
    feeder.join(60)
    assert not feeder.is_alive() and dev.get_state()["rx_fifo"] == b"hi"


def test_closing_a_quiesced_uart_releases_a_waiting_receive() -> None:
    dev, _ = uart()
    dev.quiesce()
    feeder = threading.Thread(target=dev.receive, args=(b"hi",), daemon=True)
    feeder.start()
    dev.close()
    feeder.join(60)
    assert not feeder.is_alive() and dev.get_state()["rx_fifo"] == b""


# --- vmferry-0.2's UART: rx_dropped (section version 2), serial/overrun, "lsr-overrun" ---------


def _table_uart(machine: str) -> Serial16550:
    """A UART with the properties the machine type's table gives it."""
    return Serial16550(open_chardev("null"), None, get_machine_type(machine).device_properties()["serial0"])


def _overflow(dev: Serial16550, extra: int) -> None:
    dev.receive(bytes(RX_PENDING_MAX))
    dev.receive(b"z" * extra)


@pytest.mark.parametrize(("machine", "oe"), [("vmferry-0.1", 0), ("vmferry-0.2", LSR_OE)])
def test_input_beyond_the_fifo_is_counted_and_reported_as_overrun_only_where_pinned_on(
        machine: str, oe: int) -> None:
    dev = _table_uart(machine)
    _overflow(dev, 5)
    assert dev.rx_dropped == 5
    assert dev.read(5, 1) & LSR_OE == oe  # LSR: OE only with lsr-overrun
    assert dev.read(5, 1) & LSR_OE == 0  # reading LSR cleared it
    assert dev.rx_dropped == 5  # the counter is not a register: reads leave it


def test_vmferry_0_1_sends_serial_version_1_without_the_counter_or_the_overrun() -> None:
    version = get_machine_type("vmferry-0.1").spec("serial0").version
    assert version == 1
    dev = _table_uart("vmferry-0.1")
    _overflow(dev, 3)
    dev.lsr_oe = 1  # even if latched (it cannot be with lsr-overrun off), 0.1 never sends it
    sec = SerialState.snapshot(dev, version=1)
    assert "rx_dropped" in sec.fields and set(sec.subsections) == {"serial/fifo"}
    fresh = _table_uart("vmferry-0.1")
    # Version 1 bytes: the ten register bytes, then the subsection block; no u32 counter.
    idle = SerialState.save(fresh, version=1)
    assert idle == bytes(SerialState.capture(fresh)[n] for n in (
        "ier", "fcr", "lcr", "mcr", "msr", "scr", "dll", "dlm", "thr_ipending", "irq_level")) + b"\x00\x00"
    assert [s["name"] for s in SerialState.stream_description(1)["subsections"]] == ["serial/fifo"]


def test_vmferry_0_2_migrates_the_counter_and_a_pending_overrun_and_only_then_the_subsection() -> None:
    src = _table_uart("vmferry-0.2")
    assert "serial/overrun" not in SerialState.snapshot(src, version=2).subsections  # none pending
    _overflow(src, 7)
    sec = SerialState.snapshot(src, version=2)
    assert sec.fields["rx_dropped"] == 7 and sec.subsections["serial/overrun"].fields == {"lsr_oe": 1}
    dst = _table_uart("vmferry-0.2")
    SerialState.load(dst, SerialState.save(src, version=2))
    assert (dst.rx_dropped, dst.lsr_oe) == (7, 1)
    assert dst.read(5, 1) & LSR_OE  # the guest on the destination sees the overrun it had not read
    src.read(5, 1)  # the guest read LSR: nothing pending, the subsection is not sent
    assert "serial/overrun" not in SerialState.snapshot(src, version=2).subsections


def test_a_version_1_stream_loads_on_vmferry_0_2_with_the_counter_at_zero() -> None:
    old = _table_uart("vmferry-0.1")
    old.write(7, 1, 0x5A)  # scratch register
    dst = _table_uart("vmferry-0.2")
    dst.rx_dropped, dst.lsr_oe = 9, 1
    SerialState.load(dst, SerialState.save(old, version=1), version=1)
    assert (dst.scr, dst.rx_dropped, dst.lsr_oe) == (0x5A, 0, 0)


def test_a_subsection_newer_than_the_section_version_cannot_be_encoded() -> None:
    dev = _table_uart("vmferry-0.2")
    sec = SerialState.snapshot(dev, version=2)
    sec.subsections["serial/overrun"] = SerialState.snapshot(dev, version=2).subsections.get(
        "serial/overrun") or type(sec)("serial/overrun", 1, {"lsr_oe": 1})
    sec.version = 1
    with pytest.raises(ValueError, match="unknown subsections \\['serial/overrun'\\] at version 1"):
        SerialState.encode(sec)
