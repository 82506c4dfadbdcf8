"""Page compression for RAM_COMPRESSED records: the codecs, and `auto`'s choice per chunk.

Codecs are numbered on the wire (docs/stream-format.md, RAM_COMPRESSED): 1 zstd, 2 zlib, 3 lz4
(block format; the raw length is in the record, so no frame is needed). Compressor objects are
not thread-safe: each sending thread owns a `Compressor`.

`auto` (vmferry's own setting) compresses only where it shortens the migration: for each chunk it
picks raw, lz4 or zstd by the time the chunk would take on this channel — compressing it (measured
seconds per raw byte) plus sending what comes out (measured wire rate) — and re-measures the
options it did not pick every AUTO_PROBE_EVERY chunks, so a change in the data or the link is seen.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from enum import IntEnum

import lz4.block
import zstandard

from vmferry.errors import StreamError


class Codec(IntEnum):
    """RAM_COMPRESSED's codec byte. RAW is never on the wire: it means RAM_PAGES."""

    RAW = 0
    ZSTD = 1
    ZLIB = 2
    LZ4 = 3


CODEC_BY_SETTING = {"zstd": Codec.ZSTD, "zlib": Codec.ZLIB, "lz4": Codec.LZ4}
SETTINGS = ("none", "zlib", "zstd", "lz4", "auto")
AUTO_PROBE_EVERY = 32  # chunks between re-measuring the options `auto` did not pick
_AUTO_CODECS = (Codec.RAW, Codec.LZ4, Codec.ZSTD)


def decompress(codec: int, data: memoryview | bytes, raw_length: int) -> bytes:
    """The raw bytes of a RAM_COMPRESSED payload; StreamError naming the codec if they cannot be
    had or are not exactly `raw_length` bytes."""
    try:
        if codec == Codec.ZSTD:
            out = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=raw_length)
        elif codec == Codec.ZLIB:
            d = zlib.decompressobj()
            out = d.decompress(bytes(data), raw_length)
            if d.unconsumed_tail or not d.eof:
                raise StreamError(f"RAM_COMPRESSED zlib data does not end after {raw_length} bytes")
        elif codec == Codec.LZ4:
            out = lz4.block.decompress(bytes(data), uncompressed_size=raw_length)
        else:
            raise StreamError(f"RAM_COMPRESSED has unknown codec {codec}")
    except (zstandard.ZstdError, zlib.error, lz4.block.LZ4BlockError) as e:
        raise StreamError(f"RAM_COMPRESSED {Codec(codec).name.lower()} data is corrupt: {e}") from None
    if len(out) != raw_length:
        raise StreamError(f"RAM_COMPRESSED {Codec(codec).name.lower()} data decompresses to {len(out)} "
                          f"bytes, expected {raw_length}")
    return out


@dataclass
class _Measure:
    """Running estimates for one option: seconds per raw byte spent compressing, output/input."""

    cost: float = 0.0
    ratio: float = 1.0
    samples: int = 0

    def add(self, secs: float, raw: int, out: int) -> None:
        w = 0.3 if self.samples else 1.0
        self.cost += w * (secs / raw - self.cost)
        self.ratio += w * (out / raw - self.ratio)
        self.samples += 1


@dataclass
class Compressor:
    """One sending thread's compression: `setting` is multifd-compression's value."""

    setting: str = "none"
    zlib_level: int = 1
    zstd_level: int = 1
    wire_bytes_per_s: float = 0.0  # the channel's measured rate; `auto` reads it
    chosen: dict[str, int] = field(default_factory=dict)  # how often each codec was used
    _zstd: zstandard.ZstdCompressor | None = None
    _measures: dict[Codec, _Measure] = field(default_factory=dict)
    _chunks: int = 0

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown compression {self.setting!r} (one of {', '.join(SETTINGS)})")
        self._zstd = zstandard.ZstdCompressor(level=self.zstd_level)
        self._measures = {c: _Measure() for c in _AUTO_CODECS}

    def compress(self, raw: memoryview) -> tuple[Codec, bytes | memoryview]:
        """-> (codec, bytes to send). RAW returns `raw` itself. `raw` must be the sender's own
        copy of the pages (zlib reads its input twice; a live page could change in between)."""
        if self.setting == "none":
            return Codec.RAW, raw
        if self.setting != "auto":
            codec = CODEC_BY_SETTING[self.setting]
            out = self._run(codec, raw)
            self.chosen[codec.name] = self.chosen.get(codec.name, 0) + 1
            return codec, out
        return self._auto(raw)

    def _run(self, codec: Codec, raw: memoryview) -> bytes:
        if codec == Codec.ZSTD:
            return self._zstd.compress(raw)  # type: ignore[union-attr]
        if codec == Codec.ZLIB:
            return zlib.compress(raw, self.zlib_level)
        return lz4.block.compress(raw, store_size=False)

    def _auto(self, raw: memoryview) -> tuple[Codec, bytes | memoryview]:
        n = raw.nbytes
        self._chunks += 1
        unmeasured = [c for c in _AUTO_CODECS[1:] if not self._measures[c].samples]
        probe = unmeasured or (self._chunks % AUTO_PROBE_EVERY == 0)
        if probe:  # measure every compressing option on this chunk, then pick among them
            outs: dict[Codec, bytes | memoryview] = {Codec.RAW: raw}
            for c in _AUTO_CODECS[1:]:
                t = time.perf_counter()
                outs[c] = self._run(c, raw)
                self._measures[c].add(time.perf_counter() - t, n, len(outs[c]))
            codec = self.pick()
            out = outs[codec]
        else:
            codec = self.pick()
            if codec == Codec.RAW:
                out = raw
            else:
                t = time.perf_counter()
                out = self._run(codec, raw)
                self._measures[codec].add(time.perf_counter() - t, n, len(out))
        self.chosen[codec.name] = self.chosen.get(codec.name, 0) + 1
        return codec, out

    def pick(self) -> Codec:
        """The option with the least expected seconds per raw byte on this channel: compressing
        plus sending the result. Without a wire rate yet, raw (nothing measured to gain)."""
        wire = self.wire_bytes_per_s
        if wire <= 0:
            return Codec.RAW
        best, best_cost = Codec.RAW, 1.0 / wire
        for c in _AUTO_CODECS[1:]:
            m = self._measures[c]
            if not m.samples:
                continue
            cost = m.cost + m.ratio / wire
            if cost < best_cost * 0.95:  # a clear gain only: compression costs CPU the guest could use
                best, best_cost = c, cost
        return best
