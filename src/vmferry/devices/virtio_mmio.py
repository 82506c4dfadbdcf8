"""The virtio-mmio transport, version 2 (virtio 1.x; spec 1.2 section 4.2.2), as QEMU's microvm
machine lays it out: transport i at 0xFEB00000 + 0x200 * i. The same guest image finds its
devices the same way under `qemu-system-x86_64 -M microvm -device virtio-blk-device` (docs/disks.md
says why this transport and not virtio-pci).

The transport owns what every virtio device has: feature negotiation, the device status byte,
the virtqueues' addresses and positions, the interrupt status and the IRQ line. The device behind
it (`VirtioDevice`: virtio-blk today) supplies its ID, features, config space, and the work a
queue notification starts. Registers are touched on vCPU threads; the device's I/O thread pops
and pushes requests; one lock covers both.

Interrupt: a used-buffer notification sets bit 0 of InterruptStatus and raises the IRQ line
(level); the driver's write to InterruptACK clears bits and the line drops when none is left.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from vmferry.devices.virtqueue import QUEUE_NUM_MAX, Chain, GuestMemory, VirtQueue
from vmferry.vmstate import U8, U16, U32, U64, List, VMState

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x554D4551  # "QEMU", as QEMU's transports report
MMIO_BASE = 0xFEB0_0000
MMIO_STRIDE = 0x200
CONFIG_OFFSET = 0x100

F_VERSION_1 = 1 << 32
STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK = 1, 2, 4, 8
STATUS_NEEDS_RESET, STATUS_FAILED = 0x40, 0x80
INT_USED_RING, INT_CONFIG = 1, 2

# Register offsets (spec table 4.1)
R_MAGIC, R_VERSION, R_DEVICE_ID, R_VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
R_DEVICE_FEATURES, R_DEVICE_FEATURES_SEL = 0x010, 0x014
R_DRIVER_FEATURES, R_DRIVER_FEATURES_SEL = 0x020, 0x024
R_QUEUE_SEL, R_QUEUE_NUM_MAX, R_QUEUE_NUM, R_QUEUE_READY, R_QUEUE_NOTIFY = 0x030, 0x034, 0x038, 0x044, 0x050
R_INTERRUPT_STATUS, R_INTERRUPT_ACK, R_STATUS = 0x060, 0x064, 0x070
R_QUEUE_DESC_LOW, R_QUEUE_DESC_HIGH = 0x080, 0x084
R_QUEUE_DRIVER_LOW, R_QUEUE_DRIVER_HIGH = 0x090, 0x094
R_QUEUE_DEVICE_LOW, R_QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
R_CONFIG_GENERATION = 0x0FC
_QUEUE_ADDR = {R_QUEUE_DESC_LOW: "desc_gpa", R_QUEUE_DRIVER_LOW: "avail_gpa", R_QUEUE_DEVICE_LOW: "used_gpa"}


class VirtioDevice(Protocol):
    device_id: int
    num_queues: int

    def device_features(self) -> int: ...

    def config(self) -> bytes: ...

    def queue_notify(self, queue: int) -> None:
        """The driver kicked `queue` (vCPU thread, transport lock not held): wake the I/O thread."""
        ...

    def reset(self) -> None:
        """The driver reset the device (vCPU thread, transport lock not held)."""
        ...


class VirtQueueState(VMState):
    name = "virtio-mmio/queue"
    num: U16
    ready: U8
    desc_gpa: U64
    avail_gpa: U64
    used_gpa: U64
    last_avail_idx: U16
    used_idx: U16


class VirtioMmioState(VMState):
    """The transport's part of a virtio device's state: negotiation, status, queues, interrupt.
    Nested in the device's own section (virtio-blk: `VirtioBlkState`)."""

    name = "virtio-mmio"
    status: U8
    device_features_sel: U32
    driver_features_sel: U32
    driver_features: U64
    queue_sel: U32
    interrupt_status: U32
    irq_level: U8
    config_generation: U32
    queues: List(VirtQueueState, max=8)


