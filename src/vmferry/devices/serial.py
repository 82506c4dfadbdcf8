"""A 16550A UART on COM1 (ports 0x3F8-0x3FF, IRQ 4), enough for a guest that polls LSR or takes
interrupts.

Transmission is instantaneous: THR is always empty (LSR.THRE|TEMT set), so a guest polling
"THR empty" never waits. Received bytes wait in `rx_fifo` until the guest reads RBR. The IRQ line
follows IIR: raised while an enabled interrupt is pending, lowered otherwise, through KVM_IRQ_LINE
(only on level changes). Handlers run on vCPU threads, input arrives on a backend thread: one lock.

The backend thread is the device's own: `quiesce()` (the machine calls it when it pauses) makes
`receive()` wait until `unquiesce()`, so a paused machine's UART does not change — input stays
in the backend (a socket's buffer) meanwhile. `state_lock()` is held by the vmstate layer across
a whole capture (registers, `needed()`, the FIFO), so section and subsection agree.

Input beyond RX_PENDING_MAX is dropped and counted in `rx_dropped`. With the compat property
"lsr-overrun" on, a drop also latches the overrun error, LSR bit 1 (OE), until the guest reads
LSR — as a real 16550 reports a character lost to a full FIFO; off (machine type vmferry-0.1),
LSR never shows OE, as that release's UART did not.

Registers and the FIFO are plain attributes; `get_state()/set_state()` expose all of them, and
the section "serial" (`SerialState`) describes them for migration: version 1 (vmferry-0.1) the
registers, with the pending input in the subsection "serial/fifo"; version 2 (vmferry-0.2) adds
the `rx_dropped` counter and the subsection "serial/overrun" (a latched OE, sent only while one
is pending).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from vmferry.devices.chardev import Chardev
from vmferry.vmstate import U8, U32, VarBytes, VMState, field

COM1_PORT = 0x3F8
COM1_IRQ = 4
RX_PENDING_MAX = 65536  # bytes of host input kept before the guest reads them; beyond: dropped

LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
IER_RDI, IER_THRI = 0x01, 0x02
IIR_NO_INT, IIR_THRI, IIR_RDI, IIR_FIFO = 0x01, 0x02, 0x04, 0xC0
LCR_DLAB = 0x80
MCR_LOOP = 0x10
_REGS = ("ier", "fcr", "lcr", "mcr", "msr", "scr", "dll", "dlm", "thr_ipending", "irq_level")


class SerialFifo(VMState):
    """Host input the guest has not read yet. A subsection, sent only when there is some: an
    idle UART's stream then stays exactly what a build without input buffering would send."""

    name = "serial/fifo"
    fifo: VarBytes(max=RX_PENDING_MAX)

    @classmethod
    def needed(cls, obj: Any) -> bool:
        return bool(obj.properties["migrate-rx-fifo"]) and len(obj.rx_fifo) > 0

    @classmethod
    def capture(cls, obj: Any) -> dict[str, Any]:
        return {"fifo": obj.get_state()["rx_fifo"]}

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        obj.load_rx_fifo(values["fifo"])


class SerialOverrun(VMState):
    """A latched overrun error the guest has not seen yet (LSR.OE). Sent only while one is
    pending, so a UART that never overflowed sends what it would without the feature; exists
    from section version 2 on, the first to have "lsr-overrun"."""

    name = "serial/overrun"
    since = 2
    lsr_oe: U8  # 1: latched (a sender writes 1; a reader takes any non-zero byte as 1)

    @classmethod
    def needed(cls, obj: Any) -> bool:
        return bool(obj.properties["lsr-overrun"]) and bool(obj.lsr_oe)

    @classmethod
    def capture(cls, obj: Any) -> dict[str, Any]:
        return {"lsr_oe": obj.lsr_oe}

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        obj.load_overrun(1 if values["lsr_oe"] else 0)  # any non-zero byte: latched


