"""S5 over a real 1 Gbit/s link: precopy never converges, postcopy completes; vmferry and QEMU.

    python bench/bench_postcopy_link.py [--runs 3] [--sides vmferry,qemu-kvm] [--rate 1gbit]
                                        [--precopy-s 10] [--json out.json]

Root needed. The link: a veth pair into a network namespace of its own, shaped by `tc tbf` to
--rate both ways (/work/shared/BENCHMARKS.md, "A 1 Gbit/s link on one machine"); the destination
runs in the namespace, the source outside, so every byte of the migration and of the return path
crosses the shaped link. The link is vmferry.testing.netns's `veth_link`, as the tests' links;
the namespace and its veth pair are deleted on every way out.

Per run and side (sides interleaved; QEMU 7.2 with `-accel kvm`, the same `dirty` image and
arguments: 4 GiB, ws=1024 rate=200, i.e. S5): start the source, wait for the fill and a
`verify ok`; start the destination with `--incoming defer` / `-incoming defer` in the namespace;
QEMU's sequence on both: `migrate-set-capabilities postcopy-ram` on both sides
(`postcopy-blocktime` on the destination), `migrate-incoming`, `max-bandwidth` raised to
100 GiB/s on the source (the link is the limit), `migrate`; precopy runs --precopy-s seconds
(10: into its second pass, the first takes ~9 s for the 1 GiB working set) and what it had left,
its expected downtime, vmferry's convergence verdict and the guest's real write rate meanwhile
are recorded (the guest writes slower while it is migrated than its rate=200: the vCPU shares 2
cores with the migration; a precopy that completes on its own before the switch is recorded as
such, and the run then exercised no postcopy); then `migrate-start-postcopy`, and both sides
are polled to `completed`. The destination's guest must then print `verify ok` (its
own check of every page; vmferry's host verifier `x-verify-dirty-guest` too).

Reported from the source's final query-migrate: total-time, downtime (the pause at the switch:
vmferry's from the vCPUs stopping to the destination's word that its guest runs, QEMU's from its
vCPUs stopping to its device state and RUN sent), ram.transferred (bytes sent); the guest's own
`stall=` in the destination's first progress line after the switch (the pause as the guest saw it, plus any
fault in that second) and the worst one after the switch; postcopy-blocktime and requests from
the destination. The target: total-time <= 1.2 x (bytes sent / link rate), with the link rate
both nominal (--rate) and measured in the same run (one Python TCP stream through the link,
--probe-mib MiB, before each run). Medians over --runs, load average at start and end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_procs import install_signal_handlers, stop_all
from migration_vm import PROGRESS_RX, BenchError, Vm, vms

from vmferry.testing.netns import Shaping, VethLink, veth_link

LINK: VethLink | None = None  # the shaped link, while main() holds it up
UNCAPPED = 100 << 30
MEMORY = "4G"
APPEND = "ws=1024 rate=200 verify={verify}"
POLL_S = 0.05
RATE_UNITS = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}


def parse_rate(rate: str) -> float:
    """tc's rate ("1gbit", "500mbit") in bytes per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", rate)
    if not m:
        raise SystemExit(f"--rate {rate!r}: expected a number with kbit, mbit or gbit")
    return float(m.group(1)) * RATE_UNITS[m.group(2)]


def _link() -> VethLink:
    assert LINK is not None, "the link is up only inside main()"
    return LINK


RECEIVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20); n = 0
while (k := c.recv_into(buf)):
    n += k
