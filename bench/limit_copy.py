"""The machine's limit for a migration's bulk: 1 GiB from one process's memory into another's fresh RAM.

No vmferry: a sender process fills a buffer (touched before the clock starts) and `sendall`s it
in 1 MiB pieces over loopback TCP; a receiver process `recv_into`s them into a fresh anonymous
mapping, with 4 KiB pages or with `MADV_HUGEPAGE` on it (THP in `madvise` mode here, as QEMU
asks for on guest RAM). The time is the receiver's, from `accept` to the last byte placed: what
a destination pays to receive and fault in that much memory (BENCHMARKS.md, issue 9).

  python bench/limit_copy.py [--mib 1024] [--huge]        one measurement, prints a JSON line
  python bench/limit_copy.py recv PORTFILE MIB HUGE        (the receiver role, started by the above)
  python bench/limit_copy.py send PORT MIB                 (the sender role)
"""

from __future__ import annotations

import argparse
import json
import mmap
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench_procs import install_signal_handlers, spawn, stop, stop_all

MiB = 1 << 20
PIECE = MiB


def receive(port_file: Path, mib: int, huge: bool) -> None:
    size = mib * MiB
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        buf.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(buf)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        port_file.write_text(str(ls.getsockname()[1]))
        ls.settimeout(60)
        conn, _ = ls.accept()
    with conn:
        t0 = time.perf_counter()
        got = 0
        while got < size:
            n = conn.recv_into(view[got:got + PIECE])
            if n == 0:
                raise SystemExit(f"sender closed after {got} of {size} bytes")
            got += n
        elapsed = time.perf_counter() - t0
        conn.sendall(b"k")
    print(json.dumps({"seconds": elapsed, "bytes": got, "anon_huge_kib": anon_huge_kib()}), flush=True)


def anon_huge_kib() -> int:
    """How much of this process's memory the kernel backs with transparent huge pages."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def send(port: int, mib: int) -> None:
    data = bytearray(b"\xa5" * (mib * MiB))  # written, so every page is in memory before the clock
    view = memoryview(data)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        for off in range(0, len(data), PIECE):
            s.sendall(view[off:off + PIECE])
        s.recv(1)


def measure(mib: int, huge: bool, timeout: float = 120.0) -> dict[str, float]:
    """The receiver's report for `mib` MiB: seconds, bytes, anon_huge_kib (fresh processes each call)."""
    me = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="limit-copy-") as tmp:
        port_file = Path(tmp) / "port"
        out = Path(tmp) / "recv.out"
        with open(out, "wb") as rout, open(Path(tmp) / "send.out", "wb") as sout:
            recv = spawn([sys.executable, me, "recv", str(port_file), str(mib), str(int(huge))], rout)
            sender = None
            try:
                deadline = time.monotonic() + timeout
                while not port_file.exists() or not port_file.read_text():
                    if recv.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"limit receiver did not listen: {out.read_text()[-500:]}")
                    time.sleep(0.01)
                sender = spawn([sys.executable, me, "send", port_file.read_text(), str(mib)], sout)
                recv.wait(max(1.0, deadline - time.monotonic()))
                sender.wait(10)
                if recv.returncode != 0:
                    raise RuntimeError(f"limit receiver failed: {out.read_text()[-500:]}")
                return dict(json.loads(out.read_text().splitlines()[-1]))
            finally:
                if sender is not None:
                    stop(sender, grace_s=1.0)
                stop(recv, grace_s=1.0)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "recv":
        receive(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "send":
        send(int(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--huge", action="store_true", help="MADV_HUGEPAGE on the receiving mapping")
    args = ap.parse_args()
    install_signal_handlers()
    try:
        r = measure(args.mib, args.huge)
    finally:
        stop_all()
    print(json.dumps({"mib": args.mib, "huge": args.huge, "seconds": round(r["seconds"], 3),
                      "GB/s": round(args.mib * MiB / r["seconds"] / 1e9, 2),
                      "receiver AnonHugePages MiB": r["anon_huge_kib"] // 1024}))


if __name__ == "__main__":
    main()
