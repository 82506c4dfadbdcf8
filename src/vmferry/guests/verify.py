"""Host-side check of the `dirty` guest's memory: did every page survive (a migration) intact?

The guest keeps, in its own RAM (guests/dirty_layout.h is the other half of this contract)::

    GPA 0x9000   header, 0x80 bytes, little-endian
                 0x00 magic "VMFDIRTY"     0x08 u32 version (1)   0x0c u32 header_size (0x80)
                 0x10 u64 ws_gpa           0x18 u64 npages        0x20 u64 table_gpa
                 0x28 u32 entry_size (4)   0x2c u32 page_size (4096)
                 0x30 u64 generation       last generation stamped, 0 before any write
                 0x38 u64 inflight         page being rewritten, or 2**64-1
                 0x40 u64 filled           pages [0, filled) were written at least once
                 0x48 u64 writes           page writes since boot
                 0x50 u64 verify_passes    0x58 u64 verify_fails (the guest's own checks)
                 0x60 u32 rate_mib_s  0x64 u16 pattern (1 uniform, 2 hot)
                 0x66 u16 fill (version 2; 0 stamp, 1 text, 2 sparse, 3 random)     0x68 u32 hot_percent
                 0x6c u32 hot_writes  0x70 u64 seed
                 0x78 u64 table_sum        sum of all table entries mod 2**64
    table_gpa    npages x u32: the generation last written to page i (0 = never)
    ws_gpa       npages x 4 KiB: u64s 0 and 511 of page i are its stamp (table[i] << 32) | i;
                 with fill=stamp (version 1) every u64 is; with text/sparse u64s 1..510 are word
                 tokens picked by a hash of (i, table[i] for text or 0 for sparse, u64 index),
                 with random the hash of (i, table[i], u64 index) itself: `expected_pages`

A rewrite of page p goes: inflight = p; stamp the page (rep stosq); table_sum += new - old;
table[p] = new; generation = new; writes += 1; inflight = none. So a guest paused at any
instruction has at most one page (the in-flight one) that disagrees with the table, and its
u64s each hold either the table's generation or the next one. Generations are 32-bit and wrap
from 2**32-1 to 1.

The verifier checks every u64 of every written page (the guest's own periodic check does too,
unless started with check=ends) with numpy over whole buffers: about a second per GiB.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from collections.abc import Buffer  # Python 3.12+
except ImportError:  # Python 3.11: anything with the buffer protocol (bytes, mmap, memoryview, ...)
    Buffer = Any  # type: ignore[misc,assignment]

HEADER_GPA = 0x9000
MAGIC = b"VMFDIRTY"
LAYOUT_VERSIONS = (1, 2)  # 2 adds `fill`; a guest with fill=stamp says 1
FILL_STAMP, FILL_TEXT, FILL_SPARSE, FILL_RANDOM = 0, 1, 2, 3
FILL_NAMES = {FILL_STAMP: "stamp", FILL_TEXT: "text", FILL_SPARSE: "sparse", FILL_RANDOM: "random"}
NO_PAGE = 0xFFFF_FFFF_FFFF_FFFF
PAGE_SIZE = 4096
PAGE_U64S = PAGE_SIZE // 8
ENTRY_SIZE = 4
GEN_MAX = 0xFFFF_FFFF

_HEADER = struct.Struct("<8sIIQQQIIQQQQQQIHHIIQQ")
assert _HEADER.size == 0x80
# Pages compared per numpy call: big enough to amortise the call, small enough that the
# temporaries (one bool per u64) stay in cache-sized chunks rather than a copy of RAM.
_CHUNK_PAGES = 2048


@dataclass(frozen=True)
class DirtyHeader:
    magic: bytes
    version: int
    header_size: int
    ws_gpa: int
    npages: int
    table_gpa: int
    entry_size: int
    page_size: int
    generation: int
    inflight: int
    filled: int
    writes: int
    verify_passes: int
    verify_fails: int
    rate_mib_s: int
    pattern: int
    fill: int
    hot_percent: int
    hot_writes: int
    seed: int
    table_sum: int


@dataclass(frozen=True)
class Verdict:
    ok: bool
    pages: int  # pages checked: the header's `filled`
    generation: int  # the header's `generation` (0 when there is no header)
    first_bad_page: int | None
    reason: str

    def __str__(self) -> str:
        if self.ok:
            return f"verify ok gen={self.generation} pages={self.pages}"
        where = f" page={self.first_bad_page}" if self.first_bad_page is not None else ""
        return f"verify FAIL{where}: {self.reason}"


def _next_gen(gen: int) -> int:
    return gen + 1 if gen < GEN_MAX else 1


# The text fills' tokens (guests/dirty.c make_tokens, restated): each vocabulary word cut to 7
# letters and padded with spaces to 8 bytes, as a little-endian u64.
_VOCAB = ("the", "migration", "of", "a", "guest", "page", "is", "sent", "and", "memory", "to", "dirty",
          "log", "while", "vCPU", "runs", "in", "destination", "source", "with", "bytes", "that",
          "switchover", "on", "each", "pass", "for", "device", "state", "stream", "record", "host")
TOKENS = np.frombuffer(b"".join(w[:7].ljust(8).encode() for w in _VOCAB), dtype="<u8")


def _word_hash(pages: np.ndarray, gens: np.ndarray) -> np.ndarray:
    """dirty.c page_word's hash for u64s 1..510 of each page: shape (n, 510), uint64."""
    with np.errstate(over="ignore"):
        key = (pages.astype(np.uint64) << np.uint64(32)) | gens.astype(np.uint64)
        j = np.arange(1, PAGE_U64S - 1, dtype=np.uint64)
        x = key[:, None] * np.uint64(0x9E3779B97F4A7C15) + j[None, :] * np.uint64(0xD1B54A32D192ED03)
        x ^= x >> np.uint64(29)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(32)
    return x


