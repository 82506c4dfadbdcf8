"""Compression for RAM_COMPRESSED and BLOCK_COMPRESSED records: the codecs, and `auto`'s choice
per chunk (multifd's pages, a copied drive's runs).

Codecs are numbered on the wire (docs/stream-format.md, RAM_COMPRESSED): 1 zstd, 2 zlib, 3 lz4
(block format; the raw length is in the record, so no frame is needed). Compressor objects are
not thread-safe: each sending thread owns a `Compressor`.

`auto` (vmferry's own setting) compresses only where it shortens the migration. The decision is
`AutoPolicy` (pure: measurements in, choice out; `Compressor` does the timing): the expected
seconds per raw byte of each option — raw: the wire's cost per byte, measured from this channel's
own sends of raw records (the time it was blocked sending them); lz4 or zstd: its measured
compression cost per byte plus its measured ratio times the wire's cost — and the option in use
goes to a compressor only when it is expected to be clearly faster (hysteresis), and back to raw
when raw is expected to be faster at all, so measurement noise on a loaded machine cannot make it
flip and incompressible pages go raw. While sending raw, the compressors are probed on a small
sample of a chunk, rarely (the interval doubles each time a probe changes nothing, up to 512
chunks for pages that do not shrink, 8 for pages that do): on random pages that costs next to
nothing and the choice stays raw. While compressing, one chunk goes raw
now and then (16 to 256 chunks apart, doubling while those change nothing), so a link that got
faster is seen; the other compressor is sampled every 4 to 8 chunks.
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
_AUTO_CODECS = (Codec.LZ4, Codec.ZSTD)


def decompress(codec: int, data: memoryview | bytes, raw_length: int, what: str = "RAM_COMPRESSED") -> bytes:
    """The raw bytes of a RAM_COMPRESSED (or `what`: BLOCK_COMPRESSED) payload; StreamError naming
    the record type and codec if they cannot be had or are not exactly `raw_length` bytes."""
    try:
        if codec == Codec.ZSTD:
            out = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=raw_length)
        elif codec == Codec.ZLIB:
            d = zlib.decompressobj()
            out = d.decompress(bytes(data), raw_length)
            if d.unconsumed_tail or not d.eof:
                raise StreamError(f"{what} zlib data does not end after {raw_length} bytes")
        elif codec == Codec.LZ4:
            out = lz4.block.decompress(bytes(data), uncompressed_size=raw_length)
        else:
            raise StreamError(f"{what} has unknown codec {codec}")
    except (zstandard.ZstdError, zlib.error, lz4.block.LZ4BlockError) as e:
        raise StreamError(f"{what} {Codec(codec).name.lower()} data is corrupt: {e}") from None
    if len(out) != raw_length:
        raise StreamError(f"{what} {Codec(codec).name.lower()} data decompresses to {len(out)} "
                          f"bytes, expected {raw_length}")
    return out


# `auto`'s tuning. Each number trades how fast a change is seen against what measuring costs.
# Compressing only for an option expected to take at most (1 - this) of the current one's time;
# back to raw as soon as raw is expected to be faster at all (compression costs CPU the guest and
# the destination could use: raw is the safe side).
HYSTERESIS = 0.1
SAMPLE_BYTES = 64 << 10  # compressors are probed on this much of a chunk while the channel sends raw
PROBE_FIRST = 4  # chunks between probes of the compressors, at first and after the choice changed
PROBE_MAX = 512  # ... doubling each time a probe changes nothing, up to this for pages that do not
PROBE_MAX_COMPRESSIBLE = 8  # shrink, up to this for pages that do (the wire's estimate grows as the
# socket buffers fill, and a busy moment's measurement must not hold a channel raw for long)
INCOMPRESSIBLE = 0.9  # no compressor's ratio below this: compressing can gain 10 % at most
RAW_PROBE_FIRST = 16  # while compressing: chunks between sending one chunk raw (to measure the wire)
RAW_PROBE_MAX = 256
WIRE_WINDOW = 8 << 20  # the wire's estimate weighs about the last this many bytes sent
CODEC_WEIGHT = 0.3  # a compressor's estimate: each measurement (sample or chunk) weighs this much
MIN_SEND_BYTES = 64 << 10  # a smaller send says too little about the wire to count


@dataclass
class Estimate:
    """A decaying sum of (seconds, input bytes, output bytes): cost = seconds per input byte,
    ratio = output / input. With a `window`, over about the last `window` bytes of input: sums,
    not averages of per-sample rates, so one sample that was fast by chance (a send that fit in
    the socket buffer) weighs by its bytes. Without one (None), every measurement weighs
    CODEC_WEIGHT whatever its size: a compressor's whole chunk, timed while the machine was busy
    for a moment, must not outweigh the samples around it."""

    window: int | None
    seconds: float = 0.0
    inp: float = 0.0
    out: float = 0.0

    def add(self, seconds: float, inp: int, out: int) -> None:
        if inp <= 0:
            return
        seconds = max(seconds, 0.0)
        if self.window is None:  # each measurement as one unit of input
            keep = 1.0 - CODEC_WEIGHT if self.inp else 0.0
            seconds, out, inp = seconds / inp, out / inp, 1
        else:
            keep = max(0.0, 1.0 - inp / self.window)
        self.seconds = self.seconds * keep + seconds
        self.inp = self.inp * keep + inp
        self.out = self.out * keep + out

    @property
    def known(self) -> bool:
        return self.inp > 0

    @property
    def cost(self) -> float:
        return self.seconds / self.inp

    @property
    def ratio(self) -> float:
        return self.out / self.inp


@dataclass(frozen=True)
class Plan:
    """What to do with the next chunk: compress it with `codec` (RAW: send it as it is), and
    first time `probe`'s compressors on a sample of it."""

    codec: Codec
    probe: tuple[Codec, ...] = ()


