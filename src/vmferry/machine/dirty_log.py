"""`DirtyLog`: which units of some guest-visible store changed, from several producers, for
several consumers. Units are whatever the owner tracks: 4 KiB pages of a RAM block today, blocks
of a disk tomorrow; the log only counts them.

Producers:
- *harvested* ones (`add_harvester`): a function that, at each `sync()`, ORs into a given bitmap
  what it saw since the last sync and resets itself — KVM's per-slot dirty log for guest writes;
- the *noted* one (`note`): any host-side writer (the VMM copying into guest RAM, a device
  thread doing DMA, a block job) records the units it wrote, right after writing them.

Consumers (`add_consumer`): each has its own bitmap and clears bits in it as it handles units;
that never affects another consumer. Consumers see producers' bits only at `sync()`, which runs
on the consumer's side: a noted write is held in the log's pending bitmap until then, so a
consumer clearing its bitmap while another thread notes a write cannot lose that write.

Order rule for a noting writer: write the data first, then `note` it. A consumer that syncs in
between sends the new data and sees the unit again at its next sync (sent twice, never lost);
noting first would let a sync claim the unit and send the old data.

Producers record only while the log is active (`start()` .. `stop()`); before that, owners
find what holds data some other way (RamBlock: mincore). Bitmap layout everywhere: bit i of
little-endian u64 word j = unit 64*j+i (the KVM_GET_DIRTY_LOG layout).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from vmferry.errors import VmferryError

Harvester = Callable[[np.ndarray], None]
_ALL = (1 << 64) - 1


def units_to_bitmap(unit_mask: np.ndarray) -> np.ndarray:
    """A bool array (one entry per unit) -> u64 bitmap."""
    nwords = (len(unit_mask) + 63) // 64
    packed = np.packbits(unit_mask.astype(bool), bitorder="little")
    out = np.zeros(nwords * 8, dtype=np.uint8)
    out[: len(packed)] = packed
    return out.view(np.uint64)


def bitmap_to_units(bitmap: np.ndarray, nunits: int) -> np.ndarray:
    """u64 bitmap -> sorted array of the set unit indexes below nunits."""
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:nunits]
    return np.flatnonzero(bits)


def set_bit_range(bitmap: np.ndarray, first: int, count: int) -> None:
    """Set bits [first, first+count) of a u64 bitmap."""
    if count <= 0:
        return
    end = first + count
    w0, w1 = first // 64, (end - 1) // 64
    lo = (_ALL << (first % 64)) & _ALL
    hi = _ALL >> (63 - (end - 1) % 64)
    if w0 == w1:
        bitmap[w0] |= np.uint64(lo & hi)
        return
    bitmap[w0] |= np.uint64(lo)
    bitmap[w0 + 1 : w1] = np.uint64(_ALL)
    bitmap[w1] |= np.uint64(hi)


class DirtyLog:
    def __init__(self, nunits: int, what: str = "dirty log") -> None:
        if nunits <= 0:
            raise VmferryError(f"{what}: needs at least one unit")
        self.nunits = nunits
        self.what = what  # named in errors ("RAM block pc.ram")
        self.nwords = (nunits + 63) // 64
        self._lock = threading.Lock()  # consumers, harvesters, the active flag
        self._noted_lock = threading.Lock()  # only the pending bitmap: writers hold it briefly
        self._active = False
        self._consumers: dict[str, np.ndarray] = {}
        self._harvesters: dict[str, Harvester] = {}
        self._noted = np.zeros(self.nwords, dtype=np.uint64)
        self._scratch = np.zeros(self.nwords, dtype=np.uint64)
        self._harvest = np.zeros(self.nwords, dtype=np.uint64)

    # --- producers ---

    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> None:
        """Producers record from now on. What any of them saw before is dropped."""
        with self._lock:
            if self._active:
                return
            for harvest in self._harvesters.values():
                self._scratch[:] = 0
                harvest(self._scratch)
            with self._noted_lock:
                self._noted[:] = 0
                self._active = True

    def stop(self) -> None:
        """Producers stop recording. Call sync() first to keep what they saw until now."""
        with self._lock, self._noted_lock:
            self._active = False

    def add_harvester(self, name: str, harvest: Harvester) -> None:
        """A producer polled at each sync(): `harvest(bitmap)` ORs its units into the (zeroed)
        bitmap and resets itself. It is polled only while the log is active."""
        with self._lock:
            if name in self._harvesters:
                raise VmferryError(f"{self.what}: dirty producer {name!r} already exists")
            self._harvesters[name] = harvest

    def remove_harvester(self, name: str) -> None:
        with self._lock:
            self._harvesters.pop(name, None)

    def note(self, first: int, count: int) -> None:
        """A host-side writer changed units [first, first+count): call right after the write.
        Thread-safe and cheap; a no-op while the log is not active."""
        if not self._active or count <= 0:
            return
        if first < 0 or first + count > self.nunits:
            raise VmferryError(f"{self.what}: units [{first}, +{count}) outside 0..{self.nunits}")
        with self._noted_lock:
            if self._active:
                set_bit_range(self._noted, first, count)

    # --- consumers ---

    def add_consumer(self, name: str) -> None:
        """A new consumer: it sees the units changed from now on. What producers saw before is
        first folded into the existing consumers, so the newcomer starts all-clear."""
        with self._lock:
            if name in self._consumers:
                raise VmferryError(f"{self.what}: dirty consumer {name!r} already exists")
            self._sync_locked()
            self._consumers[name] = np.zeros(self.nwords, dtype=np.uint64)

    def remove_consumer(self, name: str) -> int:
        """Drop a consumer; returns how many consumers remain."""
        with self._lock:
            self._consumers.pop(name, None)
            return len(self._consumers)

    def bitmap(self, name: str) -> np.ndarray:
        """The consumer's own u64 bitmap, live: the consumer clears bits in it as it goes."""
        try:
            return self._consumers[name]
        except KeyError:
            raise VmferryError(f"{self.what}: no dirty consumer {name!r}") from None

    def mark(self, name: str, unit_mask: np.ndarray) -> None:
        """OR a bool-per-unit mask into one consumer's bitmap."""
        bm = self.bitmap(name)
        with self._lock:
            bm |= units_to_bitmap(unit_mask)

    def take(self, name: str) -> np.ndarray | None:
        """Atomically copy and clear one consumer's bitmap (None if nothing is set): a sync
        folding into it from another thread can neither be lost nor half-taken."""
        bm = self.bitmap(name)
        with self._lock:
            if not bm.any():
                return None
            taken = bm.copy()
            bm[:] = 0
            return taken

    def units(self, name: str) -> np.ndarray:
        """Indexes of the units set in the consumer's bitmap."""
        return bitmap_to_units(self.bitmap(name), self.nunits)

    def sync(self) -> int:
        """Collect every producer's units since the last sync and OR them into every consumer's
        bitmap. Returns how many distinct units the producers reported."""
        with self._lock:
            return self._sync_locked()

    def _sync_locked(self) -> int:
        if not self._active:
            return 0
        self._harvest[:] = 0
        for harvest in self._harvesters.values():
            self._scratch[:] = 0
            harvest(self._scratch)
            self._harvest |= self._scratch
        with self._noted_lock:
            self._harvest |= self._noted
            self._noted[:] = 0
        for bm in self._consumers.values():
            bm |= self._harvest
        return int(np.bitwise_count(self._harvest).sum())
