"""The destination side: an incoming thread, so the destination's monitor stays live throughout.

The thread accepts the channel, feeds a StreamDecoder whose `place` callback points RAM_PAGES
payloads straight at guest memory (the socket writes the pages there; the decoder then checks
them), stages device sections without applying them, and only after END — record count and
running digest verified — applies all device state, starts the vCPUs and acknowledges on the
return path. Any error before that: the guest never starts, the source is told why (SHUT), and
`query-migrate` here says `failed` with the reason, naming the record.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable

from vmferry.errors import MigrationError, StreamError, VmferryError
from vmferry.machine.machine import Machine
from vmferry.migration.device_state import DeviceStateLoader
from vmferry.migration.ram import RamLoader
from vmferry.migration.return_path import ReturnPathWriter
from vmferry.migration.state import MigrationState, MigrationStatus
from vmferry.migration.stats import MigrationStats
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.records import (
    Command,
    CommandCode,
    Config,
    Description,
    DeviceSection,
    EndOfStream,
    PassStart,
    RamBlocks,
    RamPageList,
    RamPages,
    RamZero,
    SectionPhase,
    StreamHeader,
)
from vmferry.transport.channel import Channel
from vmferry.transport.connect import Listener
from vmferry.transport.uri import FileUri

log = logging.getLogger("vmferry.migration")
S = MigrationStatus
CHUNK_BYTES = 1 << 20
DIRECT_BYTES = 64 << 10


class IncomingMigration:
    def __init__(
        self,
        machine: Machine,
        devices: DeviceStateLoader,
        listener: Listener,
        state: MigrationState,
        on_loaded: Callable[[], None],
    ) -> None:
        """`on_loaded` runs once everything is verified and applied; it starts the guest (or,
        with -S, leaves it paused) — before the source is acknowledged."""
        self.machine = machine
        self.devices = devices
        self.listener = listener
        self.state = state
        self.on_loaded = on_loaded
        self.stats = MigrationStats()
        self.stats.total_bytes = sum(b.nbytes for b in machine.ram_blocks)
        self.ram = RamLoader(machine.ram_blocks)
        self.channel: Channel | None = None
        self.passes = 0
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migration-incoming", daemon=True)

    def start(self) -> None:
        self.stats.begin()
        self.state.set(S.SETUP)
        self._thread.start()

    def cancel(self) -> None:
        """migrate_cancel on the destination: stop receiving; the source is told and resumes."""
        self._cancel.set()
        self.listener.close()
        if self.channel is not None:
            ReturnPathWriter(self.channel).shut("migration cancelled on the destination")
            self.channel.shutdown()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        rp: ReturnPathWriter | None = None
        try:
            self.channel = self.listener.accept()
            self.listener.close()
            if self._cancel.is_set():
                raise MigrationError("migration cancelled")
            if self.channel.has_return_path:
                rp = ReturnPathWriter(self.channel)
            # The destination's clock starts when the source connects, not while it waited.
            self.stats.start_ns = self.stats.setup_end_ns = time.monotonic_ns()
            self.state.set(S.ACTIVE)
            count = self._receive(self.channel)
            elapsed_s = (time.monotonic_ns() - self.stats.start_ns) / 1e9
            self.stats.bandwidth_bps = self.stats.transferred / elapsed_s if elapsed_s > 0 else 0.0
            self.devices.apply()
            self.on_loaded()
            if rp is not None:
                rp.send(Command(CommandCode.ACK, index=count))
            self.stats.end_ns = time.monotonic_ns()
            self.state.set(S.COMPLETED)
            log.info("incoming migration completed: %d pages, %d zero pages", self.ram.pages,
                     self.ram.zero_pages)
        except BaseException as e:  # noqa: BLE001 - every failure must end in a defined state
            reason = self._reason(e)
            # The failed receive's frames hold views of guest memory (the placed payload, the
            # decoder, which also holds this exception: a cycle). Drop them now, or the mapping
            # cannot be closed at exit ("BufferError: cannot close exported pointers exist").
            traceback.clear_frames(e.__traceback__)
            if rp is not None:
                rp.shut(reason)
            self.stats.error = reason
            self.stats.end_ns = time.monotonic_ns()
            if self.state.status not in (S.FAILED, S.CANCELLED):
                self.state.set(S.FAILED)
            log.error("incoming migration failed: %s", reason)
        finally:
            self.ram.release()
            if self.channel is not None:
                self.channel.close()

    def _reason(self, e: BaseException) -> str:
        if self._cancel.is_set():
            return "migration cancelled on the destination"
        if isinstance(e, VmferryError):
            return str(e)
        log.exception("incoming migration thread failed")
        return f"internal error: {type(e).__name__}: {e}"

    def _receive(self, channel: Channel) -> int:
        """Read and load the whole stream; returns the record count END carried."""
        dec = StreamDecoder(place=self.ram.place)
        chunk = memoryview(bytearray(CHUNK_BYTES))
        while True:
            # A large placed payload is received straight into guest memory; everything else
            # (headers, small records) in chunks fed to the decoder, one system call for many
            # records. Records are drained before the chunk is reused.
            target = dec.get_buffer()
            if len(target) >= DIRECT_BYTES:
                n = channel.recv_into(target)
                if n:
                    dec.buffer_updated(n)
            else:
                n = channel.recv_into(chunk)
                if n:
                    dec.feed(chunk[:n])
            if n == 0:
                dec.feed_eof()
            self.stats.transferred += n
            while (rec := dec.next_record()) is not None:
                if isinstance(rec, EndOfStream):
                    if isinstance(self.listener.address, FileUri):
                        self._expect_end_of_file(channel, dec, chunk)
                    return rec.record_count
                self._handle(rec, dec)
            if n == 0:  # feed_eof always queues an error or END; never loop on EOF
                raise StreamError("stream ended without END", offset=dec.bytes_consumed)

    def _expect_end_of_file(self, channel: Channel, dec: StreamDecoder, chunk: memoryview) -> None:
        """A snapshot file holds one stream, to its end: nothing may follow END (stream spec).
        (A socket cannot be read to its end here: the source waits for the ACK on it.)"""
        n = channel.recv_into(chunk)
        if n:
            dec.feed(chunk[:n])
        dec.next_record()  # raises "N bytes after the end of stream", from this chunk or END's

    def _handle(self, rec: object, dec: StreamDecoder) -> None:
        if isinstance(rec, RamPages):
            if not rec.placed:
                self.ram.store(rec.block_id, rec.first_page, memoryview(rec.data))
            self.stats.normal += rec.page_count
        elif isinstance(rec, RamPageList):
            self.ram.store_list(rec.block_id, rec)
            self.stats.normal += len(rec.pages)
        elif isinstance(rec, RamZero):
            self.ram.zero(rec.block_id, rec.first_page, rec.page_count)
            self.stats.duplicate += rec.page_count
        elif isinstance(rec, DeviceSection):
            if rec.phase != SectionPhase.FULL:
                raise StreamError(f"device section phase {rec.phase.name} is not supported here",
                                  record_index=dec.record_index)
            self.devices.stage(rec.section_id, rec.data)
        elif isinstance(rec, PassStart):
            self.passes = rec.pass_number
            self.stats.dirty_sync_count = rec.pass_number
        elif isinstance(rec, StreamHeader):
            self._check_header(rec)
        elif isinstance(rec, RamBlocks):
            self.ram.check_layout(rec)
        elif isinstance(rec, Description):
            self.devices.check_description(rec)
        elif isinstance(rec, Config):
            self._check_config(rec.settings)
        elif isinstance(rec, Command) and rec.code == CommandCode.POPULATED_HINT:
            self.ram.prefault(rec.block_id, rec.data)
        elif isinstance(rec, Command) and rec.code == CommandCode.DEVICE_PROPERTIES:
            self.devices.check_properties(rec.data)
        elif isinstance(rec, Command) and rec.code == CommandCode.SHUT:
            raise MigrationError(f"the source gave up: {rec.message}")

    def _check_header(self, h: StreamHeader) -> None:
        if h.page_size != 4096:
            raise MigrationError(f"the stream's page size is {h.page_size}; this machine uses 4096")
        ours = self.machine.machine_type.name
        if h.machine_type and h.machine_type != ours:
            raise MigrationError(
                f"the stream is of machine type '{h.machine_type}' but this destination runs '{ours}';"
                f" start it with -M {h.machine_type}"
            )

    def _check_config(self, cfg: object) -> None:
        if not isinstance(cfg, dict):
            return
        smp = cfg.get("smp")
        if isinstance(smp, int) and smp != self.machine.smp:
            raise MigrationError(f"the source has {smp} vCPUs but this destination has "
                                 f"{self.machine.smp}; start it with --smp {smp}")
