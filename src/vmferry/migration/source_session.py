"""The source side of a migration as a protocol object: which records go next, where passes
begin and end, when to switch over. Sans-I/O: no threads, no sockets, no clock — the driver
(`source.py`) passes the time in and supplies the output (`SaverOutput`: encoder + send).

    session = SourceSession(savers, encoder, config, downtime_limit_ms)
    session.setup(out, now)
    while True:
        step = session.step(out, clock)        # one budget's worth of the current pass
        if step.switchover and session.confirm_switchover():   # after draining the backlog
            break
    phases = session.complete(out, clock)      # the vCPUs are paused: the rest
    session.end(out)                           # END

A pass: a PASS record, then each saver's `iterate` until every saver ran out of what it had
(it sent less than its budget), then `sync` of every saver. While the bulk-first savers (copied
drives) still have a large, shrinking backlog, the others (RAM) are held back: they send nothing
in that pass (convergence.hold_back), so the disk converges first and RAM is sent once, after it,
rather than once per disk pass. Once a pass lets them go, they are never held again; a pass that
held them never ends in a switchover. After the sync the session reports the pass (its own bytes
over its own time) and decides: expected downtime = (sum of the savers'
`pending` + the bytes still in flight) / bandwidth + FIXED_MS; see convergence.switch_now.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmferry.migration.convergence import (
    EndToEndRate,
    PassReport,
    expected_downtime_ms,
    hold_back,
    switch_now,
)
from vmferry.migration.saver import Saver, SaverOutput
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Config, EndOfStream, PassStart

UNIT_BYTES = 4096  # a unit of Saver.units(): a RAM page, a disk block

# Bytes each step sends before handing control back to the driver (cancel checks, progress).
STEP_BUDGET = 8 << 20
# What the downtime costs beyond the bytes themselves: pausing the vCPUs, saving device state,
# the destination applying it, starting the guest and confirming. Measured on a static 2 GiB
# guest on an otherwise idle 2-core host: 5-7 ms in all, of which RAM's final sync ~1 ms.
FIXED_MS = 5.0


@dataclass
class Step:
    pass_started: int = 0  # the pass this step opened (its PASS record went out), else 0
    report: PassReport | None = None  # the pass this step closed
    held: tuple[str, ...] = ()  # savers held back in the pass this step opened (hold_back)
    switchover: bool = False  # the closed pass says: switch over now
    sync_ms: float = 0.0  # folding the dirty logs and deciding, when a pass closed


class SourceSession:
    def __init__(self, savers: Sequence[Saver], encoder: StreamEncoder, config: Mapping[str, Any],
                 downtime_limit_ms: Callable[[], int], *, end_to_end: bool = False,
                 step_budget: int = STEP_BUDGET,
                 bandwidth_cap: Callable[[], float] = lambda: 0.0) -> None:
        """`end_to_end`: the destination reports progress (a return path), so bandwidth and
        backlog come from `progress`; else from what the channel accepted. `bandwidth_cap`:
        max-bandwidth in the units `sent_total` counts (0: none)."""
        self.savers = list(savers)
        # Within a pass, state the guest rewrites slowly for its size goes first (Saver.bulk_first:
        # a disk), so that what the long first pass sends early is less likely to be dirtied again
        # before the pass ends; setup and complete keep the list's order.
        self._iterate_order = sorted(range(len(self.savers)), key=lambda i: not self.savers[i].bulk_first)
        self.encoder = encoder
        self.config = dict(config)
        self.downtime_limit_ms = downtime_limit_ms
        self.bandwidth_cap = bandwidth_cap
        self.end_to_end = end_to_end
        self.step_budget = step_budget
        self.sent = 0  # stream bytes the channel accepted
        self.e2e = EndToEndRate()
        self.passes: list[PassReport] = []
        self.expected_ms: float | None = None
        self.expected_at_switchover_ms: float | None = None
        self._pass = 0
        self._in_pass = False
        self._drained: set[int] = set()
        self._pass_t0 = 0.0
        self._pass_sent0 = 0
        self._pass_pages0 = (0, 0)
        self._pass_units0 = 0
        self._send_bytes = 0  # over all passes, for the channel-side bandwidth
        self._send_secs = 0.0
        self._last_sync = 0.0
        self._extra = 0  # passes made after the expected downtime first fell within the limit
        # hold_back: the savers (indexes) held in the current pass, how many passes held them,
        # whether they were let go (for good), and the bulk-first savers' bytes per pass
        self._held: frozenset[int] = frozenset()
        self._held_passes = 0
        self._released = False
        self._bulk_sent = 0
        self._bulk_sent_last: int | None = None
        self._waiting0: list[tuple[int, int]] = []  # per saver at pass start: (units, pages) waiting

    # --- what the driver feeds in ---

    def progress(self, applied: int, sent_then: int, now: float) -> None:
        """A PROGRESS report: the destination applied `applied` stream bytes; `sent_then` is what
        the source had sent when the report arrived, at `now`."""
        self.e2e.report(now, applied, sent_then)

    # --- the numbers ---

    def pending(self) -> int:
        return sum(s.pending() for s in self.savers)

    def sent_total(self) -> int:
        """Bytes accepted on the main stream and on the savers' own channels (multifd)."""
        return self.sent + sum(s.sent_elsewhere() for s in self.savers)

    def backlog(self) -> int:
        """Bytes sent and not yet reported applied; 0 until a first report arrived (a
        destination that does not send PROGRESS must not look infinitely behind)."""
        if not self.end_to_end or self.e2e.samples == 0:
            return 0
        return max(0, self.sent_total() - self.e2e.applied)

    def bandwidth(self) -> float:
        """End to end where the destination reports it, else what the channel accepted; never
        above max-bandwidth. The cap matters: the end-to-end rate leaves out the destination's
        idle time, and under a cap the limiter's waits are idle time, so the measured rate is
        the burst's, not the cap's (several channels burst a chunk each, then wait)."""
        rate = self.e2e.rate() if self.end_to_end else 0.0
        if rate <= 0:
            rate = self._send_bytes / self._send_secs if self._send_secs > 0 else 0.0
        cap = self.bandwidth_cap()
        return min(rate, cap) if cap > 0 and rate > 0 else rate

    def expected_downtime(self) -> float:
        return expected_downtime_ms(self.pending() + self.backlog(), self.bandwidth(), FIXED_MS)

    def units(self) -> tuple[int, int]:
        """(4 KiB units sent, units waiting) over the savers: RAM pages and disk blocks."""
        sent = waiting = 0
        for s in self.savers:
            a, b = s.units()
            sent, waiting = sent + a, waiting + b
        return sent, waiting

    def pages(self) -> tuple[int, int, int]:
        """(pages sent with contents, zero pages sent, pages waiting) over the savers."""
        sent = zero = waiting = 0
        for s in self.savers:
            a, b, c = s.page_counts()
            sent, zero, waiting = sent + a, zero + b, waiting + c
        return sent, zero, waiting

    # --- the protocol ---

    def _out(self, out: SaverOutput) -> SaverOutput:
        return _Counting(self, out)

    def setup(self, out: SaverOutput, now: float) -> None:
        """Stream header, configuration, then every saver's setup (tables, descriptions, hints;
        tracking starts). The setup's marking counts as the first sync, as in QEMU."""
        o = self._out(out)
        o.send([self.encoder.header(), self.encoder.encode(Config(self.config))])
        for s in self.savers:
            s.setup(o)
        self._last_sync = now

    def step(self, out: SaverOutput, clock: Callable[[], float]) -> Step:
        """Send one budget's worth of the current pass (opening one if none is open); when the
        pass is done, sync and decide. `clock` is read at the start and, if the pass ends, at
        its end (a pass may fit in one step)."""
        o = self._out(out)
        step = Step()
        now = clock()
        if not self._in_pass:
            self._pass += 1
            self._in_pass = True
            self._drained = set()
            self._pass_t0 = now
            self._pass_sent0 = self.sent_total()
            self._pass_pages0 = self.pages()[:2]
            self._pass_units0 = self.units()[0]
            self._held = self._hold()
            self._bulk_sent = 0
            self._waiting0 = [(s.units()[1], s.page_counts()[2]) for s in self.savers]
            o.send([self.encoder.encode(PassStart(self._pass))])
            step.pass_started = self._pass
            step.held = tuple(self.savers[i].name for i in sorted(self._held))
        budget = self.step_budget
        for i in self._iterate_order:
            s = self.savers[i]
            if i in self._drained or i in self._held or budget <= 0:
                continue
            sent = s.iterate(o, budget)
            if s.bulk_first:
                self._bulk_sent += sent
            if sent < budget:
                self._drained.add(i)
            budget -= sent
        if len(self._drained | self._held) == len(self.savers):
            now = clock()
            step.report, step.switchover = self._end_pass(now)
            step.sync_ms = (clock() - now) * 1000
        return step

    def _hold(self) -> frozenset[int]:
        """The savers to hold back in the pass about to start (convergence.hold_back): all that
        are not bulk-first, while the bulk-first ones' backlog is large and shrinking."""
        bulk = [s for s in self.savers if s.bulk_first]
        if self._released or not bulk or len(bulk) == len(self.savers):
            return frozenset()
        left = sum(s.pending() for s in bulk)
        if not hold_back(left, self._bulk_sent_last, self.bandwidth(), self.downtime_limit_ms(),
                         self._held_passes):
            self._released = True
            return frozenset()
        self._held_passes += 1
        return frozenset(i for i, s in enumerate(self.savers) if not s.bulk_first)

    def _end_pass(self, now: float) -> tuple[PassReport, bool]:
        self._in_pass = False
        self._bulk_sent_last = self._bulk_sent
        for s in self.savers:
            s.sync()
        secs = now - self._pass_t0
        nbytes = self.sent_total() - self._pass_sent0
        self._send_bytes += nbytes
        self._send_secs += secs
        sent, zero, waiting = self.pages()
        pages, zero_pages = sent - self._pass_pages0[0], zero - self._pass_pages0[1]
        units_sent, units_waiting = self.units()
        elapsed = max(now - self._last_sync, 1e-6)
        # Dirtied since the last sync: what a saver has waiting after its sync, having sent what
        # it had; a held saver sent nothing, so only what its wait grew by is new.
        dirty_units = dirty_pages = 0
        for i, s in enumerate(self.savers):
            u, p = s.units()[1], s.page_counts()[2]
            if i in self._held:
                u0, p0 = self._waiting0[i]
                u, p = max(0, u - u0), max(0, p - p0)
            dirty_units, dirty_pages = dirty_units + u, dirty_pages + p
        self._last_sync = now
        exp = self.expected_downtime()
        self.expected_ms = exp
        held = tuple(self.savers[i].name for i in sorted(self._held))
        report = PassReport(self._pass, pages, zero_pages, nbytes, secs,
                            nbytes / secs if secs > 0 else 0.0, waiting, dirty_pages / elapsed, exp,
                            dirty_units * UNIT_BYTES / elapsed, held)
        self.passes.append(report)
        limit = self.downtime_limit_ms()
        # RAM pages and disk blocks alike: a pass pays when it leaves less than half of what it
        # sent, whichever state the guest dirties.
        # A pass that held savers back never ends in a switchover, even when their backlog would
        # fit the limit (a small RAM): they get a pass of their own first, so the pause carries
        # only what they dirty again, not all they hold.
        switch = not self._held and switch_now(exp, limit, units_sent - self._pass_units0,
                                               units_waiting, self._extra)
        if exp <= limit:
            self._extra += 1
        return report, switch

    def confirm_switchover(self) -> bool:
        """After the driver waited for the backlog to drain: is the expected downtime, with the
        backlog as it now is, still within the limit? If not, passes go on."""
        exp = self.expected_downtime()
        self.expected_ms = exp
        if exp > self.downtime_limit_ms():
            return False
        self.expected_at_switchover_ms = exp
        return True

    def complete(self, out: SaverOutput, clock: Callable[[], float],
                 skip: Sequence[Saver] = ()) -> dict[str, float]:
        """The vCPUs are paused: each saver's rest. Returns where the time went, in ms, as
        "stopped-<saver>" per saver. END follows with `end`. `skip`: savers whose rest goes
        otherwise (postcopy's RAM, sent after the destination runs the guest)."""
        o = self._out(out)
        phases: dict[str, float] = {}
        t = clock()
        for s in self.savers:
            if s in skip:
                continue
            s.complete(o)
            t1 = clock()
            phases[f"stopped-{s.name}"] = round((t1 - t) * 1000, 3)
            t = t1
        return phases

    def send(self, out: SaverOutput, bufs: Sequence[bytes | bytearray | memoryview]) -> int:
        """Records the driver writes itself (postcopy's commands and pages), counted as sent."""
        return self._out(out).send(bufs)

    def end(self, out: SaverOutput) -> None:
        """END: the record count and running digest that close the stream."""
        self._out(out).send([self.encoder.encode(EndOfStream())])

    def cleanup(self) -> None:
        for s in self.savers:
            s.cleanup()


class _Counting:
    """The driver's output, counting what the channel accepted into the session."""

    def __init__(self, session: SourceSession, out: SaverOutput) -> None:
        self._session = session
        self._out = out
        self.encoder = out.encoder

    def send(self, bufs: Sequence[bytes | bytearray | memoryview]) -> int:
        n = self._out.send(bufs)
        self._session.sent += n
        return n

    def cancelled(self) -> bool:
        return self._out.cancelled()

