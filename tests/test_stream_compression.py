"""RAM_COMPRESSED: codecs round trip, every bit flip is refused by name, the decompressed pages are
checked against the record's raw checksum, `auto` picks by measured cost, `vmferry analyze` reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import StreamError
from vmferry.stream.compression import (
    HYSTERESIS,
    PROBE_FIRST,
    PROBE_MAX,
    PROBE_MAX_COMPRESSIBLE,
    RAW_PROBE_FIRST,
    RAW_PROBE_MAX,
    SAMPLE_BYTES,
    AutoPolicy,
    Codec,
    Compressor,
    decompress,
)
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.format import checksum
from vmferry.stream.records import RamBlockInfo, RamBlocks, RamCompressed

PAGE = 4096
TEXT = b"The quick brown fox jumps over the lazy dog. " * 200


def stream_with(codec_setting: str, raw: bytes, *, listed: bool, raw_check: int | None = None) -> bytes:
    enc = StreamEncoder(machine_type="test")
    codec, wire = Compressor(codec_setting).compress(memoryview(raw))
    n = len(raw) // PAGE
    pages = np.arange(3, 3 + 2 * n, 2, dtype=np.uint32) if listed else None
    rec = RamCompressed(1, 0 if listed else 5, n, codec, checksum(raw) if raw_check is None else raw_check,
                        b"", pages, wire)
    return b"".join([enc.header(), enc.encode(RamBlocks((RamBlockInfo(1, "pc.ram", 0, 1 << 20),))),
                     *(bytes(b) for b in enc.encode_buffers(rec)), enc.end()])


def decode(data: bytes) -> list:
    dec = StreamDecoder()
    dec.feed(data)
    dec.feed_eof()
    return list(dec.records())


@pytest.mark.parametrize("setting", ["zstd", "zlib", "lz4"])
@pytest.mark.parametrize("listed", [False, True])
def test_each_codec_round_trips_runs_and_lists(setting: str, listed: bool) -> None:
    raw = (TEXT * 3)[: 3 * PAGE]
    recs = decode(stream_with(setting, raw, listed=listed))
    rec = recs[2]
    assert isinstance(rec, RamCompressed)
    assert rec.codec == Codec[setting.upper()] and bytes(rec.data) == raw
    assert (rec.pages is not None) == listed
    if listed:
        assert rec.pages.tolist() == [3, 5, 7]
    else:
        assert rec.first_page == 5


@settings(max_examples=60, deadline=None)
@given(setting=st.sampled_from(["zstd", "zlib", "lz4"]), bit=st.integers(0, 10**9))
def test_any_flipped_bit_in_a_compressed_record_is_refused_by_name(setting: str, bit: int) -> None:
    data = bytearray(stream_with(setting, TEXT[: 2 * PAGE], listed=False))
    # The compressed record lies between the RAM_BLOCKS record and END.
    start = 80 + len(StreamEncoder().encode(RamBlocks((RamBlockInfo(1, "pc.ram", 0, 1 << 20),))))
    end = len(data) - (32 + 16 + 8)
    pos = start + bit % ((end - start) * 8) // 8
    data[pos] ^= 1 << (bit % 8)
    with pytest.raises(StreamError) as info:
        decode(bytes(data))
    msg = str(info.value)
    assert "RAM_COMPRESSED" in msg or "record header" in msg or "sync word" in msg, msg


def test_pages_that_do_not_match_the_raw_checksum_are_refused() -> None:
    """What the trailer cannot see: the compressed bytes arrived intact but are not the pages the
    source checksummed (a compressor that read a page while it changed)."""
    raw = TEXT[: 2 * PAGE]
    data = stream_with("zstd", raw, listed=False, raw_check=checksum(raw) ^ 1)
    with pytest.raises(StreamError, match="RAM_COMPRESSED pages do not match their checksum after zstd"):
        decode(data)


def test_compressed_garbage_is_refused_naming_the_codec() -> None:
    enc = StreamEncoder()
    raw = TEXT[:PAGE]
    rec = RamCompressed(1, 0, 1, Codec.LZ4, checksum(raw), b"", None, b"\xff" * 40)
    data = b"".join([enc.header(), enc.encode(RamBlocks((RamBlockInfo(1, "pc.ram", 0, 1 << 20),))),
                     *(bytes(b) for b in enc.encode_buffers(rec)), enc.end()])
    with pytest.raises(StreamError, match="RAM_COMPRESSED lz4 data is corrupt"):
        decode(data)


def test_none_sends_the_pages_themselves() -> None:
    raw = memoryview(bytearray(TEXT[:PAGE]))
    codec, out = Compressor("none").compress(raw)
    assert codec == Codec.RAW and out is raw


# `auto`'s decision (AutoPolicy) is pure: measurements in, choice out. Costs are seconds per byte.
CHUNK = 2 << 20
FAST_WIRE = 0.3e-9  # loopback-like
SLOW_WIRE = 9e-9  # about 1 Gbit/s


def feed_chunk(p: AutoPolicy, wire: float, costs: dict[Codec, tuple[float, float]]) -> Codec:
    """One chunk through the policy as the Compressor would: plan, probe or compress, send."""
    plan = p.plan()
    for c in plan.probe:
        cost, ratio = costs[c]
        p.compressed(c, cost * SAMPLE_BYTES, SAMPLE_BYTES, int(ratio * SAMPLE_BYTES))
    if plan.codec == Codec.RAW:
        p.sent(wire * CHUNK, CHUNK)
    else:
        cost, ratio = costs[plan.codec]
        p.compressed(plan.codec, cost * CHUNK, CHUNK, int(ratio * CHUNK))
    p.decide(probed=bool(plan.probe) or plan.codec != p.current)
    return plan.codec


RANDOM = {Codec.LZ4: (0.4e-9, 1.004), Codec.ZSTD: (1.5e-9, 1.0)}
TEXT_COSTS = {Codec.LZ4: (0.8e-9, 0.6), Codec.ZSTD: (2.5e-9, 0.12)}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-12, 1e-6), st.floats(1e-12, 1e-6), st.floats(1e-12, 1e-6),
                          st.floats(1.0, 1.2), st.floats(1.0, 1.2)), min_size=1, max_size=300))
def test_auto_never_leaves_raw_when_nothing_shrinks(steps: list[tuple[float, ...]]) -> None:
    """Whatever the wire and compressors cost, however noisy: pages that do not shrink go raw."""
    p = AutoPolicy()
    for wire, lz4_cost, zstd_cost, lz4_ratio, zstd_ratio in steps:
        sent = feed_chunk(p, wire, {Codec.LZ4: (lz4_cost, lz4_ratio), Codec.ZSTD: (zstd_cost, zstd_ratio)})
        assert sent == Codec.RAW and p.current == Codec.RAW


def test_auto_probes_random_pages_rarely_and_on_a_sample() -> None:
    p = AutoPolicy()
    probes = 0
    for _ in range(2000):
        plan = p.plan()
        if plan.probe:
            probes += 1
            for c in plan.probe:
                p.compressed(c, RANDOM[c][0] * SAMPLE_BYTES, SAMPLE_BYTES, SAMPLE_BYTES + 16)
        p.sent(FAST_WIRE * CHUNK, CHUNK)
        p.decide(probed=bool(plan.probe))
    assert p.current == Codec.RAW
    # The interval doubles from PROBE_FIRST to PROBE_MAX: about log2 + 2000 / PROBE_MAX probes.
    assert probes <= 2 + (PROBE_MAX // PROBE_FIRST).bit_length() + 2000 // PROBE_MAX
    assert p.probe_every == PROBE_MAX
    assert SAMPLE_BYTES * probes < CHUNK * 2000 / 500  # under 0.2 % of the bytes ever compressed


def test_auto_compresses_text_on_a_slow_wire_soon_and_stays_raw_on_a_fast_one() -> None:
    slow = AutoPolicy()
    chosen = [feed_chunk(slow, SLOW_WIRE, TEXT_COSTS) for _ in range(4)]
    assert chosen[0] == Codec.RAW and chosen[-1] == Codec.ZSTD  # 0.12 * 9 + 2.5 < 9 ns a byte
    fast = AutoPolicy()
    assert {feed_chunk(fast, FAST_WIRE, TEXT_COSTS) for _ in range(500)} == {Codec.RAW}


def test_auto_compresses_once_the_wire_turns_out_slow() -> None:
    """A link looks fast while the socket buffers fill: compressible pages keep being probed
    (at most every PROBE_MAX_COMPRESSIBLE chunks), so the slow wire behind them is acted on."""
    p = AutoPolicy()
    for _ in range(300):
        feed_chunk(p, FAST_WIRE, TEXT_COSTS)
    assert p.current == Codec.RAW and p.probe_every == PROBE_MAX_COMPRESSIBLE
    chosen = [feed_chunk(p, SLOW_WIRE, TEXT_COSTS) for _ in range(2 * PROBE_MAX_COMPRESSIBLE)]
    assert chosen[-1] == Codec.ZSTD


def test_auto_probes_often_while_a_compressor_gains_a_little() -> None:
    """Expected faster, but not by the margin (5 % here): probed every PROBE_MAX_COMPRESSIBLE
    chunks at most, so a wire that turns out slower once the socket buffers are full is acted on
    soon."""
    wire = 1.0e-9
    costs = {Codec.LZ4: (0.35e-9, 0.6), Codec.ZSTD: (1e-6, 0.5)}  # lz4: 0.35 + 0.6 * 1 = 0.95 x raw
    p = AutoPolicy()
    for _ in range(200):
        assert feed_chunk(p, wire, costs) == Codec.RAW
    assert p.probe_every == PROBE_MAX_COMPRESSIBLE
    chosen = [feed_chunk(p, 4 * wire, costs) for _ in range(2 * PROBE_MAX_COMPRESSIBLE)]
    assert chosen[-1] == Codec.LZ4


def test_one_slow_chunk_does_not_hold_a_channel_raw() -> None:
    """A whole chunk compressed while the machine was busy (10x the usual cost) weighs as one
    measurement: the samples after it bring the estimate back and the channel compresses."""
    p = AutoPolicy()
    for _ in range(20):
        feed_chunk(p, SLOW_WIRE, TEXT_COSTS)
    assert p.current == Codec.ZSTD
    for c, (cost, ratio) in TEXT_COSTS.items():  # both compressors timed 10x slower, once
        p.compressed(c, 10 * cost * CHUNK, CHUNK, int(ratio * CHUNK))
    p.decide(probed=False)
    chosen = [feed_chunk(p, SLOW_WIRE, TEXT_COSTS) for _ in range(8 * PROBE_MAX_COMPRESSIBLE)]
    assert chosen[-1] == Codec.ZSTD


def test_auto_goes_back_to_raw_when_the_data_stops_shrinking() -> None:
    p = AutoPolicy()
    for _ in range(20):
        feed_chunk(p, SLOW_WIRE, TEXT_COSTS)
    assert p.current == Codec.ZSTD
    chosen = [feed_chunk(p, SLOW_WIRE, RANDOM) for _ in range(20)]
    # Measured on every compressed chunk: seen within a few (perhaps via lz4, whose last
    # estimate was still the text's), then raw for good.
    assert chosen[-10:] == [Codec.RAW] * 10


def test_auto_sees_a_faster_link_through_its_raw_probes() -> None:
    p = AutoPolicy()
    for _ in range(20):
        feed_chunk(p, SLOW_WIRE, TEXT_COSTS)
    assert p.current == Codec.ZSTD
    chosen = [feed_chunk(p, FAST_WIRE, TEXT_COSTS) for _ in range(RAW_PROBE_MAX * 8)]
    assert Codec.RAW in chosen and p.current == Codec.RAW


def test_a_compressing_channels_first_raw_probe_comes_after_raw_probe_first_chunks() -> None:
    """Samples of the other compressor say nothing of the wire: they must not push the raw
    chunks that measure it apart (they once doubled that interval to RAW_PROBE_MAX within a
    few samples). Raw chunks come RAW_PROBE_FIRST chunks apart, then twice as far each time
    one changes nothing; samples PROBE_FIRST apart, up to PROBE_MAX_COMPRESSIBLE."""
    p = AutoPolicy()
    while p.current != Codec.ZSTD:
        feed_chunk(p, SLOW_WIRE, TEXT_COSTS)
    raw_at, sampled_at = [], []
    for i in range(1, 200):
        plan = p.plan()
        for c in plan.probe:
            cost, ratio = TEXT_COSTS[c]
            p.compressed(c, cost * SAMPLE_BYTES, SAMPLE_BYTES, int(ratio * SAMPLE_BYTES))
        if plan.codec == Codec.RAW:
            raw_at.append(i)
            p.sent(SLOW_WIRE * CHUNK, CHUNK)
        else:
            cost, ratio = TEXT_COSTS[plan.codec]
            p.compressed(plan.codec, cost * CHUNK, CHUNK, int(ratio * CHUNK))
        if plan.probe:
            sampled_at.append(i)
        assert p.decide(probed=bool(plan.probe) or plan.codec != p.current) == Codec.ZSTD
    gaps = [b - a for a, b in zip([0, *raw_at], raw_at, strict=False)]
    assert gaps[:3] == [RAW_PROBE_FIRST, 2 * RAW_PROBE_FIRST, 4 * RAW_PROBE_FIRST], raw_at
    assert p.probe_every == PROBE_MAX_COMPRESSIBLE
    assert len(sampled_at) < 200 // PROBE_MAX_COMPRESSIBLE + 3


def test_one_fast_raw_probe_does_not_flip_a_compressing_channel() -> None:
    """A raw chunk that fit in the socket buffer was sent in no time: one such sample must not
    outweigh the window of sends that blocked."""
    p = AutoPolicy()
    for _ in range(20):
        feed_chunk(p, SLOW_WIRE, TEXT_COSTS)
    assert p.current == Codec.ZSTD
    p.sent(1e-6, CHUNK)
    assert p.decide(probed=True) == Codec.ZSTD


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-11, 2e-8), st.sampled_from(["random", "text"])),
                min_size=1, max_size=200))
def test_auto_switches_only_on_a_clear_gain(steps: list[tuple[float, str]]) -> None:
    """Hysteresis: each change to a compressor is to one expected to take ≤ (1 - HYSTERESIS) of
    the time of the option it leaves, by the estimates at that moment; to raw, less time."""
    p = AutoPolicy()
    for wire, kind in steps:
        before = p.current
        plan = p.plan()
        costs = RANDOM if kind == "random" else TEXT_COSTS
        for c in plan.probe:
            p.compressed(c, costs[c][0] * SAMPLE_BYTES, SAMPLE_BYTES, int(costs[c][1] * SAMPLE_BYTES))
        if plan.codec == Codec.RAW:
            p.sent(wire * CHUNK, CHUNK)
        else:
            p.compressed(plan.codec, costs[plan.codec][0] * CHUNK, CHUNK, int(costs[plan.codec][1] * CHUNK))
        old_t = p.expected(before)
        after = p.decide(probed=bool(plan.probe))
        if after != before:
            new_t = p.expected(after)
            assert old_t is not None and new_t is not None
            assert new_t < old_t * (1.0 if after == Codec.RAW else 1 - HYSTERESIS)
        assert PROBE_FIRST <= p.probe_every <= PROBE_MAX
        if kind == "text" and plan.probe and after == Codec.RAW:
            assert p.probe_every <= PROBE_MAX_COMPRESSIBLE  # pages that shrink: a slower wire is seen soon
        assert RAW_PROBE_FIRST <= p.raw_probe_every <= RAW_PROBE_MAX


def test_compressor_auto_sends_random_pages_as_they_are() -> None:
    rng = np.random.default_rng(1)
    noise = memoryview(rng.integers(0, 256, 512 * PAGE, dtype=np.uint8).tobytes())
    c = Compressor("auto")
    for _ in range(50):
        codec, out = c.compress(noise)
        assert codec == Codec.RAW and out is noise
        c.sent(10.0)  # even on a very slow wire: random pages do not shrink
    assert c.chosen == {"RAW": 50}


def test_compressor_auto_compresses_text_on_a_very_slow_wire_and_it_round_trips() -> None:
    text = memoryview((TEXT * 200)[: 512 * PAGE])
    c = Compressor("auto")
    seen = []
    for _ in range(10):
        codec, out = c.compress(text)
        seen.append(codec)
        if codec != Codec.RAW:
            assert decompress(codec, out, text.nbytes) == text
        c.sent(10.0 if codec == Codec.RAW else 0.0)  # 10 s a raw chunk: any compressor beats that
    assert seen[0] == Codec.RAW and seen[-1] in (Codec.LZ4, Codec.ZSTD)


def test_analyze_reads_compressed_records(tmp_path: Path) -> None:
    path = tmp_path / "c.vmf"
    path.write_bytes(stream_with("zstd", TEXT[: 2 * PAGE], listed=True))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-m", "vmferry", "analyze", "--json", str(path)],
                         capture_output=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    doc = json.loads(out.stdout)
    block = doc["ram_blocks"][0]
    assert block["pages_sent"] == 2 if "pages_sent" in block else True
    assert "RAM_COMPRESSED zstd" in json.dumps(doc)


def test_with_workers_beside_the_sender_a_codec_costs_the_slower_of_compressing_and_sending() -> None:
    """A copied drive's workers compress while the migration thread sends: a codec as slow per
    byte as the wire is then worth it when it halves the bytes (the two overlap), where the
    sender compressing in turn would find it slower than raw."""
    wire, costs = 8e-9, {Codec.LZ4: (8e-9, 0.5), Codec.ZSTD: (16e-9, 0.2)}  # both as slow as the wire
    serial = AutoPolicy()
    assert {feed_chunk(serial, wire, costs) for _ in range(50)} == {Codec.RAW}
    overlapped = AutoPolicy(workers=2)  # lz4: max(4, 4) = 4 ns; zstd: max(8, 1.6) = 8; raw 8
    chosen = [feed_chunk(overlapped, wire, costs) for _ in range(20)]
    assert chosen[-1] == Codec.LZ4
    assert overlapped.expected(Codec.ZSTD) == pytest.approx(max(16e-9 / 2, 0.2 * wire), rel=0.05)


def test_a_plan_made_on_the_sender_and_carried_out_elsewhere_drives_the_same_policy() -> None:
    """The pipeline's split: the sending thread plans (plan_chunk), a worker's own Compressor
    carries the plan out (execute: the probes on a sample, then the codec), the sender accounts
    for it and reports the send (account, sent): on a very slow wire, text ends compressed and
    round-trips; random data stays raw."""
    text = memoryview((TEXT * 200)[: 512 * PAGE])
    noise = memoryview(np.random.default_rng(2).integers(0, 256, 512 * PAGE, dtype=np.uint8).tobytes())
    for data, want in ((text, {Codec.LZ4, Codec.ZSTD}), (noise, {Codec.RAW})):
        sender, worker = Compressor("auto"), Compressor("auto")
        seen = []
        for _ in range(10):
            plan = sender.plan_chunk()
            codec, out, measures = worker.execute(plan, data)
            assert codec == plan.codec and len(measures) == len(plan.probe) + (codec != Codec.RAW)
            if codec != Codec.RAW:
                assert decompress(codec, out, data.nbytes) == data
            sender.account(measures, data.nbytes if codec == Codec.RAW else 0, {codec.name: 1})
            sender.sent(10.0 if codec == Codec.RAW else 0.0, plan)
            seen.append(codec)
        assert seen[0] == Codec.RAW and seen[-1] in want
        assert sum(sender.chosen.values()) == 10 and worker.chosen == {}
    assert Compressor("zstd").plan_chunk().codec == Codec.ZSTD
