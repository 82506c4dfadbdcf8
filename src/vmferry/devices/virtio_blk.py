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

In flight: the I/O thread takes everything the driver offered off the ring at once (the ring
position advances past them) and serves them in order; until a request's status is pushed it is
*in flight*, kept as (queue, descriptor head) — which is all the guest's descriptor table needs to
find it again. `quiesce()` (Machine.pause, so also a migration's switchover) stops taking new
requests, lets those in flight finish for up to `DRAIN_BUDGET_S`, then stops before the next one:
a request already in the backend finishes (a system call), the others stay in flight untouched.
They travel in the device's section as the `pending` list and are walked again from the
descriptor table and served on the destination when its machine runs (`unquiesce`). A request is
never half done: nothing it does (backend write, data into guest RAM) happens before the point
where it can no longer be stopped.

Migration also hands the image over: `release_image()` (the source at switchover) flushes and
drops the image lock; `unquiesce()` takes it back first if it was released (a failed migration:
the source continues; after a completed one the destination holds it, and `cont` on the source is
refused with QEMU's "Failed to get "write" lock"). Writes the device completes are noted in the
drive's `dirty` log (4 KiB units; active only while a migration copies the drive).

Test-only: with `VMFERRY_TEST_BLK_HOLD=PATH` in the environment, a request waits before it is
served for as long as the file PATH exists (a backend that has stopped answering), so a test can
have a request in flight at switchover for certain. A quiesce past its budget abandons the wait,
which leaves the request in flight, untouched. Not for production.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from vmferry.block.backend import SECTOR_SIZE, BlockBackend
from vmferry.block.digest import sampled_digest
from vmferry.block.stats import BlockStats
from vmferry.devices.virtio_mmio import F_VERSION_1, VirtioMmio, VirtioMmioState
from vmferry.devices.virtqueue import QUEUE_NUM_MAX, Chain, GuestMemory, dma_write
from vmferry.errors import GuestError, StateLoadError
from vmferry.vmstate import U8, U16, U64, List, Str, Struct, VMState

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
# How long a quiesce lets the requests in flight finish before it leaves the rest in flight.
DRAIN_BUDGET_S = 0.2
# The unit of the drive's dirty log: a guest's random 4 KiB write costs 4 KiB on the wire.
DIRTY_UNIT = 4096
TEST_HOLD_ENV = "VMFERRY_TEST_BLK_HOLD"  # test-only: see the module doc
DRIVE_ID_MAX = 64


class PendingRequestState(VMState):
    """One request in flight: its queue and the head of its descriptor chain (never a host
    pointer: the destination walks the chain again in the guest's descriptor table)."""

    name = "virtio-blk/request"
    queue: U16
    head: U16


class VirtioBlkState(VMState):
    """A virtio-blk drive: its guest-visible config (capacity, read-only), which drive it is and
    a digest of sampled blocks of its image (the destination checks it opened the same image in
    the same state), its transport, and the requests in flight."""

    name = "virtio-blk"
    version = 1
    capacity: U64  # sectors; a destination whose image differs refuses the section
    readonly: U8
    drive_id: Str(max=DRIVE_ID_MAX)
    image_digest: U64  # block/digest.py, taken quiesced and flushed
    transport: Struct(VirtioMmioState)
    pending: List(PendingRequestState, max=QUEUE_NUM_MAX)

    @classmethod
    def capture(cls, obj: Any) -> dict[str, Any]:
        return {"capacity": obj.backend.size // SECTOR_SIZE, "readonly": int(obj.backend.readonly),
                "drive_id": obj.drive_id, "image_digest": sampled_digest(obj.backend),
                "transport": obj.transport.get_state(), "pending": obj.pending_requests()}

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        obj.transport.set_state(values["transport"])
        obj.resubmit(values["pending"])


@dataclass(eq=False)
class _Request:
    queue: int
    chain: Chain
    epoch: int


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
        # Imported here: vmferry.machine imports this module (the package builds the drives).
        from vmferry.machine.dirty_log import DirtyLog

        self.dirty = DirtyLog(max(1, -(-backend.size // DIRTY_UNIT)), f"drive {drive_id}")
        self._kick = threading.Event()
        self._stop = False
        # _cond guards the in-flight list and the quiesce flags; taken before the transport's lock.
        self._cond = threading.Condition()
        self._inflight: list[_Request] = []
        self._busy = False  # the I/O thread is on _inflight[0]
        self._quiescing = False  # take nothing new off the ring
        self._abort = threading.Event()  # and start no further request
        self._lock_released = False
        self._hold_path = os.environ.get(TEST_HOLD_ENV, "")
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
        # The transport dropped the queues: what was in flight belongs to rings that are gone (a
        # request being served completes into nothing: its epoch is stale).
        with self._cond:
            self._inflight.clear()

    # --- the I/O thread ---

    def _io_loop(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            if self._stop:
                return
            try:
                while self._serve_next():
                    pass
            except GuestError as e:
                # A malformed ring: the device needs a reset; the VMM carries on.
                log.warning("drive %s: %s; device needs reset", self.drive_id, e)
                self._drop_inflight()
                self.transport.fail()
            except Exception:
                # A bug of ours must not silently stop the disk: say so, and tell the driver.
                log.exception("drive %s: request failed; device needs reset", self.drive_id)
                self._drop_inflight()
                self.transport.fail()

    def _drop_inflight(self) -> None:
        with self._cond:
            self._inflight.clear()
            self._busy = False
            self._cond.notify_all()

    def _serve_next(self) -> bool:
        """Serve the oldest request in flight (taking what the driver offered first); False when
        there is nothing to do or the device is quiesced."""
        with self._cond:
            if self._stop or self._abort.is_set():
                return False
            if not self._quiescing:
                while (popped := self.transport.pop(0)) is not None:
                    self._inflight.append(_Request(0, *popped))
            if not self._inflight:
                return False
            req = self._inflight[0]
            self._busy = True
        done = False
        try:
            if self._held():
                return False  # quiesced past its budget: the request stays in flight, untouched
            written = self._serve(req.chain)
            self.transport.push(req.queue, req.chain.head, written, req.epoch)
            done = True
        finally:
            with self._cond:
                self._busy = False
                if done and req in self._inflight:
                    self._inflight.remove(req)
                self._cond.notify_all()
        return True

    def _held(self) -> bool:
        """The test hook (module doc): wait while the hold file exists; True if a quiesce
        abandoned the wait."""
        while self._hold_path and os.path.exists(self._hold_path):
            if self._abort.wait(0.01):
                return True
        return False

    # --- quiesce, and the requests in flight ---

    def quiesce(self) -> None:
        """Take no new request; let those in flight finish for up to DRAIN_BUDGET_S; then start
        no further one. On return the device changes nothing (module doc)."""
        with self._cond:
            self._quiescing = True
            deadline = time.monotonic() + DRAIN_BUDGET_S
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            self._abort.set()
            while self._busy:
                self._cond.wait(1.0)
            if self._inflight:
                log.info("drive %s: %d request(s) still in flight after %.0f ms; they stay in "
                         "flight", self.drive_id, len(self._inflight), DRAIN_BUDGET_S * 1000)

    def unquiesce(self) -> None:
        """Serve again: take the image lock back if a migration gave it away (BlockError when
        another VMM holds it now), then the requests in flight, then the ring."""
        with self._cond:
            if self._lock_released:
                self.backend.lock()
                self._lock_released = False
            self._quiescing = False
            self._abort.clear()
        self._kick.set()

    def pending_requests(self) -> list[dict[str, int]]:
        """The requests in flight as the device's state carries them (quiesced only)."""
        with self._cond:
            return [{"queue": r.queue, "head": r.chain.head} for r in self._inflight]

    def resubmit(self, pending: list[dict[str, Any]]) -> None:
        """A destination: the source's requests in flight, walked again from the descriptor
        table; served (before anything new on the ring) once the machine runs (`unquiesce`)."""
        reqs = []
        for p in pending:
            queue, head = int(p["queue"]), int(p["head"])
            if queue >= len(self.transport.queues):
                raise StateLoadError(f"drive {self.drive_id}: a request in flight on queue {queue}, "
                                     f"which does not exist", section=VirtioBlkState.name, field="pending")
            try:
                chain = self.transport.queues[queue].walk(self.mem, head)
            except GuestError as e:
                raise StateLoadError(f"drive {self.drive_id}: request in flight at descriptor {head}: "
                                     f"{e}", section=VirtioBlkState.name, field="pending") from None
            reqs.append(_Request(queue, chain, self.transport.epoch))
        with self._cond:
            self._inflight = reqs
            self._quiescing = True
            self._abort.set()
        if reqs:
            log.info("drive %s: %d request(s) carried in flight from the source", self.drive_id, len(reqs))

    def release_image(self) -> None:
        """The migration source at switchover (quiesced): make every completed write durable and
        give the image's lock up; `unquiesce` takes it back."""
        self.backend.flush()
        with self._cond:
            if self.backend.locked:
                self.backend.release_lock()
                self._lock_released = True

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
                # After the write (dirty_log.py's order rule); a failed one may have written part.
                first = offset // DIRTY_UNIT
                self.dirty.note(first, (offset + len(data) - 1) // DIRTY_UNIT - first + 1)
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
        """Refuse state from a drive this one could not continue: another drive, size or
        writability, or an image whose sampled blocks differ from the source's at switchover."""
        if fields["drive_id"] != self.drive_id:
            raise StateLoadError(f"the source's drive '{fields['drive_id']}' would load into drive "
                                 f"'{self.drive_id}' here: give the destination the same --drive ids "
                                 "in the same order", section=VirtioBlkState.name, field="drive_id")
        ours = {"capacity": self.backend.size // SECTOR_SIZE, "readonly": int(self.backend.readonly)}
        for name, value in ours.items():
            if fields[name] != value:
                raise StateLoadError(f"drive {self.drive_id}: the source's {name} is {fields[name]}, "
                                     f"this drive's {value}", section=VirtioBlkState.name, field=name)
        if fields["image_digest"] != sampled_digest(self.backend):
            raise StateLoadError(f"drive {self.drive_id}: image '{getattr(self.backend, 'path', '?')}' "
                                 "differs from the source's at switchover (digest of sampled blocks): "
                                 "not the same image, or written since", section=VirtioBlkState.name,
                                 field="image_digest")

    # --- host side ---

    def query_block(self) -> dict:
        return {"device": self.drive_id, "qdev": self.qdev, "locked": False, "removable": False,
                "type": "unknown", "tray_open": False, "io-status": "ok",
                "inserted": {**self.backend.describe(), "node-name": self.drive_id}}

    def queue_status(self, queue: int) -> dict:
        """x-query-virtio-queue-status: where the device stands in `queue`."""
        from vmferry.errors import QmpError

        if not 0 <= queue < len(self.transport.queues):
            raise QmpError(f"Invalid virtqueue index {queue}")
        with self._cond, self.transport.lock:
            q = self.transport.queues[queue]
            inuse = sum(1 for r in self._inflight if r.queue == queue)
            return {"name": "virtio-blk", "queue-index": queue, "inuse": inuse, "vring-num": q.num,
                    "vring-num-default": QUEUE_NUM_MAX, "vring-desc": q.desc_gpa,
                    "vring-avail": q.avail_gpa, "vring-used": q.used_gpa,
                    "last-avail-idx": q.last_avail_idx, "used-idx": q.used_idx}

    def query_blockstats(self) -> dict:
        return {"device": self.drive_id, "qdev": self.qdev, "node-name": self.drive_id,
                "stats": self.stats.query()}

    def close(self) -> None:
        """Stop the I/O thread (finishing the request it is on), then release the backend."""
        self._stop = True
        self._abort.set()
        self._kick.set()
        self._thread.join(timeout=10)
        self.backend.close()
