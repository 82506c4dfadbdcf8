"""The multiboot v1 loader without KVM: what it writes where, and its refusals."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from test_machine_asm import build_guest, poweroff
from vmferry.errors import GuestError
from vmferry.machine import multiboot
from vmferry.machine.machine_type import get_machine_type

GiB = 1 << 30


def load_into_dict(
    image: bytes, cmdline: str, ranges: list[tuple[int, int]]
) -> tuple[dict[int, bytes], multiboot.BootInfo]:
    writes: dict[int, bytes] = {}
    boot = multiboot.load(image, cmdline, ranges, lambda gpa, data: writes.__setitem__(gpa, data))
    return writes, boot


def test_mbi_memory_map_and_cmdline(tmp_path: Path) -> None:
    layout = get_machine_type().ram_layout(4 * GiB)
    ranges = [(r.gpa, r.nbytes) for r in layout if r.system_ram]
    writes, boot = load_into_dict(build_guest(tmp_path, poweroff(0)).read_bytes(), "ws=4 rate=8", ranges)
    assert all(gpa >= 0x500 and gpa + len(d) <= 0x8000 for gpa, d in writes.items() if gpa < 0x100000)
    flags, mem_lower, mem_upper = struct.unpack_from("<III", writes[multiboot.MBI_GPA])
    assert flags & (1 << 0) and flags & (1 << 2) and flags & (1 << 6)
    assert (mem_lower, mem_upper) == (640, (3 * GiB - (1 << 20)) // 1024)
    assert writes[multiboot.CMDLINE_GPA] == b"ws=4 rate=8\0"
    mmap = writes[multiboot.MMAP_GPA]
    entries = [struct.unpack_from("<IQQI", mmap, off) for off in range(0, len(mmap), 24)]
    assert entries == [(20, 0, 3 * GiB, 1), (20, 4 * GiB, 1 * GiB, 1)]  # no vga.vram
    assert boot.entry == 0x10000C


def test_refuses_images_it_cannot_boot(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="no multiboot v1 header"):
        multiboot.parse(b"\x7fELF" + bytes(9000))
    good = bytearray(build_guest(tmp_path, poweroff(0)).read_bytes())
    good[4] = 2  # ELFCLASS64
    with pytest.raises(GuestError, match="32-bit"):
        multiboot.parse(bytes(good))
    with pytest.raises(GuestError, match="does not fit"):
        load_into_dict(build_guest(tmp_path, poweroff(0)).read_bytes(), "", [(0, 1 << 20)])
    with pytest.raises(GuestError, match="command line too long"):
        load_into_dict(build_guest(tmp_path, poweroff(0)).read_bytes(), "x" * 0x8000, [(0, 64 << 20)])
