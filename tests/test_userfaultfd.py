"""userfaultfd on real KVM (kvm/userfaultfd.py): a guest reading pages that are missing blocks in
KVM_RUN until a resolver thread places them, then continues with the right contents; closing the
userfaultfd wakes a vCPU blocked on a page that never came (it reads zeros) so the machine can
close; a host thread copying from a missing page with a GIL-releasing call is resolved too."""

from __future__ import annotations

import ctypes
import mmap
import threading
from pathlib import Path

import pytest

from polling import wait_for
from test_machine_asm import build_guest
from vmferry.kvm.userfaultfd import PAGE_SIZE, Fault, Userfaultfd
from vmferry.machine.machine import Machine

MiB = 1 << 20
FIRST = 0x800  # guest page 8 MiB: nothing of the kernel image lives there
PAGES = 32

# Sums the first dword of PAGES pages from 8 MiB on, then writes (sum + page number) into the
# last dword of each, and powers off with the sum as its status.
SUM_GUEST = f"""
    xor %eax, %eax
    mov ${FIRST * PAGE_SIZE:#x}, %esi
    mov ${PAGES}, %ecx
1:  add (%esi), %eax
    add $4096, %esi
    loop 1b
    mov ${FIRST * PAGE_SIZE:#x}, %esi
    mov ${PAGES}, %ecx
    xor %edx, %edx
2:  mov %eax, %ebx
    add %edx, %ebx
    mov %ebx, 4092(%esi)
    inc %edx
    add $4096, %esi
    loop 2b
    out %eax, $0xf4
9:  hlt
    jmp 9b
"""


