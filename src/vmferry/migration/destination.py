"""The destination side: an incoming thread, so the destination's monitor stays live throughout.

A thin driver around `DestSession` (dest_session.py): it accepts the channel and feeds a
StreamDecoder whose `place` callback points RAM_PAGES payloads straight at guest memory (the
socket writes the pages there; the decoder then checks them); the session dispatches every
record to its loader (RAM, device state), which stages device sections without applying them.
Only after END — record count and running digest verified — do the loaders apply their state,
the vCPUs start and the ACK goes back on the return path. Along the way the destination reports
PROGRESS (stream bytes applied) per MiB and whenever it has caught up, so the source measures
what actually arrives. Any error before the end: the guest never starts, the source is told why
(SHUT), and `query-migrate` here says `failed` with the reason, naming the record.

Heartbeats (migration/heartbeat.py), on a channel with a return path: a HEARTBEAT goes back at
once when the source connects and then every x-heartbeat-ms (this side's parameter) from a
thread of its own. Once the source sent a HEARTBEAT, the watchdog fails the migration when this
side has been waiting for the stream for 3 intervals with nothing arriving (time spent applying
is not the source's silence), shutting the channel down; END disarms it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import select
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from vmferry.errors import MigrationError, StreamError, TransportError, VmferryError
from vmferry.machine.machine import Machine
from vmferry.migration import testpoint
from vmferry.migration.block import DriveLoader
from vmferry.migration.dest_session import DestSession
from vmferry.migration.device_state import DeviceLoader, DeviceStateLoader
from vmferry.migration.heartbeat import Watchdog
from vmferry.migration.multifd import ChannelLosses, DataChannelLost, DataChannelReceiver
from vmferry.migration.postcopy import (
    PostcopyLoader,
    PostcopyNeverRan,
    restore_switch_interval,
    short_switch_interval,
)
from vmferry.migration.preempt import PreemptLink, PreemptPages, PreemptReceiver, no_delay
from vmferry.migration.ram import RamLoader
from vmferry.migration.return_path import ReturnPathWriter
from vmferry.migration.state import MigrationState, MigrationStatus
from vmferry.migration.stats import MigrationStats
from vmferry.migration.trace import NULL_TRACE, NullTrace
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.records import Command, CommandCode, StreamHeader
from vmferry.transport.channel import Channel
from vmferry.transport.connect import Listener
from vmferry.transport.uri import FileUri

log = logging.getLogger("vmferry.migration")
S = MigrationStatus
CHUNK_BYTES = 1 << 20
DIRECT_BYTES = 64 << 10
PROGRESS_BYTES = 1 << 20
CAUGHT_UP_S = 0.001
# After refusing a stream: how long to read what the source still sends before closing.
DRAIN_BEFORE_CLOSE_S = 1.0
DATA_ACCEPT_S = 60.0  # how long the destination waits for a data channel (multifd)
# The postcopy step each command completes here (migration/testpoint.py's names).
_POSTCOPY_STEP = {CommandCode.POSTCOPY_ADVISE: "postcopy-advise",
                  CommandCode.POSTCOPY_LISTEN: "postcopy-listen",
                  CommandCode.POSTCOPY_RESUMED: "postcopy-resumed"}


@dataclass
class _ChannelWatch:
    """Per channel: its bytes when it last triggered a PROGRESS, when that was, and a poll for
    "more waiting?"."""

    reported: int = 0
    reported_at: float = 0.0
    poll: select.poll | None = None


class IncomingMigration:
    def __init__(
        self,
        machine: Machine,
        devices: DeviceStateLoader,
        listener: Listener,
        state: MigrationState,
        on_loaded: Callable[[], None],
        trace_opener: Callable[[], NullTrace] = lambda: NULL_TRACE,
        heartbeat_ms: Callable[[], int] = lambda: 1000,
        postcopy_enabled: Callable[[], bool] = lambda: False,
        relisten: Callable[[], Listener | None] = lambda: None,
        preempt_enabled: Callable[[], bool] = lambda: False,
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
        self.drives = DriveLoader(machine.block_devices)
        self.losses = ChannelLosses()
        self.device_loader = DeviceLoader(devices)
        self.postcopy = PostcopyLoader(self.ram, postcopy_enabled, self._page_request,
                                       machine.vcpu_thread_ids, self._postcopy_run, self._postcopy_resumed,
                                       self._resolver_died, preempt_link=self._preempt_link)
        self._resolver_error: str | None = None  # the fault resolver died: why
        self._eof = False  # the source's stream ended (closed or reset) before END
        self._pause_requested: str | None = None
        # x-postcopy-reconnect: a new listener on the address this side migrated on (None: off)
        self._relisten = relisten
        self._paused = False  # postcopy-paused: state is kept for a recovery
        self.bytes_at_run = 0  # stream bytes received when postcopy's RUN arrived
        self.session = DestSession([self.ram, self.drives, self.device_loader, self.losses, self.postcopy],
                                   check_header=self._check_header, check_config=self._check_config)
        self.channel: Channel | None = None
        self._rp: ReturnPathWriter | None = None
        self._reported = 0  # stream bytes (all channels) last reported in PROGRESS
        self._progress_lock = threading.Lock()
        self._holding_progress = False  # between RUN read and the guest started (_postcopy_run)
        self._main_watch = _ChannelWatch()
        self._decoder: StreamDecoder | None = None
        self.trace, self._trace_opener = NULL_TRACE, trace_opener  # opened when the source connects
        self._traced_pass = 0
        self._heartbeat_ms = heartbeat_ms  # read when the source connects
        self.watchdog: Watchdog | None = None
        self._waiting_since: float | None = None  # blocked reading the stream since then
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migration-incoming", daemon=True)
        # multifd: the data channels CONFIG announced, their threads, the first failure among them
        self.data_channels: list[Channel] = []
        self._data_threads: list[threading.Thread] = []
        self._receivers: list[DataChannelReceiver] = []
        self._data_error: str | None = None
        # postcopy-preempt (migration/preempt.py): this side's capability; the preempt channel's
        # connection, receiver and thread once CONFIG announced it (dropped at a postcopy pause).
        self._preempt_enabled = preempt_enabled
        self._preempt: tuple[Channel, PreemptReceiver, threading.Thread, PreemptLink] | None = None
        self._preempt_sink: PreemptPages | None = None  # what the channel placed, counted
        self._preempt_done = False  # the migration no longer needs it: its end is no failure
        self._preempt_page_bytes = 0

    @property
    def passes(self) -> int:
        return self.session.passes

    def start(self) -> None:
        self.stats.begin()
        self.state.set(S.SETUP)
        self._thread.start()

    def cancel(self) -> None:
        """migrate_cancel on the destination: stop receiving; the source is told and resumes."""
        self._cancel.set()
        self.listener.close()
        if self.channel is not None:
            # The return path already carries a header (and PROGRESS) once the thread set it up.
            rp = self._rp or ReturnPathWriter(self.channel)
            rp.shut("migration cancelled on the destination")
            self.channel.shutdown()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        # While the stream comes in nothing waits on the garbage collector: a full collection
        # costs tens of ms, and one falling between END and the guest's start is downtime. What
        # lives now is frozen (never garbage); collection resumes once the migration ended.
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            self.channel = self.listener.accept()
            if self._cancel.is_set():
                raise MigrationError("migration cancelled")
            if self.channel.has_return_path:
                self._rp = ReturnPathWriter(self.channel)
                self.watchdog = Watchdog(self._heartbeat_ms(), self._source_quiet_for,
                                         self._source_silent, beat=self._rp.heartbeat, peer="source")
                if self.watchdog.enabled:
                    self._rp.heartbeat()  # tells the source that this destination beats
                    self.watchdog.start()
            self.machine.park_vcpus()  # thread creation stays out of the downtime
            # The destination's clock starts when the source connects, not while it waited.
            self.stats.start_ns = self.stats.setup_end_ns = time.monotonic_ns()
            self.trace = self._trace_opener()
            self.state.set(S.ACTIVE)
            self._receive(self.channel)
            self._waiting_since = None  # END: nothing more to wait for from the source
            self._applied("ram", self.session.passes)
            if self.postcopy.running:
                self._finish_postcopy()
                return
            self._finish_data_channels()
            self._preempt_done = True  # precopy completed: the preempt channel carried nothing
            if self._receivers:
                self.stats.multifd_bytes = sum(rx.bytes_received for rx in self._receivers)
                self.stats.transferred += self.stats.multifd_bytes
                self._count()
            elapsed_s = (time.monotonic_ns() - self.stats.start_ns) / 1e9
            self.stats.bandwidth_bps = self.stats.transferred / elapsed_s if elapsed_s > 0 else 0.0
            t0 = time.monotonic()
            self.session.complete()
            self._applied("devices", self.session.passes)
            t1 = time.monotonic()
            self.on_loaded()
            self._applied("started", self.session.passes)
            t2 = time.monotonic()
            if self._rp is not None:
                self._rp.ack(self.session.record_count, {"apply": round((t1 - t0) * 1000, 3),
                                                         "start": round((t2 - t1) * 1000, 3)})
                self._rp.end()
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
            if self.postcopy.running:
                self._postcopy_paused(reason)
                return
            if self._link_broke_before_run(e):
                # The source may have written RUN (it sends it right after LISTEN): only this
                # side knows the guest never ran here; keep everything and answer a recovery.
                self._postcopy_paused(f"{reason}; after POSTCOPY_LISTEN, before POSTCOPY_RUN: the guest "
                                      "never ran here")
                return
            if self._rp is not None:
                self._rp.shut(reason)
            self.stats.error = reason
            self.stats.end_ns = time.monotonic_ns()
            if self.state.status not in (S.FAILED, S.CANCELLED):
                self.state.set(S.FAILED)
            log.error("incoming migration failed: %s", reason)
            if self._rp is not None and self.channel is not None and not self._cancel.is_set():
                _drain_before_close(self.channel)
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            self.listener.close()
            self._drop_preempt()
            for ch in self.data_channels:
                ch.shutdown()
            for t in self._data_threads:
                t.join(5.0)
            for ch in self.data_channels:
                ch.close()
            if not self._paused:
                self.session.release()
            if self.channel is not None:
                self.channel.close()
            gc.enable()
            gc.unfreeze()

    # --- postcopy (migration/postcopy.py) ---

    def _link_broke_before_run(self, e: BaseException) -> bool:
        """The connection broke (a peer gone or silent, not a refusal by either side) after
        POSTCOPY_LISTEN and before RUN arrived: the source may be paused after writing RUN."""
        dest = self.postcopy.dest
        if dest is None or dest.uffd is None or self.postcopy.running:
            return False
        if self._cancel.is_set() or self._data_error is not None or self._resolver_error is not None:
            return False
        fired = self.watchdog is not None and self.watchdog.fired is not None
        return fired or self._eof or isinstance(e, TransportError | OSError)

    def _resolver_died(self, why: str) -> None:
        """The fault resolver ended (its thread): after RUN the guest would hang on its next
        missing page, so the migration pauses naming it, and a recovery starts the resolver
        again; before RUN, RUN is refused (the source resumes the guest)."""
        self._resolver_error = why
        if self.postcopy.running and self.channel is not None:
            self.channel.shutdown()

    def _page_request(self, block_id: int, first_page: int, count: int) -> None:
        """The fault resolver's PAGE_REQUEST. A dead return path loses it quietly: the migration
        pauses, and a recovery asks again for every page a thread still waits on."""
        testpoint.fail("postcopy-resolver")  # on the resolver's thread, at its first request
        if self._rp is None:
            return
        try:
            self._rp.page_request(block_id, first_page, count)
        except (TransportError, OSError, ValueError) as e:
            log.debug("page request not sent: %s", e)
        self._request_counted()

    def _postcopy_run(self) -> None:
        """POSTCOPY_RUN: RAM is registered and the devices' sections are staged: apply them and
        start the guest while the rest of RAM arrives. The PROGRESS that first covers RUN goes
        out once the guest runs: the source ends postcopy's downtime when it arrives."""
        if self._resolver_error is not None:
            raise MigrationError(self._resolver_error)
        t0 = time.monotonic()
        with self._progress_lock:  # RUN is consumed already: no other thread may report it yet
            self._holding_progress = True
        try:
            _postcopy_latency_settings(self.channel)
            self.bytes_at_run = self.stats.transferred
            self.drives.complete()
            self.device_loader.complete()
            self._applied("devices", self.session.passes)
            testpoint.reached("postcopy-devices")
            # Past this line the guest may run here: a failure must pause, never SHUT (a SHUT after
            # RUN tells the source the guest never started here, and the source resumes it).
            self.postcopy.started()
            self.on_loaded()
            self._applied("started", self.session.passes)
            self.stats.downtime_phases = {"apply": round((time.monotonic() - t0) * 1000, 3)}
        finally:
            with self._progress_lock:
                self._holding_progress = False
        if self._rp is not None:  # the guest runs: tell the source now (it ends the downtime)
            with self._progress_lock:
                self._reported = max(self._reported, self._applied_total())
                # A link that fails here is found by the incoming thread's next read.
                with contextlib.suppress(TransportError, OSError, ValueError):
                    self._rp.progress(self._reported)
        self.state.set(S.POSTCOPY_ACTIVE)
        log.info("postcopy: the guest runs here; %d pages still to come",
                 self.postcopy.dest.pages_to_come if self.postcopy.dest else 0)

    def _finish_postcopy(self) -> None:
        """END after postcopy: every page to come has been placed; close the userfaultfd (pages
        never populated on the source become ordinary zero-fill pages), then ACK."""
        dest = self.postcopy.dest
        assert dest is not None
        self._finish_preempt()
        if not dest.all_placed():
            raise MigrationError(f"the stream ended with {dest.missing()} postcopy pages not sent")
        self.stats.postcopy = self._with_preempt(dest.report())
        latency, latencies = dest.fault_latency_snapshot()
        # One event for the whole postcopy, written after the last page arrived: a line per fault
        # from the resolver thread would cost time on the path it measures (docs/trace.md).
        self.trace.event("postcopy", requests=dest.requests, pages_placed=dest.pages_placed,
                         blocktime_ms=self.stats.postcopy.get("postcopy-blocktime", 0),
                         fault_latency=latency, fault_latencies_us=latencies)
        dest.close()
        restore_switch_interval()
        self._count()
        if self._rp is not None:
            self._rp.ack(self.session.record_count, {})
            self._rp.end()
        self.stats.end_ns = time.monotonic_ns()
        self.state.set(S.COMPLETED)
        log.info("postcopy completed: %d pages requested, %d placed after the switch", dest.requests,
                 dest.pages_placed)

    def recover(self, listener: Listener) -> None:
        """migrate-recover: accept the source's resumed stream on `listener` (on a new incoming
        thread); the migration stays postcopy-paused until the source connects."""
        if self.state.status != S.POSTCOPY_PAUSED:
            raise MigrationError("Migrate recover can only be run when postcopy is paused.")
        if self._thread.is_alive():  # an earlier migrate-recover still waits: this one replaces it
            self.listener.close()
            self._thread.join(5.0)
            if self._thread.is_alive():
                raise MigrationError("the previous migrate-recover is still being set up; try again")
        self.listener = listener
        self._pause_requested = None
        self._thread = threading.Thread(target=self._recover_run, name="migration-incoming", daemon=True)
        self._thread.start()

    def pause_postcopy(self) -> None:
        """migrate-pause on the destination: break the connection on purpose (postcopy-paused)."""
        if self.state.status not in (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER):
            raise MigrationError("migrate-pause is only for a postcopy migration after the switch "
                                 f"(this one is {self.state.status})")
        self._pause_requested = "paused by migrate-pause"
        if self.channel is not None:
            self.channel.shutdown()

    def _recover_run(self) -> None:
        """The recovery's incoming thread: the new stream starts with POSTCOPY_RESUMED (answered
        by _postcopy_resumed), then carries the rest of the pages to END."""
        try:
            channel = self.listener.accept()
            self.listener.close()
            self.channel = channel
            if not channel.has_return_path:
                raise MigrationError("a postcopy recovery needs a return path")
            self.state.set(S.POSTCOPY_RECOVER)
            self._rp = ReturnPathWriter(channel)
            self.watchdog = Watchdog(self._heartbeat_ms(), self._source_quiet_for, self._source_silent,
                                     beat=self._rp.heartbeat, peer="source")
            if self.watchdog.enabled:
                self._rp.heartbeat()
                self.watchdog.start()
            self._main_watch = _ChannelWatch()
            self._receive(channel)
            self._waiting_since = None
            if self.state.status != S.POSTCOPY_ACTIVE:
                raise MigrationError("the recovered stream ended without POSTCOPY_RESUMED")
            self._finish_postcopy()
            self._paused = False
        except BaseException as e:  # noqa: BLE001 - every failure must end in a defined state
            traceback.clear_frames(e.__traceback__)
            if isinstance(e, PostcopyNeverRan):
                self._never_ran(str(e))
            else:
                self._postcopy_paused(self._reason(e))
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            self.listener.close()
            if not self._paused:
                self.session.release()
            if self.channel is not None:
                self.channel.close()

    def _never_ran(self, reason: str) -> None:
        """A recovery reached this destination paused before RUN: tell the source (SHUT: it
        resumes the guest, which it still has whole) and fail; everything here is released."""
        if self._rp is not None:
            with contextlib.suppress(TransportError, OSError):
                self._rp.shut(reason)
        self._paused = False
        self.stats.error = reason
        self.stats.end_ns = time.monotonic_ns()
        self.state.set(S.FAILED)
        log.error("incoming migration failed: %s", reason)
        if self.channel is not None:
            _drain_before_close(self.channel)

    def _postcopy_resumed(self) -> None:
        """POSTCOPY_RESUMED arrived on the recovered stream: tell the source which pages are
        here, then RESUME."""
        assert self._rp is not None
        for bid, bitmap in self.postcopy.received_bitmaps():
            self._rp.received_bitmap(bid, bitmap)
        self._rp.resume()
        self.stats.error = None
        self._resolver_error = None
        self.state.set(S.POSTCOPY_ACTIVE)
        log.info("postcopy recovered: %d pages still to come",
                 self.postcopy.dest.missing() if self.postcopy.dest else 0)

    def _postcopy_paused(self, reason: str) -> None:
        """A failure after RUN: the guest runs here on what has arrived; threads touching a page
        still to come wait for it. Keep everything (userfaultfd, resolver, received pages) for a
        recovery; never exit on our own."""
        self._paused = True
        self._drop_preempt()  # a recovery goes on without it
        self._data_error = None  # its failure (in `reason` already) must not outlive the recovery
        if self._pause_requested is not None:
            reason = self._pause_requested
        self.stats.error = f"postcopy paused: {reason}"
        if self.state.status != S.POSTCOPY_PAUSED:
            self.state.set(S.POSTCOPY_PAUSED)
        log.warning("postcopy paused: %s; waiting for migrate-recover", reason)
        if self._pause_requested is None:
            threading.Thread(target=self._listen_again, args=(threading.current_thread(),),
                             name="postcopy-relisten", daemon=True).start()

    def _listen_again(self, paused_by: threading.Thread) -> None:
        """x-postcopy-reconnect: once the failed incoming thread has ended, listen again on the
        address the migration came in on, as migrate-recover would."""
        paused_by.join()
        if self.state.status != S.POSTCOPY_PAUSED or self._thread.is_alive():
            return
        try:
            listener = self._relisten()
        except VmferryError as e:
            log.warning("postcopy: cannot listen again for the source: %s", e)
            return
        if listener is None:
            return
        try:
            self.recover(listener)
            log.info("postcopy: listening again on %s for the source", listener.address)
        except MigrationError:
            listener.close()  # a migrate-recover by hand came first

    def postcopy_report(self) -> dict:
        """Live postcopy figures for query-migrate (the final ones once completed)."""
        dest = self.postcopy.dest
        if self.stats.postcopy or dest is None or dest.uffd is None:
            return dict(self.stats.postcopy)
        return self._with_preempt(dest.report())

    def _with_preempt(self, report: dict) -> dict:
        """x-postcopy's `preempt-page-bytes`: page bytes the preempt channel brought (while it is
        there; after a recovery, what it brought before the pause)."""
        if self._preempt is not None:
            self._preempt_page_bytes = self._preempt[1].page_bytes
        if self._preempt_enabled() or self._preempt_page_bytes:
            report["x-postcopy"]["preempt-page-bytes"] = self._preempt_page_bytes
        return report

    def close(self) -> None:
        """The VMM is exiting: close the userfaultfd before the VM's fds (a vCPU blocked on a
        page that never came must be woken, or it may be stuck in the kernel)."""
        self.postcopy.release()
        if self._paused:  # what postcopy-paused kept for a recovery (views of guest RAM too)
            self._paused = False
            self.session.release()

    def _reason(self, e: BaseException) -> str:
        if self._cancel.is_set():
            return "migration cancelled on the destination"
        if self._resolver_error is not None:
            return self._resolver_error
        if self.watchdog is not None and self.watchdog.fired:
            return self.watchdog.fired
        if self._data_error is not None:
            return self._data_error
        if isinstance(e, VmferryError):
            return str(e)
        log.exception("incoming migration thread failed")
        return f"internal error: {type(e).__name__}: {e}"

    def _receive(self, channel: Channel) -> None:
        """Read and load the whole stream, up to and including END."""
        dec = self._decoder = StreamDecoder(place=self.ram.place)
        chunk = memoryview(bytearray(CHUNK_BYTES))
        while True:
            # A large placed payload is received straight into guest memory; everything else
            # (headers, small records) in chunks fed to the decoder, one system call for many
            # records. Records are drained before the chunk is reused.
            target = dec.get_buffer()
            self._waiting_since = time.monotonic()
            if len(target) >= DIRECT_BYTES:
                n = channel.recv_into(target)
                maybe_caught_up = True  # into place, done or not: perhaps all there was
                if n:
                    dec.buffer_updated(n)
            else:
                n = channel.recv_into(chunk)
                maybe_caught_up = n < len(chunk)  # a full chunk: more is coming
                if n:
                    dec.feed(chunk[:n])
            self._waiting_since = None
            if n == 0:
                self._eof = True
                dec.feed_eof()
            self.stats.transferred += n
            while (rec := dec.next_record()) is not None:
                if isinstance(rec, Command) and rec.code == CommandCode.HEARTBEAT and self.watchdog:
                    self.watchdog.arm()  # advisory: the session skips it
                ended = self.session.feed(rec)
                if isinstance(rec, Command) and rec.code in _POSTCOPY_STEP:
                    testpoint.reached(_POSTCOPY_STEP[rec.code])
                if self.session.passes != self._traced_pass:  # a PASS record: trace each one
                    self._traced_pass = self.session.passes
                    self._applied("pass-start", self._traced_pass)
                if ended:
                    self._count()
                    if isinstance(self.listener.address, FileUri):
                        self._expect_end_of_file(channel, dec, chunk)
                    return
            self._count()
            if n == 0:  # feed_eof always queues an error or END; never loop on EOF
                raise StreamError("stream ended without END", offset=dec.bytes_consumed)
            if self._rp is not None and dec.bytes_consumed != self._reported:
                self._progress(channel, dec.bytes_consumed, maybe_caught_up)

    def _source_quiet_for(self) -> float:
        since = self._waiting_since
        return 0.0 if since is None else time.monotonic() - since

    def _source_silent(self, reason: str) -> None:
        """From the watchdog: give up on the source, interrupting the blocked receive."""
        if self.channel is not None:
            self.channel.shutdown()

    def _expect_end_of_file(self, channel: Channel, dec: StreamDecoder, chunk: memoryview) -> None:
        """A snapshot file holds one stream, to its end: nothing may follow END (stream spec).
        (A socket cannot be read to its end here: the source waits for the ACK on it.)"""
        n = channel.recv_into(chunk)
        if n:
            dec.feed(chunk[:n])
        dec.next_record()  # raises "N bytes after the end of stream", from this chunk or END's

    def _progress(self, channel: Channel, consumed: int, maybe_caught_up: bool,
                  watch: _ChannelWatch | None = None) -> None:
        """PROGRESS per MiB applied on a channel, and whenever a channel caught up with the
        source (nothing more to read on it right now): the report the source waits for before it
        pauses the guest. Whether more is waiting is asked (one poll) only after a short read or
        a read straight into place — a full 1 MiB chunk means more is coming. Caught-up reports
        come at most once per CAUGHT_UP_S per channel: within it, the poll waits that long for
        more data, and reports only if none came (so the last report is never held back, and a
        destination that keeps catching up does not flood the source with one report per read).
        The value is the main stream's bytes plus, for multifd, the page bytes (uncompressed) the
        data channels applied: the source plans in those units whatever the compression ratio."""
        watch = watch or self._main_watch
        per_mib = consumed - watch.reported >= PROGRESS_BYTES
        if not per_mib:
            if not maybe_caught_up:
                return
            if watch.poll is None:
                watch.poll = select.poll()
                watch.poll.register(channel.fileno(), select.POLLIN)
            wait_s = CAUGHT_UP_S - (time.monotonic() - watch.reported_at)
            if watch.poll.poll(max(0, round(wait_s * 1000))):
                return  # more is waiting: not caught up after all
        watch.reported = consumed
        watch.reported_at = time.monotonic()
        with self._progress_lock:  # one total at a time, so the reports only grow
            total = self._applied_total()
            if total > self._reported and not self._holding_progress:
                self._reported = total
                self._rp.progress(total)  # type: ignore[union-attr]

    def _applied_total(self) -> int:
        main = self._decoder.bytes_consumed if self._decoder is not None else 0
        return main + sum(rx.page_bytes for rx in self._receivers if rx.lost is None)

    def _count(self) -> None:
        sink = self._preempt_sink  # postcopy-preempt's pages are placed there, not by self.ram
        self.stats.normal = self.ram.pages + (sink.pages if sink is not None else 0)
        self.stats.duplicate = self.ram.zero_pages + (sink.zero_pages if sink is not None else 0)
        self.stats.dirty_sync_count = self.session.passes

    def _applied(self, what: str, number: int) -> None:
        """Trace what this side has applied so far (docs/trace.md, event `applied`)."""
        self.trace.event("applied", what=what, pass_=number, bytes=self.stats.transferred,
                         pages=self.stats.normal, zero_pages=self.stats.duplicate)

    def _check_header(self, h: StreamHeader) -> None:
        if h.page_size != 4096:
            raise MigrationError(f"the stream's page size is {h.page_size}; this machine uses 4096")
        ours = self.machine.machine_type.name
        if h.machine_type and h.machine_type != ours:
            raise MigrationError(
                f"the stream is of machine type '{h.machine_type}' but this destination runs '{ours}';"
                f" start it with -M {h.machine_type}"
            )

    def _accept_preempt(self, cfg: dict) -> None:
        """postcopy-preempt: both sides must have it (the source says so in CONFIG); then accept
        the preempt channel on the same listener and read its first records (hello, RAM_BLOCKS)
        on a thread of its own; from LISTEN on the fault resolver has it (`_preempt_link`)."""
        theirs, ours = cfg.get("postcopy-preempt") is True, self._preempt_enabled()
        if theirs != ours:
            side = ("the source has capability 'postcopy-preempt' on but this destination has it off"
                    if theirs else
                    "this destination has capability 'postcopy-preempt' on but the source has it off")
            raise MigrationError(f"{side}: set it the same on both sides (migrate-set-capabilities)")
        if not theirs:
            return
        if cfg.get("preempt-requests") is not True:
            raise MigrationError("the source's postcopy-preempt channel does not take page requests "
                                 "(an older vmferry): turn postcopy-preempt off on both sides")
        mid = cfg.get("migration-id")
        if not isinstance(mid, str):
            raise MigrationError(f"CONFIG migration-id {mid!r} is not valid")
        try:
            ch = self.listener.accept(DATA_ACCEPT_S)
        except VmferryError as e:
            raise MigrationError(f"postcopy-preempt: the preempt channel did not connect: {e}") from None
        no_delay(ch)
        sink = self._preempt_sink = PreemptPages(self.ram, lambda: self.postcopy.dest)
        rx = PreemptReceiver(sink, mid)
        link = PreemptLink(ch, rx, self._request_counted)
        t = threading.Thread(target=self._receive_preempt_hello, args=(ch, rx), name="postcopy-preempt-recv",
                             daemon=True)
        self._preempt = (ch, rx, t, link)
        t.start()
        log.info("postcopy-preempt: the preempt channel connected (migration %s)", mid)

    def _receive_preempt_hello(self, channel: Channel, rx: PreemptReceiver) -> None:
        """The preempt channel's first records, hello and RAM_BLOCKS (checked against this VM's);
        nothing more comes until the fault resolver requests pages on it. A channel that is wrong
        (a bad record, another migration) fails the migration: the main stream is shut down and
        its thread reports why. One that just ends early fails nothing: the main stream says
        what happened."""
        chunk = memoryview(bytearray(DIRECT_BYTES))
        try:
            while rx.records < 2 and not rx.ended:
                if not rx.read_from(channel.recv_into, chunk):
                    raise DataChannelLost("the postcopy-preempt channel closed before its END")
        except BaseException as e:  # noqa: BLE001 - the channel's failure, reported by _preempt_lost
            self._preempt_lost(e)

    def _preempt_link(self) -> tuple[PreemptLink, Callable[[BaseException], None]] | None:
        """POSTCOPY_LISTEN: the preempt channel for the fault resolver once its first records are
        in (None without one, or if it failed: requests then go on the return path)."""
        if self._preempt is None:
            return None
        _, rx, t, link = self._preempt
        t.join(DATA_ACCEPT_S)
        if self._data_error is not None:
            raise MigrationError(self._data_error)
        if t.is_alive() or rx.lost is not None or rx.records < 2:
            return None
        return link, self._preempt_lost

    def _preempt_lost(self, e: BaseException) -> None:
        """The preempt channel failed (its hello's thread, or the fault resolver). A channel that
        is wrong fails the migration; one that just ended fails nothing before RUN, and after RUN
        the main stream is shut down too, so that both sides pause at once."""
        if self._preempt is not None:
            self._preempt[1].lost = str(e)
        if self._preempt_done or self._cancel.is_set():
            return
        if isinstance(e, DataChannelLost | TransportError | OSError):
            if not self.postcopy.running:
                return
            log.warning("postcopy-preempt channel lost: %s", e)
        else:
            if self._data_error is None:
                why = str(e) if isinstance(e, VmferryError) else f"internal error: {type(e).__name__}: {e}"
                self._data_error = why if "postcopy-preempt" in why else f"postcopy-preempt channel: {why}"
            log.warning("%s", self._data_error)
        if self.channel is not None:
            self.channel.shutdown()

    def _request_counted(self) -> None:
        self.stats.postcopy_requests += 1

    def _finish_preempt(self) -> None:
        """Postcopy's END on the main stream: the preempt channel's END (sent before it) must be
        read and its pages placed (by the fault resolver) before the last pages can be counted."""
        if self._preempt is None:
            return
        _, rx, _, link = self._preempt
        if link.attached.is_set():
            deadline = time.monotonic() + DATA_ACCEPT_S
            while not link.ended.is_set() and not link.released.is_set() and time.monotonic() < deadline:
                link.released.wait(0.05)
        if self._data_error is not None:
            raise MigrationError(self._data_error)
        if not link.ended.is_set():
            raise MigrationError(f"the postcopy-preempt channel did not end: {rx.lost or 'no END'}")

    def _drop_preempt(self) -> None:
        """The migration is over here, or paused (a recovery goes on without it). Idempotent."""
        self._preempt_done = True
        if self._preempt is None:
            return
        ch, rx, t, link = self._preempt
        self._preempt_page_bytes = rx.page_bytes
        self._preempt = None
        ch.shutdown()  # the resolver's read fails at once: it lets the channel go
        if t is not threading.current_thread():
            t.join(5.0)
        if link.attached.is_set() and not link.released.wait(5.0):
            log.warning("postcopy-preempt: the fault resolver did not let the channel go")
            return  # its fd may still be polled: left to the process's exit
        ch.close()

    def _accept_data_channels(self, cfg: dict) -> None:
        """CONFIG names the data channels (multifd): accept them on the same listener, each on a
        receiving thread of its own."""
        n = cfg.get("multifd-channels")
        if n is None:
            return
        mid = cfg.get("migration-id")
        if not isinstance(n, int) or not 1 <= n <= 255 or not isinstance(mid, str):
            raise MigrationError(f"CONFIG multifd-channels {n!r} / migration-id {mid!r} are not valid")
        for i in range(n):
            try:
                ch = self.listener.accept(DATA_ACCEPT_S)
            except VmferryError as e:
                raise MigrationError(f"multifd: data channel {i + 1} of {n} did not connect: {e}") from None
            self.data_channels.append(ch)
            rx = DataChannelReceiver(self.ram, mid)
            self._receivers.append(rx)
            t = threading.Thread(target=self._receive_data, args=(ch, rx), name=f"multifd-recv-{i}",
                                 daemon=True)
            self._data_threads.append(t)
            t.start()
        log.info("multifd: %d data channels connected (migration %s)", n, mid)

    def _receive_data(self, channel: Channel, rx: DataChannelReceiver) -> None:
        """One data channel, to its END. A connection that ends early is *lost*: not fatal here,
        the source re-sends its pages on the other channels and says so on the main stream (see
        _finish_data_channels). Anything else wrong with the channel (a bad checksum, a foreign
        migration) fails the migration: the main stream is shut down so its thread stops and
        reports this reason."""
        chunk = memoryview(bytearray(CHUNK_BYTES))
        watch = _ChannelWatch()
        try:
            while not rx.ended and rx.read_from(channel.recv_into, chunk):
                if self._rp is not None:
                    self._progress(channel, rx.decoder.bytes_consumed, rx.maybe_caught_up, watch)
        except (DataChannelLost, TransportError, OSError) as e:
            rx.lost = str(e)
            log.warning("multifd: data channel %s lost: %s", rx.channel_id, e)
        except VmferryError as e:
            if self._data_error is None and not self._cancel.is_set():
                self._data_error = str(e) if "channel" in str(e) else f"multifd data channel: {e}"
                if self.channel is not None:
                    self.channel.shutdown()

    def _finish_data_channels(self) -> None:
        """After the main stream's END: every data channel must have ended (its END verified)
        and its pages applied before the guest may start."""
        deadline = time.monotonic() + DATA_ACCEPT_S
        # With heartbeats on, a channel whose END is due and that brings nothing for their limit
        # is stalled (the source sent every END before the main stream's): fail naming it.
        heard = [(rx.bytes_received, time.monotonic()) for rx in self._receivers]
        while True:
            if self._data_error is not None:
                raise MigrationError(self._data_error)
            wd = self.watchdog
            stall_s = wd.limit_s if wd is not None and wd.enabled and wd.armed else None
            waiting = []
            for i, rx in enumerate(self._receivers):
                cid = i if rx.channel_id is None else rx.channel_id
                if rx.ended:
                    continue
                if cid in self.losses.declared:  # the source gave up on it: its pages came again
                    self.data_channels[i].shutdown()
                    continue
                if rx.lost is not None:  # gone, but the source ended without re-sending its pages
                    raise MigrationError(f"multifd: data channel {cid} was lost before its END: {rx.lost}")
                now = time.monotonic()
                if rx.bytes_received != heard[i][0]:
                    heard[i] = (rx.bytes_received, now)
                elif stall_s is not None and now - heard[i][1] > stall_s:
                    raise MigrationError(f"multifd: data channel {cid} stalled: nothing arrived for "
                                         f"{now - heard[i][1]:.1f} s after the main stream's END "
                                         f"(limit {stall_s:.1f} s, x-heartbeat-ms)")
                waiting.append(cid)
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise MigrationError(f"multifd: data channel(s) {waiting} did not end")
            time.sleep(0.005)

    def _check_config(self, cfg: object) -> None:
        if not isinstance(cfg, dict):
            self.listener.close()
            return
        self._accept_data_channels(cfg)
        self._accept_preempt(cfg)
        self.listener.close()
        smp = cfg.get("smp")
        if isinstance(smp, int) and smp != self.machine.smp:
            raise MigrationError(f"the source has {smp} vCPUs but this destination has "
                                 f"{self.machine.smp}; start it with --smp {smp}")


def _postcopy_latency_settings(channel: Channel | None) -> None:
    """Postcopy: a short GIL switch interval (postcopy.SWITCH_INTERVAL_S). The receive buffer is
    left as the kernel tuned it: shrunk at RUN (to 64 KiB; 256 KiB did it too) the kernel
    pruned the receive queue against the window it had already advertised and dropped a segment
    once per S5 run on the 1 Gbit/s link (nstat TcpExtRcvPruned, TCPRcvQDrop), and the
    retransmission held a fault for 0.2-1 s (bench/RESULTS.md). What queues there is bounded by
    the source's small send buffer only while this side keeps up with the link."""
    del channel
    short_switch_interval()


def _drain_before_close(channel: Channel, limit_s: float = DRAIN_BEFORE_CLOSE_S) -> None:
    """After SHUT: stop writing and read (dropping it) what the source still sends until it
    closes, at most `limit_s`. Closing with unread bytes would reset the connection, and a reset
    can reach the source before it read the SHUT: it would report "Connection reset" instead of
    this side's reason."""
    sock = getattr(channel, "socket", None)
    if not isinstance(sock, socket.socket):
        return
    deadline = time.monotonic() + limit_s
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(1 << 16):
                return
    except OSError:
        return
