"""virtio-blk (virtio 1.x, spec 1.2 section 5.2) over a BlockBackend, one request queue.

Requests are served on the drive's own I/O thread, never on a vCPU thread: the vCPU's queue
notification only sets an event. The thread pops requests, reads the header and the data from
guest RAM, calls the backend, writes the data (for reads) and the status byte back through
`dma_write`, completes the request in the used ring and raises the interrupt.

Offered features: VERSION_1, FLUSH (a flush is the backend's fdatasync), RO for a read-only
drive; the driver may accept any subset (VERSION_1 is required by the transport). Config space:
`capacity` (u64, 512-byte sectors) at offset 0; the rest of struct virtio_blk_config reads as 0.
Request types: IN, OUT, FLUSH, GET_ID (the drive's id, NUL-padded to 20 bytes); others are
answered UNSUPP. An out-of-range request or a write to a read-only drive is answered IOERR and
counted as invalid in query-blockstats; a backend error is answered IOERR and counted as failed.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from typing import Any

from vmferry.block.backend import SECTOR_SIZE, BlockBackend
from vmferry.block.stats import BlockStats
from vmferry.devices.virtio_mmio import F_VERSION_1, VirtioMmio, VirtioMmioState
from vmferry.devices.virtqueue import Chain, GuestMemory, dma_write
from vmferry.errors import GuestError, StateLoadError
from vmferry.vmstate import U8, U64, Struct, VMState

log = logging.getLogger("vmferry.devices")

DEVICE_ID_BLOCK = 2
F_BLK_RO = 1 << 5
F_BLK_FLUSH = 1 << 9
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20
_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
# One request moves at most this much (the guest chooses; larger is refused as IOERR rather
# than letting a guest make the VMM allocate without bound).
MAX_REQUEST_BYTES = 4 << 20


class VirtioBlkState(VMState):
    """A virtio-blk drive: its guest-visible config (capacity, read-only) and its transport.
    Not yet in any machine type's section list: disks do not migrate yet (docs/disks.md). The
    requests in flight join it as a list when they do."""

    name = "virtio-blk"
    version = 1
    capacity: U64  # sectors; a destination whose image differs refuses the section
    readonly: U8
    transport: Struct(VirtioMmioState)

    @classmethod
    def capture(cls, obj: Any) -> dict[str, Any]:
        return {"capacity": obj.backend.size // SECTOR_SIZE, "readonly": int(obj.backend.readonly),
                "transport": obj.transport.get_state()}

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        obj.transport.set_state(values["transport"])


class VirtioBlk:
    vmstate = VirtioBlkState
    device_id = DEVICE_ID_BLOCK
    num_queues = 1

    def __init__(self, drive_id: str, backend: BlockBackend, mem: GuestMemory,
                 set_irq: Any, *, qdev: str = "") -> None:
        self.drive_id = drive_id
        self.qdev = qdev
        self.backend = backend
        self.mem = mem
        self.stats = BlockStats()
        self.transport = VirtioMmio(self, mem, set_irq)
        self._kick = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._io_loop, name=f"iothread-{drive_id}", daemon=True)
        self._thread.start()

    # --- VirtioDevice ---

    def device_features(self) -> int:
        return F_VERSION_1 | F_BLK_FLUSH | (F_BLK_RO if self.backend.readonly else 0)

    def config(self) -> bytes:
        # struct virtio_blk_config up to and including blk_size (the fields after capacity are
        # only meaningful with features we do not offer).
        return struct.pack("<Q", self.backend.size // SECTOR_SIZE).ljust(24, b"\0")

    def queue_notify(self, queue: int) -> None:
        self._kick.set()

    def reset(self) -> None:
        pass  # the transport dropped the queues; a request in flight completes into nothing

    # --- the I/O thread ---

    def _io_loop(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            if self._stop:
                return
            try:
                while not self._stop:
                    popped = self.transport.pop(0)
                    if popped is None:
                        break
                    chain, epoch = popped
                    written = self._serve(chain)
                    self.transport.push(0, chain.head, written, epoch)
            except GuestError as e:
                # A malformed ring: the device needs a reset; the VMM carries on.
                log.warning("drive %s: %s; device needs reset", self.drive_id, e)
                self.transport.fail()
            except Exception:
                # A bug of ours must not silently stop the disk: say so, and tell the driver.
                log.exception("drive %s: request failed; device needs reset", self.drive_id)
                self.transport.fail()

    def _gather(self, segs: list[tuple[int, int]], limit: int) -> bytes:
        if sum(n for _, n in segs) > limit:
            raise GuestError(f"request larger than {limit} bytes")
        return b"".join(self.mem.read_gpa(gpa, n) for gpa, n in segs)

    def _serve(self, chain: Chain) -> int:
        """Do one request; returns the bytes written into the driver's buffers (used.len)."""
        start = time.monotonic_ns()
        out = self._gather(chain.readable, MAX_REQUEST_BYTES + _HEADER.size)
        if len(out) < _HEADER.size or not chain.writable or chain.writable[-1][1] < 1:
            raise GuestError("virtio-blk request without a header or a status byte")
        kind, _, sector = _HEADER.unpack_from(out)
        status_gpa = chain.writable[-1][0] + chain.writable[-1][1] - 1
        data_in = list(chain.writable)
        data_in[-1] = (data_in[-1][0], data_in[-1][1] - 1)
        in_len = sum(n for _, n in data_in)
        offset = sector * SECTOR_SIZE
        written = 0
        if kind == T_IN:
            status = self._check("rd", offset, in_len, write=False)
            if status == S_OK:
                buf = bytearray(in_len)
                try:
                    self.backend.read_into(offset, memoryview(buf))
                except OSError as e:
                    log.warning("drive %s: read at %d: %s", self.drive_id, offset, e)
                    status = S_IOERR
                else:
                    pos = 0
                    for gpa, n in data_in:
                        dma_write(self.mem, gpa, bytes(buf[pos : pos + n]))
                        pos += n
                    written = in_len
                self.stats.done("rd", in_len, start, ok=status == S_OK, offset=offset)
        elif kind == T_OUT:
            data = memoryview(out)[_HEADER.size :]
            status = self._check("wr", offset, len(data), write=True)
            if status == S_OK:
                try:
                    self.backend.write(offset, data)
                except OSError as e:
                    log.warning("drive %s: write at %d: %s", self.drive_id, offset, e)
                    status = S_IOERR
                self.stats.done("wr", len(data), start, ok=status == S_OK, offset=offset)
        elif kind == T_FLUSH:
            status = S_OK
            try:
                self.backend.flush()
            except OSError as e:
                log.warning("drive %s: flush: %s", self.drive_id, e)
                status = S_IOERR
            self.stats.done("flush", 0, start, ok=status == S_OK)
        elif kind == T_GET_ID:
            ident = self.drive_id.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
            pos = 0
            for gpa, n in data_in:
                take = ident[pos : pos + n]
                if take:
                    dma_write(self.mem, gpa, take)
                pos += len(take)
            written = pos
            status = S_OK
        else:
            status = S_UNSUPP
        dma_write(self.mem, status_gpa, bytes([status]))
        return written + 1

    def _check(self, kind: str, offset: int, nbytes: int, *, write: bool) -> int:
        if nbytes % SECTOR_SIZE or offset + nbytes > self.backend.size or nbytes > MAX_REQUEST_BYTES:
            self.stats.invalid(kind)
            return S_IOERR
        if write and self.backend.readonly:
            self.stats.invalid(kind)
            return S_IOERR
        return S_OK

    def check_loadable(self, fields: dict[str, Any]) -> None:
        """Refuse state from a drive this one could not continue: another size or writability."""
        ours = {"capacity": self.backend.size // SECTOR_SIZE, "readonly": int(self.backend.readonly)}
        for name, value in ours.items():
            if fields[name] != value:
                raise StateLoadError(f"drive {self.drive_id}: the source's {name} is {fields[name]}, "
                                     f"this drive's {value}", section=VirtioBlkState.name, field=name)

    # --- host side ---

    def query_block(self) -> dict:
        return {"device": self.drive_id, "qdev": self.qdev, "locked": False, "removable": False,
                "type": "unknown", "tray_open": False, "io-status": "ok",
                "inserted": {**self.backend.describe(), "node-name": self.drive_id}}

    def query_blockstats(self) -> dict:
        return {"device": self.drive_id, "qdev": self.qdev, "node-name": self.drive_id,
                "stats": self.stats.query()}

    def close(self) -> None:
        """Stop the I/O thread (finishing the request it is on), then release the backend."""
        self._stop = True
        self._kick.set()
        self._thread.join(timeout=10)
        self.backend.close()