class Resolver:
    """Places page FIRST+i as dwords of i+1 (pages in `withheld` never), anything else as zeros."""

    def __init__(self, uffd: Userfaultfd, base: int, withheld: range = range(0)) -> None:
        self.uffd, self.base, self.withheld = uffd, base, withheld
        self.faults: list[Fault] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.uffd.closed:
            for f in self.uffd.wait(0.1):
                self.faults.append(f)
                page = (f.address - self.base) // PAGE_SIZE
                at = f.address & ~(PAGE_SIZE - 1)
                if page - FIRST in self.withheld:
                    continue
                if FIRST <= page < FIRST + PAGES:
                    data = (ctypes.c_uint32 * (PAGE_SIZE // 4))(*([page - FIRST + 1] * (PAGE_SIZE // 4)))
                    self.uffd.copy(at, ctypes.addressof(data), PAGE_SIZE)
                else:
                    self.uffd.zeropage(at, PAGE_SIZE)

    def join(self) -> None:
        self._thread.join(10)


@pytest.mark.kvm
def test_a_guest_reading_missing_pages_continues_once_they_are_placed(tmp_path: Path) -> None:
    with Machine(memory=32 * MiB) as m:
        m.load_kernel(build_guest(tmp_path, SUM_GUEST))
        ram = m.ram_block("pc.ram")
        uffd = Userfaultfd()
        try:
            uffd.register(ram.host_addr, ram.nbytes)
            resolver = Resolver(uffd, ram.host_addr)
            m.start()
            status = m.wait(60)
            want = PAGES * (PAGES + 1) // 2
            assert status is not None and (status.kind, status.code) == ("poweroff", want)
            # Every page of the range faulted once, on the vCPU's thread.
            pages = {(f.address - ram.host_addr) // PAGE_SIZE for f in resolver.faults}
            assert set(range(FIRST, FIRST + PAGES)) <= pages
            assert {f.thread_id for f in resolver.faults} == set(m.vcpu_thread_ids())
            # The placed pages hold what was placed plus the guest's own write (read through
            # ctypes.memmove: never through mmap indexing, see the module's hazard note).
            for i in range(PAGES):
                got = (ctypes.c_uint32 * 1024)()
                ctypes.memmove(got, ram.host_addr + (FIRST + i) * PAGE_SIZE, PAGE_SIZE)
                assert got[0] == i + 1 and got[1022] == i + 1 and got[1023] == want + i
        finally:
            uffd.close()
        resolver.join()
        uffd.release()


@pytest.mark.kvm
def test_closing_the_userfaultfd_wakes_a_vcpu_blocked_on_a_page_that_never_came(tmp_path: Path) -> None:
    with Machine(memory=32 * MiB) as m:
        m.load_kernel(build_guest(tmp_path, SUM_GUEST))
        ram = m.ram_block("pc.ram")
        uffd = Userfaultfd()
        withheld = range(PAGES // 2, PAGES)
        try:
            uffd.register(ram.host_addr, ram.nbytes)
            resolver = Resolver(uffd, ram.host_addr, withheld)
            m.start()
            wait_for(lambda: any((f.address - ram.host_addr) // PAGE_SIZE == FIRST + withheld[0]
                                 for f in resolver.faults), timeout_s=60, what="the withheld page's fault")
            assert not m.finished  # blocked on it
        finally:
            uffd.close()  # before the machine closes: the blocked vCPU gets zero pages
        status = m.wait(60)
        half = PAGES // 2
        assert status is not None and (status.kind, status.code) == ("poweroff", half * (half + 1) // 2)
        resolver.join()
        uffd.release()


def test_a_host_thread_copying_from_a_missing_page_without_the_gil_is_resolved() -> None:
    mem = mmap.mmap(-1, 16 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(mem)
    base = ctypes.addressof(anchor)
    del anchor
    uffd = Userfaultfd()
    try:
        uffd.register(base, 16 * PAGE_SIZE)
        out = ctypes.create_string_buffer(PAGE_SIZE)
        reader = threading.Thread(target=ctypes.memmove, args=(out, base + 3 * PAGE_SIZE, PAGE_SIZE))
        reader.start()
        faults = uffd.wait(30)
        assert [(f.address & ~(PAGE_SIZE - 1)) - base for f in faults] == [3 * PAGE_SIZE]
        assert faults[0].thread_id == reader.native_id
        src = ctypes.create_string_buffer(b"\xab" * PAGE_SIZE, PAGE_SIZE)
        assert uffd.copy(base + 3 * PAGE_SIZE, ctypes.addressof(src), PAGE_SIZE)
        assert not uffd.copy(base + 3 * PAGE_SIZE, ctypes.addressof(src), PAGE_SIZE)  # EEXIST
        reader.join(30)
        assert out.raw == b"\xab" * PAGE_SIZE
    finally:
        uffd.release()
        mem.close()


def test_device_reads_and_writes_of_guest_ram_fault_and_are_resolved_without_deadlock() -> None:
    """Devices reach guest RAM only through RamBlock.read/write (Machine.read_gpa/write_gpa,
    virtqueue.py's accessors): on a missing page those fault with the GIL released, so the
    Python resolver thread runs and places the page. A GIL-holding access here would hang."""
    from vmferry.machine.ramblock import RamBlock

    block = RamBlock("test.ram", 0x100000, 16 * PAGE_SIZE)
    uffd = Userfaultfd()
    seen: list[int] = []

    def resolve() -> None:
        while not uffd.closed:
            for f in uffd.wait(0.1):
                page = (f.address - block.host_addr) // PAGE_SIZE
                seen.append(page)
                data = ctypes.create_string_buffer(bytes([page]) * PAGE_SIZE, PAGE_SIZE)
                uffd.copy(block.host_addr + page * PAGE_SIZE, ctypes.addressof(data), PAGE_SIZE)

    resolver = threading.Thread(target=resolve, daemon=True)
    try:
        uffd.register(block.host_addr, block.nbytes)
        resolver.start()
        assert block.read(0x100000 + 5 * PAGE_SIZE + 10, 4) == bytes([5]) * 4  # a descriptor read
        block.write(0x100000 + 9 * PAGE_SIZE + 100, b"\x01\x02")  # a status byte written back
        assert block.read(0x100000 + 9 * PAGE_SIZE + 99, 4) == b"\x09\x01\x02\x09"
        assert seen == [5, 9]
    finally:
        uffd.close()
        resolver.join(10)
        uffd.release()
        block.close()
