"""Turning dirty bitmaps into runs of pages to send: pure numpy, no I/O.

Bitmap layout throughout (KVM_GET_DIRTY_LOG's): bit i of little-endian u64 word j = page 64*j+i.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

PAGE_SIZE = 4096
WORDS_PER_PAGE = PAGE_SIZE // 8


def dirty_page_indexes(bitmap: np.ndarray, npages: int) -> np.ndarray:
    """Indexes (ascending, int64) of the set bits of `bitmap`, below `npages`."""
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:npages])


def count_dirty(bitmap: np.ndarray) -> int:
    return int(np.bitwise_count(bitmap).sum())


def runs(indexes: np.ndarray, max_run: int) -> Iterator[tuple[int, int]]:
    """Group ascending page indexes into (first_page, count) runs of consecutive pages,
    none longer than `max_run`."""
    if indexes.size == 0:
        return
    breaks = np.flatnonzero(np.diff(indexes) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [indexes.size]))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        first = int(indexes[s])
        count = e - s
        while count > 0:
            n = min(count, max_run)
            yield first, n
            first += n
            count -= n


def zero_pages(data: memoryview) -> np.ndarray:
    """For `data` (a whole number of pages), a bool array: True where the page is all zero.

    Reads the pages through a u64 view at memory speed (~12 GB/s, KVM-FACTS.md).
    """
    words = np.frombuffer(data, dtype=np.uint64).reshape(-1, WORDS_PER_PAGE)
    return ~words.any(axis=1)


def split_zero(is_zero: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """Split a run by zeroness into (offset, count, zero) pieces, in order."""
    n = is_zero.size
    if n == 0:
        return
    change = np.flatnonzero(is_zero[1:] != is_zero[:-1]) + 1
    starts = np.concatenate(([0], change)).tolist()
    ends = np.concatenate((change, [n])).tolist()
    for s, e in zip(starts, ends, strict=True):
        yield s, e - s, bool(is_zero[s])