def expected_pages(fill: int, pages: np.ndarray, gens: np.ndarray) -> np.ndarray:
    """What pages `pages` (u64 indexes) hold at generations `gens` (u32): shape (n, PAGE_U64S)."""
    stamps = (gens.astype(np.uint64) << np.uint64(32)) | pages.astype(np.uint64)
    if fill == FILL_STAMP:
        return np.repeat(stamps[:, None], PAGE_U64S, axis=1)
    out = np.empty((len(pages), PAGE_U64S), dtype="<u8")
    body_gens = np.zeros_like(gens) if fill == FILL_SPARSE else gens  # sparse: the text never changes
    x = _word_hash(pages, body_gens)
    if fill == FILL_RANDOM:
        out[:, 1 : PAGE_U64S - 1] = x
    else:
        out[:, 1 : PAGE_U64S - 1] = TOKENS[(x % np.uint64(len(TOKENS))).astype(np.intp)]
    out[:, 0] = stamps
    out[:, PAGE_U64S - 1] = stamps
    return out


class _Memory:
    """Guest-physical reads over (gpa, buffer) regions. Whole-page views are zero-copy; a page or
    range that straddles two regions is copied."""

    def __init__(self, regions: Sequence[tuple[int, Buffer]]) -> None:
        self.regions = sorted(((gpa, memoryview(buf).cast("B")) for gpa, buf in regions), key=lambda r: r[0])

    def read(self, gpa: int, nbytes: int) -> bytes | None:
        """The bytes at [gpa, gpa+nbytes), or None if some of them are in no region."""
        out = bytearray()
        cur, end = gpa, gpa + nbytes
        for base, mv in self.regions:
            if base <= cur < base + len(mv):
                take = min(end, base + len(mv)) - cur
                out += mv[cur - base : cur - base + take]
                cur += take
                if cur == end:
                    return bytes(out)
        return bytes(out) if cur == end else None

    def page_chunks(self, gpa: int, npages: int) -> list[tuple[int, np.ndarray]] | int:
        """Pages [0, npages) of the array at gpa as (first page, u64 array of shape (n, 512))
        pieces, or the first page index that no region holds."""
        chunks: list[tuple[int, np.ndarray]] = []
        page = 0
        while page < npages:
            cur = gpa + page * PAGE_SIZE
            for base, mv in self.regions:
                if base <= cur < base + len(mv):
                    n = min(npages - page, (base + len(mv) - cur) // PAGE_SIZE)
                    if n > 0:
                        arr = np.frombuffer(mv, dtype="<u8", count=n * PAGE_U64S, offset=cur - base)
                        chunks.append((page, arr.reshape(n, PAGE_U64S)))
                    else:  # the page straddles this region's end
                        data = self.read(cur, PAGE_SIZE)
                        if data is None:
                            return page
                        chunks.append((page, np.frombuffer(data, dtype="<u8").reshape(1, PAGE_U64S)))
                        n = 1
                    page += n
                    break
            else:
                return page
        return chunks


def read_header(regions: Sequence[tuple[int, Buffer]]) -> DirtyHeader | None:
    """The dirty guest's header as it is in memory (unvalidated), or None if GPA 0x9000 is not
    in the regions."""
    raw = _Memory(regions).read(HEADER_GPA, _HEADER.size)
    return None if raw is None else DirtyHeader(*_HEADER.unpack(raw))


def _header_problem(h: DirtyHeader) -> str | None:
    if h.magic != MAGIC:
        return f"no dirty guest header at GPA {HEADER_GPA:#x} (magic {h.magic!r}, want {MAGIC!r})"
    if h.version not in LAYOUT_VERSIONS:
        return f"header layout version {h.version}, this verifier reads {LAYOUT_VERSIONS}"
    if h.fill not in FILL_NAMES or (h.version == 1 and h.fill != FILL_STAMP):
        return f"garbled header: fill={h.fill} in a version {h.version} header"
    if h.header_size != _HEADER.size or h.entry_size != ENTRY_SIZE or h.page_size != PAGE_SIZE:
        return (
            f"garbled header: header_size={h.header_size} entry_size={h.entry_size} "
            f"page_size={h.page_size} (want {_HEADER.size}, {ENTRY_SIZE}, {PAGE_SIZE})"
        )
    if h.npages == 0 or h.npages > 1 << 32 or h.ws_gpa % PAGE_SIZE:
        return f"garbled header: npages={h.npages} ws_gpa={h.ws_gpa:#x}"
    if h.filled > h.npages or h.generation > GEN_MAX:
        return f"garbled header: filled={h.filled} of {h.npages} pages, generation={h.generation}"
    if h.inflight != NO_PAGE and h.inflight >= h.npages:
        return f"garbled header: inflight page {h.inflight} >= npages {h.npages}"
    table_end = h.table_gpa + h.npages * ENTRY_SIZE
    ws_end = h.ws_gpa + h.npages * PAGE_SIZE
    if h.table_gpa < ws_end and h.ws_gpa < table_end:
        return "garbled header: the table overlaps the working set"
    return None


def _inflight_ok(fill: int, page_u64: np.ndarray, page: int, table_gen: int, next_gen: int) -> bool:
    """A page caught mid-rewrite: each u64 is either its old content or its new one."""
    new = expected_pages(fill, np.array([page]), np.array([next_gen]))[0]
    new_or_old = page_u64 == new
    if table_gen:
        new_or_old |= page_u64 == expected_pages(fill, np.array([page]), np.array([table_gen]))[0]
    else:  # first write of the initial fill: the rest of the page is still zero
        new_or_old |= page_u64 == 0
    return bool(new_or_old.all())


def verify_dirty(regions: Sequence[tuple[int, Buffer]]) -> Verdict:
    """Checks a paused (or powered-off) dirty guest's RAM against its own table.

    `regions` are (guest physical base, buffer) pairs covering at least the header, the table and
    the working set, e.g. [(0, mmap_of_ram)]. Buffers are only read. Do not pass RAM registered
    with userfaultfd that still has missing pages: numpy reads it holding the GIL.
    """
    mem = _Memory(regions)
    raw = mem.read(HEADER_GPA, _HEADER.size)
    if raw is None:
        return Verdict(False, 0, 0, None, f"GPA {HEADER_GPA:#x} (the header) is in none of the regions")
    h = DirtyHeader(*_HEADER.unpack(raw))
    problem = _header_problem(h)
    if problem:
        return Verdict(False, 0, 0, None, problem)

    def fail(reason: str, page: int | None = None) -> Verdict:
        return Verdict(False, h.filled, h.generation, page, reason)

    table_raw = mem.read(h.table_gpa, h.npages * ENTRY_SIZE)
    if table_raw is None:
        return fail(f"the table at GPA {h.table_gpa:#x} is not (all) in the given regions")
    table = np.frombuffer(table_raw, dtype="<u4")
    inflight = None if h.inflight == NO_PAGE else h.inflight
    next_gen = _next_gen(h.generation)

    if h.filled:
        zero = np.flatnonzero(table[: h.filled] == 0)
        zero = zero[zero != inflight] if inflight is not None else zero
        if zero.size:
            return fail("table entry is 0 (never written) below the header's filled count", int(zero[0]))

    chunks = mem.page_chunks(h.ws_gpa, h.filled)
    if isinstance(chunks, int):
        return fail(f"working set page at GPA {h.ws_gpa + chunks * PAGE_SIZE:#x} is in none of the regions")
    scratch = np.empty((_CHUNK_PAGES, PAGE_U64S), dtype=bool)
    for first, arr in chunks:
        for lo in range(0, arr.shape[0], _CHUNK_PAGES):
            block = arr[lo : lo + _CHUNK_PAGES]
            p0 = first + lo
            n = block.shape[0]
            idx = np.arange(p0, p0 + n, dtype=np.uint64)
            if h.fill == FILL_STAMP:  # one stamp per page, broadcast: no expected copy of RAM
                expected = ((table[p0 : p0 + n].astype(np.uint64) << np.uint64(32)) | idx)[:, None]
            else:
                expected = expected_pages(h.fill, idx, table[p0 : p0 + n])
            ne = np.not_equal(block, expected, out=scratch[:n])
            bad = np.flatnonzero(ne.any(axis=1))
            for b in bad:
                page = p0 + int(b)
                if page == inflight and _inflight_ok(h.fill, block[b], page, int(table[page]), next_gen):
                    continue
                word = int(np.flatnonzero(ne[b])[0])
                want = int(expected[b, 0 if h.fill == FILL_STAMP else word])
                return fail(
                    f"u64 {word} holds {int(block[b, word]):#018x}, the table says generation "
                    f"{int(table[page])} (want {want:#018x})",
                    page,
                )
    if inflight is not None and inflight >= h.filled:
        # During the initial fill the in-flight page is the next one, not yet counted in filled.
        page_raw = mem.read(h.ws_gpa + inflight * PAGE_SIZE, PAGE_SIZE)
        if page_raw is None:
            return fail("the in-flight page is in none of the regions", inflight)
        page_u64 = np.frombuffer(page_raw, dtype="<u8")
        if not _inflight_ok(h.fill, page_u64, inflight, int(table[inflight]), next_gen):
            return fail("the in-flight page holds neither its old nor its new stamp", inflight)

    table_sum = int(table.sum(dtype=np.uint64))
    if table_sum != h.table_sum:
        # Paused between `table_sum += new - old` and `table[p] = new`: off by exactly p's change.
        between = inflight is not None and (
            (table_sum - int(table[inflight]) + next_gen) % (1 << 64) == h.table_sum
        )
        if not between:
            return fail(
                f"table sum {table_sum:#x} != header table_sum {h.table_sum:#x}: "
                "a stale or corrupted table page (its data pages stale too)"
            )
    if h.writes <= GEN_MAX:
        # No generation has wrapped yet, so none can be newer than the header's: a newer one
        # means the header page is stale.
        newer = np.flatnonzero(table > h.generation)
        newer = newer[newer != inflight] if inflight is not None else newer
        if newer.size:
            return fail(f"table generation is newer than the header's ({h.generation})", int(newer[0]))
    return Verdict(True, h.filled, h.generation, None, "")
