"""The Machine on real KVM: dirty log exactness, pause/resume (with device quiesce, and a vCPU
crashing while being paused), power-off, serial, crash status, lazy RAM, and `vmferry run`'s
one-line error without KVM."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from polling import wait_for
from test_machine_asm import build_guest, poweroff
from vmferry.devices.serial import SerialState
from vmferry.machine.machine import Machine

MiB, GiB = 1 << 20, 1 << 30


@pytest.mark.kvm
def test_dirty_log_reports_exactly_the_pages_the_guest_wrote(tmp_path: Path) -> None:
    written = [0x200, 0x203, 0x3FF, 0x1234]
    body = "".join(f"    movl $1, {p * 4096:#x}\n" for p in written) + poweroff(0)
    with Machine(memory=32 * MiB) as m:
        m.load_kernel(build_guest(tmp_path, body))
        ram = m.ram_block("pc.ram")
        ram.start_dirty_log()
        ram.add_dirty_consumer("a")
        m.start()
        status = m.wait(30)
        assert status is not None and status.kind == "poweroff"
        ram.add_dirty_consumer("late")  # joins after the writes: must see none of them
        assert ram.dirty_pages("a").tolist() == written
        assert ram.sync_dirty() == 0
        assert ram.dirty_pages("late").tolist() == []
        # The producer was reset by the harvest: clearing a consumer's bits sticks.
        ram.dirty_bitmap("a")[:] = 0
        assert ram.sync_dirty() == 0 and ram.dirty_pages("a").tolist() == []
        populated = np.flatnonzero(ram.populated_pages())
        assert set(written) <= set(populated.tolist())
        assert not m.ram_block("vga.vram").populated_pages().any()


@pytest.mark.kvm
def test_debug_exit_powers_off_with_the_written_value(tmp_path: Path) -> None:
    with Machine(memory=16 * MiB) as m:
        m.load_kernel(build_guest(tmp_path, poweroff(0x2A)))
        m.start()
        status = m.wait(30)
    assert status is not None and (status.kind, status.code) == ("poweroff", 0x2A)


@pytest.mark.kvm
def test_serial_output_reaches_a_file_backend(tmp_path: Path) -> None:
    body = r"""
    mov $msg, %esi
1:  mov $0x3fd, %dx
2:  in %dx, %al
    test $0x20, %al          # LSR.THRE: poll until the transmitter is empty
    jz 2b
    mov (%esi), %al
    test %al, %al
    jz 3f
    mov $0x3f8, %dx
    out %al, %dx
    inc %esi
    jmp 1b
