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
Scattered pages (a sparse dirty set: a random quarter of the buffer's pages, adjacent ones not merged
into runs; rates are bytes of those pages / wall time):
  scattered/encode-1page     one RAM_PAGES record per page (encode_ram_pages), the pre-1.0 way
  scattered/encode-list512   RAM_PAGE_LIST of 512 pages: the gather of the pages (np.take into a
                             staging buffer allocated and faulted in once, as a sender reuses
                             one; the sender's one copy) + encode_ram_page_list
  scattered/decode-1page     the 1-page records through get_buffer()/place(), simulated recv
                             copy included (what the destination does for RAM_PAGES)
  scattered/decode-list512   the lists through get_buffer() (recv into the assembly buffer,
                             simulated copy included) + RamPageList.scatter_into guest memory
  scattered/round-trip-*     encode + decode of the same pages
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import time

import numpy as np

from vmferry.stream import RamBlockInfo, RamBlocks, RamPageList, StreamDecoder, StreamEncoder

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


def encode_scattered(guest: np.ndarray, pages: np.ndarray, per_record: int, staging: np.ndarray) -> list:
    """per_record = 1: one RAM_PAGES per page; otherwise RAM_PAGE_LIST records of that many pages,
    gathered into `staging` (len(pages) pages; a fresh array per record would cost more in page
    faults than the copy itself: 1.1 against 3.5-4.8 GB/s measured)."""
    enc = StreamEncoder(page_size=PAGE)
    bufs = [enc.header(), enc.encode(RamBlocks((RamBlockInfo(1, "pc.ram", 0, guest.nbytes),)))]
    view = memoryview(guest.reshape(-1))
    if per_record == 1:
        for p in pages.tolist():
            bufs += enc.encode_ram_pages(1, p, view[p * PAGE:(p + 1) * PAGE])
    else:
        for i in range(0, len(pages), per_record):
            chunk = pages[i:i + per_record]
            out = staging[i:i + len(chunk)]
            np.take(guest, chunk, axis=0, out=out)  # the gather: the sender's one copy
            bufs += enc.encode_ram_page_list(1, chunk, memoryview(out.reshape(-1)))
    bufs.append(enc.end())
    return bufs


def decode_scattered(wire: bytes, dst: np.ndarray) -> None:
    """Both record kinds through get_buffer() with a simulated recv copy: RAM_PAGES placed into
    dst, RAM_PAGE_LIST received into the assembly buffer and scattered into dst."""
    flat = memoryview(dst.reshape(-1))
    dec = StreamDecoder(place=lambda b, first, count: flat[first * PAGE:(first + count) * PAGE])
    src_addr = ctypes.cast(ctypes.c_char_p(wire), ctypes.c_void_p).value
    pos = 0
    while not dec.ended:
        buf = dec.get_buffer()
        n = min(len(buf), len(wire) - pos)
        ctypes.memmove(ctypes.addressof(ctypes.c_char.from_buffer(buf)), src_addr + pos, n)
        pos += n
        dec.buffer_updated(n)
        for rec in dec.records():
            if isinstance(rec, RamPageList):
                rec.scatter_into(flat, PAGE)


def bench_scattered(src: np.ndarray, runs: int, results: dict[str, list[float]]) -> int:
    """-> bytes of page data per run (the scattered rows' numerator)."""
    guest = src.reshape(-1, PAGE)
    rng = np.random.default_rng(0)
    pages = np.flatnonzero(rng.random(len(guest)) < 0.25).astype(np.uint32)
    dst = np.zeros_like(guest)
    staging = np.zeros((len(pages), PAGE), dtype=np.uint8)  # zeroed: faulted in before timing
    for label, per in (("1page", 1), ("list512", 512)):
        results[f"scattered/encode-{label}"] = timed(lambda p=per: encode_scattered(guest, pages, p, staging),
                                                    runs)
        wire = b"".join(encode_scattered(guest, pages, per, staging))
        dst[:] = 0
        results[f"scattered/decode-{label}"] = timed(lambda w=wire: decode_scattered(w, dst), runs)
        assert np.array_equal(dst[pages], guest[pages]), "scattered decode did not reproduce the pages"
        results[f"scattered/round-trip-{label}"] = [
            e + d for e, d in zip(results[f"scattered/encode-{label}"], results[f"scattered/decode-{label}"],
                                  strict=True)]
        del wire
    return len(pages) * PAGE


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
    numerator = dict.fromkeys(results, nbytes)
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
    numerator.update(dict.fromkeys(results, nbytes))
    scattered_bytes = bench_scattered(src, args.runs, results)
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs ({_cpu()}), "
          f"Python {platform.python_version()}, {args.mib} MiB of random 4 KiB pages, "
          f"median of {args.runs} runs [min-max], GB/s")
    print(f"# scattered rows: {scattered_bytes >> 20} MiB of pages ({scattered_bytes // PAGE} pages), "
          "a random quarter of the buffer")
    for name, secs in results.items():
        rates = sorted(numerator.get(name, scattered_bytes) / s / 1e9 for s in secs)
        print(f"| {name:<18} | {statistics.median(rates):6.2f} | [{rates[0]:.2f}-{rates[-1]:.2f}] |")


if __name__ == "__main__":
    main()
