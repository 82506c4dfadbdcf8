"""The VMM's control surface: what QMP commands do to a Machine and its migrations.

`VmControl` implements the monitor's `MonitorBackend`. It owns the run state QMP reports
(running, paused, inmigrate, finish-migrate, postmigrate, shutdown) and at most one migration,
outgoing or incoming, whose thread it starts; it never waits on one (the monitor must stay live).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from vmferry.errors import MigrationError, QmpError, TransportError, VmferryError
from vmferry.guests.verify import verify_dirty
from vmferry.machine.dirty_limit import DirtyLimiter
from vmferry.machine.machine import Machine
from vmferry.migration.block import select_copied
from vmferry.migration.destination import IncomingMigration
from vmferry.migration.device_state import DeviceStateLoader, DeviceStateSaver
from vmferry.migration.dirty_rate import DirtyRateMeter
from vmferry.migration.forecast import ForecastInput, forecast, from_migration
from vmferry.migration.params import MigrationCapabilities, MigrationParameters
from vmferry.migration.return_path import ReturnPathWriter
from vmferry.migration.source import MultifdSetup, OutgoingMigration
from vmferry.migration.state import IN_PROGRESS, MigrationState, MigrationStatus
from vmferry.migration.trace import NULL_TRACE, NullTrace, TraceWriter
from vmferry.monitor.objects import ObjectRegistry, TlsSetup, migration_tls
from vmferry.stream.compression import Compressor
from vmferry.stream.format import MAGIC as STREAM_MAGIC
from vmferry.transport.channel import Channel
from vmferry.transport.connect import Listener, connect_outgoing, listen_incoming
from vmferry.transport.tls import HANDSHAKE_TIMEOUT_S, tls_accept, tls_connect
from vmferry.transport.uri import TcpUri, UnixUri, parse_uri

log = logging.getLogger("vmferry.control")
# How long `migrate` waits for the channel before replying (see VmControl.migrate).
CONNECT_WAIT_S = 0.5
# How long a TLS destination reads a plain-text source's bytes after telling it why it is refused.
PLAIN_DRAIN_S = 2.0
S = MigrationStatus
EmitEvent = Callable[[str, dict | None], None]

# Machine exit kinds -> QMP SHUTDOWN {guest, reason}
_SHUTDOWN_REASONS = {
    "poweroff": (True, "guest-shutdown"),
    "halted": (True, "guest-shutdown"),
    "error": (True, "guest-panic"),
    "shutdown": (False, "host-qmp-quit"),
}


class VmControl:
    def __init__(
        self,
        machine: Machine,
        device_saver: Callable[[Machine], DeviceStateSaver],
        device_loader: Callable[[Machine], DeviceStateLoader],
        *,
        incoming: bool = False,
        autostart: bool = True,
    ) -> None:
        self.machine = machine
        self._device_saver = device_saver
        self._device_loader = device_loader
        self.migration_parameters = MigrationParameters()
        self.migration_capabilities = MigrationCapabilities(dirty_ring=machine.dirty_ring is not None)
        self.objects = ObjectRegistry()
        self.emit: EmitEvent = lambda name, data=None: None
        self.quit_requested = threading.Event()
        self.inmigrate = incoming
        self.postmigrate = False
        self.autostart = autostart
        self.outgoing: OutgoingMigration | None = None
        self.incoming: IncomingMigration | None = None
        self._state: MigrationState | None = None
        self.listen_address = ""
        self._lock = threading.Lock()
        self.dirty_rate = DirtyRateMeter(machine.ram_blocks, machine.dirty_ring)

    # --- events ---

    def on_machine_event(self, name: str, data: dict) -> None:
        """Machine.on_event: turn machine events into QMP events."""
        if name == "SHUTDOWN":
            guest, reason = _SHUTDOWN_REASONS.get(data.get("kind", ""), (False, "host-error"))
            self.emit("SHUTDOWN", {"guest": guest, "reason": reason})
        else:
            self.emit(name, None)

    def _on_migration_status(self, status: MigrationStatus) -> None:
        if status == S.COMPLETED and self.outgoing is not None:
            self.postmigrate = True
        if self.migration_capabilities.enabled("events"):
            self.emit("MIGRATION", {"status": str(status)})
        self._trace_status(status)

    def _trace_status(self, status: MigrationStatus) -> None:
        """Each phase goes into the migration's trace; a terminal one ends it."""
        mig = self.outgoing or self.incoming
        if mig is None:
            return
        mig.trace.event("phase", phase=str(status))
        if status in (S.COMPLETED, S.FAILED, S.CANCELLED):
            info = mig.stats.query(status)
            mig.trace.close(str(status), total_time_ms=info.get("total-time", 0),
                            transferred_bytes=mig.stats.transferred, error=info.get("error-desc"))

    def _open_trace(self, side: str) -> NullTrace:
        """The trace `x-trace-file` asks for, or none."""
        path = self.migration_parameters.x_trace_file
        if not path:
            return NULL_TRACE
        return TraceWriter(path, side, ram_bytes=sum(b.nbytes for b in self.machine.ram_blocks),
                           machine_type=self.machine.machine_type.name)

    def _on_pass(self, number: int) -> None:
        if self.migration_capabilities.enabled("events"):
            self.emit("MIGRATION_PASS", {"pass": number})

    # --- MonitorBackend ---

    def query_status(self) -> dict:
        if self.machine.finished:
            return {"status": "shutdown", "running": False}
        if self.inmigrate:
            return {"status": "inmigrate", "running": False}
        if self.outgoing is not None and self.outgoing.state.status == S.DEVICE:
            return {"status": "finish-migrate", "running": False}
        if self.postmigrate and not self.machine.running:
            return {"status": "postmigrate", "running": False}
        running = self.machine.running
        return {"status": "running" if running else "paused", "running": running}

    def stop(self) -> None:
        if self.inmigrate:
            self.autostart = False
            return
        self.machine.pause()

    def cont(self) -> None:
        if self.machine.finished:
            raise QmpError("The guest has shut down; it cannot be resumed")
        if self.inmigrate:
            # QEMU: `cont` during an incoming migration starts the guest once it is in.
            self.autostart = True
            return
        if self.outgoing is not None and self.outgoing.state.status == S.DEVICE:
            raise QmpError("The migration is switching over; wait for it to finish")
        if self.outgoing is not None and self.outgoing.postcopy_started and self._migration_running():
            raise QmpError("The destination runs the guest (postcopy); the source cannot resume it")
        self.machine.resume()  # a drive whose image another VMM now holds refuses, by name
        self.postmigrate = False

    def quit(self) -> None:
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.quit_requested.set()

    def system_powerdown(self) -> None:
        # Our guests have no ACPI to hear the power button; like a PC whose button is held, the
        # machine then powers off (SHUTDOWN follows from the machine).
        self.emit("POWERDOWN", None)
        self.machine.power_off(0)

    def query_block(self) -> list[dict]:
        return [d.query_block() for d in self.machine.block_devices]

    def query_blockstats(self) -> list[dict]:
        return [d.query_blockstats() for d in self.machine.block_devices]

    def query_virtio_queue_status(self, path: str, queue: int) -> dict:
        for dev in self.machine.block_devices:
            if dev.qdev == path:
                return dev.queue_status(queue)
        raise QmpError(f"No virtio device with path '{path}'")

    def query_cpus_fast(self) -> list[dict]:
        return [{"cpu-index": i, "thread-id": tid} for i, tid in enumerate(self.machine.vcpu_thread_ids())]

    def _migration_running(self) -> bool:
        return self._state is not None and self._state.status in IN_PROGRESS

    def migrate(self, uri: str, blk: bool = False) -> None:
        """`blk`: copy every writable drive in the stream (QEMU 7.2's name); `x-block-drives`
        adds drives by id. The other drives are shared (migration/block.py)."""
        with self._lock:
            if self.machine.finished:
                raise MigrationError("The guest has shut down; there is nothing to migrate")
            if self._migration_running():
                raise MigrationError("There's a migration process in progress")
            if self.postmigrate and not self.machine.running:
                raise MigrationError("Can't migrate the vm that was paused due to previous migration")
            wanted = [n.strip() for n in self.migration_parameters.x_block_drives.split(",") if n.strip()]
            copy_drives = select_copied(self.machine.block_devices, blk, wanted)
            parsed = parse_uri(uri)  # a malformed URI is an error reply
            tls = migration_tls(self.migration_parameters, self.objects, endpoint="client",
                                uri_host=parsed.host if isinstance(parsed, TcpUri) else "")
            multifd = self._multifd_setup(uri, parsed, tls)
            preempt = self._preempt_setup(uri, parsed, tls)
            trace = self._open_trace("source")  # a path it cannot write is refused here
            channel, connected = _connect_in_background(uri, tls)
            # A refused or unreachable peer answers at once: an error reply, as the user
            # expects. A peer that is slow to answer must not hold the monitor: the migration
            # thread waits for it and reports a failure as `failed`. The TLS handshake is not
            # waited for here: its failures always end as `failed`, with the reason.
            try:
                with contextlib.suppress(FutureTimeout):
                    connected.result(timeout=CONNECT_WAIT_S)
            except Exception as e:
                trace.close("failed", error=str(e))  # the trace says why it is so short
                raise
            saver = self._device_saver(self.machine)
            self._state = MigrationState(self._on_migration_status)
            self.outgoing = OutgoingMigration(
                self.machine, saver, channel, self.migration_parameters, self._state, self._on_pass, trace,
                copy_drives=copy_drives,
                block_compressor=(_block_compressor(self.migration_parameters.snapshot())
                                  if copy_drives else None),
                auto_converge=self.migration_capabilities.enabled("auto-converge"),
                dirty_limit=self.migration_capabilities.enabled("dirty-limit"),
                multifd=multifd,
                postcopy=self.migration_capabilities.enabled("postcopy-ram"),
                reconnect=_reconnector(uri, tls),
                preempt=preempt,
                xbzrle_cache=(self.migration_parameters.xbzrle_cache_size
                              if self.migration_capabilities.enabled("xbzrle") else None),
            )
            self.incoming = None
            self.outgoing.start()

    def _multifd_setup(self, uri: str, parsed: object, tls: TlsSetup | None) -> MultifdSetup | None:
        """Capability `multifd`: its parameters as they are now, and how to open each data
        connection (same URI; TLS too when tls-creds is set). Only tcp: and unix: can carry
        several connections: a file:, exec: or fd: migration with multifd is refused by name."""
        if not self.migration_capabilities.enabled("multifd"):
            return None
        if not isinstance(parsed, TcpUri | UnixUri):
            raise MigrationError(f"multifd needs a tcp: or unix: URI (several connections); "
                                 f"'{uri}' has one channel: turn capability 'multifd' off for it")
        p = self.migration_parameters.snapshot()

        def connect() -> Channel:
            channel = connect_outgoing(uri)
            return channel if tls is None else tls_connect(channel, tls.context, tls.hostname)

        return MultifdSetup(p.multifd_channels, p.multifd_compression, p.multifd_zlib_level,
                            p.multifd_zstd_level, connect)

    def _preempt_setup(self, uri: str, parsed: object, tls: TlsSetup | None) -> Callable[[], Channel] | None:
        """Capability `postcopy-preempt`: how to open the preempt channel (same URI; TLS too when
        tls-creds is set). Only tcp: and unix: can carry a second connection."""
        if not self.migration_capabilities.enabled("postcopy-preempt"):
            return None
        if not isinstance(parsed, TcpUri | UnixUri):
            raise MigrationError(f"postcopy-preempt needs a tcp: or unix: URI (a second connection); "
                                 f"'{uri}' has one channel: turn capability 'postcopy-preempt' off for it")
        return _reconnector(uri, tls)

    def migrate_incoming(self, uri: str) -> None:
        with self._lock:
            if not self.inmigrate:
                raise QmpError("'-incoming' was not specified on the command line")
            if self.incoming is not None:
                raise QmpError("The incoming migration has already been started")
            listener = _TlsListener(listen_incoming(uri), self._incoming_tls)
            self._state = MigrationState(self._on_migration_status)
            self.incoming = IncomingMigration(
                self.machine, self._device_loader(self.machine), listener, self._state, self._loaded,
                lambda: self._open_trace("destination"),
                lambda: self.migration_parameters.x_heartbeat_ms,
                lambda: self.migration_capabilities.enabled("postcopy-ram"),
                self._relisten,
                lambda: self.migration_capabilities.enabled("postcopy-preempt"),
            )
            self.incoming.start()
            self.listen_address = str(listener.address)
            log.info("waiting for an incoming migration on %s", self.listen_address)

    def _relisten(self) -> Listener | None:
        """x-postcopy-reconnect: a listener on the address the incoming migration used (its
        actual port when it was given as 0), or None when the parameter is off."""
        if not self.migration_parameters.x_postcopy_reconnect or not self.listen_address:
            return None
        return _TlsListener(listen_incoming(self.listen_address), self._incoming_tls)

    def _incoming_tls(self) -> TlsSetup | None:
        # As QEMU: tls-creds are read when the stream arrives (they may be set after -incoming).
        return migration_tls(self.migration_parameters, self.objects, endpoint="server")

    def _loaded(self) -> None:
        """Incoming stream fully verified and applied: start the guest unless -S / stop."""
        self.inmigrate = False
        if self.autostart:
            self.machine.start()

    def migrate_start_postcopy(self) -> None:
        """migrate-start-postcopy (QEMU's checks and messages): switch at the next step."""
        with self._lock:
            if not self.migration_capabilities.enabled("postcopy-ram"):
                raise QmpError("Enable postcopy with migrate_set_capability before the start of migration")
            if self.outgoing is None or self._state is None or self._state.status == S.NONE:
                raise QmpError("Postcopy must be started after migration has been started")
            if self._state.status not in (S.SETUP, S.ACTIVE):
                raise QmpError(f"Postcopy cannot start: the migration is {self._state.status}")
            self.outgoing.start_postcopy()

    def migrate_resume(self, uri: str) -> None:
        """`migrate` with `"resume": true`: a paused postcopy goes on over a new connection to
        `uri` (where the destination's migrate-recover listens), with the same TLS setup."""
        with self._lock:
            out = self.outgoing
            if out is None or self._state is None or self._state.status != S.POSTCOPY_PAUSED:
                raise QmpError("Cannot resume if there is no paused migration")
            parsed = parse_uri(uri)
            tls = migration_tls(self.migration_parameters, self.objects, endpoint="client",
                                uri_host=parsed.host if isinstance(parsed, TcpUri) else "")
            channel, connected = _connect_in_background(uri, tls)
            with contextlib.suppress(FutureTimeout):
                connected.result(timeout=CONNECT_WAIT_S)
            out.resume(channel)

    def migrate_recover(self, uri: str) -> None:
        """migrate-recover on a paused postcopy destination: listen on `uri` for the source's
        resumed stream."""
        with self._lock:
            inc = self.incoming
            if inc is None or inc.state.status != S.POSTCOPY_PAUSED:
                raise QmpError("Migrate recover can only be run when postcopy is paused.")
            listener = _TlsListener(listen_incoming(uri), self._incoming_tls)
            inc.recover(listener)
            self.listen_address = str(listener.address)
            log.info("waiting for the resumed postcopy migration on %s", self.listen_address)

    def migrate_pause(self) -> None:
        """migrate-pause: break an active postcopy's connection on purpose, on either side."""
        with self._lock:
            if self.outgoing is not None and self.outgoing.postcopy_started:
                self.outgoing.pause_postcopy()
            elif self._postcopy_guest_here():
                assert self.incoming is not None
                self.incoming.pause_postcopy()
            else:
                raise QmpError("migrate-pause is only for a postcopy migration after the switch")

    def _postcopy_guest_here(self) -> bool:
        """Is this a destination running a guest whose RAM is still arriving (or paused)?"""
        inc = self.incoming
        return inc is not None and inc.state.status in (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED,
                                                        S.POSTCOPY_RECOVER)

    def migrate_cancel(self) -> None:
        if self.outgoing is not None and self.outgoing.postcopy_started and self._migration_running():
            raise QmpError("Postcopy cannot be cancelled: the destination runs the guest and only the "
                           "source holds the rest of its RAM")
        if self._postcopy_guest_here():
            raise QmpError("Postcopy cannot be cancelled: this destination runs the guest on part of "
                           "its RAM")
        if self.outgoing is not None and self._migration_running():
            self.outgoing.cancel()
        elif self.incoming is not None and self._migration_running():
            self.incoming.cancel()

    def query_migrate(self) -> dict:
        mig = self.outgoing or self.incoming
        if mig is None or self._state is None:
            return {}
        out = mig.stats.query(self._state.status)
        limiter = self.machine.dirty_limiter
        if (self.outgoing is not None and self.outgoing.dirty_limit is not None and limiter is not None
                and limiter.in_service):
            # QEMU 8.1: while dirty-limit throttles, µs slept per ring-full exit (the largest
            # among the vCPUs) and the ring's fill time at the vCPUs' average dirty rate.
            out["dirty-limit-throttle-time-per-round"] = limiter.throttle_time_per_round()
            out["dirty-limit-ring-full-time"] = limiter.ring_full_time()
        if self.outgoing is not None and self.outgoing.drives.copied:
            out["disk"] = self.outgoing.drives.progress()
        elif self.incoming is not None and self.incoming.drives.total:
            loader = self.incoming.drives
            out["disk"] = {"transferred": loader.received, "total": loader.total}
        if self.incoming is not None:
            out["passes-received"] = self.incoming.passes
            report = self.incoming.postcopy_report()
            if report:
                out["ram"]["postcopy-requests"] = report["x-postcopy"]["requests"]
                out["ram"]["postcopy-bytes"] = self.incoming.stats.transferred - self.incoming.bytes_at_run
                if not self.migration_capabilities.enabled("postcopy-blocktime"):
                    report = {"x-postcopy": report["x-postcopy"]}  # QEMU reports blocktime only with it
                out.update(report)
            if self._state.status in (S.SETUP,) and self.listen_address:
                out["socket-address"] = [_socket_address(self.listen_address)]
        return out

    # --- dirty page rate limit (QEMU's set/cancel/query-vcpu-dirty-limit) ---

    def _dirty_limiter(self, what: str) -> DirtyLimiter | None:
        limiter = self.machine.dirty_limiter
        if limiter is None and what == "set":
            raise QmpError("dirty page limit feature requires KVM with accelerator property "
                           "'dirty-ring-size' set'")
        return limiter

    def _dirty_limit_migration_running(self) -> bool:
        return (self._migration_running() and self.outgoing is not None
                and self.outgoing.dirty_limit is not None)

    def set_vcpu_dirty_limit(self, cpu_index: int | None, dirty_rate: int) -> None:
        limiter = self._dirty_limiter("set")
        assert limiter is not None
        try:
            limiter.check_index(cpu_index)
        except VmferryError as e:
            raise QmpError(str(e)) from None
        if self._dirty_limit_migration_running():
            raise QmpError("can't set dirty page limit while migration is running")
        limiter.set(cpu_index, dirty_rate)

    def cancel_vcpu_dirty_limit(self, cpu_index: int | None) -> None:
        limiter = self._dirty_limiter("cancel")
        if limiter is None:
            return  # QEMU: nothing to cancel without the dirty ring, and no error
        try:
            limiter.check_index(cpu_index)
        except VmferryError as e:
            raise QmpError(str(e)) from None
        if limiter.in_service and self._dirty_limit_migration_running():
            raise QmpError("can't cancel dirty page limit while migration is running")
        limiter.cancel(cpu_index)

    def query_vcpu_dirty_limit(self) -> list[dict[str, int]]:
        limiter = self.machine.dirty_limiter
        return [] if limiter is None else limiter.query()

    def verify_dirty_guest(self) -> dict:
        """x-verify-dirty-guest: the host-side verifier over this machine's RAM, on a paused
        guest (paused at any instruction is fine: the verifier tolerates the in-flight page)."""
        if self.machine.finished:
            raise QmpError("The guest has shut down")
        if self._postcopy_guest_here():
            # Reading a page still to come from here would fault holding the GIL (a deadlock).
            raise QmpError("postcopy is still bringing this guest's RAM: verify once the migration completed")
        was_running = self.machine.running
        self.machine.pause()
        try:
            verdict = verify_dirty([(b.gpa, b.mem) for b in self.machine.ram_blocks])
        finally:
            if was_running:
                self.machine.resume()
        return {"ok": verdict.ok, "pages": verdict.pages, "generation": verdict.generation,
                "first-bad-page": verdict.first_bad_page, "reason": str(verdict)}

    def calc_dirty_rate(self, calc_time: int, mode: str | None, sample_pages: int | None) -> None:
        if self.inmigrate:
            raise QmpError("the dirty rate cannot be measured while waiting for an incoming migration")
        if self._postcopy_guest_here():
            raise QmpError("the dirty rate cannot be measured while postcopy brings this guest's RAM")
        self.dirty_rate.calc(calc_time, mode, sample_pages)

    def query_dirty_rate(self) -> dict:
        return self.dirty_rate.query()

    def migrate_forecast(self, args: dict) -> dict:
        """x-migrate-forecast: the inputs the caller gave, else the last measurements: the dirty
        rate and working set from the last calc-dirty-rate (dirty-bitmap), the bandwidth, setup,
        time between passes and switchover cost from the last completed outgoing migration."""
        for name, value in args.items():
            if value < 0:
                raise QmpError(f"Parameter '{name}' expects a value of 0 or more")
        populated = sum(int(b.populated_pages().sum()) for b in self.machine.ram_blocks) * 4096
        info = self.dirty_rate.query()
        measured = "x-working-set" in info and info["mode"] == "dirty-bitmap"
        dirty = args.get("dirty-rate")
        if dirty is None:
            if not measured:
                raise QmpError("no dirty rate measured: run calc-dirty-rate with mode dirty-bitmap first, "
                               "or give 'dirty-rate'")
            dirty = info["x-dirty-rate-bytes"]
        # The measured working set goes with the measured rate only; a rate given alone writes
        # into all populated RAM unless a working set is given too.
        working_set = args.get("working-set", min(populated, info["x-working-set"])
                               if measured and "dirty-rate" not in args else populated)
        last = (from_migration(self.outgoing.stats.query(self.outgoing.state.status))
                if self.outgoing is not None else None)
        bandwidth = args.get("bandwidth")
        engine_bandwidth = args.get("engine-bandwidth")
        if bandwidth is None:
            measured = last.bandwidth_bps if last is not None else 0
            bandwidth = measured or self.migration_parameters.max_bandwidth
            if engine_bandwidth is None and measured and last is not None:
                engine_bandwidth = last.engine_bandwidth_bps
        if not bandwidth or bandwidth <= 0:
            raise QmpError("no bandwidth known: give 'bandwidth' (bytes/s), set max-bandwidth, or migrate "
                           "once to measure it")
        inputs = ForecastInput(
            initial_bytes=populated, dirty_rate_bps=float(dirty), bandwidth_bps=float(bandwidth),
            downtime_limit_ms=args.get("downtime-limit", self.migration_parameters.downtime_limit),
            working_set_bytes=working_set, engine_bandwidth_bps=engine_bandwidth,
            switchover_ms=args.get("switchover-ms", last.switchover_ms if last is not None else None),
            setup_s=args.get("setup-ms", last.setup_s * 1000 if last is not None else 0) / 1000,
            pass_overhead_s=args.get("pass-overhead-ms",
                                     last.pass_overhead_s * 1000 if last is not None else 0) / 1000)
        out = forecast(inputs).as_qmp()
        out["inputs"] = {"initial-bytes": inputs.initial_bytes, "dirty-rate": round(inputs.dirty_rate_bps),
                         "bandwidth": round(inputs.bandwidth_bps), "downtime-limit": inputs.downtime_limit_ms,
                         "engine-bandwidth": round(inputs.engine_bandwidth_bps or inputs.bandwidth_bps),
                         "working-set": inputs.working_set_bytes, "switchover-ms": inputs.switchover_ms,
                         "setup-ms": round(inputs.setup_s * 1000, 3),
                         "pass-overhead-ms": round(inputs.pass_overhead_s * 1000, 3)}
        return out

    # --- lifetime ---

    def close(self) -> None:
        if self.incoming is not None:
            if self._postcopy_guest_here():
                # The guest cannot go on without the source: stop the vCPUs first, so the ones a
                # closed userfaultfd wakes (with zero pages) never run the guest again.
                self.machine.request_shutdown()
            self.incoming.close()  # the userfaultfd first: no vCPU may stay blocked on a page
        self.dirty_rate.close()
        postcopy = self._postcopy_guest_here() or (self.outgoing is not None
                                                   and self.outgoing.postcopy_started)
        if self._migration_running() and not postcopy:  # a postcopy cannot be cancelled: just go
            self.migrate_cancel()
        for mig in (self.outgoing, self.incoming):
            if mig is not None:
                mig.join(5.0)


