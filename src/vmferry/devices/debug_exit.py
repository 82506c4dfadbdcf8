"""isa-debug-exit: QEMU's "power off with this status" port, so the same guest image ends the
same way under vmferry and under QEMU.

A guest write of value v to port 0xF4 (iosize 4) powers the machine off with exit status v.
Under QEMU (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`) the *process* exit code is
(v << 1) | 1; vmferry's `run` exits with v itself (truncated to 8 bits by the OS).
"""

from __future__ import annotations

from collections.abc import Callable

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_IOSIZE = 4


class DebugExit:
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
