"""A virtio 1.x split virtqueue, as the device sees it (virtio spec 1.2, section 2.7).

Layout in guest RAM, all little-endian, at the three addresses the driver gives:

    descriptor table  num x {u64 addr; u32 len; u16 flags; u16 next}     (flags: NEXT=1, WRITE=2)
    available ring    {u16 flags; u16 idx; u16 ring[num]}                 (flags: NO_INTERRUPT=1)
    used ring         {u16 flags; u16 idx; {u32 id; u32 len} ring[num]}

`last_avail_idx` (the next available entry the device will take) and `used_idx` (the next used
entry it will fill) are the device's whole position in the queue: with the four addresses and
`num` they are what migrates. Indirect descriptors and event indexes are not offered.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol

from vmferry.errors import GuestError

DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
QUEUE_NUM_MAX = 256
_DESC = struct.Struct("<QIHH")


class GuestMemory(Protocol):
    def read_gpa(self, gpa: int, nbytes: int) -> bytes: ...

    def write_gpa(self, gpa: int, data: bytes) -> None: ...


def dma_write(mem: GuestMemory, gpa: int, data: bytes) -> None:
    """Every byte a virtio device writes into guest RAM (read data, status, used ring) goes
    through here: the one place that will also tell the dirty log's VMM-side producer
    (`RamBlock.note_written`), since KVM's dirty log sees only the guest's own writes."""
    mem.write_gpa(gpa, data)


@dataclass
class Chain:
    """One request: its head descriptor index, and its buffers as (gpa, nbytes) in order —
    first those the device reads, then those it writes (the spec requires that order)."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class VirtQueue:
    num: int = 0  # queue size the driver chose (0 = not set up)
    ready: int = 0
    desc_gpa: int = 0
    avail_gpa: int = 0
    used_gpa: int = 0
    last_avail_idx: int = 0
    used_idx: int = 0

    def reset(self) -> None:
        self.num = self.ready = self.desc_gpa = self.avail_gpa = self.used_gpa = 0
        self.last_avail_idx = self.used_idx = 0

    def pop(self, mem: GuestMemory) -> Chain | None:
        """The next available request, or None when the driver has offered nothing new."""
        if not self.ready or not self.num:
            return None
        avail_idx = int.from_bytes(mem.read_gpa(self.avail_gpa + 2, 2), "little")
        if avail_idx == self.last_avail_idx:
            return None
        if (avail_idx - self.last_avail_idx) & 0xFFFF > self.num:
            raise GuestError(f"virtqueue: avail idx {avail_idx} is more than {self.num} ahead of "
                             f"{self.last_avail_idx}")
        slot = self.avail_gpa + 4 + 2 * (self.last_avail_idx % self.num)
        head = int.from_bytes(mem.read_gpa(slot, 2), "little")
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return self.walk(mem, head)

    def walk(self, mem: GuestMemory, head: int) -> Chain:
        """The request whose chain starts at descriptor `head` (also: one carried over by a
        migration, re-read from the descriptor table on the destination)."""
        chain = Chain(head)
        index = head
        for _ in range(self.num):
            if index >= self.num:
                raise GuestError(f"virtqueue: descriptor index {index} >= queue size {self.num}")
            addr, length, flags, nxt = _DESC.unpack(mem.read_gpa(self.desc_gpa + 16 * index, 16))
            if flags & DESC_F_INDIRECT:
                raise GuestError("virtqueue: indirect descriptor, but the feature was not offered")
            if flags & DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise GuestError("virtqueue: a device-readable descriptor after a writable one")
            else:
                chain.readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return chain
            index = nxt
        raise GuestError(f"virtqueue: descriptor chain from {head} loops")

    def push(self, mem: GuestMemory, head: int, written: int) -> None:
        """Return a request to the driver: used element {head, bytes written}, then the index."""
        elem = self.used_gpa + 4 + 8 * (self.used_idx % self.num)
        dma_write(mem, elem, struct.pack("<II", head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        dma_write(mem, self.used_gpa + 2, self.used_idx.to_bytes(2, "little"))

    def wants_interrupt(self, mem: GuestMemory) -> bool:
        flags = int.from_bytes(mem.read_gpa(self.avail_gpa, 2), "little")
        return not flags & AVAIL_F_NO_INTERRUPT
