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

from dataclasses import dataclass

import numpy as np

from vmferry.errors import StreamError

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
        within = np.arange(int(nz.sum()), dtype=np.int64) - np.repeat(np.cumsum(nz) - nz, nz)
        out[np.repeat(dstart, nz) + within] = new.reshape(-1)[np.repeat(row * page + col, nz) + within]
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
        count, i = _uleb(src, i, end)
        if d and not count:  # only the first unchanged run may be empty
            raise StreamError("RAM_DELTA has an empty unchanged run after the first")
        d += count
        count, i = _uleb(src, i, end)
        if not count:
            raise StreamError("RAM_DELTA has an empty changed run")
        if d + count > limit or i + count > end:
            raise StreamError(f"RAM_DELTA run of {count} bytes at {d} runs past the page or its encoding")
        page[d : d + count] = src[i : i + count]
        d += count
        i += count


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
        # Lazily backed: untouched slots cost no memory (np.zeros maps fresh anonymous pages).
        self.data = np.zeros((self.slots, page_size), dtype=np.uint8)
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
        slots = self.slots_of(keys)
        held = self.keys[slots]
        ok = (held == keys) | (held == EMPTY) | (self.ages[slots] + CACHED_PAGE_LIFETIME <= self.age)
        # Two keys of one chunk in the same slot: numpy's last write wins for every field alike.
        s = slots[ok]
        self.keys[s] = keys[ok]
        self.ages[s] = self.age
        self.generations[s] = generation
        self.channels[s] = channel
        self.data[s] = contents[ok]
        return self.keys[slots] == keys

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
