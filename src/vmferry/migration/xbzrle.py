"""XBZRLE (capability `xbzrle`): pages sent again as deltas against the copy sent before.

The delta codec is QEMU's encoding (migration/xbzrle.c): the page is compared byte by byte with
the cached copy, and the encoding is `(zrun nzrun bytes)*` — zrun the ULEB128 length of a run of
unchanged bytes, nzrun the ULEB128 length of the following run of changed bytes, then those bytes
as they are now; a trailing unchanged run is left out. Only the first zrun may be 0 and no nzrun
is 0, so an encoding is canonical. A page whose encoding would exceed `limit` bytes overflows
(sent whole); a page equal to its cached copy has no encoding (nothing to send).

`encode_pages` works on a whole chunk at once in numpy (no per-page or per-byte Python): changed
u64 words first, then the changed bytes inside only those words, so a page with 16 changed
bytes costs a few array elements, not 4096. `decode_into` is the destination's side: it applies
an encoding onto the page the destination holds, checking every length (the encoding comes from
the wire).

`PageCache` is the source's cache of the last content sent per page (QEMU's page_cache.c rule):
direct-mapped, slot = global page number mod slots (a power of two: `xbzrle-cache-size` /
page size), so a working set that fits in the cache never collides. A page found in another
page's slot replaces it only if that entry is older than CACHED_PAGE_LIFETIME claims, so two
pages that share a slot do not evict each other on every pass. Besides the content, each entry
keeps the generation it was sent at and the data channel that carried it (multifd): a delta for
a page travels on the channel its base went on (docs/migration.md, "XBZRLE").
"""

from __future__ import annotations

import contextlib
import mmap
from dataclasses import dataclass

import numpy as np

from vmferry.errors import StreamError
from vmferry.stream.format import checksum
from vmferry.stream.records import DELTA_ENTRY

ENCODING_XBZRLE = 1
CACHED_PAGE_LIFETIME = 2  # claims (QEMU: dirty syncs) an entry is protected from a conflicting page
EMPTY = -1
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def uleb_size(values: np.ndarray) -> np.ndarray:
    """Bytes of the ULEB128 encoding of each value (values below 2^28)."""
    v = values.astype(np.int64, copy=False)
    return 1 + (v >= 1 << 7).astype(np.int64) + (v >= 1 << 14) + (v >= 1 << 21)


def _write_uleb(out: np.ndarray, pos: np.ndarray, values: np.ndarray) -> None:
    """Write each value's ULEB128 at its position in `out` (vectorised, one byte row at a time)."""
    v = values.astype(np.int64, copy=True)
    p = pos.astype(np.int64, copy=True)
    while v.size:
        more = v >= 0x80
        out[p] = ((v & 0x7F) | (more.astype(np.int64) << 7)).astype(np.uint8)
        v, p = v[more] >> 7, p[more] + 1


