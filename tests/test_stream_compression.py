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
from vmferry.stream.compression import AUTO_PROBE_EVERY, Codec, Compressor
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


def test_auto_stays_raw_on_random_data_and_compresses_text_on_a_slow_wire() -> None:
    rng = np.random.default_rng(1)
    noise = memoryview(rng.integers(0, 256, 64 * PAGE, dtype=np.uint8).tobytes())
    text = memoryview((TEXT * 50)[: 64 * PAGE])
    c = Compressor("auto")
    assert c.compress(noise)[0] == Codec.RAW  # no wire rate measured yet: nothing to gain
    c.wire_bytes_per_s = 1e6  # a slow link: robust to a loaded machine timing the compressors
    for _ in range(3):
        c.compress(noise)
    assert c.pick() == Codec.RAW  # random pages do not shrink
    for _ in range(AUTO_PROBE_EVERY + 1):  # the options not picked are measured again by then
        c.compress(text)
    assert c.pick() in (Codec.LZ4, Codec.ZSTD)  # text shrinks many times over, faster than the wire
    c.wire_bytes_per_s = 1e15  # a wire no compressor can beat
    assert c.pick() == Codec.RAW


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
