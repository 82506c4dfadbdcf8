"""The source side of a migration: a thread of its own, never waited on by vCPUs or the monitor.

A thin driver around `SourceSession` (source_session.py), which decides which records go next:
this module owns the thread, the channel, the clock, the rate limit, pausing the vCPUs and the
QMP-visible state and numbers. The savers are RAM (ram.py) and device state (device_state.py).

States (QMP's): setup -> active -> device -> completed, or failed / cancelling -> cancelled.
- setup: the channel is open; header, configuration, then each saver's setup (RAM block table,
  dirty logging started and every populated page marked, POPULATED_HINTs; device description,
  and what the machine type's stream features add).
- active: passes (the session's). After each pass's sync, expected downtime = (what the savers
  still hold + what is in flight) / end-to-end bandwidth + a small allowance; within
  downtime-limit, passes go on while they still halve the backlog (convergence.switch_now).
  Before pausing, the driver waits (at most DRAIN_S) for the destination to catch up with what
  is in flight, then the session checks the expected downtime again.
- device: vCPUs paused; each saver's complete (RAM: the final sync and the rest straight from
  guest memory; device state); END closes the stream. With a return path the source waits for
  the destination's ACK, sent once the destination has verified everything and started the guest.
- postcopy-active (migration/postcopy.py): before the vCPUs stop, the early discard and a wait
  (at most POSTCOPY_DRAIN_S) for the destination to apply it; then the pause, the second
  discard, LISTEN, device state, RUN, and the push of the rest of RAM.
- "Nothing lost": until END is sent the destination cannot start the guest, so any failure or a
  cancel resumes the source. After END, without the ACK, the source stays paused (the destination
  may be running): `failed` says so, and `cont` resumes the source if the destination is not.

Heartbeats (migration/heartbeat.py), on a channel with a return path: a HEARTBEAT goes into the
stream right after the setup and then whenever the stream has been quiet for x-heartbeat-ms
(sent by this thread between records: after a send, while the rate limit holds it, while it
drains). The watchdog fails the migration when the destination has been silent for 3 intervals
(once it sent a HEARTBEAT), shutting the channel down so a send blocked on it returns.

Downtime (query-migrate "downtime") = from the vCPUs pausing here to the destination's ACK
arriving (the guest runs on the destination by then); without a return path, to END written.
In postcopy, to the PROGRESS that covers POSTCOPY_RUN (the destination sends it once its guest
runs), or to RUN written if none comes.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from vmferry import __version__
from vmferry.errors import MigrationError, TransportError, VmferryError
from vmferry.machine.dirty_limit import DEFAULT_PERIOD_MS as DIRTY_LIMIT_PERIOD_MS
from vmferry.machine.machine import Machine
from vmferry.migration import testpoint
from vmferry.migration.block import DriveSaver
from vmferry.migration.convergence import PassReport
from vmferry.migration.device_state import DeviceSaver, DeviceStateSaver
from vmferry.migration.heartbeat import Watchdog
from vmferry.migration.multifd import DataChannelEncoder, MultifdSender
from vmferry.migration.pages import PAGE_SIZE
from vmferry.migration.params import MigrationParameters
from vmferry.migration.postcopy import (
    PostcopySource,
    SwitchDiscards,
    precopy_overruns,
    restore_switch_interval,
    short_switch_interval,
)
from vmferry.migration.preempt import PreemptSender
from vmferry.migration.ram import RamSaver, block_table
from vmferry.migration.return_path import ReturnPathReader
from vmferry.migration.source_session import SourceSession
from vmferry.migration.state import MigrationState, MigrationStatus
from vmferry.migration.stats import MigrationStats
from vmferry.migration.throttle import AutoConverge, DirtyLimitConverge, ThrottleParams
from vmferry.migration.trace import NULL_TRACE, NullTrace
from vmferry.migration.xbzrle import XbzrleSource
from vmferry.stream.compression import Compressor
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Command, CommandCode
from vmferry.transport.bandwidth import RateLimiter
from vmferry.transport.channel import Channel

log = logging.getLogger("vmferry.migration")
S = MigrationStatus

# How long a failed send waits for the destination's reason on the return path.
RETURN_PATH_LAST_WORD_S = 2.0
ACK_TIMEOUT_S = 30.0
# How long `migrate` with resume waits for the paused migration's thread to finish closing.
RESUME_WAIT_S = 5.0
# How long the source waits, before pausing, for the destination to catch up with what is in
# flight (a few ms usually; bounded so a stalled destination cannot hold the migration).
DRAIN_S = 0.25
# Postcopy's early discard: how long the source waits, its guest still running, for the
# destination to drop the stale copies before it stops the vCPUs (measured 57-291 ms for 45 000-
# 170 000 pages; a longer wait only delays the switch, a shorter one puts the rest in the pause).
POSTCOPY_DRAIN_S = 1.0
# x-postcopy-reconnect: how often the source starts a new attempt to connect to the destination.
RECONNECT_S = 0.05
# Postcopy's send buffer (the kernel doubles it): ~0.1 ms of a 1 GB/s link queued below the push.
POSTCOPY_SNDBUF = 64 << 10


@dataclass(frozen=True)
class MultifdSetup:
    """Capability `multifd` with its parameters, read when `migrate` started; `connect` opens
    one more connection to the destination (same URI, same TLS)."""

    channels: int
    compression: str
    zlib_level: int
    zstd_level: int
    connect: Callable[[], Channel]


class OutgoingMigration:
    def __init__(
        self,
        machine: Machine,
        devices: DeviceStateSaver,
        channel: Future[Channel],
        params: MigrationParameters,
        state: MigrationState,
        on_pass: Callable[[int], None] | None = None,
        trace: NullTrace = NULL_TRACE,
        copy_drives: Sequence[str] = (),
        block_compressor: Compressor | None = None,
        auto_converge: bool = False,
        dirty_limit: bool = False,
        multifd: MultifdSetup | None = None,
        postcopy: bool = False,
        reconnect: Callable[[], Channel] | None = None,
        preempt: Callable[[], Channel] | None = None,
        xbzrle_cache: int | None = None,
    ) -> None:
        """`copy_drives`: ids of the drives whose contents go in the stream (migration/block.py);
        the others are shared; `block_compressor`: x-block-compression's, for their blocks.
        `xbzrle_cache`: capability xbzrle's cache size in bytes (None: off).
        `auto_converge` / `dirty_limit`: the capabilities (at most one; dirty_limit needs the
        machine's dirty ring)."""
        if dirty_limit and machine.dirty_limiter is None:
            raise MigrationError("dirty-limit requires KVM with accelerator property 'dirty-ring-size' set")
        if dirty_limit and auto_converge:
            raise MigrationError("dirty-limit conflicts with auto-converge "
                                 "either of then available currently")
        self.machine = machine
        self.multifd = multifd
        self.data_channels: list[Channel] = []
        self.sender: MultifdSender | None = None
        self._main_sent = 0
        self.devices = devices
        self._channel_future = channel
        self.channel: Channel | None = None  # once connected, on the migration thread
        self.params = params
        self.state = state
        self.stats = MigrationStats()
        self.on_pass = on_pass
        self.trace = trace
        self.encoder = StreamEncoder(machine_type=machine.machine_type.name)
        self.ram = RamSaver(machine.ram_blocks, self.encoder)
        if xbzrle_cache is not None:
            self.ram.xbzrle = XbzrleSource(xbzrle_cache, PAGE_SIZE, [b.npages for b in machine.ram_blocks])
        self.drives = DriveSaver(machine.block_devices, copy_drives, block_compressor)
        self.session: SourceSession | None = None
        self.limiter = RateLimiter(params.max_bandwidth)
        self.return_path: ReturnPathReader | None = None
        self._cancel = threading.Event()
        self._paused_by_us = False
        self._end_sent = False
        # Postcopy (migration/postcopy.py): capability postcopy-ram when `migrate` started;
        # migrate-start-postcopy sets the request; RUN sent = the destination may run the guest.
        self.postcopy_enabled = postcopy
        self._postcopy_requested = threading.Event()
        self.postcopy: PostcopySource | None = None
        self._run_sent = False
        # Stream bytes up to and including POSTCOPY_RUN: a PROGRESS that covers them says the
        # guest runs on the destination, which ends postcopy's downtime (None: not waiting).
        self._run_offset: int | None = None
        self.postcopy_pause_reason: str | None = None
        self._pause_requested: str | None = None
        # x-postcopy-reconnect: opens a new connection to `migrate`'s address (same TLS)
        self._reconnect = reconnect
        # postcopy-preempt (migration/preempt.py): opens the preempt channel (same address, same
        # TLS); the channel once open. Not opened again after a recovery.
        self._preempt_connect = preempt
        self.preempt: PreemptSender | None = None
        self.watchdog: Watchdog | None = None
        self._silence: str | None = None  # the watchdog's reason, once the destination went silent
        self._beat_at = 0.0  # when the stream last carried anything
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)
        self.auto_converge = AutoConverge() if auto_converge else None
        self.dirty_limit = DirtyLimitConverge() if dirty_limit else None
        self.dirty_limit_pass: int | None = None  # the pass after whose sync the limit was first set
        self.stats.total_bytes = sum(b.nbytes for b in machine.ram_blocks)

    # --- control, from the monitor thread ---

    def start(self) -> None:
        self.stats.begin()
        self.state.set(S.SETUP)
        self._thread.start()

    def start_postcopy(self) -> None:
        """migrate-start-postcopy: switch at the next step of the current pass (also during
        setup or the first pass)."""
        if not self.postcopy_enabled:
            raise MigrationError("Enable postcopy with migrate_set_capability before the start of migration")
        self._postcopy_requested.set()

    def resume(self, channel: Future[Channel]) -> None:
        """`migrate` with resume: a paused postcopy goes on over a new connection (the monitor
        thread; the work is on a new migration thread)."""
        if self.state.status == S.POSTCOPY_PAUSED and self._thread.is_alive():
            # The state says paused before the failed thread has closed its channel and joined
            # its return-path reader (up to a second): a resume right away waits for that.
            self._thread.join(RESUME_WAIT_S)
        if self.state.status != S.POSTCOPY_PAUSED or self._thread.is_alive():
            raise MigrationError("Cannot resume if there is no paused migration")
        self._channel_future = channel
        self._silence = None
        self._pause_requested = None
        with self.stats.lock:
            self.stats.error = None
        self.state.set(S.POSTCOPY_RECOVER)
        self._thread = threading.Thread(target=self._resume_run, name="migration", daemon=True)
        self._thread.start()

    def pause_postcopy(self) -> None:
        """migrate-pause: break the connection of an active postcopy on purpose; both sides go
        to postcopy-paused and a recovery continues it."""
        if self.state.status not in (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER) or not self._run_sent:
            raise MigrationError("migrate-pause is only for a postcopy migration after the switch "
                                 f"(this one is {self.state.status})")
        self._pause_requested = "paused by migrate-pause"
        if self.channel is not None:
            self.channel.shutdown()

    @property
    def postcopy_started(self) -> bool:
        """The destination may be running the guest (RUN went out): cancelling is over."""
        return self._run_sent

    def cancel(self) -> None:
        """migrate_cancel: the source keeps running. Ignored once END is out (see module doc)
        and once postcopy's RUN is out (the control refuses that cancel by name)."""
        if self._end_sent or self._run_sent:
            return
        self._cancel.set()
        for frm in (S.SETUP, S.ACTIVE, S.DEVICE, S.POSTCOPY_ACTIVE):
            if self.state.try_set(frm, S.CANCELLING):
                break
        if self.channel is not None:
            self.channel.shutdown()
        for ch in list(self.data_channels):
            ch.shutdown()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # --- the SaverOutput the session writes through ---

    def send(self, bufs: Sequence[bytes | bytearray | memoryview]) -> int:
        assert self.channel is not None
        n = self.channel.sendmsg(bufs)
        self._main_sent += n
        if self.sender is not None:
            self.stats.multifd_bytes = self.sender.sent_bytes()
        self.stats.transferred = self._main_sent + self.stats.multifd_bytes
        return self._limit(n)

    def _bandwidth_cap(self) -> float:
        """max-bandwidth (wire bytes/s) in the session's units (main stream bytes plus page bytes
        before compression): scaled by what the wire carried per unit so far."""
        cap = self.params.max_bandwidth
        if not cap:
            return 0.0
        wire, units = self.stats.transferred, self._sent_all()
        return cap * units / wire if wire > 0 and units > 0 else float(cap)

    def _sent_all(self) -> int:
        """What PROGRESS reports are compared with: main stream bytes plus the data channels'
        page bytes, uncompressed (SourceSession.sent_total)."""
        return self._main_sent + (self.sender.page_bytes_sent() if self.sender is not None else 0)

    def _limit(self, n: int, main: bool = True) -> int:
        """max-bandwidth over the main stream and every data channel together (the limiter is
        thread-safe)."""
        limit = self.params.max_bandwidth  # migrate-set-parameters takes effect at once
        if limit != self.limiter.bytes_per_s:
            self.limiter.set_limit(limit)
        self.limiter.record(n)
        if main:
            self._beat_at = time.monotonic()  # the main stream just carried something
        if limit and not self.limiter.wait(self._stop_waiting if main else self._stopped):
            raise MigrationError(self._silence or "migration cancelled")
        return n

    def _send_data(self, i: int, bufs: Sequence[bytes | bytearray | memoryview]) -> int:
        """A multifd sender thread writes on data channel i (never beats: only the migration
        thread writes on the main stream)."""
        n = self.data_channels[i].sendmsg(bufs)
        return self._limit(n, main=False)

    def _stopped(self) -> bool:
        return self._cancel.is_set() or self._silence is not None

    def _stop_waiting(self) -> bool:
        """The rate limit's wait: beat while held; stop on cancel or a silent destination."""
        self._maybe_beat()
        return self._cancel.is_set() or self._silence is not None

    def _maybe_beat(self, now: bool = False) -> None:
        """A HEARTBEAT into the stream if it has been quiet for an interval. Only between
        records (the encoder's digest covers every record in order), so only on this thread."""
        wd = self.watchdog
        if wd is None or not wd.enabled or self._end_sent or self.channel is None:
            return
        if not now and time.monotonic() - self._beat_at < wd.interval_s:
            return
        n = self.channel.sendmsg([self.encoder.encode(Command(CommandCode.HEARTBEAT))])
        self._beat_at = time.monotonic()
        self._main_sent += n
        self.stats.transferred += n
        if self.session is not None:
            self.session.sent += n

    def _stall_limit_s(self) -> float | None:
        """How long a data channel may sit with unsent bytes before it is lost: the heartbeat
        limit, once the destination beats (None: heartbeats off or not spoken). None too while
        the destination itself has been quiet for 2 intervals: a destination that stopped
        altogether is the watchdog's to report, by its own name, not each channel's."""
        wd = self.watchdog
        if wd is None or not wd.enabled or not wd.armed:
            return None
        return None if self._destination_quiet_for() > 2 * wd.interval_s else wd.limit_s

    def _destination_quiet_for(self) -> float:
        rp = self.return_path
        return 0.0 if rp is None else time.monotonic() - rp.heard_at

    def _destination_silent(self, reason: str) -> None:
        """From the watchdog: give up on the destination, interrupting a blocked send."""
        self._silence = reason
        if self.channel is not None:
            self.channel.shutdown()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # --- the migration thread ---

    def _run(self) -> None:
        try:
            self.channel = self._connected()
            self._setup()
            self.state.set(S.ACTIVE)
            if not self._postcopy_requested.is_set():
                self._iterate()
            if self._postcopy_requested.is_set():
                self._postcopy()
            else:
                self._switch_over()
        except BaseException as e:  # noqa: BLE001 - every failure must end in a defined state
            self._fail(e)
        finally:
            gc.enable()
            gc.unfreeze()
            if self.sender is not None:
                self.sender.stop()
            if self.preempt is not None:
                self.preempt.close()
            for ch in self.data_channels:
                with contextlib.suppress(VmferryError, OSError):
                    ch.close()
            if self.session is not None:
                self.session.cleanup()
            else:
                self.ram.cleanup()
            self.stats.end_ns = time.monotonic_ns()
            if self.watchdog is not None:
                self.watchdog.stop()
            self._unthrottle()
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
            self.watchdog = Watchdog(self.params.x_heartbeat_ms, self._destination_quiet_for,
                                     self._destination_silent, peer="destination")
            self.return_path = ReturnPathReader(self.channel, sent=self._sent_all,
                                                on_heartbeat=self.watchdog.arm)
            self.return_path.start()
            self.watchdog.start()
        config = {
            "producer": f"vmferry {__version__}",
            "machine-type": self.machine.machine_type.name,
            "memory": self.machine.memory,
            "smp": self.machine.smp,
            "return-path": self.channel.has_return_path,
        }
        migration_id = uuid.uuid4().hex
        if self._preempt_connect is not None:
            # preempt-requests: the destination's PAGE_REQUESTs come on the preempt channel too
            config.update({"postcopy-preempt": True, "preempt-requests": True, "migration-id": migration_id})
        if self.drives.compressor is not None:
            config["block-compression"] = self.drives.compressor.setting
        if self.ram.xbzrle is not None:
            config["xbzrle-cache-size"] = self.ram.xbzrle.cache.cache_bytes
        if self.multifd is not None:
            config.update({"multifd-channels": self.multifd.channels, "migration-id": migration_id,
                           "multifd-compression": self.multifd.compression})
        # The destination's PROGRESS counts the bytes it applied over all channels (main and data).
        self.session = SourceSession([self.ram, self.drives, DeviceSaver(self.devices)], self.encoder, config,
                                     lambda: self.params.downtime_limit,
                                     end_to_end=self.return_path is not None,
                                     bandwidth_cap=self._bandwidth_cap)
        self.ram.bandwidth = self.session.bandwidth  # XBZRLE weighs its CPU time in bytes
        self.drives.bandwidth = self.session.bandwidth  # so does a compressing drive
        self.session.setup(self, time.monotonic())
        if self.postcopy_enabled:
            if self.return_path is None:
                raise MigrationError("postcopy-ram needs a return path (tcp:, unix: or a socket fd:): "
                                     "the destination requests pages on it")
            self.session.send(self, [self.encoder.encode(Command(CommandCode.POSTCOPY_ADVISE))])
            testpoint.reached("postcopy-advise")
        self._maybe_beat(now=True)  # tells the destination that this source beats
        if self.multifd is not None:
            self._open_data_channels(migration_id)
        if self._preempt_connect is not None:
            try:
                self.preempt = PreemptSender(self._preempt_connect(), migration_id,
                                             block_table(self.machine.ram_blocks),
                                             self.machine.machine_type.name)
            except VmferryError as e:
                raise MigrationError(f"postcopy-preempt: the preempt channel could not connect: {e}"
                                     ) from None
        # Objects alive now (the whole VMM) are never garbage; frozen, a collection during the
        # migration only scans what the migration allocates, and stays short.
        gc.freeze()
        self.stats.unpopulated = self.ram.unpopulated
        self.stats.remaining_pages = self.ram.remaining()
        self.stats.dirty_sync_count = 1  # the setup's bitmap counts as the first sync, as in QEMU
        if self.auto_converge is not None:
            self.auto_converge.start(time.monotonic(), self.stats.transferred)
        if self.dirty_limit is not None:
            self.dirty_limit.start(time.monotonic(), self.stats.transferred)
        self.stats.setup_end_ns = time.monotonic_ns()
        self.trace.event("setup", pages_to_send=self.stats.remaining_pages,
                         unpopulated_pages=self.stats.unpopulated)
        log.info("migration setup done: %d pages to send, %d never populated",
                 self.stats.remaining_pages, self.stats.unpopulated)

    def _open_data_channels(self, migration_id: str) -> None:
        """After CONFIG went out (the destination accepts the data channels once it read it):
        N more connections, each with its own encoder, compressor and sender thread."""
        m = self.multifd
        assert m is not None
        table = block_table(self.machine.ram_blocks)
        encoders = []
        for i in range(m.channels):
            if self._cancel.is_set():
                raise MigrationError("migration cancelled")
            try:
                self.data_channels.append(m.connect())
            except VmferryError as e:
                raise MigrationError(f"multifd channel {i} could not connect: {e}") from None
            encoders.append(DataChannelEncoder(migration_id, i, m.channels, table,
                                               Compressor(m.compression, m.zlib_level, m.zstd_level),
                                               self.machine.machine_type.name))
        self.sender = MultifdSender(self.data_channels, encoders, self._send_data, self._stopped,
                                    {i + 1: b.npages for i, b in enumerate(self.machine.ram_blocks)},
                                    lambda i: self.data_channels[i].shutdown(), on_wait=self._maybe_beat,
                                    stall_limit_s=self._stall_limit_s)
        self.sender.start()
        self.ram.multifd = self.sender

    def _take_progress(self) -> None:
        if self.return_path is not None and self.session is not None:
            for applied, sent_then, at in self.return_path.take_progress():
                self.session.progress(applied, sent_then, at)
                if self._run_offset is not None and applied >= self._run_offset:
                    self._guest_runs_there(at)

    def _iterate(self) -> None:
        session = self.session
        assert session is not None
        while True:
            self._take_progress()
            self._maybe_beat()
            if self._postcopy_requested.is_set():
                return
            step = session.step(self, time.monotonic)
            if step.pass_started and self.on_pass is not None:
                self.on_pass(step.pass_started)
            sent, zero, _ = session.pages()
            with self.stats.lock:
                self.stats.normal, self.stats.duplicate = sent, zero
                self.stats.precopy_bytes = self.ram.counters.bytes
                if self.sender is not None:
                    self.stats.multifd_bytes = self.sender.sent_bytes()
                    self.stats.transferred = self._main_sent + self.stats.multifd_bytes
                    self.stats.multifd_lost = [f"channel {i}: {why}" for i, why in self.sender.lost]
            report = step.report
            if report is not None and self.ram.xbzrle is not None:
                self.ram.xbzrle.counters.end_period()
            self._xbzrle_stats()
            if report is not None:
                with self.stats.lock:
                    self.stats.dirty_sync_count += 1
                    self.stats.passes.append(report)
                    self.stats.remaining_pages = report.dirty_pages_after
                    self.stats.bandwidth_bps = session.bandwidth()
                    self.stats.dirty_rate_pps = report.dirty_rate_pps
                    self.stats.dirty_rate_bps = report.dirty_rate_bps
                    self.stats.expected_downtime_ms = report.expected_downtime_ms
                self._trace_pass(report, step.sync_ms)
                if not report.held:
                    # A pass that held RAM back (the copied drives go first) says nothing about
                    # whether RAM converges: RAM's backlog is all still there by design.
                    self._throttle_after_sync(report.dirty_pages_after)
                    self._dirty_limit_after_sync(report)
                    self._maybe_auto_postcopy(report)
            if self._cancel.is_set():
                raise MigrationError("migration cancelled")
            if step.switchover:
                self._drain()
                if self._cancel.is_set():
                    raise MigrationError("migration cancelled")
                if self.return_path is not None and self.return_path.shut_reason:
                    # The destination refused the stream: never pause the guest for it.
                    raise MigrationError("the destination gave up")
                if session.confirm_switchover():
                    return

    def _xbzrle_stats(self) -> None:
        if self.ram.xbzrle is not None:
            snapshot = self.ram.xbzrle.counters.as_qmp()
            with self.stats.lock:
                self.stats.xbzrle = snapshot

    def _trace_pass(self, report: PassReport, sync_ms: float) -> None:
        remaining = report.dirty_pages_after * PAGE_SIZE
        self.trace.event("sync", sync=self.stats.dirty_sync_count, dirty_pages=report.dirty_pages_after,
                         remaining_bytes=remaining, duration_ms=sync_ms)
        self.trace.event(  # throttle: auto-converge's, in force during this pass (set at earlier syncs)
            "pass", pass_=report.number, duration_ms=report.duration_s * 1000, bytes=report.bytes_sent,
            pages=report.pages_sent, zero_pages=report.zero_pages,
            unpopulated_pages=self.stats.unpopulated if report.number == 1 else 0,
            transferred_bytes=self.stats.transferred, remaining_bytes=remaining,
            bandwidth_bps=report.bandwidth_bps, dirty_rate_bps=report.dirty_rate_pps * PAGE_SIZE,
            expected_downtime_ms=report.expected_downtime_ms,
            throttle_percent=self.stats.cpu_throttle_percentage, held=list(report.held))
    def _throttle_after_sync(self, dirty_pages: int) -> None:
        """auto-converge's evaluation after a sync (migration/throttle.py)."""
        if self.auto_converge is None:
            return
        p = self.params.snapshot()
        tp = ThrottleParams(p.throttle_trigger_threshold, p.cpu_throttle_initial, p.cpu_throttle_increment,
                            p.cpu_throttle_tailslow, p.max_cpu_throttle)
        new = self.auto_converge.on_sync(time.monotonic(), dirty_pages, self.stats.transferred, tp)
        if new is not None:
            log.info("auto-converge: vCPUs throttled to %d %%", new)
            self.machine.set_cpu_throttle(new)
            self.stats.cpu_throttle_percentage = new

    def _dirty_limit_after_sync(self, report: PassReport) -> None:
        """dirty-limit's evaluation after a sync: the same trigger; when it fires, every vCPU
        gets vcpu-dirty-limit as its quota (machine/dirty_limit.py measures and throttles)."""
        limiter = self.machine.dirty_limiter
        if self.dirty_limit is None or limiter is None:
            return
        p = self.params.snapshot()
        quota = self.dirty_limit.on_sync(time.monotonic(), report.dirty_pages_after, self.stats.transferred,
                                         p.throttle_trigger_threshold, p.vcpu_dirty_limit)
        if quota is None:
            return
        if self.dirty_limit_pass is None:
            self.dirty_limit_pass = report.number
        log.info("dirty-limit: every vCPU limited to %d MB/s after pass %d", quota, report.number)
        limiter.period_ms = lambda: self.params.x_vcpu_dirty_limit_period
        limiter.set(None, quota)

    def _unthrottle(self) -> None:
        """The throttle ends with the migration, whatever its end: the source runs at full speed.
        Called before the final state is set, and again (a no-op by then) in _run's finally."""
        if self.auto_converge is not None and self.machine.cpu_throttle_percentage:
            self.machine.set_cpu_throttle(0)
        self.stats.cpu_throttle_percentage = 0
        limiter = self.machine.dirty_limiter
        if self.dirty_limit is not None and limiter is not None:
            # As QEMU: the migration lifts every vCPU's limit, however it was set.
            limiter.cancel(None)
            limiter.period_ms = lambda: DIRTY_LIMIT_PERIOD_MS

    def _drain(self, limit_s: float = DRAIN_S) -> None:
        """Wait (at most `limit_s`) until the destination has applied everything sent, so the
        pause starts with nothing in flight."""
        session = self.session
        rp = self.return_path
        if rp is None or session is None:
            return
        deadline = time.monotonic() + limit_s
        while True:
            self._take_progress()
            now = time.monotonic()
            if session.backlog() == 0 or rp.closed.is_set() or self._cancel.is_set():
                return
            if now >= deadline:
                log.warning("switchover: %d bytes still in flight after waiting %.2f s for the "
                         "destination", session.backlog(), limit_s)
                return
            rp.wait_progress(min(deadline - now, 0.05))
            self._maybe_beat()

    def _switch_over(self) -> None:
        session = self.session
        assert session is not None
        # No garbage collection while the guest is stopped: a full collection costs tens of ms
        # here (measured 50 ms under load). Re-enabled in _run's finally.
        gc.disable()
        t0 = time.monotonic()
        self.stats.stop_ns = time.monotonic_ns()
        if self.machine.running:
            self.machine.pause()
            self._paused_by_us = True
        self.state.set(S.DEVICE)
        t_paused = time.monotonic()
        before = self.stats.transferred
        phases = session.complete(self, time.monotonic)
        if self._cancel.is_set():
            raise MigrationError("migration cancelled")
        self._end_sent = True  # from here the destination may start the guest
        t = time.monotonic()
        session.end(self)
        t_end = time.monotonic()
        phases["end"] = round((t_end - t) * 1000, 3)
        sent, zero, _ = session.pages()
        if self.ram.xbzrle is not None:
            self.ram.xbzrle.counters.end_period()  # the stopped part is a period of its own
        self._xbzrle_stats()
        with self.stats.lock:
            self.stats.dirty_sync_count += 1
            self.stats.normal, self.stats.duplicate = sent, zero
            if self.sender is not None:
                self.stats.multifd_bytes = self.sender.sent_bytes()
                self.stats.transferred = self._main_sent + self.stats.multifd_bytes
                self.stats.multifd_lost = [f"channel {i}: {why}" for i, why in self.sender.lost]
            self.stats.downtime_bytes = self.stats.transferred - before
            self.stats.remaining_pages = 0
            self.stats.expected_at_switchover_ms = session.expected_at_switchover_ms
        pages, sync_ms = self.ram.final_sync
        self.trace.event("sync", sync=self.stats.dirty_sync_count, dirty_pages=pages,
                         remaining_bytes=pages * PAGE_SIZE, duration_ms=sync_ms)
        if self.return_path is not None:
            self._wait_for_ack()
        else:
            assert self.channel is not None
            self.channel.close()  # flushes a file; reaps an exec: child, surfacing its failure
        t_done = time.monotonic()
        self.stats.downtime_ms = (time.monotonic_ns() - self.stats.stop_ns) / 1e6
        # Where the downtime went: pausing the vCPUs, each saver's stopped part, END, and the
        # destination confirming — of which, as it measured them, applying the staged state and
        # starting the guest.
        self.stats.downtime_phases = {"pause": round((t_paused - t0) * 1000, 3), **phases,
                                      "confirm": round((t_done - t_end) * 1000, 3)}
        if self.return_path is not None:
            for key in ("apply", "start"):
                if key in self.return_path.ack_timings:
                    self.stats.downtime_phases[f"destination-{key}"] = self.return_path.ack_timings[key]
        self.trace.event("downtime", downtime_ms=self.stats.downtime_ms, bytes=self.stats.downtime_bytes,
                         phases=self.stats.downtime_phases)
        self._unthrottle()  # before the state says it ended: query-migrate never shows both
        self.state.set(S.COMPLETED)
        log.info("migration completed: downtime %.1f ms (%s); %d progress reports", self.stats.downtime_ms,
                 self.stats.downtime_phases, session.e2e.samples)

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

    # --- postcopy ---

    def _maybe_auto_postcopy(self, report: PassReport) -> None:
        """x-postcopy-after-ms: switch by itself when precopy's forecast says it will not make it
        within the budget (from the second pass on: pass 1 measured no dirty rate yet)."""
        budget = self.params.x_postcopy_after_ms
        session = self.session
        if not (self.postcopy_enabled and budget and report.number >= 2 and session is not None):
            return
        elapsed = (time.monotonic_ns() - self.stats.start_ns) / 1e9
        populated = self.stats.total_bytes - self.stats.unpopulated * PAGE_SIZE
        why = precopy_overruns(elapsed, session.pending() + session.backlog(),
                               report.dirty_rate_pps * PAGE_SIZE, session.bandwidth(),
                               self.params.downtime_limit, populated, budget)
        if why is not None:
            log.info("switching to postcopy by itself (x-postcopy-after-ms): %s", why)
            self.stats.auto_postcopy = why
            self._postcopy_requested.set()

    def _postcopy(self) -> None:
        """The switch to postcopy. While the guest still runs here: sync, stop precopy and send
        every page still to send as the early discard (D1), and wait (at most
        POSTCOPY_DRAIN_S) until the destination has applied it and everything before it. Then
        stop the vCPUs, sync again and discard what that adds (D2: the pages written since D1;
        SwitchDiscards says why D1 ∪ D2 holds every stale page), LISTEN, the other savers' rest
        (drives, device state), RUN; then push the rest of RAM, requested pages first, END, and
        wait for the ACK."""
        session, rp = self.session, self.return_path
        assert session is not None and rp is not None and self.channel is not None
        switch = SwitchDiscards(self.ram.blocks)
        t_early = time.monotonic()
        self.ram.sync()
        early = switch.early(self.ram.take_pending())  # from here no precopy page is sent
        session.send(self, [self.encoder.encode(c) for c in early])
        self._drain(POSTCOPY_DRAIN_S)  # the guest still runs here: the early discard is applied there
        early_ms = round((time.monotonic() - t_early) * 1000, 3)
        if self._cancel.is_set():
            raise MigrationError("migration cancelled")
        if rp.shut_reason:  # the destination refused the stream: never pause the guest for it
            raise MigrationError(f"the destination gave up: {rp.shut_reason}")
        gc.disable()  # as in _switch_over: no collection while the vCPUs are stopped
        self.state.set(S.POSTCOPY_ACTIVE)
        t0 = time.monotonic()
        self.stats.stop_ns = time.monotonic_ns()
        if self.machine.running:
            self.machine.pause()
            self._paused_by_us = True
        t_paused = time.monotonic()
        self.ram.sync()
        late, pending = switch.final(self.ram.take_pending())
        pc = self.postcopy = PostcopySource(self.ram.blocks, self.encoder, pending)
        early_pages = sum(c.count for c in early)
        late_pages = sum(c.count for c in late)
        with self.stats.lock:
            self.stats.postcopy_early_discard = {"pages": early_pages, "ms": early_ms,
                                                 "late-pages": late_pages}
        log.info("postcopy: %d pages to send after the switch (%d discarded early, %.0f ms before "
                 "the pause; %d more at the switch)", pc.total, early_pages, early_ms, late_pages)
        cmds = [*late, Command(CommandCode.POSTCOPY_LISTEN)]
        session.send(self, [self.encoder.encode(c) for c in cmds])
        t_discard = time.monotonic()
        testpoint.reached("postcopy-discard")
        phases = session.complete(self, time.monotonic, skip=(self.ram,))
        if self._cancel.is_set():
            raise MigrationError("migration cancelled")
        t_devices = time.monotonic()
        session.send(self, [self.encoder.encode(Command(CommandCode.POSTCOPY_RUN))])
        self._run_sent = True  # from here the destination may run the guest
        self._run_offset = session.sent_total()
        t_run = time.monotonic()
        testpoint.reached("postcopy-run")
        with self.stats.lock:
            # Until the destination says the guest runs there (_guest_runs_there): RUN written.
            self.stats.downtime_ms = (time.monotonic_ns() - self.stats.stop_ns) / 1e6
            self.stats.downtime_phases = {"pause": round((t_paused - t0) * 1000, 3),
                                          "postcopy-discard": round((t_discard - t_paused) * 1000, 3),
                                          **phases, "postcopy-run": round((t_run - t_devices) * 1000, 3)}
            self.stats.remaining_pages = pc.left
        self._unthrottle()
        self._postcopy_push()

    def _guest_runs_there(self, at: float) -> None:
        """A PROGRESS covering POSTCOPY_RUN arrived at `at` (the destination sends one as soon as
        its guest runs, migration/destination.py): postcopy's downtime ends there, not when RUN
        was written, so it holds the destination's discard, device load and start too."""
        run_written_ms = self.stats.downtime_ms
        self._run_offset = None
        with self.stats.lock:
            self.stats.downtime_ms = max(run_written_ms, at * 1000 - self.stats.stop_ns / 1e6)
            waited = self.stats.downtime_ms - run_written_ms
            self.stats.downtime_phases["postcopy-guest-runs"] = round(waited, 3)
        self.trace.event("downtime", downtime_ms=self.stats.downtime_ms, bytes=0,
                         phases=self.stats.downtime_phases)

    def _postcopy_push(self) -> None:
        """After RUN: the rest of RAM, requested pages first, then END and the ACK."""
        session, pc, rp = self.session, self.postcopy, self.return_path
        assert session is not None and pc is not None and rp is not None
        preempt = self.preempt
        if preempt is not None:  # requests come and pages go on the preempt channel, its own thread
            preempt.start(pc)
        # Requests on the return path (no preempt channel, or the destination lost it): the push
        # sends them first on the main stream.
        rp.on_page_request = pc.request
        _small_send_buffer(self.channel)
        send = lambda bufs: session.send(_Unlimited(self), bufs)  # noqa: E731 - the push's output
        # max-postcopy-bandwidth paces the background push only: a requested page never waits.
        limiter = RateLimiter(self.params.max_postcopy_bandwidth)
        while not pc.done():
            if self._silence is not None or self._pause_requested is not None:
                raise MigrationError(self._silence or self._pause_requested or "")
            if rp.closed.is_set() and not pc.done():
                raise MigrationError(rp.shut_reason or "the destination closed the connection")
            if preempt is not None and preempt.error is not None:
                raise MigrationError(preempt.error)
            self._take_progress()
            self._maybe_beat()
            limit = self.params.max_postcopy_bandwidth
            if limit != limiter.bytes_per_s:
                limiter.set_limit(limit)
            delay = limiter.delay_s()
            if delay > 0 and not pc.has_requests():
                pc.wakeup.wait(min(delay, 0.01))
                pc.wakeup.clear()
                continue
            limiter.record(pc.step(send, background=delay == 0))
            with self.stats.lock:
                self.stats.remaining_pages = pc.left
                self.stats.postcopy_requests = pc.requests
                self.stats.postcopy_bytes = pc.bytes
                self.stats.normal = self.ram.counters.pages + pc.pages
                self.stats.duplicate = self.ram.counters.zero_pages + pc.zero_pages
        pc.step(send)  # requests that came in meanwhile are for pages sent already: dropped
        if preempt is not None:
            preempt.finish()  # its END before the main stream's: the destination waits for both
        with self.stats.lock:  # the preempt thread may have sent the last pages
            self.stats.postcopy_requests = pc.requests
            self.stats.postcopy_bytes = pc.bytes
            self.stats.normal = self.ram.counters.pages + pc.pages
            self.stats.duplicate = self.ram.counters.zero_pages + pc.zero_pages
        restore_switch_interval()
        self._end_sent = True
        session.end(self)
        self._wait_for_ack()
        self._take_progress()
        if self._run_offset is not None:  # a destination that never said when its guest ran
            self._run_offset = None
            self.trace.event("downtime", downtime_ms=self.stats.downtime_ms, bytes=0,
                             phases=self.stats.downtime_phases)
        self.stats.remaining_pages = 0
        self.state.set(S.COMPLETED)
        log.info("postcopy completed: %d pages after the switch, %d requested", pc.total, pc.requests)

    def _resume_run(self) -> None:
        """The recovery's migration thread: a new stream (header, RAM_BLOCKS, POSTCOPY_RESUMED),
        the destination's RECEIVED_BITMAPs then RESUME on the new return path (the pages it has
        are not sent again; pages lost in flight are), then the push goes on to END."""
        session, pc = self.session, self.postcopy
        assert session is not None and pc is not None
        try:
            self.channel = self._connected()
            if not self.channel.has_return_path:
                raise MigrationError("a postcopy recovery needs a return path (tcp:, unix: or a socket fd:)")
            self.encoder = session.encoder = pc.encoder = StreamEncoder(
                machine_type=self.machine.machine_type.name)
            self.watchdog = Watchdog(self.params.x_heartbeat_ms, self._destination_quiet_for,
                                     self._destination_silent, peer="destination")
            rp = self.return_path = ReturnPathReader(self.channel, sent=self._sent_all,
                                                     on_heartbeat=self.watchdog.arm)
            rp.on_received_bitmap = pc.received_bitmap
            rp.start()
            self.watchdog.start()
            session.send(self, [self.encoder.header(), self.encoder.encode(block_table(self.ram.blocks)),
                                self.encoder.encode(Command(CommandCode.POSTCOPY_RESUMED))])
            testpoint.reached("postcopy-resumed")
            self._maybe_beat(now=True)
            # A destination answers at once (it beats on accept); one that says nothing for the
            # heartbeat limit is not there (a link that broke again, or something else that
            # accepted the connection): give up within that limit, so a reconnect tries again.
            wait_s = self.watchdog.limit_s if self.watchdog.enabled else ACK_TIMEOUT_S
            deadline = time.monotonic() + wait_s
            while not rp.resumed.wait(0.05):
                if rp.closed.is_set() or self._silence is not None or self._pause_requested:
                    raise MigrationError(self._silence or self._pause_requested or rp.shut_reason
                                         or "the destination closed the connection before RESUME")
                if time.monotonic() > deadline:
                    raise MigrationError("the destination did not answer the recovery within "
                                         f"{wait_s:.1f} s")
            log.info("postcopy recovered: %d pages still to send", pc.left)
            self.state.set(S.POSTCOPY_ACTIVE)
            self._postcopy_push()
        except BaseException as e:  # noqa: BLE001 - every failure must end in a defined state
            self._fail(e)
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            if self.channel is not None:
                with contextlib.suppress(VmferryError, OSError):
                    self.channel.close()
            if self.return_path is not None:
                self.return_path.join(1.0)
            self.stats.end_ns = time.monotonic_ns()

    def _postcopy_paused(self, e: BaseException) -> None:
        """A failure after RUN: neither side has the whole VM. The source keeps its vCPUs stopped
        and every page still to send, and waits for a recovery (`migrate` with resume)."""
        if self.preempt is not None:  # a recovery goes on without it (migration/preempt.py)
            self.preempt.close()
            self.preempt = None
        if self._pause_requested is not None:
            reason = self._pause_requested
        elif self._silence is not None:
            reason = self._silence
        elif self.return_path is not None and self.return_path.shut_reason:
            reason = f"the destination gave up: {self.return_path.shut_reason}"
        elif isinstance(e, VmferryError):
            reason = str(e)
        else:
            log.exception("postcopy push failed")
            reason = f"internal error: {type(e).__name__}: {e}"
        self.postcopy_pause_reason = reason
        with self.stats.lock:
            self.stats.error = f"postcopy paused: {reason}"
        if self.state.status != S.POSTCOPY_PAUSED:
            self.state.set(S.POSTCOPY_PAUSED)
        log.warning("postcopy paused: %s; the source keeps the guest stopped and waits for a recovery",
                    reason)
        if self._reconnect is not None and self.params.x_postcopy_reconnect and self._pause_requested is None:
            threading.Thread(target=self._reconnect_loop, args=(threading.current_thread(),),
                             name="postcopy-reconnect", daemon=True).start()

    def _reconnect_loop(self, paused_by: threading.Thread) -> None:
        """x-postcopy-reconnect: a new attempt to connect to `migrate`'s address every
        RECONNECT_S, each on a thread of its own and left running while the next starts; the
        first connection up resumes as `migrate` with resume would, and any that comes up later
        is closed. Stops when something else moved the migration on (a manual resume).

        Overlapping, because on a dead link a connect's SYN is lost and the kernel sends the
        next one only after its initial RTO (1 s): one attempt at a time can leave the link back
        up for up to a second before anything crosses it (bench/RESULTS.md)."""
        paused_by.join()
        assert self._reconnect is not None
        connect = self._reconnect
        up: queue.Queue[Channel] = queue.Queue()
        taken = threading.Event()
        lock = threading.Lock()

        def attempt() -> None:
            try:
                channel = connect()
            except (VmferryError, OSError) as e:
                log.debug("postcopy reconnect: %s", e)
                return
            with lock:
                late = taken.is_set()
                if not late:
                    up.put(channel)
            if late:
                channel.close()

        while self.state.status == S.POSTCOPY_PAUSED and not self._thread.is_alive():
            threading.Thread(target=attempt, name="postcopy-reconnect-attempt", daemon=True).start()
            try:
                channel = up.get(timeout=RECONNECT_S)
            except queue.Empty:
                continue
            with lock:
                taken.set()
                extra = []
                while not up.empty():
                    extra.append(up.get_nowait())
            for ch in extra:
                ch.close()
            done: Future[Channel] = Future()
            done.set_result(channel)
            try:
                self.resume(done)
                log.info("postcopy: reconnected to the destination by itself")
            except MigrationError:
                channel.close()  # resumed meanwhile by hand
            return
        taken.set()
        with lock:
            while not up.empty():
                up.get_nowait().close()

    def _fail(self, e: BaseException) -> None:
        if (isinstance(e, TransportError) and self.return_path is not None
                and not self.return_path.shut_reason):
            # A destination that refuses the stream says why on the return path, then closes:
            # our next write may fail (broken pipe) before the reader thread has read the why.
            # It reads to the end of a closed connection promptly; give it a moment.
            self.return_path.join(RETURN_PATH_LAST_WORD_S)
        self._unthrottle()  # before resuming the source and before the state says it ended
        # Only a SHUT command counts (a TLS alert also sets shut_reason, and may come after RUN).
        refused = self.return_path is not None and self.return_path.shut_received
        if self._run_sent and not refused:
            self._postcopy_paused(e)
            return
        # A SHUT after RUN: the destination refused before it started the guest (it never SHUTs
        # once the guest may run there), at RUN or, its link having broken between LISTEN and
        # RUN, when a recovery reached it: the source is still the only owner, and resumes.
        restore_switch_interval()
        if self._cancel.is_set() and not self._end_sent:
            reason = "cancelled"
        elif self._silence is not None:
            reason = self._silence
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


class _Unlimited:
    """The postcopy push's output: straight to the channel, counted, never rate-limited
    (max-bandwidth is precopy's; a limit here would hold back requested pages too)."""

    def __init__(self, mig: OutgoingMigration) -> None:
        self._mig = mig
        self.encoder = mig.encoder

    def send(self, bufs: Sequence[bytes | bytearray | memoryview]) -> int:
        mig = self._mig
        assert mig.channel is not None
        n = mig.channel.sendmsg(bufs)
        mig._main_sent += n
        mig.stats.transferred = mig._main_sent + mig.stats.multifd_bytes
        mig._beat_at = time.monotonic()
        return n

    def cancelled(self) -> bool:
        return self._mig.cancelled()


def _small_send_buffer(channel: Channel | None) -> None:
    """Postcopy: keep little queued in the kernel below the push, so a requested page is not
    sent behind megabytes of background pages (priority framing on one stream); and hand the GIL
    over sooner (see postcopy.SWITCH_INTERVAL_S)."""
    sock = getattr(channel, "socket", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, POSTCOPY_SNDBUF)
    short_switch_interval()


def _close_if_connected(fut: Future[Channel]) -> None:
    if fut.exception() is None:
        fut.result().close()
