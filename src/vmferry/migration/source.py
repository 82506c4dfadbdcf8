"""The source side of a migration: a thread of its own, never waited on by vCPUs or the monitor.

States (QMP's): setup -> active -> device -> completed, or failed / cancelling -> cancelled.
- setup: the channel is open; header, configuration, RAM block table and device description
  (with what the machine type's stream features add) are sent; dirty logging starts and every
  populated page is marked.
- active: passes. Each pass sends the marked pages, then syncs the dirty log. After each sync,
  expected downtime = dirty bytes / measured bandwidth; within downtime-limit, passes go on
  while they still halve the backlog (convergence.switch_now), then switch over.
- device: vCPUs paused; final sync; the rest of RAM and all device state go with no scratch copy;
  END closes the stream. With a return path the source waits for the destination's ACK, sent once
  the destination has verified everything and started the guest.
- "Nothing lost": until END is sent the destination cannot start the guest, so any failure or a
  cancel resumes the source. After END, without the ACK, the source stays paused (the destination
  may be running): `failed` says so, and `cont` resumes the source if the destination is not.

Downtime (query-migrate "downtime") = from the vCPUs pausing here to the destination's ACK
arriving (the guest runs on the destination by then); without a return path, to END written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from vmferry import __version__
from vmferry.errors import MigrationError, VmferryError
from vmferry.machine.machine import Machine
from vmferry.migration.convergence import PassReport, expected_downtime_ms, switch_now
from vmferry.migration.device_state import DeviceStateSaver
from vmferry.migration.pages import PAGE_SIZE
from vmferry.migration.params import MigrationParameters
from vmferry.migration.ram import RamSaver, block_table
from vmferry.migration.return_path import ReturnPathReader
from vmferry.migration.state import MigrationState, MigrationStatus
from vmferry.migration.stats import MigrationStats
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Config, DeviceSection, EndOfStream, PassStart, SectionPhase
from vmferry.transport.bandwidth import RateLimiter
from vmferry.transport.channel import Channel

log = logging.getLogger("vmferry.migration")
S = MigrationStatus

ACK_TIMEOUT_S = 30.0
# Device state is small and local; this fixed allowance keeps the downtime estimate honest.
DEVICE_STATE_MS = 2.0


class OutgoingMigration:
    def __init__(
        self,
        machine: Machine,
        devices: DeviceStateSaver,
        channel: Future[Channel],
        params: MigrationParameters,
        state: MigrationState,
        on_pass: Callable[[int], None] | None = None,
    ) -> None:
        self.machine = machine
        self.devices = devices
        self._channel_future = channel
        self.channel: Channel | None = None  # once connected, on the migration thread
        self.params = params
        self.state = state
        self.stats = MigrationStats()
        self.on_pass = on_pass
        self.encoder = StreamEncoder(machine_type=machine.machine_type.name)
        self.ram = RamSaver(machine.ram_blocks, self.encoder)
        self.limiter = RateLimiter(params.max_bandwidth)
        self.return_path: ReturnPathReader | None = None
        self._cancel = threading.Event()
        self._paused_by_us = False
        self._end_sent = False
        self._pass_bytes = 0
        self._pass_time_s = 0.0
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)
        self.stats.total_bytes = sum(b.nbytes for b in machine.ram_blocks)

    # --- control, from the monitor thread ---

    def start(self) -> None:
        self.stats.begin()
        self.state.set(S.SETUP)
        self._thread.start()

    def cancel(self) -> None:
        """migrate_cancel: the source keeps running. Ignored once END is out (see module doc)."""
        if self._end_sent:
            return
        self._cancel.set()
        for frm in (S.SETUP, S.ACTIVE, S.DEVICE):
            if self.state.try_set(frm, S.CANCELLING):
                break
        if self.channel is not None:
            self.channel.shutdown()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # --- the migration thread ---

    def _send(self, bufs: Sequence[bytes | memoryview]) -> int:
        assert self.channel is not None
        n = self.channel.sendmsg(bufs)
        self.stats.transferred += n
        limit = self.params.max_bandwidth  # migrate-set-parameters takes effect at once
        if limit != self.limiter.bytes_per_s:
            self.limiter.set_limit(limit)
        self.limiter.record(n)
        if limit and not self.limiter.wait(self._cancel.is_set):
            raise MigrationError("migration cancelled")
        return n

    def _bandwidth_bps(self) -> float:
        """Bytes the channel accepted over the wall time of the passes that sent them, all work
        included (gathering, scanning, checksums, waiting on the limit): the rate the final
        round will really see, which is what expected downtime needs."""
        return self._pass_bytes / self._pass_time_s if self._pass_time_s > 0 else 0.0

    def _run(self) -> None:
        try:
            self.channel = self._connected()
            self._setup()
            self.state.set(S.ACTIVE)
            self._iterate()
            self._switch_over()
        except BaseException as e:  # noqa: BLE001 - every failure must end in a defined state
            self._fail(e)
        finally:
            self.ram.cleanup()
            self.stats.end_ns = time.monotonic_ns()
            if self.channel is not None:
                try:
                    self.channel.close()
                except VmferryError as e:
                    # Only after a failure or cancel (a completed migration closed it already):
                    # the state says why, and an exec: command's exit status is in that reason.
                    log.debug("closing the channel of the ended migration: %s", e)
            if self.return_path is not None:
                self.return_path.join(1.0)

    def _connected(self) -> Channel:
        """Wait for the channel `migrate` started opening (a slow peer must not hold the
        monitor); a cancel meanwhile wins, and a channel that arrives after it is closed."""
        while True:
            try:
                channel = self._channel_future.result(timeout=0.05)
            except FutureTimeout:
                if self._cancel.is_set():
                    self._channel_future.add_done_callback(_close_if_connected)
                    raise MigrationError("migration cancelled") from None
                continue
            if self._cancel.is_set():
                channel.close()
                raise MigrationError("migration cancelled")
            return channel

    def _setup(self) -> None:
        assert self.channel is not None
        if self.channel.has_return_path:
            self.return_path = ReturnPathReader(self.channel)
            self.return_path.start()
        config = {
            "producer": f"vmferry {__version__}",
            "machine-type": self.machine.machine_type.name,
            "memory": self.machine.memory,
            "smp": self.machine.smp,
            "return-path": self.channel.has_return_path,
        }
        head = [self.encoder.header(), self.encoder.encode(Config(config))]
        head.append(self.encoder.encode(block_table(self.machine.ram_blocks)))
        head.append(self.encoder.encode(self.devices.description()))
        head += [self.encoder.encode(r) for r in self.devices.stream_records()]
        self._send(head)
        self.stats.unpopulated = self.ram.setup()
        self._send([self.encoder.encode(hint) for hint in self.ram.populated_hints()])
        self.stats.remaining_pages = self.ram.remaining()
        self.stats.dirty_sync_count = 1  # the setup's bitmap counts as the first sync, as in QEMU
        self.stats.setup_end_ns = time.monotonic_ns()
        log.info("migration setup done: %d pages to send, %d never populated",
                 self.stats.remaining_pages, self.stats.unpopulated)

    def _iterate(self) -> None:
        number = 0
        extra = 0  # passes made after the expected downtime first fell within the limit
        last_sync = time.monotonic()
        while True:
            number += 1
            if self.on_pass is not None:
                self.on_pass(number)
            t0 = time.monotonic()
            sent_before = self.stats.transferred
            self._send([self.encoder.encode(PassStart(number))])
            c = self.ram.send_dirty(self._send, stable=False, cancelled=self._cancel.is_set)
            self.stats.normal += c.pages
            self.stats.duplicate += c.zero_pages
            self.stats.precopy_bytes += c.bytes
            now = time.monotonic()
            self._pass_bytes += self.stats.transferred - sent_before
            self._pass_time_s += now - t0
            dirty = self.ram.sync()
            self.stats.dirty_sync_count += 1
            dirty_rate = dirty / max(now - last_sync, 1e-6)
            last_sync = now
            bw = self._bandwidth_bps()
            remaining_bytes = dirty * PAGE_SIZE
            exp = expected_downtime_ms(remaining_bytes, bw, DEVICE_STATE_MS)
            report = PassReport(number, c.pages, c.zero_pages, self.stats.transferred - sent_before,
                                now - t0, bw, dirty, dirty_rate, exp)
            with self.stats.lock:
                self.stats.passes.append(report)
                self.stats.remaining_pages = dirty
                self.stats.bandwidth_bps = bw
                self.stats.dirty_rate_pps = dirty_rate
                self.stats.expected_downtime_ms = exp
            limit = self.params.downtime_limit
            if switch_now(exp, limit, c.pages + c.zero_pages, dirty, extra):
                return
            if exp <= limit:
                extra += 1
            if self._cancel.is_set():
                raise MigrationError("migration cancelled")

    def _switch_over(self) -> None:
        t0 = time.monotonic()
        self.stats.stop_ns = time.monotonic_ns()
        if self.machine.running:
            self.machine.pause()
            self._paused_by_us = True
        self.state.set(S.DEVICE)
        t_paused = time.monotonic()
        before = self.stats.transferred
        self.ram.sync()
        self.stats.dirty_sync_count += 1
        c = self.ram.send_dirty(self._send, stable=True, cancelled=self._cancel.is_set)
        self.stats.normal += c.pages
        self.stats.duplicate += c.zero_pages
        t_ram = time.monotonic()
        sections = [
            self.encoder.encode(DeviceSection(sid, SectionPhase.FULL, payload))
            for sid, payload in self.devices.save()
        ]
        self._send(sections)
        if self._cancel.is_set():
            raise MigrationError("migration cancelled")
        self._end_sent = True
        self._send([self.encoder.encode(EndOfStream())])
        t_devices = time.monotonic()
        self.stats.downtime_bytes = self.stats.transferred - before
        self.stats.remaining_pages = 0
        if self.return_path is not None:
            self._wait_for_ack()
        else:
            assert self.channel is not None
            self.channel.close()  # flushes a file; reaps an exec: child, surfacing its failure
        t_done = time.monotonic()
        self.stats.downtime_ms = (time.monotonic_ns() - self.stats.stop_ns) / 1e6
        # Where the downtime went: pausing the vCPUs, the last dirty pages, device state and END,
        # and the destination loading, starting the guest and confirming.
        self.stats.downtime_phases = {
            "pause": round((t_paused - t0) * 1000, 3),
            "ram": round((t_ram - t_paused) * 1000, 3),
            "devices": round((t_devices - t_ram) * 1000, 3),
            "confirm": round((t_done - t_devices) * 1000, 3),
        }
        self.state.set(S.COMPLETED)
        log.info("migration completed: downtime %.1f ms (%s)", self.stats.downtime_ms,
                 self.stats.downtime_phases)

    def _wait_for_ack(self) -> None:
        assert self.return_path is not None
        rp = self.return_path
        if not rp.acked.wait(ACK_TIMEOUT_S) or rp.ack_index is None:
            why = rp.shut_reason or (
                "the destination closed the connection" if rp.closed.is_set()
                else f"no answer within {ACK_TIMEOUT_S:.0f} s"
            )
            raise MigrationError(f"the destination did not confirm the switchover: {why}")
        if rp.ack_index != self.encoder.record_count:
            raise MigrationError(
                f"the destination confirmed {rp.ack_index} records but {self.encoder.record_count} were sent"
            )

    def _fail(self, e: BaseException) -> None:
        if self._cancel.is_set() and not self._end_sent:
            reason = "cancelled"
        elif self.return_path is not None and self.return_path.shut_reason:
            reason = f"the destination refused the stream: {self.return_path.shut_reason}"
        elif isinstance(e, VmferryError):
            reason = str(e)
        else:
            log.exception("migration thread failed")
            reason = f"internal error: {type(e).__name__}: {e}"
        if self._end_sent:
            reason += (
                "; the source stays paused because the destination may be running the guest:"
                " if it is not, 'cont' resumes the source"
            )
        elif self._paused_by_us:
            self.machine.resume()
        with self.stats.lock:
            self.stats.error = None if reason == "cancelled" else reason
        if reason == "cancelled":
            if self.state.status != S.CANCELLING:
                self.state.set(S.CANCELLING)
            self.state.set(S.CANCELLED)
            log.info("migration cancelled; the source keeps running")
        else:
            self.state.set(S.FAILED)
            log.warning("migration failed: %s", reason)


def _close_if_connected(fut: Future[Channel]) -> None:
    if fut.exception() is None:
        fut.result().close()
