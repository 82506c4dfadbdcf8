"""isa-debug-exit: QEMU's "power off with this status" port, so the same guest image ends the
same way under vmferry and under QEMU.

A guest write of value v to port 0xF4 (iosize 4) powers the machine off with exit status v.
Under QEMU (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`) the *process* exit code is
(v << 1) | 1; vmferry's `run` exits with v itself (truncated to 8 bits by the OS).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from vmferry.errors import StateLoadError
from vmferry.vmstate import U16, VMState

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_IOSIZE = 4


class DebugExitState(VMState):
    """The port has no state; the section says it exists and where, so a destination wired
    differently (another iobase, or no such device: an unknown section) refuses the stream
    instead of letting the guest's power-off write land nowhere."""

    name = "debug-exit"
    version = 1
    iobase: U16
    iosize: U16

    @classmethod
    def validate(cls, values: dict[str, Any], version: int) -> None:
        for name, ours in (("iobase", DEBUG_EXIT_PORT), ("iosize", DEBUG_EXIT_IOSIZE)):
            if values[name] != ours:
                raise StateLoadError(
                    f"the source's device has {name} {values[name]:#x}, this machine's {ours:#x}",
                    section=cls.name, field=name,
                )

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        pass  # nothing to write: validate() checked the wiring is the same


class DebugExit:
    vmstate = DebugExitState
    iobase = DEBUG_EXIT_PORT
    iosize = DEBUG_EXIT_IOSIZE

    @classmethod
    def create(cls, machine: Any, properties: Mapping[str, Any]) -> DebugExit:
        dev = cls(machine.power_off)
        machine.pio_bus.register(cls.iobase, cls.iosize, dev)
        return dev

    def __init__(self, power_off: Callable[[int], None]) -> None:
        # power_off(status) is the machine's: it stops every vCPU and records the status.
        self._power_off = power_off

    def read(self, offset: int, size: int) -> int:
        return 0xFFFFFFFF

    def write(self, offset: int, size: int, value: int) -> None:
        self._power_off(value)

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass
