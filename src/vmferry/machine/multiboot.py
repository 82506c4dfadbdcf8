"""Multiboot v1 loader for ELF32 images (the guests in guests/, which also boot under
`qemu-system-x86_64 -kernel IMAGE -append ARGS`).

Low-memory convention shared with the guest programs:
  0x0500-0x7FFF  the loader's: GDT, multiboot info (MBI), loader name, memory map, command line
  0x8000-0x9FFFF the guest's (stacks, page tables, ...)
  1 MiB upward   the image (its PT_LOAD segments), then whatever the guest wants past its end

Entry state (Multiboot spec 3.2): CR0 = PE|ET, flat 4 GiB code (type 0xB, db=1, g=1) and data
segments from a GDT in guest RAM, EAX = 0x2BADB002, EBX = MBI address, interrupts off. Only the
boot vCPU is set up; the others stay in KVM's wait-for-SIPI.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from vmferry.errors import GuestError
from vmferry.kvm import structs as s
from vmferry.kvm.vcpu import Vcpu

MB_HEADER_MAGIC = 0x1BADB002
MB_BOOT_MAGIC = 0x2BADB002
MB_SEARCH_BYTES = 8192
MB_FLAG_AOUT_KLUDGE = 1 << 16
MB_SUPPORTED_REQUIRED = 0b111  # page-align modules, memory info, video mode (ignored: text only)

MBI_MEM, MBI_CMDLINE, MBI_MMAP, MBI_LOADER_NAME = 1 << 0, 1 << 2, 1 << 6, 1 << 9
MBI_SIZE = 116

GDT_GPA = 0x0500
MBI_GPA = 0x0600
LOADER_NAME_GPA = 0x0700
MMAP_GPA = 0x0800
CMDLINE_GPA = 0x1000
LOADER_END = 0x8000  # first byte the loader must not touch
CODE_SELECTOR, DATA_SELECTOR = 0x08, 0x10
LOADER_NAME = b"vmferry\0"

PT_LOAD = 1
EM_386 = 3

WriteGpa = Callable[[int, bytes], None]


@dataclass(frozen=True)
class MultibootImage:
    entry: int
    # (guest physical address, file bytes, memory size): memsz beyond the bytes is zeroed.
    segments: list[tuple[int, bytes, int]]


@dataclass(frozen=True)
class BootInfo:
    entry: int
    mbi_gpa: int
    image_end: int


def _find_header(image: bytes) -> tuple[int, tuple[int, ...]]:
    for off in range(0, min(len(image), MB_SEARCH_BYTES) - 12 + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic == MB_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            extra = struct.unpack_from("<5I", image, off + 12) if flags & MB_FLAG_AOUT_KLUDGE else ()
            return off, (flags, *extra)
    raise GuestError(f"no multiboot v1 header in the first {MB_SEARCH_BYTES} bytes")


def parse(image: bytes) -> MultibootImage:
    """The image's entry point and what to load where. ELF32 program headers, or the header's
    address fields when it sets the a.out kludge flag (bit 16)."""
    off, (flags, *addrs) = _find_header(image)
    if flags & 0xFFFF & ~MB_SUPPORTED_REQUIRED:
        raise GuestError(f"multiboot header requires unsupported features (flags {flags:#x})")
    if flags & MB_FLAG_AOUT_KLUDGE:
        header_addr, load_addr, load_end, bss_end, entry = addrs
        start = off - (header_addr - load_addr)
        end = len(image) if load_end == 0 else start + (load_end - load_addr)
        data = image[start:end]
        memsz = max(len(data), (bss_end - load_addr) if bss_end else 0)
        return MultibootImage(entry, [(load_addr, data, memsz)])
    return _parse_elf32(image)


def _parse_elf32(image: bytes) -> MultibootImage:
    if image[:4] != b"\x7fELF":
        raise GuestError("not an ELF image and no multiboot address fields")
    if image[4] != 1 or image[5] != 1:
        raise GuestError("multiboot v1 needs a 32-bit little-endian ELF (ELF64 is not loadable, as in QEMU)")
    # Elf32_Ehdr after e_ident: type, machine, version, entry, phoff, shoff, flags, ehsize,
    # phentsize, phnum, shentsize, shnum, shstrndx.
    (_, machine, _, entry, phoff, _, _, _, phentsize, phnum, _, _, _) = struct.unpack_from(
        "<HHIIIIIHHHHHH", image, 16
    )
    if machine != EM_386:
        raise GuestError(f"ELF machine {machine} is not i386")
    segments = []
    for i in range(phnum):
        p_type, p_offset, _, p_paddr, p_filesz, p_memsz, _, _ = struct.unpack_from(
            "<8I", image, phoff + i * phentsize
        )
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_offset + p_filesz > len(image):
            raise GuestError(f"ELF segment {i} extends past the end of the file")
        segments.append((p_paddr, image[p_offset : p_offset + p_filesz], p_memsz))
    if not segments:
        raise GuestError("ELF image has no loadable segment")
    return MultibootImage(entry, segments)


def load(
    image: bytes, cmdline: str, ram_ranges: list[tuple[int, int]], write_gpa: WriteGpa
) -> BootInfo:
    """Load `image` into guest RAM and build the multiboot info. `ram_ranges` are the system-RAM
    (gpa, nbytes) ranges for the memory map; `write_gpa` copies bytes into guest RAM."""
    mb = parse(image)
    low_end = next((gpa + n for gpa, n in ram_ranges if gpa == 0), 0)
    image_end = 0
    for gpa, data, memsz in mb.segments:
        if gpa < LOADER_END or not any(g <= gpa and gpa + memsz <= g + n for g, n in ram_ranges):
            raise GuestError(f"image segment [{gpa:#x}, +{memsz:#x}) does not fit in guest RAM")
        write_gpa(gpa, data + bytes(memsz - len(data)))
        image_end = max(image_end, gpa + memsz)

    cmd = cmdline.encode() + b"\0"
    if CMDLINE_GPA + len(cmd) > LOADER_END:
        limit = LOADER_END - CMDLINE_GPA - 1
        raise GuestError(f"command line too long ({len(cmd) - 1} bytes, at most {limit})")
    mmap = b"".join(struct.pack("<IQQI", 20, gpa, n, 1) for gpa, n in ram_ranges)
    if MMAP_GPA + len(mmap) > CMDLINE_GPA:
        raise GuestError("too many RAM ranges for the multiboot memory map")
    mbi = bytearray(MBI_SIZE)
    struct.pack_into(
        "<III", mbi, 0, MBI_MEM | MBI_CMDLINE | MBI_MMAP | MBI_LOADER_NAME,
        min(low_end, 640 * 1024) // 1024,  # mem_lower, KiB from 0
        max(0, min(low_end, 0xFFFFFFFF) - (1 << 20)) // 1024,  # mem_upper, KiB from 1 MiB
    )
    struct.pack_into("<I", mbi, 16, CMDLINE_GPA)
    struct.pack_into("<II", mbi, 44, len(mmap), MMAP_GPA)
    struct.pack_into("<I", mbi, 64, LOADER_NAME_GPA)
    gdt = struct.pack("<QQQ", 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
    for gpa, data in (
        (GDT_GPA, gdt),
        (MBI_GPA, bytes(mbi)),
        (LOADER_NAME_GPA, LOADER_NAME),
        (MMAP_GPA, mmap),
        (CMDLINE_GPA, cmd),
    ):
        write_gpa(gpa, data)
    return BootInfo(entry=mb.entry, mbi_gpa=MBI_GPA, image_end=image_end)


def _flat(selector: int, seg_type: int) -> s.KvmSegment:
    return s.KvmSegment(
        base=0, limit=0xFFFFFFFF, selector=selector, type=seg_type, present=1, dpl=0, db=1, s=1, l=0, g=1
    )


def set_entry_state(vcpu: Vcpu, boot: BootInfo) -> None:
    """Put the boot vCPU in the multiboot entry state (32-bit protected mode, paging off)."""
    sregs = vcpu.get_sregs()
    sregs.cs = _flat(CODE_SELECTOR, 0xB)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _flat(DATA_SELECTOR, 0x3))
    sregs.gdt.base, sregs.gdt.limit = GDT_GPA, 3 * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = 0x11  # PE | ET
    sregs.cr3 = sregs.cr4 = sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = s.KvmRegs(rip=boot.entry, rax=MB_BOOT_MAGIC, rbx=boot.mbi_gpa, rflags=0x2)
    vcpu.set_regs(regs)
