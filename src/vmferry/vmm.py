"""`vmferry run`: build a Machine from the command line and run it until the guest stops.

`Vmm` owns the Machine and is where the QMP servers and incoming migration will attach later
(they are wired in by their own packages; until then --qmp and --incoming are refused clearly).

Exit status of `vmferry run`: the value the guest wrote to the debug-exit port (0xF4), 0 after a
clean shutdown or a guest halt, 1 when the guest crashed (triple fault, KVM internal error — the
message names which), 130 on Ctrl-C. Under QEMU the same guest's debug-exit value v gives the
process status (v << 1) | 1; vmferry returns v itself.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from importlib import resources
from pathlib import Path

from vmferry.errors import GuestError, VmferryError
from vmferry.machine.machine import ExitStatus, Machine
from vmferry.machine.machine_type import parse_size

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


class Vmm:
    """One VM and everything that serves it (today: the Machine; later: QMP servers, migration)."""

    def __init__(
        self,
        *,
        memory: int,
        smp: int = 1,
        kernel: Path | None = None,
        cmdline: str = "",
        machine_type: str | None = None,
        serial: str = "stdio",
    ) -> None:
        self.machine = Machine(machine_type, memory=memory, smp=smp, serial=serial, on_event=self._on_event)
        try:
            if kernel is not None:
                self.machine.load_kernel(kernel, cmdline)
        except BaseException:
            self.machine.close()
            raise

    def _on_event(self, name: str, data: dict) -> None:
        # The monitor will forward these as QMP events; for now they are only logged.
        log.debug("event %s %s", name, data)

    def run(self, start_paused: bool = False) -> ExitStatus:
        """Start the vCPUs (unless paused) and block until the machine finishes."""
        if not start_paused:
            self.machine.start()
        while True:
            status = self.machine.wait(_WAIT_SLICE_S)
            if status is not None:
                return status

    def close(self) -> None:
        self.machine.close()


def exit_code(status: ExitStatus) -> int:
    if status.kind == "poweroff":
        return status.code
    return 1 if status.is_error else 0


def main(args: argparse.Namespace) -> int:
    if args.qmp:
        raise VmferryError("--qmp is not implemented yet")
    if args.incoming:
        raise VmferryError("--incoming is not implemented yet")
    if args.paused:
        # Without a monitor nothing could ever send `cont`.
        raise VmferryError("-S/--paused needs --qmp, which is not implemented yet")
    if args.guest:
        kernel: Path | None = guest_image(args.guest)
    elif args.kernel:
        kernel = Path(args.kernel)
    else:
        raise VmferryError("nothing to run: give --guest NAME or --kernel PATH")
    # SIGTERM stops the guest the way Ctrl-C does.
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
        )
        status = vmm.run()
    except KeyboardInterrupt:
        return 130
    finally:
        if vmm is not None:
            vmm.close()
    if status.is_error:
        print(f"vmferry run: guest stopped: {status.reason}", file=sys.stderr)
    return exit_code(status)
