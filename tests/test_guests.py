"""The guest images: they rebuild byte for byte from guests/, and they boot under QEMU (TCG) with
the behaviour vmferry's tests rely on. The same images run under vmferry (tests of the machine)."""

from __future__ import annotations

import json
import mmap
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmferry.errors import GuestError
from vmferry.guests import GUESTS, image_path
from vmferry.guests.verify import NO_PAGE, PAGE_SIZE, read_header, verify_dirty

REPO = Path(__file__).resolve().parent.parent
REQUIRE_KVM = os.environ.get("VMFERRY_REQUIRE_KVM") == "1"
BUILD_TOOLS = ("gcc", "ld", "objcopy", "make")


def qemu_cmd(guest: str, append: str, *, mem: str = "64M", extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-no-reboot",
        "-m", mem, "-kernel", str(image_path(guest)), "-append", append,
        "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *extra,
    ]  # fmt: skip


def run_qemu(guest: str, append: str, *, timeout: float = 60, **kw) -> tuple[int, list[str]]:
    """Runs a guest to its own power-off. Returns the guest's exit value and its console lines.
    QEMU's isa-debug-exit makes the process exit with (value << 1) | 1."""
    p = subprocess.run(qemu_cmd(guest, append, **kw), capture_output=True, text=True, timeout=timeout)
    assert p.returncode & 1, f"QEMU exited {p.returncode} without the guest's power-off: {p.stderr}"
    return p.returncode >> 1, p.stdout.splitlines()


def test_image_path():
    assert set(GUESTS) == {"heartbeat", "dirty", "disk"}
    for g in GUESTS:
        assert image_path(g).is_file()
    with pytest.raises(GuestError, match="unknown guest 'nope'"):
        image_path("nope")


@pytest.mark.parametrize("guest", GUESTS)
def test_image_is_a_multiboot_elf32_loaded_at_1mib(guest):
    data = image_path(guest).read_bytes()
    assert data[:6] == b"\x7fELF\x01\x01"  # ELF32, little-endian: QEMU's -kernel refuses ELF64
    machine, _, entry, phoff = struct.unpack_from("<HIII", data, 18)
    assert machine == 3  # EM_386
    offs = [o for o in range(0, 8192, 4) if struct.unpack_from("<I", data, o)[0] == 0x1BADB002]
    assert len(offs) == 1
    magic, flags, checksum = struct.unpack_from("<III", data, offs[0])
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0 and flags == 3  # no a.out kludge: ELF
    p_type, _, _, p_paddr, _, p_memsz, *_ = struct.unpack_from("<8I", data, phoff)
    assert p_type == 1 and p_paddr == 0x100000 and p_paddr <= entry < p_paddr + p_memsz


def test_images_rebuild_byte_identical(tmp_path):
    missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
    if missing:
        if REQUIRE_KVM:
            pytest.fail(f"VMFERRY_REQUIRE_KVM=1 (CI) but {', '.join(missing)} missing: cannot rebuild guests")
        pytest.skip(f"{', '.join(missing)} not installed")
    out = tmp_path / "images"
    subprocess.run(
        ["make", "-s", "-C", str(REPO / "guests"), f"OUT={out}", f"BUILD={tmp_path / 'obj'}"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for g in GUESTS:
        assert (out / f"{g}.elf").read_bytes() == image_path(g).read_bytes(), (
            f"{g}.elf differs from a fresh build: run `make -C guests` and commit the images"
        )


@pytest.mark.qemu
def test_heartbeat_ticks_and_powers_off_after_count():
    value, lines = run_qemu("heartbeat", "hz=50 count=7")
    assert value == 0
    assert lines == ["heartbeat: hz=50 count=7", *(f"tick {n}" for n in range(1, 8)), "heartbeat: done"]


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("guest", "append", "message"),
    [
        ("heartbeat", "hz=0", "heartbeat: hz=0 out of range 1..1000"),
        ("heartbeat", "hz=1x", "bad parameter hz: not a decimal number"),
        ("heartbeat", "bogus=1", "heartbeat: unknown parameter bogus"),
        ("dirty", "pattern=zipf", "dirty: bad parameter"),
        ("dirty", "ws=100", "dirty: ws=100 MiB does not fit"),
    ],
)
def test_bad_parameters_exit_2(guest, append, message):
    value, lines = run_qemu(guest, append)
    assert value == 2
    assert any(line.startswith(message) for line in lines), lines


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["uniform", "hot"])
def test_dirty_progress_and_self_check(pattern):
    value, lines = run_qemu("dirty", f"ws=8 rate=4 verify=1 runtime=3 pattern={pattern} seed=3")
    assert value == 0, lines
    assert lines[0].startswith(f"dirty: ws=8 MiB pages=2048 rate=4 MiB/s pattern={pattern} ")
    assert "dirty: filled 2048 pages gen=2048" in lines
    progress = [line for line in lines if line.startswith("dirty: t=")]
    assert [p.split()[1] for p in progress] == ["t=1", "t=2", "t=3"]
    verifies = [line for line in lines if line.startswith("verify ")]
    assert len(verifies) == 3 and all(
        v.startswith("verify ok gen=") and v.endswith(" pages=2048") for v in verifies
    )
    assert lines[-1].startswith("dirty: done t=3 ") and lines[-1].endswith("verify_passes=3 verify_fails=0")


