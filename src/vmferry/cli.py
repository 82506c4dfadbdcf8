"""`vmferry` command line: run, migrate, demo, report, analyze, describe, check-compat.

Each subcommand's work lives in its package; this module only parses arguments and turns any
VmferryError into a one-line message and a non-zero exit (never a traceback at a user).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from vmferry import __version__
from vmferry.errors import VmferryError

# subcommand -> "module:function"; the function takes the parsed argparse.Namespace and returns
# the process exit code. Imported lazily so `vmferry analyze` never needs KVM, numpy paths, etc.
HANDLERS = {
    "run": "vmferry.vmm:main",
    "migrate": "vmferry.drive:main_migrate",
    "demo": "vmferry.demo:main",
    "report": "vmferry.report:main",
    "analyze": "vmferry.stream.analyze:main",
    "describe": "vmferry.machine.machine_type:main_describe",
    "check-compat": "vmferry.vmstate.compat:main_check_compat",
}


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a VM")
    p.add_argument("-m", "--memory", default="128M", help="guest RAM size, e.g. 512M, 4G (default 128M)")
    p.add_argument("--smp", type=int, default=1, help="number of vCPUs")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--guest", help="a bundled guest image: heartbeat, dirty or disk")
    src.add_argument("--kernel", help="path of a multiboot v1 ELF image")
    p.add_argument("--append", default="", help="guest command line")
    p.add_argument("-M", "--machine", default=None, help="machine type (default: the newest)")
    p.add_argument("--accel", default="kvm", metavar="kvm[,dirty-ring-size=N]",
                   help="QEMU's -accel: kvm only; dirty-ring-size=N (a power of two, 1024 up to what KVM "
                        "offers) tracks dirty pages with KVM's per-vCPU dirty ring instead of slot "
                        "bitmaps, which dirty-limit and calc-dirty-rate's dirty-ring mode need")
    p.add_argument(
        "--serial", default="stdio", help="COM1 backend: stdio, file:PATH, unix:PATH, null (default stdio)"
    )
    p.add_argument(
        "--qmp", action="append", default=[], metavar="unix:PATH|tcp:HOST:PORT[,allow-remote=on]",
        help="QMP server (repeatable); unix sockets are owner-only, TCP is loopback-only unless "
             "allow-remote=on: QMP has no authentication",
    )
    p.add_argument(
        "--drive", action="append", default=[], metavar="file=PATH,format=raw,id=ID[,readonly=on]",
        help="a virtio-blk disk on a raw image file, or on an NBD export with file=nbd://HOST[:PORT]/EXPORT "
             "or file=nbd+unix:///EXPORT?socket=PATH (repeatable; docs/disks.md)",
    )
    p.add_argument("--incoming", metavar="URI|defer", help="wait for an incoming migration")
    p.add_argument(
        "--object", action="append", default=[], metavar="TYPE,id=ID[,PROP=VALUE...]",
        help="create an object as QMP object-add does (repeatable), e.g. "
             "tls-creds-x509,id=tls0,dir=/etc/pki/vmferry,endpoint=server or "
             "tls-creds-psk,id=tls0,dir=/etc/pki/vmferry,endpoint=client,username=qemu or "
             "authz-simple,id=auth0,identity=CN=src.example.com,,O=Example (',,' is a comma)",
    )
    p.add_argument("-S", "--paused", action="store_true", help="do not start the vCPUs until `cont`")
    p.add_argument("--metrics", metavar="tcp:HOST:PORT",
                   help="serve the VM's state and migration counters for Prometheus at http://HOST:PORT/metrics")


def _add_migrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="migrate a running VM through its QMP monitor")
    p.add_argument("--qmp", required=True, help="source QMP socket (unix:PATH or tcp:HOST:PORT)")
    p.add_argument("--dest-qmp", help="destination QMP socket, to report its side too")
    p.add_argument("uri", help="migration URI: tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD, fd:N")
    p.add_argument("--max-bandwidth", type=int, help="bytes per second")
    p.add_argument("--downtime-limit", type=int, help="milliseconds")
    p.add_argument("--forecast", action="store_true",
                   help="first measure the dirty rate (1 s) and print the forecast (x-migrate-forecast); "
                        "at the end, print it against what happened")
    p.add_argument("--forecast-bandwidth", type=int, metavar="BYTES_PER_S",
                   help="the bandwidth the forecast assumes (default: the last migration's measured "
                        "bandwidth, else --max-bandwidth)")
    p.add_argument("--trace", metavar="FILE",
                   help="write the source's JSON-lines trace to FILE (docs/trace.md), and with --dest-qmp "
                        "the destination's to FILE with .destination before its suffix")
    p.add_argument("--blk", action="store_true",
                   help="copy every writable drive in the stream (non-shared storage; QMP migrate blk)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="live-migrate a dirtying guest between two local processes")
    p.add_argument("-m", "--memory", default="1G")
    p.add_argument("--ws", type=int, default=256, help="working set of the dirty guest, MiB")
    p.add_argument("--rate", type=int, default=50, help="dirty rate, MiB/s")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds the guest runs before migrating")
    p.add_argument("--after", type=float, default=4.0, help="seconds to watch the destination afterwards")
    p.add_argument("--transport", choices=["tcp", "unix"], default="tcp")
    p.add_argument("--report", metavar="FILE.html",
                   help="where to write the report (default: report.html in a new temporary directory)")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="draw migration traces (docs/trace.md) into an HTML or PNG report")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace files (JSON lines); several overlay")
    p.add_argument("-o", "--output", required=True, help="report.html or report.png")


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="read and explain a migration stream (file or - for stdin)")
    p.add_argument("file", help="stream file, or - for standard input")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true", help="check every record; exit 1 at the first bad one")


def _add_describe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("describe", help="print the JSON description of a machine type's device state")
    p.add_argument("-M", "--machine", default=None, help="machine type (default: the newest)")


def _add_check_compat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-compat", help="list changes that would break migration between two descriptions"
    )
    p.add_argument("old", help="the source side: a description JSON file, or build:MACHINE for this "
                               "build's machine type MACHINE")
    p.add_argument("new", help="the destination side, as OLD")
    p.add_argument("--dynamic", action="store_true",
                   help="also run generated device states through both sides' code (vmstate/dynamic.py)")
    p.add_argument("--both-directions", action="store_true",
                   help="check NEW -> OLD (backward migration) as well as OLD -> NEW")
    p.add_argument("--examples", type=int, default=64, help="generated states per section (--dynamic)")
    p.add_argument("--seed", type=int, default=1, help="seed of the generated states (--dynamic)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmferry", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vmferry {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_migrate, _add_demo, _add_report, _add_analyze, _add_describe,
                _add_check_compat):
        add(sub)
    return parser


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    module, func = HANDLERS[command].split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _handler(args.command)(args)
    except VmferryError as e:
        print(f"vmferry {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