class _TlsListener(Listener):
    """The destination's listener as the migration sees it: when the TLS parameters ask for
    encryption, each accepted connection must complete the TLS handshake (and pass tls-authz)
    before it is handed over. A connection that fails is logged with its reason and closed, and
    the destination goes back to waiting, as QEMU's does; cancel (close) ends a handshake under
    way. Parameters that are wrong (tls-creds naming nothing) refuse the migration itself."""

    def __init__(self, inner: Listener, tls: Callable[[], TlsSetup | None]) -> None:
        self._inner = inner
        self._tls = tls
        self.address = inner.address
        self._handshaking: Channel | None = None
        self._closed = False

    def accept(self, timeout_s: float | None = None) -> Channel:
        while True:
            channel = self._inner.accept(timeout_s)
            try:
                setup = self._tls()
            except BaseException:
                channel.close()
                raise
            if setup is None:
                return channel
            self._handshaking = channel
            if self._closed:  # cancelled while we were accepting
                channel.shutdown()
            if _sends_plain_stream(channel):
                reason = (f"the destination requires TLS (tls-creds '{setup.creds.id}'); this "
                          f"connection is plain text")
                _refuse_plain_stream(channel, reason)
                self._handshaking = None
                log.warning("incoming migration connection refused: %s; still waiting on %s",
                            reason, self.address)
                continue
            try:
                return tls_accept(channel, setup.context, setup.authorize)
            except TransportError as e:
                if self._closed:
                    raise TransportError(f"listener on {self.address} was closed") from e
                log.warning("incoming migration connection refused: %s; still waiting on %s",
                            e, self.address)
            finally:
                self._handshaking = None

    def close(self) -> None:
        self._closed = True
        handshaking = self._handshaking
        if handshaking is not None:
            handshaking.shutdown()
        self._inner.close()


