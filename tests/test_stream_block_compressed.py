"""BLOCK_COMPRESSED: a copied drive's sectors, compressed. Round trip with each codec, the raw
bytes checked against the record's own checksum after decompression, every damage refused by
name, and `vmferry analyze` counting them per drive with their ratio."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import StreamError
from vmferry.stream.compression import Codec, Compressor
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.format import checksum
from vmferry.stream.records import BlockCompressed, BlockDevices, DiskInfo
from vmferry.stream.summary import StreamSummary

SECTOR = 512
# What the disk guest writes, in kind: a stamp and words that differ in a few bits (compressible)
RAW = b"".join(i.to_bytes(8, "little") * 8 for i in range(1024))[: 16 * SECTOR]
DISKS = BlockDevices((DiskInfo(1, "disk0", 1 << 20), DiskInfo(2, "shared0", 1 << 20, shared=True)))


def stream_with(setting: str, raw: bytes = RAW, *, disk: int = 1, first: int = 8,
                raw_check: int | None = None, wire: bytes | None = None) -> bytes:
    enc = StreamEncoder(machine_type="test")
    codec, out = Compressor(setting).compress(memoryview(raw))
    rec = BlockCompressed(disk, first, len(raw) // SECTOR, codec,
                          checksum(raw) if raw_check is None else raw_check, raw,
                          bytes(out) if wire is None else wire)
    return b"".join([enc.header(), enc.encode(DISKS), *(bytes(b) for b in enc.encode_buffers(rec)),
                     enc.end()])


def decode(data: bytes) -> list:
    dec = StreamDecoder()
    dec.feed(data)
    dec.feed_eof()
    return list(dec.records())


@pytest.mark.parametrize("setting", ["zstd", "zlib", "lz4"])
def test_each_codec_round_trips(setting: str) -> None:
    rec = decode(stream_with(setting))[2]
    assert isinstance(rec, BlockCompressed)
    assert rec.codec == Codec[setting.upper()] and bytes(rec.data) == RAW
    assert (rec.disk_id, rec.first_sector, rec.sector_count) == (1, 8, 16)
    assert len(rec.wire) < len(RAW)


def test_sectors_that_do_not_match_the_raw_checksum_are_refused() -> None:
    data = stream_with("zstd", raw_check=checksum(RAW) ^ 1)
    with pytest.raises(StreamError, match="BLOCK_COMPRESSED sectors do not match their checksum after zstd"):
        decode(data)


def test_compressed_garbage_is_refused_naming_the_codec() -> None:
    with pytest.raises(StreamError, match="BLOCK_COMPRESSED lz4 data is corrupt"):
        decode(stream_with("lz4", wire=b"\xff" * 40))


def test_a_run_outside_the_disk_or_of_a_shared_disk_is_refused() -> None:
    with pytest.raises(StreamError, match="BLOCK_COMPRESSED sectors 2040..2055 lie outside disk 'disk0'"):
        decode(stream_with("zstd", first=2040))
    with pytest.raises(StreamError, match="BLOCK_COMPRESSED for disk 'shared0', which is listed as shared"):
        decode(stream_with("zstd", disk=2))


@settings(max_examples=60, deadline=None)
@given(setting=st.sampled_from(["zstd", "zlib", "lz4"]), bit=st.integers(0, 10**9))
def test_any_flipped_bit_is_refused_by_name(setting: str, bit: int) -> None:
    data = bytearray(stream_with(setting))
    start = 80 + len(StreamEncoder().encode(DISKS))
    end = len(data) - (32 + 16 + 8)
    pos = start + bit % ((end - start) * 8) // 8
    data[pos] ^= 1 << (bit % 8)
    with pytest.raises(StreamError) as info:
        decode(bytes(data))
    msg = str(info.value)
    assert "BLOCK_COMPRESSED" in msg or "record header" in msg or "sync word" in msg, msg


def test_analyze_counts_them_per_drive_with_the_ratio() -> None:
    summary = StreamSummary()
    dec = StreamDecoder()
    dec.feed(stream_with("zstd"))
    dec.feed_eof()
    for rec in dec.records():
        summary.add(rec)
    disk = summary.to_json()["disks"][0]
    assert disk["record_types"] == {"BLOCK_COMPRESSED zstd": 1} and disk["sent"] == 16
    assert disk["compressed"]["raw_bytes"] == len(RAW) > disk["compressed"]["wire_bytes"]