def _spans(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indexes start[i] .. start[i] + lengths[i] - 1 of every span, concatenated."""
    lengths = lengths.astype(np.int64, copy=False)
    within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts.astype(np.int64, copy=False), lengths) + within


@dataclass
class Deltas:
    """A chunk's encoding. `rows`: the chunk rows (pages) that have a delta, ascending; `lengths`:
    the bytes of each one's delta, back to back in `data`. `overflow`: rows whose delta would
    exceed the limit (send them whole); `unchanged`: rows equal to their old copy."""

    rows: np.ndarray
    lengths: np.ndarray
    data: np.ndarray
    overflow: np.ndarray
    unchanged: np.ndarray


def encode_pages(old: np.ndarray, new: np.ndarray, limit: int) -> Deltas:
    """Encode each row of `new` (n, page_size) uint8 against the same row of `old`."""
    n, page = new.shape
    if old.shape != new.shape or page % 8:
        raise ValueError(f"old {old.shape} and new {new.shape} must be equal (n, page_size) arrays")
    words = page // 8
    empty = np.empty(0, dtype=np.int64)
    if n == 0:
        return Deltas(empty, empty, np.empty(0, dtype=np.uint8), empty, empty)
    o64 = old.view(np.uint64).reshape(n, words)
    n64 = new.view(np.uint64).reshape(n, words)
    wdiff = o64 != n64
    nwords = np.count_nonzero(wdiff, axis=1)
    changed = nwords > 0
    unchanged = np.flatnonzero(~changed)
    # An encoding is at least its changed bytes plus two length bytes per run of them. Pages
    # with many changed words get that bound from a bit mask of their changed bytes (one bit a
    # byte: popcounts give bytes and run starts), and overflow without their runs being listed,
    # so a page rewritten whole or changed all over costs a compare, not a walk of its bytes.
    maybe = np.flatnonzero(nwords * 8 > limit // 4)
    too_many = np.zeros(maybe.size, dtype=bool)
    if maybe.size:
        mask = np.packbits((old[maybe] != new[maybe]).reshape(maybe.size, words, 8), axis=2,
                           bitorder="little").reshape(maybe.size, words)
        carry = np.zeros_like(mask)
        carry[:, 1:] = mask[:, :-1] >> 7  # the previous byte, in the previous word
        starts = mask & ~((mask << 1) | carry)
        nbytes = _POPCOUNT[mask].sum(axis=1, dtype=np.int64)
        bound = nbytes + 2 * _POPCOUNT[starts].sum(axis=1, dtype=np.int64)
        too_many = bound > limit
        if too_many.any():
            wdiff[maybe[too_many]] = False
    # The changed bytes, as global positions row * page + column, ascending: only inside the
    # changed words (a sparse write touches a few words of a page).
    rw, cw = np.nonzero(wdiff)
    ob = old.reshape(n, words, 8)[rw, cw]
    nb = new.reshape(n, words, 8)[rw, cw]
    kk, jj = np.nonzero(ob != nb)
    pos = rw[kk].astype(np.int64) * page + cw[kk].astype(np.int64) * 8 + jj
    if not pos.size:  # every changed page overflowed
        return Deltas(empty, empty, np.empty(0, dtype=np.uint8), np.flatnonzero(changed), unchanged)
    # Runs of consecutive changed bytes, never across a page boundary.
    brk = np.flatnonzero((np.diff(pos) != 1) | (pos[1:] % page == 0)) + 1
    first_idx = np.concatenate(([0], brk))
    nz = np.diff(np.concatenate((first_idx, [pos.size])))
    start = pos[first_idx]
    row = start // page
    col = start % page
    end = col + nz
    new_row = np.ones(row.size, dtype=bool)
    new_row[1:] = row[1:] != row[:-1]
    prev_end = np.zeros_like(end)
    prev_end[1:] = end[:-1]
    z = np.where(new_row, col, col - prev_end)
    size = uleb_size(z) + uleb_size(nz) + nz
    page_len = np.bincount(row, weights=size, minlength=n).astype(np.int64)
    fits = page_len <= limit
    fits[maybe[too_many]] = False
    overflow = np.flatnonzero(changed & ~fits)
    rows = np.flatnonzero(changed & fits)
    keep = fits[row]
    z, nz, size, row, col = z[keep], nz[keep], size[keep], row[keep], col[keep]
    total = int(size.sum())
    out = np.empty(total, dtype=np.uint8)
    if total:
        off = np.cumsum(size) - size
        hz = uleb_size(z)
        _write_uleb(out, off, z)
        _write_uleb(out, off + hz, nz)
        dstart = off + hz + uleb_size(nz)
        out[_spans(dstart, nz)] = new.reshape(-1)[_spans(row * page + col, nz)]
    return Deltas(rows, page_len[rows], out, overflow, unchanged)


def encode_page(old: bytes, new: bytes, limit: int) -> bytes | None:
    """One page: its encoding, b"" when unchanged, None on overflow (tests and tools)."""
    o = np.frombuffer(old, dtype=np.uint8).reshape(1, -1)
    n = np.frombuffer(new, dtype=np.uint8).reshape(1, -1)
    d = encode_pages(o, n, limit)
    if d.overflow.size:
        return None
    return d.data.tobytes()


def _uleb(src: bytes, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end:
            raise StreamError("RAM_DELTA encoding ends inside a run length")
        b = src[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 21:
            raise StreamError("RAM_DELTA run length is longer than 4 bytes")


def decode_into(page: memoryview, src: bytes, start: int, end: int) -> None:
    """Apply the encoding src[start:end] onto `page` (writable, one page): the unchanged runs are
    skipped, the changed runs written. StreamError naming RAM_DELTA if the encoding is not
    canonical or runs past the page or its bytes (QEMU's decoder rules)."""
    limit = len(page)
    d, i = 0, start
    if i >= end:
        raise StreamError("RAM_DELTA page encoding is empty")
    while i < end:
        # Lengths below 128 (one byte) are the common case: read inline, no call.
        count = src[i]
        if count < 0x80:
            i += 1
        else:
            count, i = _uleb(src, i, end)
        if d and not count:  # only the first unchanged run may be empty
            raise StreamError("RAM_DELTA has an empty unchanged run after the first")
        d += count
        if i < end and src[i] < 0x80:
            count = src[i]
            i += 1
        else:
            count, i = _uleb(src, i, end)
        if not count:
            raise StreamError("RAM_DELTA has an empty changed run")
        if d + count > limit or i + count > end:
            raise StreamError(f"RAM_DELTA run of {count} bytes at {d} runs past the page or its encoding")
        page[d : d + count] = src[i : i + count]
        d += count
        i += count


def _hugepage_backed(nbytes: int) -> mmap.mmap:
    """Anonymous memory for the cache, backed lazily (untouched slots cost nothing) and with
    transparent huge pages where the kernel offers them: filling the cache in pass 1 then takes
    one fault per 2 MiB instead of one per page (measured on nested KVM: 4 KiB faults made a
    128 MiB pass 1 take 0.45-1.5 s instead of 0.17 s)."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no THP: 4 KiB pages, still correct
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


class PageCache:
    """The source's copies of the pages last sent (see the module doc). Not thread-safe: the
    migration thread owns it."""

    def __init__(self, cache_bytes: int, page_size: int, block_pages: list[int]) -> None:
        if cache_bytes < page_size or cache_bytes & (cache_bytes - 1):
            raise ValueError(f"xbzrle cache of {cache_bytes} bytes: must be a power of two of at "
                             f"least one page ({page_size})")
        self.page_size = page_size
        self.slots = cache_bytes // page_size
        self.cache_bytes = cache_bytes
        # Global page numbers: block b's pages follow the pages of the blocks before it.
        self._offsets = np.concatenate(([0], np.cumsum(block_pages)[:-1])).astype(np.int64)
        self.keys = np.full(self.slots, EMPTY, dtype=np.int64)
        self.ages = np.zeros(self.slots, dtype=np.int64)
        self.generations = np.zeros(self.slots, dtype=np.uint32)
        self.channels = np.zeros(self.slots, dtype=np.int16)
        self._map = _hugepage_backed(self.slots * page_size)
        self.data = np.frombuffer(self._map, dtype=np.uint8).reshape(self.slots, page_size)
        self.age = 0

    def keys_of(self, block_index: int, pages: np.ndarray) -> np.ndarray:
        return self._offsets[block_index] + pages.astype(np.int64)

    def slots_of(self, keys: np.ndarray) -> np.ndarray:
        return keys & (self.slots - 1)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Per key: is its page in the cache?"""
        return self.keys[self.slots_of(keys)] == keys

    def store(self, keys: np.ndarray, contents: np.ndarray, generation: int, channel: int) -> np.ndarray:
        """Cache these pages as sent at `generation` on `channel` (a hit's entry is updated; a
        miss takes its slot when the slot is free or its entry is old enough). -> per key, whether
        it is cached now. Keys must be distinct."""
        all_keys = keys
        all_slots = slots = self.slots_of(keys)
        held = self.keys[slots]
        ok = (held == keys) | (held == EMPTY) | (self.ages[slots] + CACHED_PAGE_LIFETIME <= self.age)
        if not ok.all():
            slots, keys, contents = slots[ok], keys[ok], contents[ok]
        # Two keys of one chunk in the same slot: numpy's last write wins for every field alike.
        self.keys[slots] = keys
        self.ages[slots] = self.age
        self.generations[slots] = generation
        self.channels[slots] = channel
        self.data[slots] = contents
        return self.keys[all_slots] == all_keys

    def invalidate(self, keys: np.ndarray) -> None:
        """Forget these pages (sent as zero pages, or on a lost channel): the next send is whole."""
        slots = self.slots_of(keys)
        hit = self.keys[slots] == keys
        self.keys[slots[hit]] = EMPTY


@dataclass
class XbzrleCounters:
    """query-migrate's `xbzrle-cache` (QEMU's names and meanings): pages and bytes sent as deltas,
    cache misses (pages looked up and not found), overflows (deltas too big: sent whole); the
    rates are over the last period (a pass: from one dirty-log sync to the next)."""

    cache_size: int = 0
    page_size: int = 4096
    bytes: int = 0
    pages: int = 0
    cache_miss: int = 0
    overflow: int = 0
    unchanged: int = 0  # dirty pages found equal to their cached copy: nothing sent (ours)
    looked_up: int = 0
    cache_miss_rate: float = 0.0
    encoding_rate: float = 0.0
    _prev: tuple[int, int, int, int] = (0, 0, 0, 0)

    def end_period(self) -> None:
        pages, nbytes, miss, looked = self._prev
        if self.pages > pages and self.bytes > nbytes:
            self.encoding_rate = (self.pages - pages) * self.page_size / (self.bytes - nbytes)
        if self.looked_up > looked:
            self.cache_miss_rate = (self.cache_miss - miss) / (self.looked_up - looked)
        self._prev = (self.pages, self.bytes, self.cache_miss, self.looked_up)

    def as_qmp(self) -> dict[str, object]:
        return {"cache-size": self.cache_size, "bytes": self.bytes, "pages": self.pages,
                "cache-miss": self.cache_miss, "cache-miss-rate": round(self.cache_miss_rate, 6),
                "encoding-rate": round(self.encoding_rate, 3), "overflow": self.overflow}


@dataclass
class ChunkPlan:
    """What XBZRLE made of a chunk's non-zero pages (row numbers into the chunk): `whole` go as
    pages (cache misses and overflows), `deltas` as RAM_DELTA records — one per channel their
    bases went on (`channels`, -1 without multifd) — and `unchanged` not at all."""

    whole: np.ndarray
    unchanged: np.ndarray
    deltas: list[tuple[int, np.ndarray, np.ndarray]]  # (channel, rows, DELTA_ENTRY array) ...
    delta_data: list[np.ndarray]  # ... and each one's encodings, back to back


class XbzrleSource:
    """The source's XBZRLE: the page cache, the encoder and the counters, used by the RAM saver
    on the migration thread. `plan` decides per chunk; `sent` records what went where."""

    def __init__(self, cache_bytes: int, page_size: int, block_pages: list[int],
                 limit: int | None = None) -> None:
        self.cache = PageCache(cache_bytes, page_size, block_pages)
        self.page_size = page_size
        # A delta of more than a quarter page saves less than 4x and still costs the destination
        # its decoding: such a page goes whole (QEMU's limit is the page itself).
        self.limit = page_size // 4 if limit is None else limit
        self.counters = XbzrleCounters(cache_size=cache_bytes, page_size=page_size)
        self._last_bytes_per_page = float(page_size)
        self._period = [0, 0]  # pages handled this claim period, bytes they cost
        # Seconds the migration thread spent per page (copy, encode, cache, send): deltas are
        # cheap on the wire but not on the CPU, and a switchover planned on bytes alone would
        # pause the guest for the encoding of every page still dirty.
        self._last_secs_per_page = 0.0
        self._timed = [0, 0.0]  # pages timed this period, seconds

    @property
    def bytes_per_page(self) -> float:
        """Bytes a page costs on the wire (wholes, deltas, unchanged pages at 0): what `pending`
        multiplies the dirty pages by, in the unit the bandwidth is measured in. This period's
        once it has seen a chunk's worth of pages, else the last period's."""
        pages, nbytes = self._period
        if pages >= 512:
            return max(32.0, nbytes / pages)
        return self._last_bytes_per_page

    @property
    def secs_per_page(self) -> float:
        """Seconds the saver spent on a page, this period's once it timed a chunk's worth."""
        pages, secs = self._timed
        return secs / pages if pages >= 512 else self._last_secs_per_page

    def timed(self, pages: int, secs: float) -> None:
        """The saver handled `pages` (a chunk, zero pages included) in `secs`."""
        self._timed[0] += pages
        self._timed[1] += secs

    def new_generation(self) -> None:
        """A claim from the dirty bitmaps: entries age by one."""
        self.cache.age += 1
        if self._period[0]:
            self._last_bytes_per_page = max(32.0, self._period[1] / self._period[0])
        self._period = [0, 0]
        if self._timed[0] >= 512:
            self._last_secs_per_page = self._timed[1] / self._timed[0]
        self._timed = [0, 0.0]

    def plan(self, block_index: int, pages: np.ndarray, data: np.ndarray, is_zero: np.ndarray) -> ChunkPlan:
        """`data`: the chunk's pages as (n, page_size) uint8 — the saver's private copy, or guest
        memory with the vCPUs paused; never live memory, since the delta and the cache copy must
        be of the same bytes."""
        keys = self.cache.keys_of(block_index, pages)
        if is_zero.any():
            self.cache.invalidate(keys[is_zero])  # a zero page goes as RAM_ZERO: its copy is stale
        rows = np.flatnonzero(~is_zero)
        c = self.counters
        c.looked_up += rows.size
        hit = self.cache.lookup(keys[rows])
        hits, misses = rows[hit], rows[~hit]
        c.cache_miss += misses.size
        deltas: list[tuple[int, np.ndarray, np.ndarray]] = []
        delta_data: list[np.ndarray] = []
        if not hits.size:
            self._period[0] += rows.size
            self._period[1] += rows.size * self.page_size
            return ChunkPlan(misses, hits, deltas, delta_data)
        slots = self.cache.slots_of(keys[hits])
        # Every page a hit (a later pass over a cached working set): no gather of the new pages.
        enc = encode_pages(self.cache.data[slots], data if hits.size == len(data) else data[hits], self.limit)
        c.overflow += enc.overflow.size
        c.unchanged += enc.unchanged.size
        whole = np.sort(np.concatenate((misses, hits[enc.overflow])))
        if enc.rows.size:
            drows = hits[enc.rows]
            entries = np.zeros(drows.size, dtype=DELTA_ENTRY)
            entries["page"] = pages[drows]
            entries["base"] = self.cache.generations[slots[enc.rows]]
            entries["length"] = enc.lengths
            entries["check"] = [checksum(row) for row in data[drows]]
            channels = self.cache.channels[slots[enc.rows]]
            offsets = np.concatenate(([0], np.cumsum(enc.lengths)))
            # Not np.unique: its first call imports numpy.ma (~30 ms), which could fall in a downtime.
            for ch in np.flatnonzero(np.bincount(channels)).tolist():
                sel = np.flatnonzero(channels == ch)
                deltas.append((int(ch), drows[sel], entries[sel]))
                delta_data.append(enc.data[_spans(offsets[sel], enc.lengths[sel])])
            nbytes = int(enc.lengths.sum()) + drows.size * DELTA_ENTRY.itemsize
            c.pages += drows.size
            c.bytes += nbytes
            self._period[1] += nbytes
        self._period[0] += rows.size
        self._period[1] += whole.size * self.page_size
        return ChunkPlan(whole, hits[enc.unchanged], deltas, delta_data)

    def sent(self, block_index: int, pages: np.ndarray, data: np.ndarray, generation: int,
             channel: int) -> None:
        """These pages (rows of `data`, the same copy `plan` saw) went whole or as deltas at
        `generation` on `channel`: the cache now holds exactly what the destination will."""
        if pages.size:
            self.cache.store(self.cache.keys_of(block_index, pages), data, generation, channel)

    def forget(self, block_index: int, mask: np.ndarray) -> None:
        """Pages handed to a lost channel: the destination may never have had their copies."""
        pages = np.flatnonzero(mask)
        if pages.size:
            self.cache.invalidate(self.cache.keys_of(block_index, pages))


def apply_deltas(dest: np.ndarray, rec_entries: np.ndarray, offsets: np.ndarray, data: bytes,
                 rows: np.ndarray | None = None) -> None:
    """The destination's side of a RAM_DELTA: apply entries `rows` (all if None) onto `dest`
    ((pages, page_size) uint8, the RAM block), each page decoded in a scratch copy and checked
    against its entry's checksum before anything is written. StreamError naming RAM_DELTA."""
    idx = np.arange(rec_entries.size) if rows is None else rows
    if not idx.size:
        return
    pages = rec_entries["page"][idx]
    scratch = dest[pages]  # a copy: the guest's pages change only once every check passed
    page_size = dest.shape[1]
    view = memoryview(scratch).cast("B")
    checks = rec_entries["check"][idx].tolist()
    for k, i in enumerate(idx.tolist()):
        page = view[k * page_size : (k + 1) * page_size]
        decode_into(page, data, int(offsets[i]), int(offsets[i + 1]))
        if checksum(page) != checks[k]:
            raise StreamError(f"RAM_DELTA page {int(pages[k])} does not match its checksum after xbzrle "
                              "decoding: the page here is not the copy the delta was computed against")
    del view
    dest[pages] = scratch
