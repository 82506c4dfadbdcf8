"""Tiny multiboot guests assembled inline (GNU as + ld), for tests that need a guest doing one
exact thing. Also tests that the loader accepts what this helper builds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmferry.machine import multiboot

HAVE_TOOLS = shutil.which("as") is not None and shutil.which("ld") is not None

_TEMPLATE = """
    .section .text
    .globl _start
    .align 4
mb_header:
    .long 0x1BADB002
    .long 0x00000003
    .long -(0x1BADB002 + 0x00000003)
_start:
    cli
{body}
"""

POWEROFF = """
    mov ${value}, %eax
    out %eax, $0xf4
9:  hlt
    jmp 9b
"""


def build_guest(tmp_path: Path, body: str, name: str = "guest") -> Path:
    """Assemble `body` (32-bit AT&T, runs at the multiboot entry with interrupts off) into a
    multiboot ELF32 loaded at 1 MiB."""
    if not HAVE_TOOLS:
        pytest.skip("GNU as/ld not installed")
    src = tmp_path / f"{name}.S"
    obj = tmp_path / f"{name}.o"
    elf = tmp_path / f"{name}.elf"
    src.write_text(_TEMPLATE.format(body=body))
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_i386", "-n", "-Ttext=0x100000", "-e", "_start", "--build-id=none",
         "-z", "max-page-size=0x1000", "-o", str(elf), str(obj)],
        check=True,
    )
    return elf


def poweroff(value: int) -> str:
    return POWEROFF.format(value=value)


def test_inline_guest_is_a_multiboot_image(tmp_path: Path) -> None:
    image = build_guest(tmp_path, poweroff(5)).read_bytes()
    mb = multiboot.parse(image)
    assert mb.segments[0][0] == 0x100000
    assert mb.entry == 0x100000 + 12  # _start follows the 12-byte header