def _sends_plain_stream(channel: Channel) -> bool:
    """Does the peer start a plain-text stream (its magic's first byte) rather than a TLS
    handshake (0x16)? Peeked, so the handshake still reads everything."""
    sock = getattr(channel, "socket", None)
    if sock is None:
        return False
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        first = sock.recv(1, socket.MSG_PEEK)
        sock.settimeout(None)
    except OSError:
        return False  # the handshake will fail with its own words
    return first == STREAM_MAGIC[:1]


def _refuse_plain_stream(channel: Channel, reason: str) -> None:
    """Tell a plain-text source why, in its own return-path language, and let it read that: its
    bytes are drained (bounded) instead of answered with a reset that would hide the reason."""
    ReturnPathWriter(channel).shut(reason)
    sock = channel.socket  # type: ignore[attr-defined]
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.2)
        deadline = time.monotonic() + PLAIN_DRAIN_S
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                if not sock.recv(1 << 16):
                    break
    channel.close()


def _socket_address(uri: str) -> dict:
    """QEMU's SocketAddress shape for a listening URI (query-migrate on a destination)."""
    if uri.startswith("tcp:"):
        host, _, port = uri[4:].rpartition(":")
        return {"type": "inet", "host": host.strip("[]"), "port": port}
    if uri.startswith("unix:"):
        return {"type": "unix", "path": uri[5:]}
    return {"type": "uri", "uri": uri}


