"""`DirtyRing`: KVM's dirty ring for one VM (`--accel kvm,dirty-ring-size=N`), as a producer of
the RAM blocks' dirty logs and as the source of each vCPU's dirty rate.

With the ring on, KVM does not fill slot bitmaps (KVM_GET_DIRTY_LOG fails with ENXIO): each vCPU
has a ring of N entries (slot, page offset, flags), mmap'ed from its fd, that KVM appends to when
that vCPU dirties a page of a slot logging dirty pages. Harvesting a ring (`reap`):

1. read the entries from the ring's fetch index on while their flags say DIRTY (flags first: KVM
   publishes slot and offset before the flag; x86 does not reorder loads);
2. OR each (slot, offset) into that slot's *pending* bitmap and count it for the vCPU;
3. mark the entries harvested (flags RESET), then KVM_RESET_DIRTY_RINGS: KVM write-protects the
   pages again and recycles the entries.

All of it under one lock, and the pending bitmaps are handed to the dirty logs (`take_slot`, a
RamBlock's harvester) under the same lock — so a page harvested here is handed over only after it
was write-protected again: a write between harvest and reset goes unlogged, but the page is sent
after the reset, so that write's data goes with it (never lost).

A ring that reaches its soft limit makes the vCPU exit with KVM_EXIT_DIRTY_RING_FULL: its thread
reaps its own ring (`reap(vcpu)`) and goes on (machine/vcpu_runner.py); that is also where a
dirty limit makes a writing vCPU sleep (migration/dirty_limit.py).

Counting, per vCPU: `entries` = ring entries harvested; `pages` = distinct pages among each
harvest's entries. They differ: KVM may append several entries for one page between two harvests
(measured on this nested KVM: ~6 entries per distinct page for the `dirty` guest). Dirty rates use
`pages`; how often a ring fills follows `entries`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from vmferry.errors import VmferryError
from vmferry.kvm import ioctls as nr
from vmferry.kvm.vcpu import Vcpu
from vmferry.kvm.vm import Vm

GFN_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
assert GFN_DTYPE.itemsize == 16
# QEMU's bounds for dirty-ring-size: a power of two, at least 1024 ("4096 could be a good initial
# value"); the upper bound is what KVM_CAP_DIRTY_LOG_RING answers.
MIN_ENTRIES = 1024


def check_ring_size(entries: int, max_entries: int) -> None:
    """Refuse a dirty-ring-size QEMU would refuse, naming it."""
    if entries <= 0 or entries & (entries - 1):
        raise VmferryError(f"dirty-ring-size={entries}: must be a power of two")
    if not MIN_ENTRIES <= entries <= max_entries:
        raise VmferryError(f"dirty-ring-size={entries}: must be within {MIN_ENTRIES}..{max_entries} "
                           f"(the largest ring this KVM offers)")


@dataclass
class RingCounters:
    """One vCPU's harvest totals since the ring was set up (monotonic)."""

    entries: int = 0
    pages: int = 0
    full_exits: int = 0


class DirtyRing:
    def __init__(self, vm: Vm, entries: int) -> None:
        self.vm = vm
        self.entries = entries
        self._mask = entries - 1
        self._lock = threading.Lock()
        self._rings: list[np.ndarray] = []
        self._fetch: list[int] = []
        self.counters: list[RingCounters] = []
        self._pending: dict[int, np.ndarray] = {}  # slot id -> u64 bitmap of harvested pages
        self._npages: dict[int, int] = {}

    # --- setup ---

    def add_vcpu(self, vcpu: Vcpu) -> None:
        """Map the vCPU's ring. vCPUs are added in id order."""
        if vcpu.id != len(self._rings):
            raise VmferryError(f"dirty ring: vCPU {vcpu.id} added out of order")
        buf = vcpu.map_dirty_ring(self.entries)
        self._rings.append(np.frombuffer(buf, dtype=GFN_DTYPE))
        self._fetch.append(0)
        self.counters.append(RingCounters())

    def add_slot(self, slot: int, npages: int) -> None:
        with self._lock:
            self._pending[slot] = np.zeros((npages + 63) // 64, dtype=np.uint64)
            self._npages[slot] = npages

    def remove_slot(self, slot: int) -> None:
        with self._lock:
            self._pending.pop(slot, None)
            self._npages.pop(slot, None)

    def close(self) -> None:
        """Drop the numpy views, so the vCPUs can unmap their rings."""
        with self._lock:
            self._rings = []

    @property
    def nvcpus(self) -> int:
        return len(self.counters)

    # --- harvesting ---

    def reap(self, vcpu_id: int | None = None) -> int:
        """Harvest one vCPU's ring (None: every ring) into the pending bitmaps and reset what
        was harvested. Returns the number of entries harvested."""
        with self._lock:
            return self._reap_locked(vcpu_id)

    def ring_full(self, vcpu_id: int) -> None:
        """The vCPU exited with KVM_EXIT_DIRTY_RING_FULL: harvest its ring so it can go on."""
        with self._lock:
            self.counters[vcpu_id].full_exits += 1
            self._reap_locked(vcpu_id)

    def take_slot(self, slot: int, out: np.ndarray) -> None:
        """A RamBlock's harvester: reap every ring, then OR the slot's pending pages into `out`
        and clear them."""
        with self._lock:
            self._reap_locked(None)
            pending = self._pending.get(slot)
            if pending is not None:
                out |= pending
                pending[:] = 0

    def _reap_locked(self, vcpu_id: int | None) -> int:
        ids = range(len(self._rings)) if vcpu_id is None else (vcpu_id,)
        total = sum(self._reap_one(i) for i in ids)
        if total:
            self.vm.reset_dirty_rings()
        return total

    def _reap_one(self, i: int) -> int:
        ring = self._rings[i]
        pos = self._fetch[i] & self._mask
        total = 0
        while total < self.entries:
            dirty = (ring["flags"][pos:] & nr.DIRTY_GFN_F_DIRTY) != 0  # the flags: read first
            n = dirty.size if dirty.all() else int(np.argmin(dirty))
            if n == 0:
                break
            seg = ring[pos : pos + n]
            slots = seg["slot"].copy()
            offsets = seg["offset"].copy()
            seg["flags"] = nr.DIRTY_GFN_F_RESET
            self._note(i, slots, offsets)
            total += n
            pos = (pos + n) & self._mask
            if pos:  # stopped at an entry KVM has not filled
                break
        self._fetch[i] += total
        return total

    def _note(self, vcpu_id: int, slots: np.ndarray, offsets: np.ndarray) -> None:
        c = self.counters[vcpu_id]
        c.entries += int(slots.size)
        keys = np.unique((slots.astype(np.uint64) << np.uint64(40)) | offsets)
        c.pages += int(keys.size)
        key_slots = (keys >> np.uint64(40)).astype(np.int64)
        key_offsets = keys & np.uint64((1 << 40) - 1)
        for slot in np.unique(key_slots):
            pending = self._pending.get(int(slot))
            if pending is None:
                continue  # a slot removed since: nothing to tell anyone
            offs = key_offsets[key_slots == slot]
            offs = offs[offs < np.uint64(self._npages[int(slot)])]
            np.bitwise_or.at(pending, (offs >> np.uint64(6)).astype(np.int64),
                             np.left_shift(np.uint64(1), offs & np.uint64(63)))

    def snapshot(self) -> list[RingCounters]:
        """Every vCPU's counters, after reaping every ring (so they are current)."""
        with self._lock:
            self._reap_locked(None)
            return [RingCounters(c.entries, c.pages, c.full_exits) for c in self.counters]