@dataclass
class AutoPolicy:
    """`auto`'s choice, without clocks: `plan` before each chunk, then `compressed` and `sent`
    report what it cost. The expected seconds per raw byte: raw = wire cost per byte; a codec =
    its cost per byte + its ratio * wire cost per byte. Starts raw; moves only on a clear gain."""

    current: Codec = Codec.RAW
    # Compressors running beside the sender (a copied drive's pipeline workers: 2): a codec's
    # time per byte is then the slower of compressing (shared by them) and sending what it
    # leaves, not the two in turn. 0: the sender compresses, then sends (multifd's channels).
    workers: int = 0
    wire: Estimate = field(default_factory=lambda: Estimate(WIRE_WINDOW))  # blocked s / raw byte sent
    codecs: dict[Codec, Estimate] = field(
        default_factory=lambda: {c: Estimate(None) for c in _AUTO_CODECS})
    probe_every: int = PROBE_FIRST
    raw_probe_every: int = RAW_PROBE_FIRST
    _since_probe: int = 0
    _since_raw_probe: int = 0
    _raw_probe: bool = False  # the last plan sends a chunk raw to measure the wire, not to stay raw

    def plan(self) -> Plan:
        self._raw_probe = False
        if self.current == Codec.RAW:
            self._since_probe += 1
            unmeasured = any(not e.known for e in self.codecs.values())
            if unmeasured or self._since_probe >= self.probe_every:
                self._since_probe = 0
                return Plan(Codec.RAW, _AUTO_CODECS)
            return Plan(Codec.RAW)
        self._since_raw_probe += 1
        if self._since_raw_probe >= self.raw_probe_every:
            self._since_raw_probe = 0
            self._raw_probe = True
            return Plan(Codec.RAW)
        self._since_probe += 1
        others = tuple(c for c in _AUTO_CODECS if c != self.current)
        if self._since_probe >= self.probe_every:
            self._since_probe = 0
            return Plan(self.current, others)
        return Plan(self.current)

    def compressed(self, codec: Codec, seconds: float, raw: int, out: int) -> None:
        """A compressor ran (a probe or for real): `raw` bytes in, `out` out, in `seconds`."""
        self.codecs[codec].add(seconds, raw, out)

    def sent(self, seconds: float, nbytes: int) -> None:
        """The channel sent `nbytes` of raw records, blocked `seconds` in doing so."""
        if nbytes >= MIN_SEND_BYTES:
            self.wire.add(seconds, nbytes, nbytes)

    def expected(self, codec: Codec) -> float | None:
        """Expected seconds per raw byte with `codec`, or None while something is unmeasured."""
        if not self.wire.known:
            return None
        w = self.wire.cost
        if codec == Codec.RAW:
            return w
        e = self.codecs[codec]
        if not e.known:
            return None
        if self.workers:
            return max(e.cost / self.workers, e.ratio * w)
        return e.cost + e.ratio * w

    def decide(self, probed: bool) -> Codec:
        """After a chunk's measurements: keep the current option unless raw is expected to be
        faster, or a compressor to take at most (1 - HYSTERESIS) of its time. `probed`: this
        chunk probed an option not in use (a probe that changes nothing doubles the interval
        to the next probe of its kind: a raw chunk's to the next raw chunk, a compressor
        sample's to the next sample — a sample says nothing of the wire)."""
        now = self.expected(self.current)
        best, best_t = self.current, now
        if now is not None:
            for c in (Codec.RAW, *_AUTO_CODECS):
                t = self.expected(c)
                need = 1.0 if c == Codec.RAW else 1 - HYSTERESIS
                if c != self.current and t is not None and t < now * need and (
                        best_t is None or t < best_t):
                    best, best_t = c, t
        if best != self.current:
            self.current = best
            self.probe_every, self.raw_probe_every = PROBE_FIRST, RAW_PROBE_FIRST
            self._since_probe = self._since_raw_probe = 0
        elif probed:
            if best == Codec.RAW:
                ratios = [e.ratio for e in self.codecs.values() if e.known]
                shrinks = bool(ratios) and min(ratios) < INCOMPRESSIBLE
                self.probe_every = min(2 * self.probe_every, PROBE_MAX_COMPRESSIBLE if shrinks else PROBE_MAX)
            elif self._raw_probe:
                self.raw_probe_every = min(2 * self.raw_probe_every, RAW_PROBE_MAX)
            else:  # compressing: the pages shrink
                self.probe_every = min(2 * self.probe_every, PROBE_MAX_COMPRESSIBLE)
        return self.current


