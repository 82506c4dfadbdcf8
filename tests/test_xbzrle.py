"""XBZRLE: the delta codec (property tests against a byte-by-byte reference of QEMU's encoding)
and the source's page cache."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import StreamError
from vmferry.migration.xbzrle import PageCache, XbzrleCounters, decode_into, encode_page, encode_pages

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


@st.composite
def page_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """An old page and a new one made of it by a few writes: sparse, runs, wholesale, or none."""
    old = bytearray(draw(st.binary(min_size=PAGE, max_size=PAGE)) if draw(st.booleans())
                    else bytes(PAGE))
    new = bytearray(old)
    for _ in range(draw(st.integers(0, 12))):
        at = draw(st.integers(0, PAGE - 1))
        data = draw(st.binary(min_size=1, max_size=draw(st.sampled_from([1, 8, 200, PAGE]))))
        new[at : at + len(data)] = data[: PAGE - at]
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
