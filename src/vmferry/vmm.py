"""`vmferry run`: one VM process — a Machine, its QMP monitors, and its migrations.

`Vmm` owns the Machine, the `VmControl` (what QMP commands do) and the QMP servers. The main
thread only waits: for the guest to finish, for `quit`, or for Ctrl-C / SIGTERM. Everything else
runs on threads of its own (vCPUs, the monitor, the migration), so none waits on another.

`--incoming URI` builds the Machine without loading the guest (RAM must arrive untouched: pages
the source never populated are not sent) and listens at once; `--incoming defer` waits for QMP
`migrate-incoming`. The guest starts once the stream is complete and verified, unless -S.

Exit status of `vmferry run`: the value the guest wrote to the debug-exit port (0xF4), 0 after a
clean shutdown or `quit`, 1 when the guest crashed (triple fault, KVM internal error — the
message names which) or an incoming migration failed with no monitor to ask, 130 on Ctrl-C.
Under QEMU the same guest's debug-exit value v gives the process status (v << 1) | 1; vmferry
returns v itself.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from vmferry.block.backend import BlockBackend
from vmferry.block.opener import open_drive
from vmferry.block.options import DriveSpec, parse_drives
from vmferry.control import VmControl
from vmferry.errors import GuestError, VmferryError
from vmferry.machine.machine import ExitStatus, Machine
from vmferry.machine.machine_type import parse_size
from vmferry.migration.state import MigrationStatus
from vmferry.monitor.commands import CommandDispatcher
from vmferry.monitor.metrics import MetricsServer
from vmferry.monitor.metrics import render as render_metrics
from vmferry.monitor.objects import create_object, parse_object_option
from vmferry.monitor.server import QmpServer
from vmferry.options import parse_accel

log = logging.getLogger("vmferry.vmm")
# How often the main thread wakes while waiting, so Ctrl-C is seen promptly.
_WAIT_SLICE_S = 0.2


def guest_image(name: str) -> Path:
    """A bundled guest (`--guest NAME`): vmferry/guests/images/NAME.elf (package data)."""
    images = resources.files("vmferry.guests") / "images"
    path = Path(str(images / f"{name}.elf"))
    if not path.is_file():
        available = sorted(p.name.removesuffix(".elf") for p in images.iterdir() if p.name.endswith(".elf"))
        raise GuestError(f"no bundled guest {name!r} (available: {', '.join(available) or 'none'})")
    return path


def _device_state(machine: Machine):  # noqa: ANN202 - MachineDeviceState, imported lazily
    from vmferry.devices.state import MachineDeviceState

    return MachineDeviceState(machine)


def open_drives(specs: Sequence[DriveSpec], *, lock: bool = True) -> list[tuple[str, BlockBackend]]:
    """Open (and lock) every drive's image, or none: on an error the ones opened are closed.
    `lock=False` for an incoming migration: the images are locked when the migration owns them
    (migration/block.py), since a shared image is still the source's until switchover."""
    opened: list[tuple[str, BlockBackend]] = []
    try:
        for spec in specs:
            opened.append((spec.id, open_drive(spec, lock=lock)))
    except BaseException:
        for _, backend in opened:
            backend.close()
        raise
    return opened


