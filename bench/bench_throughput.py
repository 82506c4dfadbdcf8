"""Throughput side by side: vmferry and QEMU 7.2 (`-accel kvm`), channels and compression, on
loopback and on a 1 Gbit/s link, in one run.

    PYTHONPATH=src python bench/bench_throughput.py [--runs 3] [--parts link-text,lo-random]
                                                    [--mem 1G] [--ws 512] [--json out.json]

Both sides run the bundled `dirty` guest with the same arguments (`ws=512 rate=0 fill=F
verify=V`: --ws MiB written once, then static) and the same `-m`; every run must end with the
destination's guest printing `verify ok` (its own check of every page). Each side gets
`max-bandwidth` 100 GiB/s (QEMU's default cap is 128 MiB/s) and otherwise its defaults.

Parts:
  link-text  a 1 Gbit/s link: the destination runs in a network namespace of its own, reached
             over a veth pair whose source end is shaped by `tc tbf rate 1gbit`
             (vmferry.testing.netns; see /work/shared/BENCHMARKS.md); compressible RAM
             (`fill=text`, zstd-1 about 6:1).
  lo-random  loopback TCP, random RAM (`fill=random`: incompressible), channels 1, 2, 4 and
             compression `auto` against `none`.
Settings: `vmferry` / `qemu`, `plain` (capability multifd off) or `N ch` (multifd on, N
multifd-channels), and multifd-compression. QEMU needs multifd and its parameters on both ends
(its destination starts with `-incoming defer`, then `migrate-incoming`); vmferry's destination
takes them from the stream.

Reported per setting, medians [min-max] of --runs (runs interleaved: each repetition runs every
setting once, so load drift spreads over all of them):
- total and downtime from the source's final query-migrate (vmferry's downtime ends when the
  destination runs the guest and has said so, QEMU's when its source sent the last byte);
- wire MiB: `ram.transferred` of the source (QEMU 7.2 counts multifd's bytes there too); on the
  link also the veth's tx bytes (every byte on the wire, TCP/IP headers included);
- CPU: utime+stime of the source and destination processes from just before `migrate` to the
  destination running, without their vCPU threads (`vcpu0` / `CPU 0/KVM`: the guest's own work
  — its in-guest checks — is not the migration's), and that sum per GiB of guest data (--ws).
The load average is printed before every run; the tables carry its median and maximum.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_procs import install_signal_handlers, stop_all
from migration_vm import BenchError, Vm, free_port, incoming_uri, vms

from vmferry.testing.netns import GIGABIT, VethLink, veth_link

MiB = 1 << 20
GiB = 1 << 30
UNCAPPED = 100 * GiB
QEMU_PORT = 4444
VCPU_THREAD = re.compile(r"vcpu\d+|CPU \d+/KVM")
POLL_S = 0.05


@dataclass(frozen=True)
class Setting:
    side: str  # "vmferry" or "qemu"
    channels: int  # 0: capability multifd off
    compression: str = "none"

    @property
    def label(self) -> str:
        how = "plain" if not self.channels else f"{self.channels} ch {self.compression}"
        return f"{self.side} {how}"


@dataclass(frozen=True)
class Part:
    desc: str
    link: bool
    fill: str
    settings: tuple[Setting, ...]


V, Q = "vmferry", "qemu"
PARTS: dict[str, Part] = {
    "link-text": Part("1 Gbit/s link (netns + veth + tc tbf), compressible RAM (fill=text)", True, "text", (
        Setting(V, 0), Setting(V, 2), Setting(V, 2, "zstd"), Setting(V, 2, "auto"), Setting(V, 2, "lz4"),
        Setting(Q, 0), Setting(Q, 2), Setting(Q, 2, "zstd"))),
    "lo-random": Part("loopback TCP, random RAM (fill=random)", False, "random", (
        Setting(V, 0), Setting(V, 1), Setting(V, 2), Setting(V, 4), Setting(V, 2, "auto"),
        Setting(Q, 0), Setting(Q, 1), Setting(Q, 2), Setting(Q, 4))),
}


def _ticks(stat: str) -> int:
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_s(pid: int) -> tuple[float, float]:
    """(the process's utime+stime, its vCPU threads' utime+stime), seconds."""
    hz = os.sysconf("SC_CLK_TCK")
    total = _ticks(Path(f"/proc/{pid}/stat").read_text())
    vcpu = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if VCPU_THREAD.fullmatch((task / "comm").read_text().strip()):
                vcpu += _ticks((task / "stat").read_text())
    return total / hz, vcpu / hz


def set_multifd(vm: Vm, s: Setting) -> None:
    if not s.channels:
        if s.compression != "none":
            vm.cmd("migrate-set-parameters", **{"multifd-compression": s.compression})
        return
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    vm.cmd("migrate-set-parameters", **{"multifd-channels": s.channels, "multifd-compression": s.compression})


def wait_running(vm: Vm, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while vm.cmd("query-status")["status"] != "running":
        if time.monotonic() > deadline or vm.proc.poll() is not None:
            raise BenchError(f"{vm.name}: not running {timeout:.0f} s after the migration completed")
        time.sleep(0.02)


def run_once(s: Setting, part: Part, tmp: Path, args: argparse.Namespace,
             link: VethLink | None) -> dict[str, Any]:
    """One migration; over `link` (the destination in its namespace) when the part has one."""
    append = f"ws={args.ws} rate=0 fill={part.fill} verify={args.verify}"
    side = "qemu-kvm" if s.side == Q else "vmferry"
    res: dict[str, Any] = {"setting": s.label, "load": os.getloadavg()[0]}
    with vms() as started:
        src = Vm(side, tmp, "src", args.mem, append)
        started.append(src)
        src.connect()
        filled = src.wait_serial(r"dirty: filled \d+ pages", timeout=300)
        src.wait_serial(r"verify ok gen=\d+", timeout=args.verify + 120, after=filled.end())
        host = link.address if link else "127.0.0.1"
        netns = link.namespace if link else None
        if s.side == Q:
            port = QEMU_PORT if link else free_port()
            dst = Vm(side, tmp, "dst", args.mem, append, incoming="defer", netns=netns)
            started.append(dst)
            dst.connect()
            set_multifd(dst, s)
            uri = f"tcp:{host}:{port}"
            dst.cmd("migrate-incoming", uri=uri)
        else:
            dst = Vm(side, tmp, "dst", args.mem, append, incoming=f"tcp:{host}:0", netns=netns)
            started.append(dst)
            dst.connect()
            uri = incoming_uri(dst, None)
        set_multifd(src, s)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": UNCAPPED})
        c0 = (cpu_s(src.proc.pid), cpu_s(dst.proc.pid))
        tx0 = link.tx_bytes() if link else 0
        t0 = time.monotonic()
        src.cmd("migrate", uri=uri)
        while (info := src.cmd("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
            if time.monotonic() - t0 > args.timeout:
                src.cmd("migrate_cancel")
                raise BenchError(f"{s.label}: not done after {args.timeout} s: {json.dumps(info)[:500]}")
            time.sleep(POLL_S)
        if info["status"] != "completed":
            raise BenchError(f"{s.label}: {info['status']}: {info.get('error-desc')}")
        wait_running(dst)
        c1 = (cpu_s(src.proc.pid), cpu_s(dst.proc.pid))
        wall = time.monotonic() - t0
        ram = info.get("ram", {})
        res.update(total_ms=info["total-time"], downtime_ms=info["downtime"], wall_ms=wall * 1000,
                   wire_mib=ram.get("transferred", 0) / MiB, multifd_mib=ram.get("multifd-bytes", 0) / MiB,
                   src_cpu_s=c1[0][0] - c0[0][0], dst_cpu_s=c1[1][0] - c0[1][0],
                   src_vcpu_s=c1[0][1] - c0[0][1], dst_vcpu_s=c1[1][1] - c0[1][1])
        res["mig_cpu_s"] = (res["src_cpu_s"] - res["src_vcpu_s"]) + (res["dst_cpu_s"] - res["dst_vcpu_s"])
        res["cpu_s_per_gib"] = res["mig_cpu_s"] / (args.ws * MiB / GiB)
        if link:
            res["link_mib"] = (link.tx_bytes() - tx0) / MiB
        m = dst.wait_serial(r"verify (ok|FAIL)[^\n]*\n", timeout=args.verify + 120)
        res["dest_verify"] = m.group(0).strip()
        if not res["dest_verify"].startswith("verify ok"):
            raise BenchError(f"{s.label}: destination guest: {res['dest_verify']}")
    return res


def med(xs: list[float], fmt: str = ".0f") -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]"


COLUMNS = (("total ms", "total_ms", ".0f"), ("downtime ms", "downtime_ms", ".0f"),
           ("wire MiB", "wire_mib", ".1f"), ("link MiB", "link_mib", ".1f"),
           ("src CPU s", "src_cpu_s", ".2f"), ("dst CPU s", "dst_cpu_s", ".2f"),
           ("migration CPU s/GiB", "cpu_s_per_gib", ".2f"))


def table(part: Part, rows: dict[str, list[dict[str, Any]]]) -> str:
    cols = [c for c in COLUMNS if part.link or c[1] != "link_mib"]
    out = ["| setting | " + " | ".join(c[0] for c in cols) + " | ok runs | load |",
           "|---|" + "---|" * (len(cols) + 2)]
    for label, runs in rows.items():
        ok = [r for r in runs if "total_ms" in r]
        loads = [r["load"] for r in runs]
        cells = [med([r[k] for r in ok if k in r], f) for _, k, f in cols]
        out.append(f"| {label} | " + " | ".join(cells) + f" | {len(ok)}/{len(runs)} | "
                   f"{statistics.median(loads):.1f} (max {max(loads):.1f}) |")
    return "\n".join(out)


def ratio(rows: dict[str, list[dict[str, Any]]], a: str, b: str, key: str = "total_ms") -> str:
    xa = [r[key] for r in rows.get(a, []) if key in r]
    xb = [r[key] for r in rows.get(b, []) if key in r]
    if not xa or not xb:
        return f"{a} / {b}: not measured"
    return (f"{a} / {b}: {statistics.median(xa) / statistics.median(xb):.2f} "
            f"({statistics.median(xa):.0f} / {statistics.median(xb):.0f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parts", default="link-text,lo-random")
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--ws", type=int, default=512, help="MiB the guest writes once")
    ap.add_argument("--verify", type=int, default=10, help="the guest's verify= period, seconds: the "
                    "migration starts right after a verify pass and should end before the next (a pass "
                    "takes a core for a second or two, which the migration would have to share)")
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--settings", default="", help="only settings whose label contains one of these "
                    "comma-separated strings")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for p in parts:
        if p not in PARTS:
            ap.error(f"unknown part {p}; known: {', '.join(PARTS)}")
    if os.geteuid() != 0 and any(PARTS[p].link for p in parts):
        ap.error("the 1 Gbit/s link needs root (network namespaces, tc)")
    wanted = [w.strip() for w in args.settings.split(",") if w.strip()]
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, kernel {platform.release()}, Python "
          f"{platform.python_version()}, {qemu.splitlines()[0] if qemu else 'no QEMU'}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"# {' '.join(sys.argv)}", flush=True)
    install_signal_handlers()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        with contextlib.ExitStack() as stack:
            tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-throughput-")))
            for pid in parts:
                part = PARTS[pid]
                settings = [s for s in part.settings if not wanted or any(w in s.label for w in wanted)]
                rows = results.setdefault(pid, {s.label: [] for s in settings})
                with veth_link(GIGABIT) if part.link else contextlib.nullcontext() as link:
                    for rep in range(args.runs):
                        for s in settings:
                            tmp = Path(tempfile.mkdtemp(prefix=f"{pid}-{rep}-", dir=tmpdir))
                            try:
                                r = run_once(s, part, tmp, args, link)
                            except BenchError as e:
                                r = {"setting": s.label, "load": os.getloadavg()[0], "error": str(e)[:2000]}
                            rows[s.label].append(r)
                            print(f"{pid} run {rep + 1}: {json.dumps(r)}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
    finally:
        stop_all()
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    for pid, rows in results.items():
        part = PARTS[pid]
        print(f"\n## {pid}: {part.desc}, {args.mem} guest, ws={args.ws} MiB written once, "
              f"{args.runs} runs\n")
        print(table(part, rows))
        print()
        if pid == "link-text":
            for a, b in (("vmferry 2 ch zstd", "vmferry plain"), ("vmferry 2 ch auto", "vmferry plain"),
                         ("vmferry 2 ch zstd", "vmferry 2 ch none"), ("vmferry 2 ch zstd", "qemu 2 ch zstd"),
                         ("vmferry 2 ch auto", "qemu 2 ch zstd"), ("vmferry 2 ch lz4", "qemu 2 ch zstd")):
                print(f"- {ratio(rows, a, b)}")
        else:
            for a, b in (("vmferry 2 ch auto", "vmferry 2 ch none"),
                         ("vmferry 2 ch none", "vmferry 1 ch none"),
                         ("vmferry 4 ch none", "vmferry 1 ch none"),
                         ("qemu 2 ch none", "qemu 1 ch none"), ("qemu 4 ch none", "qemu 1 ch none"),
                         ("vmferry 2 ch none", "qemu 2 ch none")):
                print(f"- {ratio(rows, a, b)}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        sys.exit(f"bench_throughput: stopped ({e or 'Ctrl-C'}); every process it started was stopped")