3:
""" + poweroff(7) + '\nmsg: .asciz "hello from the guest\\n"\n'
    out = tmp_path / "serial.txt"
    with Machine(memory=16 * MiB, serial=f"file:{out}") as m:
        m.load_kernel(build_guest(tmp_path, body))
        m.start()
        status = m.wait(30)
    assert status is not None and status.code == 7
    assert out.read_text() == "hello from the guest\n"


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("body", "named"),
    [
        # No IDT (limit 0): #UD -> #GP -> #DF -> triple fault.
        ("    ud2\n", "triple fault"),
        # This host's emulator cannot deliver int3 at all: an internal error, named as such.
        ("    int3\n", "internal error"),
    ],
)
def test_guest_crash_stops_the_machine_with_an_error_naming_it(tmp_path: Path, body: str, named: str) -> None:
    with Machine(memory=16 * MiB) as m:
        m.load_kernel(build_guest(tmp_path, body))
        m.start()
        status = m.wait(30)
    assert status is not None and status.is_error
    assert named in status.reason


@pytest.mark.kvm
def test_pause_resume_repeatedly_with_two_vcpus(tmp_path: Path) -> None:
    body = "1:  incl 0x9000\n    jmp 1b\n"
    with Machine(memory=16 * MiB, smp=2) as m:
        events: list[str] = []
        m.on_event = lambda name, data: events.append(name)
        m.load_kernel(build_guest(tmp_path, body))
        m.start()
        for _ in range(5):
            m.pause()
            m.pause()  # idempotent
            assert not m.running
            frozen = m.read_gpa(0x9000, 4)
            regs = [v.get_regs() for v in m.vcpus]  # out of KVM_RUN: ioctls do not block
            assert m.read_gpa(0x9000, 4) == frozen
            assert bytes(m.vcpus[0].get_regs()) == bytes(regs[0])
            m.resume()
            assert m.running
            while m.read_gpa(0x9000, 4) == frozen:  # the guest counts again
                pass
        assert m.wait(0) is None
        m.shutdown()
        status = m.wait(5)
    assert status is not None and status.kind == "shutdown"
    assert events[:3] == ["RESUME", "STOP", "RESUME"] and events[-1] == "SHUTDOWN"


@pytest.mark.kvm
def test_a_4gib_machine_builds_with_lazy_ram() -> None:
    with Machine(memory=4 * GiB) as m:
        layout = [(b.name, b.gpa, b.nbytes) for b in m.ram_blocks]
        assert layout == [
            ("pc.ram", 0, 3 * GiB),
            ("pc.ram-high", 4 * GiB, 1 * GiB),
            ("vga.vram", 0xE0000000, 8 * MiB),
        ]
        assert sum(int(b.populated_pages().sum()) for b in m.ram_blocks) == 0


def _run_cli(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "vmferry", "run", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_run_without_kvm_device_gives_one_line_error() -> None:
    r = _run_cli("--guest", "heartbeat", env_extra={"VMFERRY_KVM_DEVICE": "/nonexistent/kvm"})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "does not exist" in lines[0] and "kvm module" in lines[0]


def test_run_with_a_non_kvm_device_gives_one_line_error(tmp_path: Path) -> None:
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    r = _run_cli("--guest", "heartbeat", env_extra={"VMFERRY_KVM_DEVICE": str(fake)})
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "not a KVM device" in r.stderr


def test_run_paused_without_a_monitor_is_refused() -> None:
    r = _run_cli("--guest", "heartbeat", "-S", env_extra={})
    assert r.returncode == 1 and "needs --qmp" in r.stderr


class _TrapPort:
    """A port device whose first write waits for the test, then does `then` (raise, power off)."""

    def __init__(self, then) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.then = then

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.entered.set()
        self.release.wait(120)
        self.then()


def _crash() -> None:
    raise RuntimeError("device model bug")


@pytest.mark.kvm
@pytest.mark.parametrize("outcome", ["crash", "poweroff"])
def test_pause_returns_when_a_vcpu_crashes_or_powers_off_while_being_paused(tmp_path: Path,
                                                                           outcome: str) -> None:
    # The vCPU is inside an exit handler when pause() is asked for; the handler then crashes
    # the vCPU thread (or powers the machine off). Both need the machine's lock on the vCPU
    # thread while pause() waits for that vCPU: pause() must not hold that lock while waiting.
    body = "1:  out %al, $0x80\n    jmp 1b\n"
    with Machine(memory=16 * MiB) as m:
        trap = _TrapPort(_crash if outcome == "crash" else lambda: m.power_off(3))
        m.pio_bus.register(0x80, 1, trap)
        m.load_kernel(build_guest(tmp_path, body))
        m.start()
        assert trap.entered.wait(60)
        pauser = threading.Thread(target=m.pause, daemon=True)
        pauser.start()
        wait_for(lambda: m._runners[0]._pause, "pause() to ask the vCPU to park")
        trap.release.set()
        pauser.join(60)
        assert not pauser.is_alive(), "pause() deadlocked"
        status = m.wait(60)
        assert status is not None
        assert (status.kind, status.code) == (("error", 1) if outcome == "crash" else ("poweroff", 3))
        if outcome == "crash":
            assert "device model bug" in status.reason


@pytest.mark.kvm
def test_pause_quiesces_the_serial_input_thread_and_resume_lets_it_go(tmp_path: Path) -> None:
    body = "1:  pause\n    jmp 1b\n"
    with Machine(memory=16 * MiB) as m:
        uart = m.devices["serial0"]
        m.load_kernel(build_guest(tmp_path, body))
        m.start()
        m.pause()
        before = SerialState.snapshot(uart)
        feeder = threading.Thread(target=uart.receive, args=(b"typed while paused",), daemon=True)
        feeder.start()
        # Held back while the machine is paused (if the feeder ran at all, it is waiting).
        assert SerialState.snapshot(uart) == before
        m.resume()
        wait_for(lambda: uart.get_state()["rx_fifo"] == b"typed while paused", "the input after resume")
        feeder.join(60)
        m.pause()
        m.shutdown()


@pytest.mark.kvm
def test_the_dirty_log_has_both_producers_guest_writes_and_vmm_writes(tmp_path: Path) -> None:
    body = "    movl $1, 0x200000\n" + poweroff(0)  # the guest writes page 0x200
    with Machine(memory=32 * MiB) as m:
        m.load_kernel(build_guest(tmp_path, body))
        ram = m.ram_block("pc.ram")
        ram.start_dirty_log()
        ram.add_dirty_consumer("a")
        m.start()
        assert m.wait(30) is not None
        m.write_gpa(0x300000, b"from the VMM")  # page 0x300
        ram.view()[0x301000] = 1  # a device writing through a view, then saying so
        ram.note_written(0x301000, 1)
        ram.sync_dirty()
        assert ram.dirty_pages("a").tolist() == [0x200, 0x300, 0x301]