class SerialState(VMState):
    name = "serial"
    version = 2
    ier: U8
    fcr: U8
    lcr: U8
    mcr: U8
    msr: U8
    scr: U8
    dll: U8  # divisor latch, low byte
    dlm: U8  # divisor latch, high byte
    thr_ipending: U8  # "THR empty" interrupt pending (cleared by reading IIR)
    irq_level: U8  # the level this UART last drove its IRQ line to
    rx_dropped: U32 = field(since=2, default=0)  # host input bytes lost to a full FIFO
    subsections = (SerialFifo, SerialOverrun)

    @classmethod
    def capture(cls, obj: Any) -> dict[str, Any]:
        st = obj.get_state()
        return {name: st[name] for name in (*_REGS, "rx_dropped")}

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        obj.load_registers(values)

    @classmethod
    def post_load(cls, obj: Any, version: int) -> None:
        obj.sync_irq()


class Serial16550:
    """Properties (from the machine type): "iobase" and "irq" (where it is wired),
    "migrate-rx-fifo" (whether pending input travels in the "serial/fifo" subsection) and
    "lsr-overrun" (whether dropped input latches LSR.OE)."""

    vmstate = SerialState
    default_properties: Mapping[str, Any] = {"iobase": COM1_PORT, "irq": COM1_IRQ, "migrate-rx-fifo": True,
                                             "lsr-overrun": True}

    @classmethod
    def create(cls, machine: Any, properties: Mapping[str, Any]) -> Serial16550:
        dev = cls(machine.chardev, None, properties)
        irq = dev.properties["irq"]
        dev._set_irq = lambda level: machine.set_isa_irq(irq, level)
        machine.pio_bus.register(dev.properties["iobase"], 8, dev)
        return dev

    def __init__(self, backend: Chardev, set_irq: Callable[[int], None] | None = None,
                 properties: Mapping[str, Any] | None = None) -> None:
        unknown = set(properties or {}) - set(self.default_properties)
        if unknown:
            raise ValueError(f"serial: unknown properties {sorted(unknown)}")
        self.properties = {**self.default_properties, **(properties or {})}
        self.backend = backend
        self._set_irq = set_irq
        # Re-entrant: a capture holds it across get_state() calls (state_lock()).
        self._lock = threading.RLock()
        self._input_allowed = threading.Condition(self._lock)
        self._quiesced = False
        self._closed = False
        self.ier = 0
        self.fcr = 0
        self.lcr = 0
        self.mcr = 0
        self.msr = 0xB0  # CTS|DSR|DCD: a terminal is always there
        self.scr = 0
        self.dll = 0x0C  # 9600 baud, as firmware would leave it
        self.dlm = 0
        self.thr_ipending = 0
        self.irq_level = 0
        self.rx_fifo: deque[int] = deque()
        self.rx_dropped = 0  # wraps at 2**32, as the u32 that migrates it
        self.lsr_oe = 0  # overrun latched, cleared by reading LSR ("lsr-overrun" only)
        backend.set_receiver(self.receive)

    # --- guest side (vCPU threads) ---

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
            return value

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == 0:
            if dlab:
                return self.dll
            return self.rx_fifo.popleft() if self.rx_fifo else 0
        if offset == 1:
            return self.dlm if dlab else self.ier
        if offset == 2:
            iir = self._iir()
            if iir == IIR_THRI:
                self.thr_ipending = 0  # reading IIR acknowledges "THR empty"
            return iir | (IIR_FIFO if self.fcr & 1 else 0)
        if offset == 3:
            return self.lcr
        if offset == 4:
            return self.mcr
        if offset == 5:
            oe, self.lsr_oe = (LSR_OE if self.lsr_oe else 0), 0  # reading LSR clears OE
            return LSR_THRE | LSR_TEMT | oe | (LSR_DR if self.rx_fifo else 0)
        if offset == 6:
            if self.mcr & MCR_LOOP:
                # Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                m = self.mcr
                return ((m & 2) << 3) | ((m & 1) << 5) | ((m & 4) << 4) | ((m & 8) << 4)
            return self.msr
        return self.scr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        out = b""
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if offset == 0:
                if dlab:
                    self.dll = value
                elif self.mcr & MCR_LOOP:
                    self._push(bytes([value]))
                    self.thr_ipending = 1
                else:
                    out = bytes([value])
                    self.thr_ipending = 1
            elif offset == 1:
                if dlab:
                    self.dlm = value
                else:
                    if value & IER_THRI and not self.ier & IER_THRI:
                        self.thr_ipending = 1  # THR is empty: enabling its interrupt fires it
                    self.ier = value & 0x0F
            elif offset == 2:
                self.fcr = value & 0xC9
                if value & 0x02:
                    self.rx_fifo.clear()
            elif offset == 3:
                self.lcr = value
            elif offset == 4:
                self.mcr = value & 0x1F
            elif offset == 7:
                self.scr = value
            self._update_irq()
        if out:
            # Outside the lock: a slow backend (a stalled unix client) must not block input.
            self.backend.write(out)

    def _iir(self) -> int:
        if self.ier & IER_RDI and self.rx_fifo:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_ipending:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = 0 if self._iir() == IIR_NO_INT else 1
        if level != self.irq_level:
            self.irq_level = level
            if self._set_irq is not None:
                self._set_irq(level)

    # --- host side (backend thread) ---

    def _push(self, data: bytes) -> None:
        room = max(RX_PENDING_MAX - len(self.rx_fifo), 0)
        self.rx_fifo.extend(data[:room])
        dropped = len(data) - room
        if dropped > 0:
            self.rx_dropped = (self.rx_dropped + dropped) & 0xFFFF_FFFF
            if self.properties["lsr-overrun"]:
                self.lsr_oe = 1

    def receive(self, data: bytes) -> None:
        """Bytes from the backend, for the guest to read from RBR. Waits while quiesced."""
        with self._lock:
            while self._quiesced and not self._closed:
                self._input_allowed.wait()
            if self._closed:
                return
            self._push(data)
            self._update_irq()

    # --- the machine's pause hook ---

    def quiesce(self) -> None:
        """Hold input until unquiesce(). Returns once no receive() is under way."""
        with self._lock:
            self._quiesced = True

    def unquiesce(self) -> None:
        with self._lock:
            self._quiesced = False
            self._input_allowed.notify_all()

    def close(self) -> None:
        """No more input: a receive() waiting on a quiesce returns (its bytes are dropped)."""
        with self._lock:
            self._closed = True
            self._input_allowed.notify_all()

    def state_lock(self) -> contextlib.AbstractContextManager[bool]:
        """Held across one capture or one load of the whole section (see vmstate.snapshot)."""
        return self._lock

    # --- migration ---

    def get_state(self) -> dict:
        """All registers (ints), "rx_fifo" (bytes not yet read by the guest), "rx_dropped" and
        "lsr_oe"."""
        with self._lock:
            st: dict = {name: getattr(self, name) for name in _REGS}
            st["rx_fifo"] = bytes(self.rx_fifo)
            st["rx_dropped"] = self.rx_dropped
            st["lsr_oe"] = self.lsr_oe
            return st

    def set_state(self, state: dict) -> None:
        with self._lock:
            for name in _REGS:
                setattr(self, name, int(state[name]))
            self.rx_fifo = deque(state["rx_fifo"])
            self.rx_dropped = int(state.get("rx_dropped", 0))
            self.lsr_oe = int(state.get("lsr_oe", 0))
            # irq_level came with the state and matches the irqchip's saved line; drive the
            # line only if the loaded registers say otherwise.
            self._update_irq()

    # The pieces of set_state() that SerialState applies one at a time (registers, then the
    # FIFO subsection if it was sent, then the IRQ line once everything is in).

    def load_registers(self, values: dict) -> None:
        """The section's fields. A version-1 stream gives rx_dropped its default (0), and no
        "serial/overrun" subsection: no overrun is pending unless that subsection says so."""
        with self._lock:
            for name in _REGS:
                setattr(self, name, int(values[name]))
            self.rx_dropped = int(values["rx_dropped"])
            self.lsr_oe = 0

    def load_overrun(self, lsr_oe: int) -> None:
        with self._lock:
            self.lsr_oe = lsr_oe

    def load_rx_fifo(self, data: bytes) -> None:
        with self._lock:
            self.rx_fifo = deque(data)

    def sync_irq(self) -> None:
        with self._lock:
            self._update_irq()