def _reconnector(uri: str, tls: TlsSetup | None) -> Callable[[], Channel]:
    """One more connection to `migrate`'s address, TLS as the first (x-postcopy-reconnect, and
    postcopy-preempt's channel)."""

    def connect() -> Channel:
        channel = connect_outgoing(uri, timeout_s=1.0)
        return channel if tls is None else tls_connect(channel, tls.context, tls.hostname)

    return connect


def _block_compressor(p: MigrationParameters) -> Compressor | None:
    """x-block-compression, with multifd-compression's levels; None: blocks go raw."""
    if p.x_block_compression == "none":
        return None
    return Compressor(p.x_block_compression, p.multifd_zlib_level, p.multifd_zstd_level)


def _connect_in_background(uri: str, tls: TlsSetup | None) -> tuple[Future[Channel], Future[None]]:
    """(the channel, ready for the stream; the connection alone, done before any TLS handshake)."""
    fut: Future[Channel] = Future()
    connected: Future[None] = Future()

    def connect() -> None:
        try:
            channel = connect_outgoing(uri)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the futures
            connected.set_exception(e)
            fut.set_exception(e)
            return
        connected.set_result(None)
        try:
            fut.set_result(channel if tls is None else tls_connect(channel, tls.context, tls.hostname))
        except BaseException as e:  # noqa: BLE001 - handed to the migration thread
            fut.set_exception(e)

    threading.Thread(target=connect, name="migration-connect", daemon=True).start()
    return fut, connected