class Vmm:
    """One VM and everything that serves it."""

    def __init__(
        self,
        *,
        memory: int,
        smp: int = 1,
        kernel: Path | None = None,
        cmdline: str = "",
        machine_type: str | None = None,
        serial: str = "stdio",
        qmp: list[str] | None = None,
        incoming: str | None = None,
        paused: bool = False,
        objects: list[tuple[str, object]] | None = None,
        drives: Sequence[DriveSpec] = (),
        metrics: str | None = None,
        dirty_ring_size: int = 0,
    ) -> None:
        self.servers: list[QmpServer] = []
        self.metrics: MetricsServer | None = None
        self.machine = Machine(machine_type, memory=memory, smp=smp, serial=serial, on_event=self._on_event,
                               drives=open_drives(drives, lock=incoming is None),
                               dirty_ring_size=dirty_ring_size)
        self.control = VmControl(self.machine, _device_state, _device_state,
                                 incoming=incoming is not None, autostart=not paused)
        self.control.emit = self._emit
        # Device-state codecs are built once per process (30-40 ms here): now, on a thread, so
        # that neither a migration's setup nor its downtime pays for them.
        threading.Thread(target=_device_state(self.machine).warm, name="warm-codecs", daemon=True).start()
        for obj_id, obj in objects or ():
            self.control.objects.add(obj_id, obj)
        self.incoming = incoming
        self.paused = paused
        try:
            if kernel is not None and incoming is None:
                self.machine.load_kernel(kernel, cmdline)
            if qmp:
                self.servers.append(QmpServer(CommandDispatcher(self.control), qmp))
            if metrics:
                self.metrics = MetricsServer(metrics, self._metrics_text)
                print(f"vmferry: metrics on {self.metrics.address}", file=sys.stderr, flush=True)
            if incoming is not None and incoming != "defer":
                self.control.migrate_incoming(incoming)
                print(f"vmferry: waiting for an incoming migration on {self.control.listen_address}",
                      file=sys.stderr, flush=True)
        except BaseException:
            self.close()
            raise

    def _on_event(self, name: str, data: dict) -> None:
        self.control.on_machine_event(name, data)

    def _metrics_text(self) -> str:
        ram_bytes = sum(b.nbytes for b in self.machine.ram_blocks)
        return render_metrics(self.control.query_status(), self.control.query_migrate(),
                              ram_bytes=ram_bytes, vcpus=self.machine.smp)

    def _emit(self, name: str, data: dict | None = None) -> None:
        for server in self.servers:
            server.emit_event(name, data)

    def run(self) -> ExitStatus:
        """Start the vCPUs (unless paused or incoming) and block until the machine finishes or
        the monitor says quit."""
        if not self.paused and self.incoming is None:
            self.machine.start()
        while True:
            status = self.machine.wait(_WAIT_SLICE_S)
            if status is not None:
                return status
            if self.control.quit_requested.is_set():
                return ExitStatus("shutdown", 0, "quit requested over QMP")
            if not self.servers and self._incoming_failed():
                reason = self.control.query_migrate().get("error-desc", "incoming migration failed")
                return ExitStatus("error", 1, f"incoming migration failed: {reason}")

    def _incoming_failed(self) -> bool:
        inc = self.control.incoming
        return inc is not None and inc.state.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED)

    def close(self) -> None:
        self.control.close()
        for server in self.servers:
            server.close()
        if self.metrics is not None:
            self.metrics.close()
        self.machine.close()


def exit_code(status: ExitStatus) -> int:
    if status.kind == "poweroff":
        return status.code
    return 1 if status.is_error else 0


def main(args: argparse.Namespace) -> int:
    if args.paused and not args.qmp:
        raise VmferryError("-S/--paused needs --qmp: without a monitor nothing could ever send 'cont'")
    if args.incoming == "defer" and not args.qmp:
        raise VmferryError("--incoming defer needs --qmp to receive 'migrate-incoming'")
    drives = parse_drives(args.drive)
    dirty_ring_size = parse_accel(args.accel)
    if args.guest:
        kernel: Path | None = guest_image(args.guest)
    elif args.kernel:
        kernel = Path(args.kernel)
    elif args.incoming:
        kernel = None
    else:
        raise VmferryError("nothing to run: give --guest NAME, --kernel PATH or --incoming URI")
    # --object: built (files read, certificates checked) before anything else starts.
    objects = []
    for text in args.object:
        qom_type, obj_id, props = parse_object_option(text)
        objects.append((obj_id, create_object(qom_type, obj_id, props)))
    logging.basicConfig(level=logging.WARNING, format="vmferry: %(name)s: %(message)s")
    # SIGTERM stops the VM the way Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    vmm = None
    try:
        vmm = Vmm(
            memory=parse_size(args.memory),
            smp=args.smp,
            kernel=kernel,
            cmdline=args.append,
            machine_type=args.machine,
            serial=args.serial,
            qmp=args.qmp,
            incoming=args.incoming,
            paused=args.paused,
            objects=objects,
            drives=drives,
            metrics=args.metrics,
            dirty_ring_size=dirty_ring_size,
        )
        status = vmm.run()
    except KeyboardInterrupt:
        return 130
    finally:
        if vmm is not None:
            with contextlib.suppress(KeyboardInterrupt):
                vmm.close()
    if status.is_error:
        print(f"vmferry run: {status.reason}", file=sys.stderr)
    return exit_code(status)