@dataclass(frozen=True)
class Measure:
    """One compressor run, timed where it ran (a pipeline worker), for the policy's thread."""

    codec: Codec
    seconds: float
    raw: int
    out: int


@dataclass
class Compressor:
    """One sending thread's compression: `setting` is multifd-compression's value. The sender
    reports each send with `sent`, which `auto` reads as the wire's cost."""

    setting: str = "none"
    zlib_level: int = 1
    zstd_level: int = 1
    chosen: dict[str, int] = field(default_factory=dict)  # how often each codec was used
    policy: AutoPolicy = field(default_factory=AutoPolicy)
    _zstd: zstandard.ZstdCompressor | None = None
    _unsent_raw: int = 0  # bytes of raw records since the last `sent`
    _unsent_compressed: bool = False  # ... and whether compressed ones were among them
    _plan: Plan | None = None
    _probe_at: int = 0

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown compression {self.setting!r} (one of {', '.join(SETTINGS)})")
        self._zstd = zstandard.ZstdCompressor(level=self.zstd_level)

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

    def sent(self, seconds: float, plan: Plan | None = None) -> None:
        """The sender wrote everything `compress` returned (or `account` was told of) since the
        last call, blocked `seconds`: for `auto`, a measure of the wire if it was raw records
        only. `plan`: the chunk's, when it was made ahead (`plan_chunk`)."""
        if self.setting == "auto":
            if not self._unsent_compressed:
                self.policy.sent(seconds, self._unsent_raw)
            plan = plan or self._plan
            if plan is not None:
                self.policy.decide(probed=bool(plan.probe) or plan.codec != self.policy.current)
                self._plan = None
        self._unsent_raw, self._unsent_compressed = 0, False

    def _run(self, codec: Codec, raw: memoryview) -> bytes:
        if codec == Codec.ZSTD:
            return self._zstd.compress(raw)  # type: ignore[union-attr]
        if codec == Codec.ZLIB:
            return zlib.compress(raw, self.zlib_level)
        return lz4.block.compress(raw, store_size=False)

    # --- a pipeline: the plan made on the sending thread, carried out on a worker ---

    def plan_chunk(self) -> Plan:
        """The plan for the next chunk, made here (the thread that sends and so measures the
        wire) and carried out on a worker by that worker's own Compressor (`execute`). A named
        codec's plan is that codec; `auto`'s is the policy's."""
        if self.setting == "auto":
            return self.policy.plan()
        return Plan(CODEC_BY_SETTING.get(self.setting, Codec.RAW))

    def execute(self, plan: Plan, raw: memoryview, probe: bool = True) -> tuple[Codec, bytes | memoryview,
                                                                             list[Measure]]:
        """Carry `plan` out on `raw` (a worker; this Compressor's own codec objects, no policy):
        -> (codec, bytes to send, what each compressor run cost). `probe`: time the plan's probe
        codecs on a sample first (once per chunk: False for a chunk's later records)."""
        measures: list[Measure] = []
        if probe and plan.probe:
            n = raw.nbytes
            size = min(SAMPLE_BYTES, n)
            at = self._probe_at % max(n - size + 1, 1)
            self._probe_at += size + 4096 * 7
            for c in plan.probe:
                measures.append(self._measured(c, raw[at:at + size]))
        if plan.codec == Codec.RAW:
            return Codec.RAW, raw, measures
        t = time.perf_counter()
        out = self._run(plan.codec, raw)
        measures.append(Measure(plan.codec, time.perf_counter() - t, raw.nbytes, len(out)))
        return plan.codec, out, measures

    def account(self, measures: list[Measure], raw_bytes: int, records: dict[str, int]) -> None:
        """A chunk carried out elsewhere is about to be sent: its compressor runs go to the policy;
        `raw_bytes` of it go raw; `records` counts its records by codec name. Then
        `sent(seconds, plan)`."""
        for m in measures:
            self.policy.compressed(m.codec, m.seconds, m.raw, m.out)
        self._unsent_raw += raw_bytes
        for name, n in records.items():
            self.chosen[name] = self.chosen.get(name, 0) + n
            if name != Codec.RAW.name:
                self._unsent_compressed = True

    def _measured(self, codec: Codec, raw: memoryview) -> Measure:
        t = time.perf_counter()
        out = self._run(codec, raw)
        return Measure(codec, time.perf_counter() - t, raw.nbytes, len(out))

    def _auto(self, raw: memoryview) -> tuple[Codec, bytes | memoryview]:
        # One plan per chunk: a chunk may make several records (runs split by zero pages).
        first = self._plan is None
        if first:
            self._plan = self.policy.plan()
        assert self._plan is not None
        codec, out, measures = self.execute(self._plan, raw, probe=first)
        self.account(measures, raw.nbytes if codec == Codec.RAW else 0, {codec.name: 1})
        return codec, out
