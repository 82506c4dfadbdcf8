"""`vmferry demo`: live-migrate a running, memory-dirtying guest between two vmferry processes.

It starts a source VM running the `dirty` guest (which rewrites its working set at a steady
rate and checks its own memory), and a destination waiting on a loopback TCP port; migrates with
a live progress display; then reports the numbers and the proof: the host-side verifier over the
destination's RAM, and the guest's own `verify ok` lines printed after it moved. Both sides
trace the migration (docs/trace.md); the demo ends by drawing the traces into an HTML report
(`vmferry report`) and printing its path.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from vmferry.drive import report, watch
from vmferry.errors import VmferryError
from vmferry.monitor.client import QmpClient
from vmferry.report import write_report


class _VmProcess:
    """A `vmferry run` child with its QMP socket and console file in `workdir`."""

    def __init__(self, workdir: Path, name: str, args: list[str]) -> None:
        self.name = name
        self.console = workdir / f"{name}.console"
        qmp = workdir / f"{name}.qmp"
        self.log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmferry", "run", "--qmp", f"unix:{qmp}",
             "--serial", f"file:{self.console}", *args],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.qmp = QmpClient(f"unix:{qmp}", timeout_s=30)

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_for(self, pattern: str, timeout_s: float, after: int = 0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text()[after:])
            if m:
                return m.group(0)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise VmferryError(f"the {self.name} guest did not print /{pattern}/ within {timeout_s:.0f} s")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.execute("quit")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def main(args: argparse.Namespace) -> int:
    console = Console()
    append = f"ws={args.ws} rate={args.rate} verify=1"
    report_path = _report_path(args.report)
    with tempfile.TemporaryDirectory(prefix="vmferry-demo-") as tmp:
        work = Path(tmp)
        vms: list[_VmProcess] = []
        try:
            console.rule("[bold]vmferry demo: live migration of a dirtying guest")
            console.print(f"source: -m {args.memory} --guest dirty --append '{append}'")
            src = _VmProcess(work, "source", ["-m", args.memory, "--guest", "dirty", "--append", append])
            vms.append(src)
            incoming = "tcp:127.0.0.1:0" if args.transport == "tcp" else f"unix:{work}/migration.sock"
            dst = _VmProcess(work, "destination", ["-m", args.memory, "--incoming", incoming])
            vms.append(dst)
            uri = _listening_uri(dst.qmp, incoming)
            console.print(f"destination: waiting on {uri}")
            src.wait_for(r"dirty: filled", 120)
            src.wait_for(r"verify ok", 60)
            console.print(f"the guest filled {args.ws} MiB and vouched for it; it now rewrites "
                          f"{args.rate} MiB/s. Running {args.warmup:.0f} s before migrating...")
            time.sleep(args.warmup)
            events_on = [{"capability": "events", "state": True}]
            src.qmp.execute("migrate-set-capabilities", capabilities=events_on)
            # Uncapped, as the benchmark compares; QEMU's default cap is 128 MiB/s.
            src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 0})
            traces = [report_path.with_name("source.jsonl"), report_path.with_name("destination.jsonl")]
            src.qmp.execute("migrate-set-parameters", **{"x-trace-file": str(traces[0])})
            dst.qmp.execute("migrate-set-parameters", **{"x-trace-file": str(traces[1])})
            mark = len(dst.text())
            src.qmp.execute("migrate", uri=uri)
            outcome = watch(src.qmp, dst.qmp, console)
            report(outcome, console)
            if outcome.source.get("status") != "completed":
                console.print(f"[red]migration {outcome.source.get('status')}; the source keeps running")
                return 1
            console.print(f"source is now [bold]{src.qmp.execute('query-status')['status']}[/], "
                          f"destination [bold]{dst.qmp.execute('query-status')['status']}[/]")
            line = dst.wait_for(r"verify (ok|FAIL)[^\n]*", 30, after=mark)
            console.print(f"destination guest, after the move: [bold]{line}[/]")
            time.sleep(args.after)
            verdict = dst.qmp.execute("x-verify-dirty-guest")
            color = "green" if verdict["ok"] else "red"
            console.print(f"host-side verifier on the destination's RAM: [bold {color}]{verdict['reason']}")
            stalls = [int(x) for x in re.findall(r"stall=(\d+) us", dst.text()[mark:])]
            if stalls:
                console.print(f"downtime as the guest saw it: [bold]{max(stalls) / 1000:.1f} ms[/] "
                              "(its longest stall, by its own TSC, in the seconds after the move)")
            console.print("destination console (last lines):")
            console.print("\n".join(dst.text()[mark:].strip().splitlines()[-4:]), markup=False)
            _wait_closed(traces)
            write_report(traces, report_path)
            console.print(f"report (plots of both sides' traces): [bold]{report_path}[/]")
            print(report_path)
            ok = verdict["ok"] and "FAIL" not in dst.text()
            return 0 if ok else 1
        finally:
            for vm in vms:
                vm.stop()


def _wait_closed(traces: list[Path], timeout_s: float = 10) -> None:
    """Each side writes its trace's `end` line just after its status turns final; a trace still
    without it after timeout_s is drawn as it is (the report marks it unfinished)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(p.exists() and '"event": "end"' in p.read_text(errors="replace") for p in traces):
            return
        time.sleep(0.05)


def _report_path(requested: str | None) -> Path:
    """Where the report goes: as asked, or report.html in a new directory that outlives the demo;
    the traces go beside it."""
    if requested:
        path = Path(requested).resolve()
        if not path.parent.is_dir():
            raise VmferryError(f"--report {requested}: no such directory {path.parent}")
        return path
    return Path(tempfile.mkdtemp(prefix="vmferry-demo-report-")) / "report.html"


def _listening_uri(qmp: QmpClient, requested: str, timeout_s: float = 30) -> str:
    """Where the destination listens (its port when it asked for port 0). Its monitor answers
    before the incoming migration is set up, so ask until query-migrate shows the address."""
    deadline = time.monotonic() + timeout_s
    while True:
        for addr in qmp.execute("query-migrate").get("socket-address", []):
            if addr.get("type") == "inet":
                return f"tcp:{addr['host']}:{addr['port']}"
            if addr.get("type") == "unix":
                return f"unix:{addr['path']}"
        if time.monotonic() > deadline:
            if requested.endswith(":0"):
                raise VmferryError(f"the destination did not say where it listens within {timeout_s:.0f} s")
            return requested
        time.sleep(0.05)
