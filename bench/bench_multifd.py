"""Several channels and compression: a quick measurement on loopback.

    python bench/bench_multifd.py [--runs 3] [--mem 1G] [--ws 512] [--parts vm,datapath]

Part `vm`: two `vmferry run` processes on KVM, the `dirty` guest with --ws MiB written once then
static (`rate=0`; each of its pages is one 8-byte word repeated: compressible ~1000x, the best
case for compression, not a typical guest), migrated over loopback TCP
with multifd off, then 1, 2, 4 channels (compression none), then 2 channels with lz4, zstd, auto.
Reported per setting (median [min-max] of --runs): total-time and downtime from the source's
query-migrate, bytes on the wire, and the CPU seconds each process spent during the migration
(/proc/PID/stat utime+stime, before `migrate` and after the destination completed). Every run must
end with the destination's guest printing `verify ok`.

Part `datapath`: the multifd data path alone, in process: --dp-mib MiB of pages of one kind
(`random`: os.urandom; `text`: a fixed English corpus repeated, compressible about 30x) go from a
RamBlock through RamSaver's copy, the channels' encoders and compressors, a real socket pair per
channel, to a receiving process (fork: its own GIL) that decodes, decompresses, checks and applies
them with generations. Rate = raw page bytes / wall time; ratio = wire bytes / raw bytes.
(Whole migrations of compressible and random guest RAM, `fill=text` / `fill=random`, against
QEMU and over a 1 Gbit/s link: bench_throughput.py.)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from vmferry.machine.ramblock import RamBlock  # noqa: E402
from vmferry.migration.multifd import DataChannelEncoder, DataChannelReceiver, MultifdSender  # noqa: E402
from vmferry.migration.ram import RamLoader, RamSaver, block_table  # noqa: E402
from vmferry.stream.compression import Compressor  # noqa: E402
from vmferry.stream.encoder import StreamEncoder  # noqa: E402
from vmferry.transport.channel import SocketChannel  # noqa: E402
from vmproc import VmProcess  # noqa: E402

PAGE = 4096
CORPUS = (b"It was the best of times, it was the worst of times, it was the age of wisdom, it was "
          b"the age of foolishness, it was the epoch of belief, it was the epoch of incredulity. ")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_run(tmp: Path, mem: str, ws: int, channels: int, compression: str) -> dict:
    src = VmProcess(tmp, "src", "-m", mem, "--guest", "dirty", "--append", f"ws={ws} rate=0 verify=2")
    dst = None
    try:
        src.wait_serial(r"verify ok", timeout=120)
        dst = VmProcess(tmp, "dst", "-m", mem, "--incoming", "tcp:127.0.0.1:0")
        deadline = time.monotonic() + 60
        while not (m := re.search(r"incoming migration on (\S+)", dst.log())):
            if time.monotonic() > deadline:
                raise RuntimeError("destination never listened")
            time.sleep(0.05)
        uri = m.group(1)
        if channels:
            src.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
            src.cmd("migrate-set-parameters", **{"multifd-channels": channels,
                                                 "multifd-compression": compression})
        c0 = (cpu_s(src.proc.pid), cpu_s(dst.proc.pid))
        src.cmd("migrate", uri=uri)
        info = src.wait_migration(timeout=300)
        dinfo = dst.wait_migration(timeout=300)
        c1 = (cpu_s(src.proc.pid), cpu_s(dst.proc.pid))
        if info["status"] != "completed" or dinfo["status"] != "completed":
            raise RuntimeError(f"migration failed: {info.get('error-desc')} / {dinfo.get('error-desc')}")
        start = len(dst.serial())
        dst.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
        return {"total_ms": info["total-time"], "downtime_ms": info["downtime"],
                "wire_mib": info["ram"]["transferred"] / 2**20,
                "src_cpu_s": c1[0] - c0[0], "dst_cpu_s": c1[1] - c0[1]}
    finally:
        src.close()
        if dst is not None:
            dst.close()


def _fill(block: RamBlock, kind: str) -> None:
    mem = np.frombuffer(block.mem, dtype=np.uint8)
    if kind == "random":
        mem[:] = np.frombuffer(os.urandom(block.nbytes), dtype=np.uint8)
    else:
        text = (CORPUS * (block.nbytes // len(CORPUS) + 1))[: block.nbytes]
        mem[:] = np.frombuffer(text, dtype=np.uint8)


def datapath_run(mib: int, kind: str, channels: int, compression: str) -> dict:
    nbytes = mib << 20
    src = RamBlock("pc.ram", 0, nbytes)
    _fill(src, kind)
    table = block_table([src])
    pairs = [socket.socketpair() for _ in range(channels)]
    pid = os.fork()
    if pid == 0:  # the destination: its own process and GIL
        code = 0
        try:
            dst = RamBlock("pc.ram", 0, nbytes)
            loader = RamLoader([dst])
            loader.check_layout(table)
            import threading

            def recv(sock: socket.socket, rx: DataChannelReceiver) -> None:
                chunk = memoryview(bytearray(1 << 20))
                while not rx.ended and rx.read_from(sock.recv_into, chunk):
                    pass

            rxs = [DataChannelReceiver(loader, "bench") for _ in pairs]
            ts = [threading.Thread(target=recv, args=(b, rx))
                  for (_, b), rx in zip(pairs, rxs, strict=True)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            if not all(rx.ended for rx in rxs):
                code = 1
            for _, b in pairs:
                b.sendall(b"k")
        except BaseException:  # noqa: BLE001
            code = 2
        os._exit(code)
    chans = [SocketChannel(a, f"bench-{i}") for i, (a, _) in enumerate(pairs)]
    encs = [DataChannelEncoder("bench", i, channels, table, Compressor(compression)) for i in range(channels)]
    saver = RamSaver([src], StreamEncoder())
    saver.setup(None)
    t0 = time.perf_counter()
    sender = MultifdSender(chans, encs, lambda i, bufs: chans[i].sendmsg(bufs), lambda: False,
                           {1: src.npages})
    sender.start()
    saver.multifd = sender
    saver.send_dirty(lambda bufs: 0, stable=False, cancelled=lambda: False)
    sender.flush()
    for a, _ in pairs:
        a.recv(1)
    secs = time.perf_counter() - t0
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"receiver failed ({status})")
    chosen: dict[str, int] = {}
    for e in encs:
        for k, v in e.compressor.chosen.items():
            chosen[k] = chosen.get(k, 0) + v
    wire = sender.sent_bytes()
    saver.cleanup()
    for a, b in pairs:
        a.close()
        b.close()
    src.close()
    return {"gbps": nbytes / secs / 1e9, "ratio": wire / nbytes, "chosen": chosen}


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--ws", type=int, default=512, help="MiB the guest writes once")
    ap.add_argument("--dp-mib", type=int, default=256)
    ap.add_argument("--parts", default="vm,datapath")
    args = ap.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f}")
    print(f"# {' '.join(sys.argv)}")
    if "vm" in args.parts:
        print(f"\n## vm: {args.mem} guest, {args.ws} MiB written once (one word a page), loopback TCP, "
              f"{args.runs} runs")
        print("| setting | total ms | downtime ms | wire MiB | source CPU s | destination CPU s |")
        print("|---|---|---|---|---|---|")
        for channels, comp in [(0, "none"), (1, "none"), (2, "none"), (4, "none"), (2, "lz4"),
                               (2, "zstd"), (2, "auto")]:
            rs = []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as d:
                    rs.append(vm_run(Path(d), args.mem, args.ws, channels, comp))
            name = "multifd off" if not channels else f"{channels} ch, {comp}"
            print(f"| {name} | " + " | ".join(med([r[k] for r in rs]) for k in
                                             ("total_ms", "downtime_ms", "wire_mib", "src_cpu_s",
                                              "dst_cpu_s")) + " |", flush=True)
    if "datapath" in args.parts:
        print(f"\n## datapath: {args.dp_mib} MiB, {args.runs} runs, GB/s of raw pages and wire/raw")
        print("| data | channels | compression | GB/s | wire/raw | chosen |")
        print("|---|---|---|---|---|---|")
        for kind in ("random", "text"):
            for channels, comp in [(1, "none"), (2, "none"), (4, "none"), (2, "lz4"), (2, "zstd"),
                                   (2, "zlib"), (2, "auto")]:
                rs = [datapath_run(args.dp_mib, kind, channels, comp) for _ in range(args.runs)]
                print(f"| {kind} | {channels} | {comp} | {med([r['gbps'] for r in rs])} | "
                      f"{statistics.median(r['ratio'] for r in rs):.3f} | {rs[-1]['chosen'] or '-'} |",
                      flush=True)


if __name__ == "__main__":
    main()
