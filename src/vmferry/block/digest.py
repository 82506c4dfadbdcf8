"""A digest of sampled blocks of an image: what a snapshot (or any migration) records so the side
that restores it can tell, before the guest runs, that it opened the same image in the same
state — not a different file of the same size, nor one written to since.

`SAMPLES` blocks of `SAMPLE_BYTES` spread evenly over the image (the first and the last
included), read through the backend (holes read as zeros without being read) into one BLAKE2b
of 8 bytes. Cheap enough for the switchover (a few dozen 4 KiB reads of a flushed image), and
not a proof: a change between sampled blocks goes unseen.
"""

from __future__ import annotations

import hashlib

from vmferry.block.backend import BlockBackend

SAMPLES = 64
SAMPLE_BYTES = 4096


def sample_offsets(size: int) -> list[int]:
    """Where the samples are taken: 4 KiB-aligned, evenly spread, the last block included."""
    nblocks = (size + SAMPLE_BYTES - 1) // SAMPLE_BYTES
    if nblocks <= SAMPLES:
        return [i * SAMPLE_BYTES for i in range(nblocks)]
    return sorted({(i * (nblocks - 1) // (SAMPLES - 1)) * SAMPLE_BYTES for i in range(SAMPLES)})


def sampled_digest(backend: BlockBackend) -> int:
    """The u64 digest of the image's sampled blocks (see the module doc)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(backend.size.to_bytes(8, "little"))
    buf = bytearray(SAMPLE_BYTES)
    for off in sample_offsets(backend.size):
        n = min(SAMPLE_BYTES, backend.size - off)
        view = memoryview(buf)[:n]
        backend.read_into(off, view)
        h.update(view)
    return int.from_bytes(h.digest(), "little")