class VirtioMmio:
    def __init__(self, device: VirtioDevice, mem: GuestMemory, set_irq: Callable[[int], None]) -> None:
        self.device = device
        self.mem = mem
        self._set_irq = set_irq
        self.lock = threading.Lock()
        self.queues = [VirtQueue() for _ in range(device.num_queues)]
        # Bumped on every reset: a request the I/O thread took before a reset must not complete
        # into the rings the driver sets up afterwards.
        self.epoch = 0
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.irq_level = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()

    # --- registers (vCPU threads) ---

    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG_OFFSET:
            cfg = self.device.config()
            chunk = cfg[offset - CONFIG_OFFSET : offset - CONFIG_OFFSET + size]
            return int.from_bytes(chunk.ljust(size, b"\0"), "little")
        if size != 4:
            return 0  # the spec allows only 32-bit accesses below the config space
        with self.lock:
            q = self._queue()
            if offset == R_MAGIC:
                return MAGIC
            if offset == R_VERSION:
                return VERSION
            if offset == R_DEVICE_ID:
                return self.device.device_id
            if offset == R_VENDOR_ID:
                return VENDOR_ID
            if offset == R_DEVICE_FEATURES:
                return (self.device.device_features() >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                    if self.device_features_sel < 2 else 0
            if offset == R_QUEUE_NUM_MAX:
                return QUEUE_NUM_MAX if q is not None else 0
            if offset == R_QUEUE_READY:
                return q.ready if q is not None else 0
            if offset == R_INTERRUPT_STATUS:
                return self.interrupt_status
            if offset == R_STATUS:
                return self.status
            if offset == R_CONFIG_GENERATION:
                return self.config_generation
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG_OFFSET or size != 4:
            return  # virtio-blk's config space is read-only to the driver
        kick: int | None = None
        reset = False
        with self.lock:
            q = self._queue()
            if offset == R_DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            elif offset == R_DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == R_DRIVER_FEATURES:
                if self.driver_features_sel < 2 and not self.status & STATUS_FEATURES_OK:
                    shift = 32 * self.driver_features_sel
                    self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
            elif offset == R_QUEUE_SEL:
                self.queue_sel = value
            elif offset == R_QUEUE_NUM and q is not None:
                # A power of two up to the maximum (split rings need not be, but we only offer
                # what the spec always allows); anything else leaves the queue unusable.
                q.num = value if 0 < value <= QUEUE_NUM_MAX and not value & (value - 1) else 0
            elif offset == R_QUEUE_READY and q is not None:
                q.ready = value & 1
            elif offset in (R_QUEUE_DESC_LOW, R_QUEUE_DRIVER_LOW, R_QUEUE_DEVICE_LOW) and q is not None:
                attr = _QUEUE_ADDR[offset]
                setattr(q, attr, (getattr(q, attr) & ~0xFFFFFFFF) | value)
            elif offset in (R_QUEUE_DESC_HIGH, R_QUEUE_DRIVER_HIGH, R_QUEUE_DEVICE_HIGH) and q is not None:
                attr = _QUEUE_ADDR[offset - 4]
                setattr(q, attr, (getattr(q, attr) & 0xFFFFFFFF) | (value << 32))
            elif offset == R_QUEUE_NOTIFY:
                if self.status & STATUS_DRIVER_OK and value < len(self.queues):
                    kick = value
            elif offset == R_INTERRUPT_ACK:
                self.interrupt_status &= ~value
                self._update_irq()
            elif offset == R_STATUS:
                if value == 0:
                    reset = True
                    self.epoch += 1
                    self._reset_registers()
                    self._update_irq(force=True)
                else:
                    self._set_status(value)
        if reset:
            self.device.reset()
        if kick is not None:
            self.device.queue_notify(kick)

    def _set_status(self, value: int) -> None:
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            offered = self.device.device_features()
            # FEATURES_OK stays clear (the driver reads it back and gives up) when the driver
            # asks for what was not offered or, being a virtio 1.x transport, lacks VERSION_1.
            if self.driver_features & ~offered or not self.driver_features & F_VERSION_1:
                value &= ~STATUS_FEATURES_OK
        self.status = value & 0xFF

    def _queue(self) -> VirtQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _update_irq(self, force: bool = False) -> None:
        level = 1 if self.interrupt_status else 0
        if level != self.irq_level or force:
            self.irq_level = level
            self._set_irq(level)

    # --- the device's I/O thread ---

    def pop(self, queue: int) -> tuple[Chain, int] | None:
        """The next request of `queue` and the epoch it belongs to, or None."""
        with self.lock:
            if not self.status & STATUS_DRIVER_OK or self.status & STATUS_NEEDS_RESET:
                return None
            chain = self.queues[queue].pop(self.mem)
            return (chain, self.epoch) if chain is not None else None

    def push(self, queue: int, head: int, written: int, epoch: int) -> None:
        """Complete a request and interrupt the driver (unless it asked not to be)."""
        with self.lock:
            if epoch != self.epoch:
                return  # the driver reset the device meanwhile; the rings are not ours any more
            q = self.queues[queue]
            q.push(self.mem, head, written)
            if q.wants_interrupt(self.mem):
                self.interrupt_status |= INT_USED_RING
                self._update_irq()

    def fail(self) -> None:
        """The driver broke the queue rules: DEVICE_NEEDS_RESET, and a config interrupt."""
        with self.lock:
            self.status |= STATUS_NEEDS_RESET
            self.interrupt_status |= INT_CONFIG
            self._update_irq()

    # --- state ---

    def get_state(self) -> dict[str, Any]:
        with self.lock:
            regs = ("status", "device_features_sel", "driver_features_sel", "driver_features",
                    "queue_sel", "interrupt_status", "irq_level", "config_generation")
            st: dict[str, Any] = {name: getattr(self, name) for name in regs}
            st["queues"] = [dict(vars(q)) for q in self.queues]
            return st

    def set_state(self, st: dict[str, Any]) -> None:
        with self.lock:
            for name, value in st.items():
                if name != "queues":
                    setattr(self, name, int(value))
            for q, qs in zip(self.queues, st["queues"], strict=True):
                for name, value in qs.items():
                    setattr(q, name, int(value))
            self._set_irq(self.irq_level)
