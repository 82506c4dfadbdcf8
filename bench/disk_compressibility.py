"""How compressible the `disk` guest's sectors are, against random bytes.

16 runs of 1 MiB (what one BLOCK record carries) of sectors generated exactly as
guests/disk_layout.h writes them (consecutive blocks, consecutive generations, as its fill does),
each compressed alone with zstd level 1 (x-block-compression zstd at multifd-zstd-level 1) and
lz4; then 16 MiB of seeded random bytes (bench_disk.py --disk-data random) the same way.
Prints the compressed share of the raw bytes and each codec's rate on this machine.

  python bench/disk_compressibility.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import lz4.block
import numpy as np
import zstandard

M1, M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)
FNV_OFFSET, FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)
MAGIC = np.uint64(0x31534B4459524546)
MiB = 1 << 20


def stamped_run(first_block: int, gen0: int, blocks: int = 256) -> bytes:
    """`blocks` 4 KiB blocks from `first_block`, block k with generation gen0 + k."""
    lba = np.arange(blocks * 8, dtype=np.uint64) + np.uint64(first_block * 8)
    gen = np.arange(blocks, dtype=np.uint64).repeat(8) + np.uint64(gen0)
    w = np.zeros((blocks * 8, 64), dtype=np.uint64)
    w[:, 0], w[:, 1], w[:, 2] = MAGIC, lba, gen
    i = np.arange(3, 63, dtype=np.uint64)
    with np.errstate(over="ignore"):
        w[:, 3:63] = ((lba * M1) ^ (gen * M2))[:, None] ^ i[None, :]
        h = np.full(len(w), FNV_OFFSET, dtype=np.uint64)
        for k in range(63):
            h = (h ^ w[:, k]) * FNV_PRIME
    w[:, 63] = h
    return w.astype("<u8").tobytes()


def measure(runs: list[bytes], compress: Callable[[bytes], bytes]) -> tuple[float, float]:
    """(compressed / raw, MB/s)"""
    raw = out = 0
    t = time.perf_counter()
    for r in runs:
        raw += len(r)
        out += len(compress(r))
    return out / raw, raw / (time.perf_counter() - t) / 1e6


def main() -> None:
    zstd = zstandard.ZstdCompressor(level=1).compress
    codecs = {"zstd-1": zstd, "lz4": lambda b: lz4.block.compress(b, store_size=False)}
    stamped = [stamped_run(k * 256 * 37, 1 + k * 1000) for k in range(16)]
    noise = np.random.default_rng(10).bytes(16 * MiB)
    random = [noise[o:o + MiB] for o in range(0, len(noise), MiB)]
    for name, f in codecs.items():
        (rs, ss), (rr, sr) = measure(stamped, f), measure(random, f)
        print(f"{name}: stamped sectors {rs:.3f} of raw ({ss:.0f} MB/s); "
              f"random {rr:.3f} of raw ({sr:.0f} MB/s)")


if __name__ == "__main__":
    main()
