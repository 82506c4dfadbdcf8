"""The exit dispatch: a port-I/O bus and an MMIO bus that devices register address ranges on.

A vCPU thread that gets KVM_EXIT_IO or KVM_EXIT_MMIO looks the address up here and calls the
device. Handlers run on the vCPU thread; a device shared by several vCPUs guards its own state.
Unclaimed reads return all-ones (an ISA bus with nothing on it floats high); unclaimed writes are
dropped, both logged once per address at debug level.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger("vmferry.machine")


class BusDevice(Protocol):
    """What a bus calls. `offset` is relative to the registered base; `size` is 1, 2, 4 or 8."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class Bus:
    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[tuple[int, int, BusDevice]] = []  # (base, length, device)
        self._lock = threading.Lock()
        self._warned: set[int] = set()

    def register(self, base: int, length: int, device: BusDevice) -> None:
        with self._lock:
            for b, n, _ in self._ranges:
                if base < b + n and b < base + length:
                    raise ValueError(f"{self.name} bus: [{base:#x}, +{length:#x}) overlaps [{b:#x}, +{n:#x})")
            self._ranges.append((base, length, device))

    def find(self, addr: int) -> tuple[int, BusDevice] | None:
        for base, length, dev in self._ranges:
            if base <= addr < base + length:
                return base, dev
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr)
        if hit is None:
            self._unclaimed("read", addr)
            return (1 << (8 * size)) - 1
        base, dev = hit
        return dev.read(addr - base, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr)
        if hit is None:
            self._unclaimed("write", addr)
            return
        base, dev = hit
        dev.write(addr - base, size, value)

    def _unclaimed(self, what: str, addr: int) -> None:
        if addr not in self._warned:
            self._warned.add(addr)
            log.debug("%s bus: unclaimed %s at %#x", self.name, what, addr)
