"""Encode and decode speed of RAM records, against the raw memcpy rate of the same data.

    python bench/bench_stream.py [--mib 256] [--runs 5]

Guest RAM is a numpy buffer of random bytes (4 KiB pages); runs of 64 and 256 pages per record.
All rates are page-data bytes / wall time (GB = 1e9 bytes), median of --runs with the range:
  memcpy        np.copyto of the whole buffer: the machine's copy rate, the ceiling for any path
                that must move the bytes once
  encode        StreamEncoder.encode_ram_pages over every run: header + xxh3 of the pages; the
                pages are not copied (a sender passes the buffers to sendmsg)
  decode-feed   StreamDecoder.feed() of the encoded stream in 1 MiB chunks (a recv loop that gets
                bytes): records split across chunks are assembled (one copy) and checked
  decode-whole  feed() of the whole stream at once: payloads handed on as views, checksum only
  decode-placed get_buffer()/buffer_updated() with a place() callback; the "recv_into" is a memmove
                from the encoded stream into the destination guest buffer, i.e. the one copy the
                kernel would make: the zero-copy destination path, copy included
  decode-placed-nocopy  the same without the page copy (pages already in place): the decoder's
                own cost (header handling + xxh3 over the placed pages)
  round-trip    encode + decode-placed of the same data, end to end, simulated kernel copy included
  round-trip-codec  encode + decode-placed-nocopy: the codec's share of a migration's CPU
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import time

import numpy as np

from vmferry.stream import RamBlockInfo, RamBlocks, StreamDecoder, StreamEncoder

PAGE = 4096


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def encode_stream(guest: memoryview, run_pages: int) -> tuple[StreamEncoder, list]:
    enc = StreamEncoder(page_size=PAGE)
    bufs = [enc.header(), enc.encode(RamBlocks((RamBlockInfo(1, "pc.ram", 0, guest.nbytes),)))]
    step = run_pages * PAGE
    for off in range(0, guest.nbytes, step):
        bufs += enc.encode_ram_pages(1, off // PAGE, guest[off:off + step])
    bufs.append(enc.end())
    return enc, bufs


def decode_feed(wire: bytes, chunk: int) -> None:
    dec = StreamDecoder()
    view = memoryview(wire)
    for off in range(0, len(wire), chunk):
        dec.feed(view[off:off + chunk])
        for _ in dec.records():
            pass
    dec.feed_eof()
    assert dec.ended


def decode_placed(wire: bytes, dst: memoryview, copy_pages: bool = True) -> None:
    dec = StreamDecoder(place=lambda b, first, count: dst[first * PAGE:(first + count) * PAGE])
    src_addr = ctypes.cast(ctypes.c_char_p(wire), ctypes.c_void_p).value
    pos = 0
    while not dec.ended:
        buf = dec.get_buffer()
        n = min(len(buf), len(wire) - pos)
        # the "recv_into": one copy from the wire into wherever the decoder wants the bytes. With
        # copy_pages=False, page payloads are taken as already there (dst holds them from an earlier
        # run): what remains is the decoder's own cost, the part the kernel's copy does not pay.
        if copy_pages or n < 1024:  # headers and trailers are always copied
            ctypes.memmove(ctypes.addressof(ctypes.c_char.from_buffer(buf)), src_addr + pos, n)
        pos += n
        dec.buffer_updated(n)
        for _ in dec.records():
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    nbytes = args.mib << 20
    src = np.frombuffer(os.urandom(nbytes), dtype=np.uint8).copy()
    dst = np.empty_like(src)
    guest, dst_view = memoryview(src), memoryview(dst)
    np.copyto(dst, src)  # fault in the destination once, so memcpy measures copying, not page faults
    results: dict[str, list[float]] = {"memcpy": timed(lambda: np.copyto(dst, src), args.runs)}
    for run_pages in (64, 256):
        results[f"encode/{run_pages}"] = timed(lambda rp=run_pages: encode_stream(guest, rp), args.runs)
        wire = b"".join(encode_stream(guest, run_pages)[1])
        results[f"decode-feed/{run_pages}"] = timed(lambda w=wire: decode_feed(w, 1 << 20), args.runs)
        results[f"decode-whole/{run_pages}"] = timed(lambda w=wire: decode_feed(w, len(w)), args.runs)
        results[f"decode-placed/{run_pages}"] = timed(lambda w=wire: decode_placed(w, dst_view), args.runs)
        assert np.array_equal(src, dst), "placed decode did not reproduce the guest"
        results[f"decode-placed-nocopy/{run_pages}"] = timed(
            lambda w=wire: decode_placed(w, dst_view, copy_pages=False), args.runs)
        for label, decode in (("round-trip", "decode-placed"), ("round-trip-codec", "decode-placed-nocopy")):
            results[f"{label}/{run_pages}"] = [
                e + d for e, d in zip(results[f"encode/{run_pages}"], results[f"{decode}/{run_pages}"],
                                      strict=True)]
        del wire
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs ({_cpu()}), "
          f"Python {platform.python_version()}, {args.mib} MiB of random 4 KiB pages, "
          f"median of {args.runs} runs [min-max], GB/s")
    for name, secs in results.items():
        rates = sorted(nbytes / s / 1e9 for s in secs)
        print(f"| {name:<18} | {statistics.median(rates):6.2f} | [{rates[0]:.2f}-{rates[-1]:.2f}] |")


if __name__ == "__main__":
    main()