c.sendall(str(n).encode()); c.close()
"""


def probe_link(mib: int, port: int) -> float:
    """Bytes/s of one Python TCP stream from outside into the namespace (the source's direction)."""
    rx = subprocess.Popen([*_link().exec_prefix, sys.executable, "-c", RECEIVER, _link().address, str(port)],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout is not None
        if rx.stdout.readline().strip() != "ready":
            raise BenchError("link probe: the receiver did not start")
        chunk = b"\x5a" * (1 << 20)
        with socket.create_connection((_link().address, port), timeout=60) as s:
            t0 = time.monotonic()
            for _ in range(mib):
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
            got = int(s.recv(64) or b"0")
            dt = time.monotonic() - t0
        if got != mib << 20:
            raise BenchError(f"link probe: {got} bytes arrived of {mib << 20}")
        return got / dt
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            rx.wait(5)
        if rx.poll() is None:
            rx.kill()
            rx.wait()


def stalls_after(vm: Vm, offset: int) -> list[int]:
    """The guest's stall= (us) of every whole progress line from serial offset `offset` on."""
    text = vm.serial()
    return [int(m.group(3)) for m in PROGRESS_RX.finditer(text, offset)
            if m.group(3) is not None and text.startswith("\n", m.end())]


def poll_until(vm: Vm, done: tuple[str, ...], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = vm.cmd("query-migrate")
        if info.get("status") in done:
            return info
        if time.monotonic() > deadline:
            raise BenchError(f"{vm.name}: still {info.get('status')} after {timeout} s: {info}")
        vm.serial()
        time.sleep(POLL_S)


def switch_seen(src: Vm, dst: Vm, t_switch: float, timeout: float = 60) -> dict[str, Any]:
    """When each side first reported postcopy-active after migrate-start-postcopy, polling both
    every few ms (the destination's is when it runs the guest: vmferry's `downtime` ends when
    the source hears of it; QEMU's ends at RUN written into its socket)."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < 2 and time.monotonic() < deadline:
        for name, vm in (("src", src), ("dst", dst)):
            if name not in seen and vm.cmd("query-migrate").get("status") in ("postcopy-active", "completed"):
                seen[name] = time.monotonic()
        time.sleep(0.005)
    return {f"{name}_postcopy_active_after_ms": round((t - t_switch) * 1000) for name, t in seen.items()}


def run_once(side: str, tmp: Path, port: int, args: argparse.Namespace) -> dict[str, Any]:
    append = APPEND.format(verify=args.verify)
    res: dict[str, Any] = {"side": side, "append": append, "load_start": os.getloadavg()[0]}
    with vms() as started:
        src = Vm(side, tmp, "src", MEMORY, append)
        started.append(src)
        src.connect()
        filled = src.wait_serial(r"dirty: filled \d+ pages", timeout=300)
        src.wait_serial(r"verify ok gen=\d+", timeout=args.verify + 120, after=filled.end())
        dst = Vm(side, tmp, "dst", MEMORY, append, incoming="defer", netns=_link().namespace)
        started.append(dst)
        dst.connect()
        postcopy = [{"capability": "postcopy-ram", "state": True}]
        src.cmd("migrate-set-capabilities", capabilities=postcopy)
        dst.cmd("migrate-set-capabilities",
                capabilities=[*postcopy, {"capability": "postcopy-blocktime", "state": True}])
        uri = f"tcp:{_link().address}:{port}"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": UNCAPPED})
        # Right after a verify pass: the guest writes for the whole precopy window (a verify pass
        # is a quiet window in which precopy could converge; --verify is longer than the window).
        src.wait_serial(r"verify ok gen=\d+", timeout=args.verify + 60, after=len(src.serial()))
        time.sleep(0.5)  # let the listener come up (QEMU's migrate-incoming returns before it listens)
        t0 = time.monotonic()
        src.cmd("migrate", uri=uri)
        while time.monotonic() - t0 < args.precopy_s:
            pre = src.cmd("query-migrate")
            if pre.get("status") not in ("setup", "active"):
                break
            src.serial()
            time.sleep(0.2)
        else:
            pre = src.cmd("query-migrate")
        if pre.get("status") != "active":
            # Precopy ended on its own: a result (the guest wrote slower than the link while
            # migrating), recorded and checked, but postcopy was not exercised.
            res["precopy_ended"] = {"status": pre.get("status"), "total_ms": pre.get("total-time"),
                                    "downtime_ms": pre.get("downtime"),
                                    "passes": pre.get("ram", {}).get("dirty-sync-count"),
                                    "convergence": pre.get("convergence")}
            if pre.get("status") == "completed":
                dst.wait_serial(r"verify ok gen=\d+", timeout=args.verify + 120)
            raise BenchError(f"{side}: precopy ended on its own ({pre.get('status')}) after "
                             f"{pre.get('total-time')} ms, before the switch: {res['precopy_ended']}")
        ram = pre.get("ram", {})
        res["precopy"] = {
            "seconds": round(time.monotonic() - t0, 1), "status": pre["status"],
            "passes": ram.get("dirty-sync-count"), "remaining_mib": round(ram.get("remaining", 0) / 2**20),
            "transferred_mib": round(ram.get("transferred", 0) / 2**20),
            "dirty_rate_mibs": round(ram.get("dirty-pages-rate", 0) * 4096 / 2**20),
            "expected_downtime_ms": pre.get("expected-downtime"),
            "mbps": ram.get("mbps"), "convergence": (pre.get("convergence") or {}).get("verdict")}
        rate = src.write_rate(t0)
        res["precopy"]["guest_rate_mibs"] = round(rate, 1) if rate is not None else None
        serial_at = len(dst.serial())
        t_switch = time.monotonic()
        src.cmd("migrate-start-postcopy")
        res.update(switch_seen(src, dst, t_switch))
        s = poll_until(src, ("completed", "failed", "cancelled", "postcopy-paused"), args.timeout)
        res["wall_s"] = round(time.monotonic() - t0, 2)
        res["postcopy_wall_s"] = round(time.monotonic() - t_switch, 2)
        d = poll_until(dst, ("completed", "failed", "postcopy-paused"), 120)
        res["src_status"], res["dst_status"] = s["status"], d["status"]
        if s["status"] != "completed" or d["status"] != "completed":
            res["src_info"], res["dst_info"] = s, d
            raise BenchError(f"{side}: source {s['status']}, destination {d['status']}: "
                             f"{json.dumps(s)[:1500]} / {json.dumps(d)[:1500]}")
        ram = s.get("ram", {})
        res.update({
            "total_ms": s.get("total-time"), "downtime_ms": s.get("downtime"),
            "setup_ms": s.get("setup-time"), "transferred": ram.get("transferred"),
            "postcopy_requests_src": ram.get("postcopy-requests"),
            "postcopy_bytes_src": ram.get("postcopy-bytes"),
            # The wire rate after the switch: what precopy had not sent, over the postcopy's time.
            "postcopy_phase_mbs": round((ram.get("transferred", 0) - pre["ram"]["transferred"]) / 1e6
                                        / res["postcopy_wall_s"], 1),
            "blocktime_ms": d.get("postcopy-blocktime"),
            "vcpu_blocktime_ms": d.get("postcopy-vcpu-blocktime"),
            "downtime_phases": s.get("downtime-phases"), "x_postcopy": d.get("x-postcopy"),
            "early_discard": s.get("x-postcopy-early-discard")})
        ok = dst.wait_serial(r"verify ok gen=\d+", timeout=args.verify + 120, after=serial_at)
        if "FAIL" in dst.serial()[serial_at:]:
            raise BenchError(f"{side}: the destination's guest found bad pages: {dst.serial()[-1500:]}")
        res["verify_ok"] = ok.group(0)
        dst.wait_serial(r"dirty: t=\d+ .*stall=\d+ us\n", timeout=60, after=ok.end())
        stalls = stalls_after(dst, serial_at)
        res["stall_first_ms"] = stalls[0] / 1000 if stalls else None
        res["stall_max_ms"] = max(stalls) / 1000 if stalls else None
        if side == "vmferry":
            verdict = dst.cmd("x-verify-dirty-guest")
            res["host_verify"] = verdict.get("ok")
            if not verdict.get("ok"):
                raise BenchError(f"vmferry: the host verifier disagrees: {verdict}")
    res["load_end"] = os.getloadavg()[0]
    return res


def judge(r: dict[str, Any], nominal: float, measured: float) -> None:
    """Total time against 1.2 x (bytes sent / link rate), nominal and measured rate."""
    for name, rate in (("nominal", nominal), ("measured", measured)):
        ideal_ms = r["transferred"] / rate * 1000
        r[f"ideal_ms_{name}"] = round(ideal_ms)
        r[f"ratio_{name}"] = round(r["total_ms"] / ideal_ms, 3)


def fmt(values: list[float | None], unit: str = "", nd: int = 0) -> str:
    vs = [v for v in values if v is not None]
    if not vs:
        return "-"
    f = f"{{:,.{nd}f}}"
    med = f.format(statistics.median(vs))
    return med + unit if len(vs) == 1 else f"{med}{unit} [{f.format(min(vs))}-{f.format(max(vs))}]"


def table(results: list[dict[str, Any]], sides: list[str]) -> str:
    head = ["side", "runs ok", "precopy after N s: passes, left MiB, expected downtime ms",
            "guest's write rate in precopy MiB/s", "total ms",
            "bytes sent MiB", "total / (bytes / 1 Gbit/s)", "total / (bytes / measured link)",
            "switch pause (downtime) ms", "destination postcopy-active after ms", "guest stall at switch ms",
            "worst stall after ms", "blocktime ms", "requests", "wire after the switch MB/s", "verify"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for side in sides:
        ok = [r for r in results if r["side"] == side and "error" not in r]
        n = sum(1 for r in results if r["side"] == side)
        if not ok:
            rows.append(f"| {side} | 0 / {n} |" + " |" * (len(head) - 2))
            continue
        pre = [r["precopy"] for r in ok]
        pre_cell = (f"{pre[0]['seconds']:.0f} s: {fmt([p['passes'] for p in pre])}, "
                    f"{fmt([p['remaining_mib'] for p in pre])}, "
                    f"{fmt([p['expected_downtime_ms'] for p in pre])}")
        def col(key: str, nd: int = 0, ok: list[dict[str, Any]] = ok) -> str:
            return fmt([r.get(key) for r in ok], nd=nd)

        cells = [fmt([p.get("guest_rate_mibs") for p in pre]), col("total_ms"),
                 fmt([r["transferred"] / 2**20 for r in ok]), col("ratio_nominal", 2),
                 col("ratio_measured", 2), col("downtime_ms"), col("dst_postcopy_active_after_ms"),
                 col("stall_first_ms", 1), col("stall_max_ms", 1), col("blocktime_ms"),
                 col("postcopy_requests_src"), col("postcopy_phase_mbs", 1),
                 "ok" if all(r.get("verify_ok") for r in ok) else "FAIL"]
        rows.append(f"| {side} | {len(ok)} / {n} | {pre_cell} | {' | '.join(cells)} |")
    return "\n".join(rows)


def main() -> None:
    global LINK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sides", default="vmferry,qemu-kvm")
    ap.add_argument("--rate", default="1gbit", help="tc tbf rate of the link (both ways)")
    ap.add_argument("--precopy-s", type=float, default=10, help="seconds of precopy before the switch")
    ap.add_argument("--verify", type=int, default=30, help="the guest's verify interval, s (longer than "
                    "the precopy window: a verify pass is a quiet window)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed after the switch")
    ap.add_argument("--probe-mib", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for s in sides:
        if s not in ("vmferry", "qemu-kvm"):
            ap.error(f"unknown side {s}; known: vmferry, qemu-kvm")
    if os.geteuid() != 0:
        ap.error("root needed (network namespaces, tc)")
    nominal = parse_rate(args.rate)
    install_signal_handlers()
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    print(f"# {os.cpu_count()} CPUs, kernel {platform.release()}, {qemu.splitlines()[0] if qemu else '-'}, "
          f"link tbf {args.rate}, load {os.getloadavg()}", flush=True)
    results: list[dict[str, Any]] = []
    port = 4700
    try:
        with veth_link(Shaping(args.rate), both_ways=True) as link:
            LINK = link
            for i in range(args.runs):
                port += 1
                measured = probe_link(args.probe_mib, port)
                print(f"run {i + 1}: link measured {measured / 1e6:.1f} MB/s", flush=True)
                for side in sides:
                    port += 1
                    with tempfile.TemporaryDirectory(prefix=f"bench-pclink-{side}-") as tmp:
                        try:
                            r = run_once(side, Path(tmp), port, args)
                            judge(r, nominal, measured)
                        except BenchError as e:
                            r = {"side": side, "error": str(e)[:3000]}
                    r["run"], r["link_measured_bps"] = i + 1, measured
                    results.append(r)
                    print(json.dumps(r), flush=True)
    finally:
        stop_all()
    print(f"\nload at end {os.getloadavg()}\n")
    print(table(results, sides))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
