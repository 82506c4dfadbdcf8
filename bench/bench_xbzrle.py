"""XBZRLE: what it saves on the bytes sent again after pass 1, on loopback.

    python bench/bench_xbzrle.py [--runs 3] [--mem 512M] [--ws 256] [--rate 64] [--cache-mib 512]
                                 [--bandwidth 0]

Two `vmferry run` processes on KVM; the `dirty` guest with `fill=sparse` (each page written whole
once, later writes rewrite only its two 8-byte stamps: what XBZRLE is for) at --rate MiB/s of
page writes over a --ws MiB working set, migrated over loopback TCP with XBZRLE off and on, on
the main stream alone and with 2 multifd channels. Same guest, same parameters otherwise
(downtime-limit 300 ms; --bandwidth caps max-bandwidth, bytes/s, 0 = none). xbzrle-cache-size is
--cache-mib: at least the working set, or most pages miss (the cache is direct-mapped: QEMU's
default 64 MiB holds a quarter of a 256 MiB working set).

Reported per setting, median [min-max] of --runs:
- pass-1 MiB: the pages the first pass sent (every populated page once), at 4 KiB each;
- re-sent MiB: everything sent but those — the passes' bytes plus the stopped part
  (`downtime-bytes`), less pass 1's pages at 4 KiB each (record headers of pass 1 count as
  re-sent: a few KiB); on data channels a pass's bytes are page bytes (a delta: its payload);
- re-sent pages: pages sent with contents after pass 1 (`ram.normal` − pass 1's pages; with
  XBZRLE, a delta counts as its page), and bytes per re-sent page — the cut XBZRLE makes whatever
  the number of passes each migration happened to need;
- passes, total-time and downtime; the xbzrle-cache pages, overflows and misses.
Every run must end with the destination's guest printing `verify ok`.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from vmproc import VmProcess  # noqa: E402

MIB = 1 << 20
PAGE = 4096


def run(tmp: Path, mem: str, ws: int, rate: int, channels: int, xbzrle: bool, bandwidth: int,
        cache_mib: int) -> dict:
    src = VmProcess(tmp, "src", "-m", mem, "--guest", "dirty", "--append",
                    f"ws={ws} rate={rate} verify=2 fill=sparse")
    dst = None
    try:
        src.wait_serial(r"verify ok", timeout=120)
        dst = VmProcess(tmp, "dst", "-m", mem, "--incoming", "tcp:127.0.0.1:0")
        deadline = time.monotonic() + 60
        while not (m := re.search(r"incoming migration on (\S+)", dst.log())):
            if time.monotonic() > deadline:
                raise RuntimeError("destination never listened")
            time.sleep(0.05)
        caps = [{"capability": "xbzrle", "state": xbzrle}, {"capability": "multifd", "state": bool(channels)}]
        src.cmd("migrate-set-capabilities", capabilities=caps)
        if channels:
            src.cmd("migrate-set-parameters", **{"multifd-channels": channels})
        src.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth,
                                             "xbzrle-cache-size": cache_mib * MIB})
        src.cmd("migrate", uri=m.group(1))
        info = src.wait_migration(timeout=600)
        dinfo = dst.wait_migration(timeout=600)
        if info["status"] != "completed" or dinfo["status"] != "completed":
            raise RuntimeError(f"migration failed: {info.get('error-desc')} / {dinfo.get('error-desc')}")
        start = len(dst.serial())
        dst.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
        passes = info["passes"]
        # Everything the passes and the stopped part sent, less pass 1's pages at a page each. Not
        # `passes[1:]`: on data channels a pass counts page bytes when a channel sent them, so a
        # chunk still queued when pass 1 ended would count as re-sent.
        total = sum(p["bytes"] for p in passes) + info["ram"]["downtime-bytes"]
        resent = total - passes[0]["pages"] * PAGE
        pages = info["ram"]["normal"] - passes[0]["pages"]
        cache = info.get("xbzrle-cache", {})
        return {"pass1_mib": passes[0]["pages"] * PAGE / MIB, "resent_mib": resent / MIB,
                "resent_pages": pages,
                "bytes_per_page": resent / pages if pages else 0.0, "passes": len(passes),
                "total_ms": info["total-time"], "downtime_ms": info["downtime"],
                "xbzrle": "-" if not cache else
                f"{cache.get('pages', 0)}/{cache.get('overflow', 0)}/{cache.get('cache-miss', 0)}"}
    finally:
        src.close()
        if dst is not None:
            dst.close()


def med(xs: list[float], fmt: str = ".1f") -> str:
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mem", default="512M")
    ap.add_argument("--ws", type=int, default=256, help="working set, MiB")
    ap.add_argument("--rate", type=int, default=64, help="MiB/s of page writes (16 bytes each changed)")
    ap.add_argument("--bandwidth", type=int, default=0, help="max-bandwidth, bytes/s (0: none)")
    ap.add_argument("--cache-mib", type=int, default=512, help="xbzrle-cache-size, MiB (a power of two)")
    args = ap.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# {' '.join(sys.argv)}")
    print(f"\n{args.mem} guest, dirty ws={args.ws} rate={args.rate} fill=sparse, loopback TCP, "
          f"max-bandwidth {args.bandwidth or 'none'}, xbzrle-cache-size {args.cache_mib} MiB, "
          f"{args.runs} runs")
    print("| setting | pass-1 MiB | re-sent MiB | re-sent pages | bytes / re-sent page | passes | "
          "total ms | downtime ms | xbzrle pages/overflow/miss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for channels in (0, 2):
        for xbzrle in (False, True):
            rs = []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as d:
                    rs.append(run(Path(d), args.mem, args.ws, args.rate, channels, xbzrle, args.bandwidth,
                                  args.cache_mib))
            name = "1 channel" if not channels else f"multifd {channels} ch"
            cols = [med([r["pass1_mib"] for r in rs]), med([r["resent_mib"] for r in rs], ".2f")]
            cols += [med([r[k] for r in rs], ".0f") for k in ("resent_pages", "bytes_per_page", "passes",
                                                               "total_ms", "downtime_ms")]
            print(f"| {name}, xbzrle {'on' if xbzrle else 'off'} | " + " | ".join(cols)
                  + f" | {rs[-1]['xbzrle']} |", flush=True)
    print(f"# load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
