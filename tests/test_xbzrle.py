"""XBZRLE: the delta codec (property tests against a byte-by-byte reference of QEMU's encoding)
and the source's page cache."""

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
from vmferry.migration.xbzrle import (
    PageCache,
    XbzrleCounters,
    apply_deltas,
    decode_into,
    encode_page,
    encode_pages,
)
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.format import checksum
from vmferry.stream.payloads import DELTA_HEAD
from vmferry.stream.records import DELTA_ENTRY, RamBlockInfo, RamBlocks, RamDelta

PAGE = 4096


def uleb(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def reference_encode(old: bytes, new: bytes) -> bytes:
    """QEMU's xbzrle_encode_buffer, byte by byte: (zrun nzrun bytes)*, trailing zrun dropped."""
    out, i, n = bytearray(), 0, len(new)
    while i < n:
        z = i
        while i < n and old[i] == new[i]:
            i += 1
        if i == n:
            break
        zrun = i - z
        s = i
        while i < n and old[i] != new[i]:
            i += 1
        out += uleb(zrun) + uleb(i - s) + new[s:i]
    return bytes(out)


def apply(old: bytes, enc: bytes) -> bytes:
    page = bytearray(old)
    decode_into(memoryview(page), enc, 0, len(enc))
    return bytes(page)


def _noise(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@st.composite
def page_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """An old page and a new one made of it by a few writes: sparse, runs, wholesale, or none.
    Contents come from seeds (small inputs: hypothesis shrinks them and never runs out of data)."""
    old = bytearray(_noise(draw(st.integers(0, 2**32)), PAGE) if draw(st.booleans()) else bytes(PAGE))
    new = bytearray(old)
    for _ in range(draw(st.integers(0, 12))):
        at = draw(st.integers(0, PAGE - 1))
        size = draw(st.sampled_from([1, 2, 8, 9, 200, PAGE]))
        data = _noise(draw(st.integers(0, 2**32)), size) if draw(st.booleans()) else bytes(size)
        new[at : at + size] = data[: PAGE - at]
    return bytes(old), bytes(new)


@settings(max_examples=300, deadline=None)
@given(pair=page_pairs(), limit=st.sampled_from([64, 1024, PAGE]))
def test_decode_of_encode_is_the_new_page_and_matches_qemus_encoding(pair: tuple[bytes, bytes],
                                                                     limit: int) -> None:
    old, new = pair
    ref = reference_encode(old, new)
    enc = encode_page(old, new, limit)
    if len(ref) > limit:
        assert enc is None  # overflow: the page goes whole
        return
    assert enc == ref
    if old == new:
        assert enc == b""
    else:
        assert apply(old, enc) == new


@settings(max_examples=50, deadline=None)
@given(pairs=st.lists(page_pairs(), min_size=1, max_size=12), limit=st.sampled_from([100, 1024]))
def test_a_chunk_encodes_page_by_page(pairs: list[tuple[bytes, bytes]], limit: int) -> None:
    old = np.frombuffer(b"".join(p[0] for p in pairs), dtype=np.uint8).reshape(-1, PAGE)
    new = np.frombuffer(b"".join(p[1] for p in pairs), dtype=np.uint8).reshape(-1, PAGE)
    d = encode_pages(old, new, limit)
    offsets = np.concatenate(([0], np.cumsum(d.lengths)))
    data = d.data.tobytes()
    for k, row in enumerate(d.rows.tolist()):
        assert data[offsets[k] : offsets[k + 1]] == reference_encode(*pairs[row])
    for row in d.overflow.tolist():
        assert len(reference_encode(*pairs[row])) > limit
    for row in d.unchanged.tolist():
        assert pairs[row][0] == pairs[row][1]
    assert sorted([*d.rows.tolist(), *d.overflow.tolist(), *d.unchanged.tolist()]) == list(range(len(pairs)))


def test_a_page_rewritten_whole_overflows_and_sparse_stamps_are_tiny() -> None:
    rng = np.random.default_rng(3)
    old = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    assert encode_page(old, rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes(), PAGE // 4) is None
    new = bytearray(old)
    new[0:8] = bytes(8 * [0xAA])
    new[PAGE - 8 :] = bytes(8 * [0xBB])
    enc = encode_page(old, bytes(new), PAGE // 4)
    assert enc is not None and len(enc) <= 22  # the dirty guest's fill=sparse write: 16 bytes


@pytest.mark.parametrize(("enc", "why"), [
    (b"\x00", "ends inside a run length"),
    (b"\x00\x00", "empty changed run"),
    (b"\x00\x05ab", "runs past"),
    (b"\x80\x80\x80\x80\x01\x01a", "longer than 4 bytes"),
    (b"\x00\x01a\x00\x01b", "empty unchanged run"),
    (b"\xff\x7f\x01a", "runs past"),
    (b"", "empty"),
])
def test_malformed_encodings_are_refused_naming_ram_delta(enc: bytes, why: str) -> None:
    with pytest.raises(StreamError, match=f"RAM_DELTA.*{why}"):
        apply(bytes(PAGE), enc)


def test_the_cache_is_direct_mapped_and_keeps_young_entries() -> None:
    cache = PageCache(4 * PAGE, PAGE, [16, 16])
    pages = np.array([0, 1, 2, 3])
    contents = np.arange(4 * PAGE, dtype=np.uint64).view(np.uint8)[: 4 * PAGE].reshape(4, PAGE)
    keys = cache.keys_of(0, pages)
    assert cache.store(keys, contents, generation=1, channel=0).all()
    assert cache.lookup(keys).all() and (cache.data[:4] == contents).all()
    # Block 1's page 0 is global page 16: slot 0, taken by a young entry, so not cached.
    other = cache.keys_of(1, np.array([0]))
    assert not cache.store(other, contents[:1], generation=2, channel=1).any()
    cache.age += 2  # CACHED_PAGE_LIFETIME claims later the old entry gives way
    assert cache.store(other, contents[:1], generation=3, channel=1).all()
    assert not cache.lookup(keys[:1]).any() and cache.lookup(other).all()
    assert cache.generations[0] == 3 and cache.channels[0] == 1
    cache.invalidate(other)
    assert not cache.lookup(other).any()
    with pytest.raises(ValueError, match="power of two"):
        PageCache(3 * PAGE, PAGE, [16])


def test_counters_give_qemus_rates_per_period() -> None:
    c = XbzrleCounters(cache_size=1 << 20)
    c.pages, c.bytes, c.cache_miss, c.looked_up = 10, 400, 5, 20
    c.end_period()
    assert c.encoding_rate == pytest.approx(10 * PAGE / 400)
    assert c.cache_miss_rate == pytest.approx(0.25)
    q = c.as_qmp()
    assert set(q) == {"cache-size", "bytes", "pages", "cache-miss", "cache-miss-rate", "encoding-rate",
                      "overflow"}


# --- the RAM_DELTA record --------------------------------------------------------------------------


def delta_stream(entries_pages: list[int], old: bytes, new: bytes) -> tuple[bytes, RamDelta]:
    """A stream with one RAM_DELTA of the pages `entries_pages`, each encoded old -> new."""
    enc_bytes = encode_page(old, new, PAGE)
    assert enc_bytes
    e = np.zeros(len(entries_pages), dtype=DELTA_ENTRY)
    e["page"], e["base"], e["length"], e["check"] = entries_pages, 4, len(enc_bytes), checksum(new)
    rec = RamDelta(1, e, enc_bytes * len(entries_pages))
    enc = StreamEncoder(machine_type="test")
    data = b"".join([enc.header(), enc.encode(RamBlocks((RamBlockInfo(1, "pc.ram", 0, 1 << 20),))),
                     *(bytes(b) for b in enc.encode_buffers(rec)), enc.end()])
    return data, rec


def decode(data: bytes) -> list:
    dec = StreamDecoder()
    dec.feed(data)
    dec.feed_eof()
    return list(dec.records())


OLD = bytes(range(256)) * 16
NEW = OLD[:100] + b"sparse!!" + OLD[108:4000] + b"stamp..." + OLD[4008:]


def test_a_delta_record_round_trips_and_applies() -> None:
    data, rec = delta_stream([2, 9], OLD, NEW)
    got = decode(data)[2]
    assert isinstance(got, RamDelta) and got == rec
    block = np.frombuffer(bytearray(OLD * 16), dtype=np.uint8).reshape(16, PAGE)
    apply_deltas(block, got.entries, got.offsets(), bytes(got.data))
    assert block[2].tobytes() == NEW and block[9].tobytes() == NEW and block[3].tobytes() == OLD


@settings(max_examples=100, deadline=None)
@given(bit=st.integers(0, 10**9))
def test_any_flipped_bit_in_a_delta_record_is_refused_by_name(bit: int) -> None:
    data = bytearray(delta_stream([2, 9], OLD, NEW)[0])
    start = 80 + len(StreamEncoder().encode(RamBlocks((RamBlockInfo(1, "pc.ram", 0, 1 << 20),))))
    end = len(data) - (32 + 16 + 8)
    pos = start + bit % ((end - start) * 8) // 8
    data[pos] ^= 1 << (bit % 8)
    with pytest.raises(StreamError) as info:
        decode(bytes(data))
    msg = str(info.value)
    assert "RAM_DELTA" in msg or "record header" in msg or "sync word" in msg, msg


def test_a_delta_onto_a_page_that_is_not_its_base_is_refused_and_nothing_written() -> None:
    data, _ = delta_stream([2], OLD, NEW)
    rec = decode(data)[2]
    block = np.zeros((16, PAGE), dtype=np.uint8)  # the destination never had the base
    with pytest.raises(StreamError, match="RAM_DELTA page 2 does not match its checksum"):
        apply_deltas(block, rec.entries, rec.offsets(), bytes(rec.data))
    assert not block.any()


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda e: e.__setitem__("page", [9, 2]), "not strictly increasing"),
    (lambda e: e.__setitem__("zero", [0, 1]), "entry reserved field"),
    (lambda e: e.__setitem__("length", [1, 2 * e["length"][0] - 1]), "encoding length outside"),
])
def test_malformed_delta_entries_are_refused(mutate: object, why: str) -> None:
    _, rec = delta_stream([2, 9], OLD, NEW)
    entries = rec.entries.copy()
    mutate(entries)  # type: ignore[operator]
    enc = StreamEncoder()
    head = DELTA_HEAD.pack(1, 0, 0, 0) + entries.tobytes()
    data = b"".join([enc.header(), enc.encode(RamBlocks((RamBlockInfo(1, "pc.ram", 0, 1 << 20),))),
                     enc.raw_record(35, head + bytes(rec.data), section=1, count=2), enc.end()])
    with pytest.raises(StreamError, match=f"RAM_DELTA.*{why}"):
        decode(data)


def test_analyze_reads_delta_records(tmp_path: Path) -> None:
    path = tmp_path / "d.vmf"
    path.write_bytes(delta_stream([2, 9], OLD, NEW)[0])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-m", "vmferry", "analyze", "--json", str(path)],
                         capture_output=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    block = json.loads(out.stdout)["ram_blocks"][0]
    assert block["sent"] == 2 and block["record_types"] == {"RAM_DELTA xbzrle": 1}