class Qmp:
    """Just enough QMP for stop/cont: commands and their replies, events skipped."""

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        assert "QMP" in json.loads(self.file.readline())
        self.execute("qmp_capabilities")

    def execute(self, cmd: str) -> dict:
        self.file.write(json.dumps({"execute": cmd}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = json.loads(self.file.readline())
            if "event" not in msg:
                assert "return" in msg, msg
                return msg["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.mark.qemu
@pytest.mark.slow
def test_dirty_ram_verifies_on_the_host_paused_anywhere_and_after_power_off(tmp_path):
    """The real guest's RAM, read from QEMU's memory-backend file: paused at arbitrary moments
    while rewriting flat out (so usually mid-page), then after power-off, then with one byte
    flipped behind the guest's back."""
    ram_file, qmp_path = tmp_path / "ram", tmp_path / "qmp"
    extra = (
        "-object", f"memory-backend-file,id=m,size=64M,mem-path={ram_file},share=on",
        "-machine", "memory-backend=m", "-qmp", f"unix:{qmp_path},server=on,wait=off",
    )  # fmt: skip
    proc = subprocess.Popen(
        qemu_cmd("dirty", "ws=32 rate=100000 verify=0 runtime=4", extra=extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rng = random.Random(1)
    try:
        qmp = Qmp(qmp_path)
        with ram_file.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as ram:
            pauses = []
            while len(pauses) < 8:
                time.sleep(rng.uniform(0.05, 0.25))
                qmp.execute("stop")
                header = read_header([(0, ram)])
                verdict = verify_dirty([(0, ram)])
                pauses.append((header.inflight if header else None, verdict))
                qmp.execute("cont")
                assert verdict.ok or "no dirty guest header" in verdict.reason, verdict
            assert any(v.ok and v.pages == 8192 for _, v in pauses), pauses
            qmp.close()
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 1, (out, err)
            final = verify_dirty([(0, ram)])
        assert final.ok and final.pages == 8192, final
        assert f"gen={final.generation} " in out.splitlines()[-1]

        data = bytearray(ram_file.read_bytes())
        header = read_header([(0, data)])
        assert header is not None and header.inflight == NO_PAGE
        page = rng.randrange(header.npages)
        data[header.ws_gpa + page * PAGE_SIZE + rng.randrange(PAGE_SIZE)] ^= 0x08
        bad = verify_dirty([(0, data)])
        assert not bad.ok and bad.first_bad_page == page, bad
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _run_vmferry(guest: str, append: str, mem: str = "64M") -> tuple[int, list[str]]:
    p = subprocess.run(
        [sys.executable, "-m", "vmferry", "run", "-m", mem, "--guest", guest, "--append", append,
         "--serial", "stdio"], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout.splitlines()


def _comparable(lines: list[str]) -> list[str]:
    # The only thing allowed to differ: how long the host held the guest's loop (`stall=`).
    return [re.sub(r" stalled=\d+ us stall=\d+ us", "", line) for line in lines]


@pytest.mark.qemu
@pytest.mark.kvm
@pytest.mark.parametrize(("guest", "append"), [("heartbeat", "hz=50 count=5"),
                                               ("dirty", "ws=4 rate=0 verify=1 runtime=2")])
def test_same_console_under_qemu_and_vmferry(guest: str, append: str) -> None:
    q_value, q_lines = run_qemu(guest, append)
    v_value, v_lines = _run_vmferry(guest, append)
    assert (q_value, v_value) == (0, 0)
    assert _comparable(q_lines) == _comparable(v_lines)
