"""Postcopy RAM: the destination runs the guest while the rest of its RAM arrives.

At the switch the source works out, per RAM block, which pages it still has to send: the pages
queued and not sent plus those a sync found re-dirtied. That set goes to the destination as
POSTCOPY_DISCARD bitmaps ("drop your copy, a fresh one is coming") in two steps
(`SwitchDiscards`): most of it while the source's guest still runs (the early discard), the
rest, what the stopped sync adds, at the switch. Every other page the destination either
received in precopy or was never populated on the source (zero), so the destination knows
exactly which pages it still waits for: the union of the discards.

Destination (`PostcopyDestination`): at each POSTCOPY_DISCARD it drops its copies of those pages
(MADV_DONTNEED: missing again; only those populated here, many runs per system call:
RamBlock.discard_mask); at POSTCOPY_LISTEN it registers every RAM block with userfaultfd in
missing mode and starts the fault resolver thread. A fault on a page to come sends PAGE_REQUEST
(once per page) on the return path, or with postcopy-preempt on the preempt channel, which the
resolver also reads and places from (one thread on the request's way here, migration/preempt.py);
a fault on any other missing page (never populated on the source: zero) is resolved on the spot
with a zero page. The incoming thread places arriving pages with
UFFDIO_COPY / UFFDIO_ZEROPAGE, which wakes every thread blocked on them. Blocked vCPUs are timed
for QEMU's `postcopy-blocktime` (all vCPUs blocked at once) and `postcopy-vcpu-blocktime` (each
vCPU); every fault's latency (read by the resolver -> placed) feeds vmferry's latency figures.

Source (`PostcopySource`): the vCPUs stay stopped; requested pages go first, then the
background push continues from just after the last requested page (the guest's locality) in
chunks that a request halves (down to 64 KiB) and that double while no request comes (up to
256 KiB), so a request never waits behind more than one chunk of this thread's own output. A
chunk's non-zero pages go as one record (RAM_PAGE_LIST when scattered): the destination's one
incoming thread parses a record per chunk, not one per run of pages. Without
postcopy-preempt all on the one stream (priority framing: one writer decides the order): the
socket's send buffer is kept small in postcopy so that little is queued below us. With it,
requests come and requested pages go on the preempt channel, served by a thread of its own
(`take_request`, migration/preempt.py); `_send` / `_send_few` hand each page to exactly one of
the two threads.

Nothing here reads guest RAM through Python indexing on the destination: placing goes from the
stream's buffers through ioctls that release the GIL (kvm/userfaultfd.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vmferry.errors import MigrationError
from vmferry.kvm.userfaultfd import Fault, Userfaultfd
from vmferry.machine.ramblock import RamBlock
from vmferry.migration.forecast import ForecastInput, simulate
from vmferry.migration.pages import PAGE_SIZE, WORDS_PER_PAGE, runs, zero_pages
from vmferry.migration.saver import Handler, Loader, Send
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Command, CommandCode, RamZero

if TYPE_CHECKING:
    from vmferry.migration.preempt import PreemptLink
    from vmferry.migration.ram import RamLoader

log = logging.getLogger("vmferry.migration")

# Background push chunk, in pages: halved by a request on the one stream (a requested page
# waits behind at most one chunk: 64 pages are 2.2 ms of a 1 Gbit/s link), never below MIN,
# doubled by each chunk sent. Not before: reset to 4 pages by every request, the chunks stayed
# small under the ~250 requests/s of S5 and the push was CPU-bound at ~50 MB/s (bench/RESULTS.md).
MIN_CHUNK_PAGES = 16
MAX_CHUNK_PAGES = 64
MAX_LIST_PAGES = 1 << 16
SCAN_WINDOW_PAGES = 8192
# Pages sent with a requested one (the guest usually touches the next pages next).
REQUEST_AHEAD_PAGES = 3
# A request this small (with the pages ahead) is sent by a path of its own (PostcopySource._send_few).
SMALL_REQUEST_PAGES = 16
# A requested page crosses several threads (on the one stream four: resolver, the source's
# return-path reader, its push, the destination's incoming thread; with postcopy-preempt two),
# each of which may wait for the GIL while another thread is busy: Python's default switch
# interval (5 ms) per hop would dominate the fault latency.
SWITCH_INTERVAL_S = 0.0001  # measured: 0.5 ms gave p99 ~11 ms with preempt, 0.1 ms ~4 ms
_saved_switch_interval: float | None = None
# POSTCOPY_DISCARD's index: 1 = the early discard, sent while the source's guest still runs;
# 0 = at the switch, the vCPUs stopped. The destination applies both at once; the index only
# says which of its figures (outside or inside the pause) the time goes to.
DISCARD_EARLY = 1
# The nice value of the threads on a fault's way (fault_path_priority); measured on this 2-core
# host at load 8-11 with postcopy-preempt: average 0.9-1.5 ms at -10 against 1.4-4.1 ms at 0.
FAULT_PATH_NICE = -10


def short_switch_interval() -> None:
    """Postcopy's GIL hand-over (SWITCH_INTERVAL_S) for this process, until restored."""
    global _saved_switch_interval
    if _saved_switch_interval is None:
        _saved_switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def fault_path_priority() -> None:
    """The calling thread is on a fault's way (the destination's resolver, the source's preempt
    thread): ask for a higher scheduling priority (FAULT_PATH_NICE), where allowed. These threads
    sleep until a fault or a request comes and then run briefly; on a host whose cores are busy
    (the push's threads, the guest's vCPUs, other work) each wake-up otherwise waits for a core.
    Best effort: without the privilege (CAP_SYS_NICE) the thread keeps its priority."""
    with contextlib.suppress(OSError):  # Linux: PRIO_PROCESS with a thread id is that thread only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FAULT_PATH_NICE)


def restore_switch_interval() -> None:
    """Postcopy is over here: the interval Python had before."""
    global _saved_switch_interval
    if _saved_switch_interval is not None:
        sys.setswitchinterval(_saved_switch_interval)
        _saved_switch_interval = None


HISTOGRAM_BUCKETS = 24  # log2 buckets of fault latency in us: [1, 2) ... [2^23, inf)


def precopy_overruns(elapsed_s: float, remaining_bytes: int, dirty_rate_bps: float, bandwidth_bps: float,
                     downtime_limit_ms: float, working_set_bytes: int, budget_ms: int) -> str | None:
    """Postcopy's automatic switch (x-postcopy-after-ms): does precopy's forecast, from where the
    migration stands after a pass, say it will not complete within `budget_ms` of its start?
    The reason if so, else None (also while nothing has been measured). Pure."""
    if budget_ms <= 0 or bandwidth_bps <= 0:
        return None
    f = simulate(ForecastInput(initial_bytes=remaining_bytes, dirty_rate_bps=dirty_rate_bps,
                               bandwidth_bps=bandwidth_bps, downtime_limit_ms=downtime_limit_ms,
                               working_set_bytes=max(working_set_bytes, remaining_bytes)))
    if not f.converges:
        return (f"precopy does not converge: the guest dirties {dirty_rate_bps / 2**20:.1f} MiB/s "
                f"against {bandwidth_bps / 2**20:.1f} MiB/s of bandwidth and a "
                f"{downtime_limit_ms:.0f} ms downtime-limit")
    done_ms = (elapsed_s + f.total_time_s) * 1000
    if done_ms > budget_ms:
        return (f"precopy would complete {done_ms:.0f} ms after the start, beyond "
                f"x-postcopy-after-ms {budget_ms}")
    return None


def mask_to_bitmap(mask: np.ndarray) -> bytes:
    """Bool per page -> bitmap (bit i of byte j = page 8j+i), the stream's bitmap layout."""
    return np.packbits(mask, bitorder="little").tobytes()


def bitmap_to_mask(data: bytes, npages: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits.size < npages:
        raise MigrationError(f"a page bitmap of {len(data)} bytes is too short for {npages} pages")
    return bits[:npages].astype(bool)


# --- measured on the destination ---


class Blocktime:
    """QEMU's postcopy blocktime: per vCPU the time it spent blocked on missing pages, and the
    time during which every vCPU was blocked at once (the guest made no progress). Times in s;
    the caller passes the clock in (pure logic)."""

    def __init__(self, nvcpus: int) -> None:
        self.nvcpus = nvcpus
        self.per_vcpu = [0.0] * nvcpus
        self.total = 0.0
        self._since: list[float | None] = [None] * nvcpus
        self._blocked = 0
        self._all_since = 0.0

    def blocked(self, vcpu: int, now: float) -> None:
        if self._since[vcpu] is not None:
            return  # one fault at a time per vCPU; a repeated message changes nothing
        self._since[vcpu] = now
        self._blocked += 1
        if self._blocked == self.nvcpus:
            self._all_since = now

    def unblocked(self, vcpu: int, now: float) -> None:
        since = self._since[vcpu]
        if since is None:
            return
        self.per_vcpu[vcpu] += max(0.0, now - since)
        if self._blocked == self.nvcpus:
            self.total += max(0.0, now - self._all_since)
        self._blocked -= 1
        self._since[vcpu] = None


@dataclass
class FaultLatency:
    """Fault latency (fault read -> page placed), in us: count, sum, max, and a log2 histogram
    (bucket k counts latencies in [2^k, 2^(k+1)) us; bucket 0 also takes those under 1 us)."""

    count: int = 0
    sum_us: float = 0.0
    max_us: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)
    _samples: list[float] = field(default_factory=list)

    def add(self, us: float) -> None:
        self.count += 1
        self.sum_us += us
        self.max_us = max(self.max_us, us)
        k = min(HISTOGRAM_BUCKETS - 1, max(0, int(us).bit_length() - 1))
        self.histogram[k] += 1
        self._samples.append(us)

    def percentile(self, p: float) -> float:
        """The p-th percentile (nearest rank) of the samples, us; 0 without any."""
        if not self._samples:
            return 0.0
        s = sorted(self._samples)
        return s[min(len(s) - 1, max(0, int(np.ceil(p / 100 * len(s))) - 1))]

    def samples_us(self) -> list[float]:
        """Every fault's latency so far, us, in the order the faults were resolved."""
        return [round(x, 1) for x in self._samples]

    def report(self) -> dict:
        """query-migrate's `x-postcopy-fault-latency` (docs/migration.md): ms, and the histogram
        as {"<2^k us": count} for its non-empty buckets."""
        ms = 1000.0
        return {
            "faults": self.count,
            "avg-ms": round(self.sum_us / self.count / ms, 3) if self.count else 0.0,
            "p50-ms": round(self.percentile(50) / ms, 3),
            "p99-ms": round(self.percentile(99) / ms, 3),
            "max-ms": round(self.max_us / ms, 3),
            "histogram-us": {str(1 << (k + 1)): n for k, n in enumerate(self.histogram) if n},
        }


class PostcopyDestination:
    """The destination's postcopy RAM: pages to come, the userfaultfd, the fault resolver.

    `request(block_id, first_page, count)` sends a PAGE_REQUEST on the return path (from the
    resolver thread); `vcpu_thread_ids()` maps faulting threads to vCPUs."""

    def __init__(self, blocks: dict[int, RamBlock], received: dict[int, np.ndarray],
                 request: Callable[[int, int, int], None],
                 vcpu_thread_ids: Callable[[], Sequence[int]]) -> None:
        self.blocks = blocks
        self.received = received
        self.to_come = {bid: np.zeros(b.npages, dtype=bool) for bid, b in blocks.items()}
        self.placed = {bid: np.zeros(b.npages, dtype=bool) for bid, b in blocks.items()}
        self._request = request
        self._vcpu_thread_ids = vcpu_thread_ids
        self._vcpu_of: dict[int, int] = {}
        self._foreign: set[int] = set()  # fault thread ids outside this process (KVM's workers)
        self._own: set[int] = set()
        self.async_faults = 0  # faults taken by KVM's async page fault workers
        self.uffd: Userfaultfd | None = None
        self._lock = threading.Lock()
        # (block, page) -> [(thread id, fault read at)] of the threads waiting for it
        self._waiting: dict[tuple[int, int], list[tuple[int, float]]] = {}
        self._requested: set[tuple[int, int]] = set()
        self.requests = 0  # PAGE_REQUESTs sent
        self.local_zero = 0  # faults resolved here with a zero page
        self.pages_to_come = 0
        self.pages_discarded = 0  # stale copies dropped by the discards at the switch (pause)
        self.discard_ms = 0.0  # what dropping them took (inside the switch's pause)
        self.early_pages_discarded = 0  # dropped by the early discard (the source's guest ran)
        self.early_discard_ms = 0.0
        self.pages_placed = 0
        self.blocktime = Blocktime(1)
        self.latency = FaultLatency()
        self.error: str | None = None  # the resolver's failure, if it failed
        # Called (from the resolver thread) when the resolver ends before close(): every later
        # fault would go unanswered and the guest hang on its next missing page.
        self.on_resolver_died: Callable[[str], None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # postcopy-preempt: the channel the resolver requests on and reads pages from (None: the
        # return path, and pages only on the main stream)
        self._link: PreemptLink | None = None
        self._link_lost: Callable[[BaseException], None] = lambda e: None

    # --- before LISTEN ---

    def discard(self, block_id: int, bitmap: bytes, early: bool = False) -> None:
        """POSTCOPY_DISCARD: these pages will come again; the copies here are stale and are
        dropped now (only those populated here). `early`: the source's guest still runs (the
        early discard), so this is outside the pause. Nothing may write guest RAM from the first
        discard on (the caller stopped its prefault threads, and the stream carries no precopy
        page after a discard)."""
        b = self.blocks.get(block_id)
        if b is None:
            raise MigrationError(f"postcopy discard for unknown RAM block id {block_id}")
        if self.uffd is not None:
            raise MigrationError("POSTCOPY_DISCARD after POSTCOPY_LISTEN")
        t0 = time.monotonic()
        # By index, not whole-block masks: the discard at the switch is small and in the pause.
        pages = np.flatnonzero(bitmap_to_mask(bitmap, b.npages))
        to_come = self.to_come[block_id]
        # A page an earlier discard dropped is missing already: not looked at again.
        dropped = b.discard_pages(pages[~to_come[pages]])
        to_come[pages] = True
        self.received[block_id][pages] = False
        ms = (time.monotonic() - t0) * 1000
        if early:
            self.early_pages_discarded += dropped
            self.early_discard_ms = round(self.early_discard_ms + ms, 3)
        else:
            self.pages_discarded += dropped
            self.discard_ms = round(self.discard_ms + ms, 3)

    def listen(self) -> None:
        """POSTCOPY_LISTEN: every stale copy was dropped by its POSTCOPY_DISCARD; register every
        block with userfaultfd, start the resolver."""
        for bid in self.blocks:
            self.pages_to_come += int(np.count_nonzero(self.to_come[bid]))
        tids = list(self._vcpu_thread_ids())
        self._vcpu_of = {tid: i for i, tid in enumerate(tids)}
        self.blocktime = Blocktime(max(1, len(tids)))
        self.uffd = Userfaultfd()
        for b in self.blocks.values():
            self.uffd.register(b.host_addr, b.nbytes)
        self._thread = threading.Thread(target=self._resolver_main, name="postcopy-faults", daemon=True)
        self._thread.start()

    def _resolver_main(self) -> None:
        """The resolver thread: `_resolve` until close(). If it ends before that, the migration
        is told (`on_resolver_died`): it pauses (after RUN) or refuses RUN (before), naming why."""
        try:
            self._resolve()
        except Exception as e:  # noqa: BLE001 - reported below, through the migration's state
            self.error = f"postcopy fault resolver: {e}"
        if self._stop.is_set():
            return
        why = self.error or "postcopy fault resolver: the thread ended"
        log.error("%s: faults are no longer answered", why)
        if self.on_resolver_died is not None:
            self.on_resolver_died(why)

    def restart_resolver(self) -> bool:
        """After a recovery: a resolver that died runs again on the same userfaultfd (faults
        it read and never answered are woken when their pages arrive). True if it was dead."""
        thread = self._thread
        if self.uffd is None or self._stop.is_set() or (thread is not None and thread.is_alive()):
            return False
        self.error = None
        self._thread = threading.Thread(target=self._resolver_main, name="postcopy-faults", daemon=True)
        self._thread.start()
        log.warning("postcopy: the fault resolver runs again (it had died)")
        return True

    # --- placing what arrives (the incoming thread) ---

    def place_pages(self, block_id: int, first_page: int, data: memoryview | bytes | bytearray) -> int:
        """Pages first_page.. from `data`: the ones still to come are placed (and their waiters
        woken); returns the pages placed."""
        count = len(data) // PAGE_SIZE
        src = np.frombuffer(data, dtype=np.uint8)
        base = src.ctypes.data  # once: `.ctypes` builds an object per access
        return self._place(block_id, np.arange(first_page, first_page + count),
                           lambda i: base + i * PAGE_SIZE, src)

    def place_list(self, block_id: int, pages: np.ndarray, data: memoryview | bytes | bytearray) -> int:
        src = np.frombuffer(data, dtype=np.uint8)
        base = src.ctypes.data
        return self._place(block_id, np.asarray(pages, dtype=np.int64),
                           lambda i: base + i * PAGE_SIZE, src)

    def place_zero(self, block_id: int, first_page: int, count: int) -> int:
        return self._place(block_id, np.arange(first_page, first_page + count), None, None)

    def _place(self, block_id: int, pages: np.ndarray, src_addr: Callable[[int], int] | None,
               keep: object) -> int:
        b = self.blocks.get(block_id)
        if b is None:
            raise MigrationError(f"pages for unknown RAM block id {block_id}")
        uffd = self.uffd
        if uffd is None:
            raise MigrationError("postcopy pages arrived before POSTCOPY_LISTEN")
        if pages.size and (pages[0] < 0 or pages[-1] >= b.npages):
            raise MigrationError(f"postcopy pages beyond RAM block id {block_id}")
        want = self.to_come[block_id][pages] & ~self.placed[block_id][pages]
        positions = np.flatnonzero(want)
        for p0, n in _runs_at(pages, positions):
            dst = b.host_addr + int(pages[p0]) * PAGE_SIZE
            if src_addr is None:
                ok = uffd.zeropage(dst, n * PAGE_SIZE)
            else:
                ok = uffd.copy(dst, src_addr(p0), n * PAGE_SIZE)
            if not ok:  # some page of the run exists already: one by one
                for j in range(p0, p0 + n):
                    at = b.host_addr + int(pages[j]) * PAGE_SIZE
                    if src_addr is None:
                        uffd.zeropage(at, PAGE_SIZE)
                    else:
                        uffd.copy(at, src_addr(j), PAGE_SIZE)
        del keep
        placed = pages[positions]
        now = time.monotonic()
        with self._lock:
            # With postcopy-preempt two threads place: a page both placed (one got EEXIST) counts once.
            placed = placed[~self.placed[block_id][placed]]
            self.placed[block_id][placed] = True
            self.pages_placed += int(placed.size)
            if self._waiting:
                for p in placed.tolist():
                    for tid, at in self._waiting.pop((block_id, p), ()):
                        self._woken(tid, at, now)
        return int(placed.size)

    def _vcpu_for(self, tid: int) -> int | None:
        """The vCPU a fault blocks. A vCPU thread's own fault is that vCPU's. A guest that can
        take interrupts faults through KVM's async page fault instead: a kernel worker takes the
        fault (its thread is not ours) and the vCPU halts until the page is there — with one
        vCPU that is vCPU 0; with more, which one is not known (counted, not attributed)."""
        vcpu = self._vcpu_of.get(tid)
        if vcpu is not None or tid in self._own:
            return vcpu
        if tid not in self._foreign:
            if os.path.exists(f"/proc/self/task/{tid}"):
                self._own.add(tid)
                return None
            self._foreign.add(tid)
        self.async_faults += 1
        return 0 if self.blocktime.nvcpus == 1 else None

    def _woken(self, tid: int, at: float, now: float) -> None:
        self.latency.add((now - at) * 1e6)
        vcpu = self._vcpu_for_woken(tid)
        if vcpu is not None:
            self.blocktime.unblocked(vcpu, now)

    def _vcpu_for_woken(self, tid: int) -> int | None:
        vcpu = self._vcpu_of.get(tid)
        if vcpu is None and tid in self._foreign and self.blocktime.nvcpus == 1:
            return 0
        return vcpu

    def all_placed(self) -> bool:
        return self.pages_placed >= self.pages_to_come

    def missing(self) -> int:
        return self.pages_to_come - self.pages_placed

    # --- the resolver thread ---

    def attach_preempt(self, link: PreemptLink, lost: Callable[[BaseException], None]) -> None:
        """postcopy-preempt: from LISTEN on the resolver requests pages on `link` and places what
        it brings (migration/preempt.py); `lost(error)` is told if the channel fails, and the
        requests go on the return path from then on. Before listen()."""
        self._link, self._link_lost = link, lost

    def _resolve(self) -> None:
        uffd = self.uffd
        assert uffd is not None
        link = self._link
        if link is not None:
            link.attached.set()
        fault_path_priority()
        try:
            while not self._stop.is_set() and not uffd.closed:
                if link is None:
                    faults, readable = uffd.wait(0.5), False
                else:
                    faults, readable = uffd.wait_with(link.fileno(), 0.5)
                if faults:
                    self._faults(uffd, faults, link)
                    if link is not None and link.released.is_set():
                        link = None  # lost while requesting: the return path asks again
                if link is not None and readable:
                    try:
                        going_on = link.pump()
                    except Exception as e:  # noqa: BLE001 - the channel's failure, not ours
                        self._drop_link(link, e)
                        link = None
                        continue
                    if not going_on:  # its END is in: the migration is ending
                        self._release(link)
                        link = None
        except Exception as e:  # noqa: BLE001 - reported through the migration's state
            if not self._stop.is_set():
                self.error = f"postcopy fault resolver: {e}"
                log.warning("%s", self.error)
        finally:
            if link is not None:
                self._release(link)

    def _faults(self, uffd: Userfaultfd, faults: list[Fault], link: PreemptLink | None) -> None:
        """Fault events: each page to come is requested once (on the preempt channel when there
        is one) and its waiters noted; any other missing page gets a zero page here."""
        now = time.monotonic()
        requests: list[tuple[int, int]] = []
        zero: list[int] = []
        with self._lock:
            for f in faults:
                bid, page = self._locate(f.address)
                if bid == 0:
                    continue
                if self.to_come[bid][page] and not self.placed[bid][page]:
                    self._waiting.setdefault((bid, page), []).append((f.thread_id, now))
                    vcpu = self._vcpu_for(f.thread_id)
                    if vcpu is not None:
                        self.blocktime.blocked(vcpu, now)
                    if (bid, page) not in self._requested:
                        self._requested.add((bid, page))
                        requests.append((bid, page))
                else:
                    zero.append(f.address & ~(PAGE_SIZE - 1))
        for bid, page in requests:
            self.requests += 1
            if link is not None and not link.released.is_set():
                try:
                    link.request(bid, page, 1)
                    continue
                except Exception as e:  # noqa: BLE001 - the channel's failure: the return path asks
                    self._drop_link(link, e)
            self._request(bid, page, 1)
        for addr in zero:
            # Never populated on the source (zero there), or placed since the fault was read: a
            # zero page, or (EEXIST) just a wake-up.
            if not uffd.zeropage(addr, PAGE_SIZE):
                uffd.wake(addr, PAGE_SIZE)
            self.local_zero += 1

    def _release(self, link: PreemptLink) -> None:
        """The resolver no longer uses the preempt channel (it may be closed now)."""
        if self._link is link:
            self._link = None
        link.released.set()

    def _drop_link(self, link: PreemptLink, e: BaseException) -> None:
        """The preempt channel failed: tell the driver, and ask again on the return path for
        every page still waited on (the requests that went on the channel may be lost)."""
        self._release(link)
        self._link_lost(e)
        self.rerequest()

    def _locate(self, addr: int) -> tuple[int, int]:
        for bid, b in self.blocks.items():
            if b.host_addr <= addr < b.host_addr + b.nbytes:
                return bid, (addr - b.host_addr) // PAGE_SIZE
        return 0, 0

    def rerequest(self) -> None:
        """After a recovery: ask again for every page a thread still waits on."""
        with self._lock:
            waiting = list(self._waiting)
        for bid, page in waiting:
            self._request(bid, page, 1)

    def close(self) -> None:
        """Stop the resolver and close the userfaultfd: every page still missing is then an
        ordinary zero-fill page and every blocked access is woken. On every exit path, before
        the VM's fds close. Idempotent."""
        self._stop.set()
        uffd = self.uffd
        if uffd is not None:
            uffd.close()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(5)
            uffd.release()

    def fault_latency_snapshot(self) -> tuple[dict, list[float]]:
        """The fault-latency figures and every fault's latency (read -> placed, us), taken
        together: the guest may still fault (pages never populated get zero pages here)."""
        with self._lock:
            return self.latency.report(), self.latency.samples_us()

    def report(self) -> dict:
        """query-migrate's postcopy numbers on the destination (docs/migration.md)."""
        with self._lock:
            blocked = [round(t * 1000) for t in self.blocktime.per_vcpu]
            total = round(self.blocktime.total * 1000)
            latency = self.latency.report()
        return {"postcopy-blocktime": total, "postcopy-vcpu-blocktime": blocked,
                "x-postcopy": {"requests": self.requests, "request-bytes": self.requests * PAGE_SIZE,
                               "pages-to-come": self.pages_to_come,
                               "pages-discarded": self.pages_discarded, "discard-ms": self.discard_ms,
                               "early-pages-discarded": self.early_pages_discarded,
                               "early-discard-ms": self.early_discard_ms,
                               "pages-placed": self.pages_placed,
                               "local-zero-pages": self.local_zero, "kvm-async-faults": self.async_faults,
                               "fault-latency": latency}}


def _runs_at(pages: np.ndarray, positions: np.ndarray) -> list[tuple[int, int]]:
    """(first position, count) of each run of `positions` (ascending indexes into `pages`) that
    is consecutive both in the record and in page numbers: what one UFFDIO_COPY can place.
    Vectorised: Python loops once per run, not once per page."""
    if not positions.size:
        return []
    at = pages[positions]
    cut = (np.flatnonzero((np.diff(positions) != 1) | (np.diff(at) != 1)) + 1).tolist()
    starts = [0, *cut]
    ends = [*cut, int(positions.size)]
    firsts = positions[starts].tolist()
    return [(f, e - s) for f, s, e in zip(firsts, starts, ends, strict=True)]


class PostcopyNeverRan(MigrationError):
    """A recovery reached a destination that listened but never got POSTCOPY_RUN: it never ran
    the guest, so the source (which still has all of it) takes it back."""


class PostcopyLoader(Loader):
    """The destination's postcopy commands (dest_session dispatch): ADVISE, DISCARD, LISTEN, RUN.

    `enabled()`: this side's capability postcopy-ram; `request`: PAGE_REQUEST on the return
    path; `on_run()`: apply the staged device state and start the guest (the driver's)."""

    name = "postcopy"

    def __init__(self, ram: RamLoader, enabled: Callable[[], bool], request: Callable[[int, int, int], None],
                 vcpu_thread_ids: Callable[[], Sequence[int]], on_run: Callable[[], None],
                 on_resumed: Callable[[], None] = lambda: None,
                 on_resolver_died: Callable[[str], None] = lambda why: None,
                 preempt_link: Callable[[], tuple[PreemptLink, Callable[[BaseException], None]] | None]
                 = lambda: None) -> None:
        self.ram = ram
        self._enabled = enabled
        self._request = request
        self._vcpu_thread_ids = vcpu_thread_ids
        self._on_run = on_run
        self._on_resumed = on_resumed
        self._on_resolver_died = on_resolver_died
        self._preempt_link = preempt_link
        self.advised = False
        self.dest: PostcopyDestination | None = None
        self.running = False  # RUN applied: the guest runs here

    def handlers(self) -> Mapping[type | CommandCode, Handler]:
        return {CommandCode.POSTCOPY_ADVISE: self._advise, CommandCode.POSTCOPY_DISCARD: self._discard,
                CommandCode.POSTCOPY_LISTEN: self._listen, CommandCode.POSTCOPY_RUN: self._run,
                CommandCode.POSTCOPY_RESUMED: self._resumed}

    def _advise(self, cmd: Command) -> None:
        if not self._enabled():
            raise MigrationError("the source advises postcopy but capability 'postcopy-ram' is off on this "
                                 "destination: turn it on on both sides (migrate-set-capabilities)")
        Userfaultfd().release()  # can this process use userfaultfd at all? Say so now, not at the switch
        self.advised = True
        self.ram.no_placing = True

    def _ready(self, what: str) -> PostcopyDestination:
        if not self.advised:
            raise MigrationError(f"{what} without POSTCOPY_ADVISE")
        if self.dest is None:
            self.dest = PostcopyDestination(self.ram.blocks_by_id, self.ram.received, self._request,
                                            self._vcpu_thread_ids)
            self.dest.on_resolver_died = self._on_resolver_died
        return self.dest

    def _discard(self, cmd: Command) -> None:
        dest = self._ready("POSTCOPY_DISCARD")
        # From the first discard on nothing may populate guest RAM here: a page prefaulted
        # after its copy was dropped would read as zero instead of faulting once registered.
        self.ram.stop_prefaulting()
        self.ram.discarding = True
        dest.discard(cmd.block_id, cmd.data, early=cmd.index == DISCARD_EARLY)

    def _listen(self, cmd: Command) -> None:
        dest = self._ready("POSTCOPY_LISTEN")
        if dest.uffd is not None:
            raise MigrationError("POSTCOPY_LISTEN twice")
        self.ram.stop_prefaulting()
        link = self._preempt_link()
        if link is not None:
            dest.attach_preempt(*link)
        dest.listen()
        self.ram.placer = dest

    def _run(self, cmd: Command) -> None:
        if self.dest is None or self.dest.uffd is None:
            raise MigrationError("POSTCOPY_RUN before POSTCOPY_LISTEN")
        self._on_run()

    def started(self) -> None:
        """The driver is about to start the guest: from here a failure pauses instead of
        refusing the stream (a refusal, SHUT, tells the source that the guest never ran here, and
        the source resumes it)."""
        self.running = True

    def _resumed(self, cmd: Command) -> None:
        """POSTCOPY_RESUMED, the first command of a recovery's stream: answer with what is here
        (RECEIVED_BITMAP per block, RESUME) through the driver, and ask again for every page a
        thread still waits on."""
        if self.dest is not None and self.dest.uffd is not None and not self.running:
            raise PostcopyNeverRan("POSTCOPY_RUN never arrived here: the guest never ran on this "
                                   "destination, the source keeps it")
        if not self.running or self.dest is None:
            raise MigrationError("POSTCOPY_RESUMED without a paused postcopy migration here")
        self.dest.restart_resolver()
        self._on_resumed()
        self.dest.rerequest()

    def received_bitmaps(self) -> list[tuple[int, bytes]]:
        """(block id, bitmap) of the pages to come that were placed: what a recovery skips."""
        assert self.dest is not None
        with self.dest._lock:
            return [(bid, mask_to_bitmap(self.dest.placed[bid])) for bid in self.dest.blocks]

    def release(self) -> None:
        if self.dest is not None:
            self.dest.close()


# --- the source ---


class SwitchDiscards:
    """The source's two discards at the switch to postcopy.

    D1, the early discard: the source syncs the dirty log while its guest still runs, stops
    sending precopy pages, and sends every page still to send (queued or dirty) as
    POSTCOPY_DISCARD; the destination drops those copies while the guest runs here (the drain
    before the pause waits for it). D2, at the switch: the vCPUs stopped, a second sync finds
    only the pages written since D1; those not in D1 are discarded too. The pages to come are
    D1 ∪ D2.

    Why nothing stale is left on the destination: a copy it holds was read here at some time t
    after the sync that last cleared the page's dirty bit; a write after t is in the dirty log
    from t on, so it is in the first sync after it — D1 if it came before the D1 sync, D2 if it
    came between the two syncs (the log tracks across both), none after the vCPUs stopped. A
    page in flight at D1 travels before the discard on the one stream (multifd, whose channels
    would not, is refused with postcopy) and is dropped by it. Nothing is sent between the two
    syncs, so no copy on the destination is newer than D1's view. And nothing clean is dropped:
    a page is in D1 ∪ D2 only if it was dirtied after its last claim or never sent."""

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        self.blocks = list(blocks)
        self.early_masks: list[np.ndarray] | None = None

    def early(self, pending: Sequence[np.ndarray]) -> list[Command]:
        """D1 from the saver's pages still to send (per block, indexes): the early discard."""
        self.early_masks = [np.zeros(b.npages, dtype=bool) for b in self.blocks]
        for mask, idx in zip(self.early_masks, pending, strict=True):
            mask[idx] = True
        return _discard_commands(self.early_masks, DISCARD_EARLY)

    def final(self, pending: Sequence[np.ndarray]) -> tuple[list[Command], list[np.ndarray]]:
        """D2 from the stopped sync's pages: the discard of what D1 did not hold, and per block
        the pages to come (D1 ∪ D2, ascending indexes)."""
        late = [np.zeros(b.npages, dtype=bool) for b in self.blocks]
        for mask, idx in zip(late, pending, strict=True):
            mask[idx] = True
        early = self.early_masks or [np.zeros(b.npages, dtype=bool) for b in self.blocks]
        cmds = _discard_commands([m & ~e for m, e in zip(late, early, strict=True)], 0)
        return cmds, [np.flatnonzero(m | e) for m, e in zip(late, early, strict=True)]


def _discard_commands(masks: Sequence[np.ndarray], index: int) -> list[Command]:
    return [Command(CommandCode.POSTCOPY_DISCARD, block_id=i + 1, index=index,
                    count=int(np.count_nonzero(m)), data=mask_to_bitmap(m))
            for i, m in enumerate(masks) if m.any()]


class PostcopySource:
    """The source's postcopy RAM push: pages to send (per block), requests first."""

    def __init__(self, blocks: Sequence[RamBlock], encoder: StreamEncoder,
                 pending: Sequence[np.ndarray]) -> None:
        """`pending`: per block (ids 1-based, the RAM_BLOCKS order) the page indexes still to send."""
        self.blocks = list(blocks)
        self.encoder = encoder
        self.unsent = [np.zeros(b.npages, dtype=bool) for b in self.blocks]
        for mask, idx in zip(self.unsent, pending, strict=True):
            mask[idx] = True
        self.left = int(sum(int(np.count_nonzero(m)) for m in self.unsent))
        self.total = self.left
        # The whole postcopy set: after a recovery, what the destination may still miss.
        self._to_send = [m.copy() for m in self.unsent]
        self._requests: deque[tuple[int, int, int]] = deque()
        self._lock = threading.Lock()
        self.wakeup = threading.Event()
        self._cursor = (0, 0)  # (block index, page) where the background push goes on
        self._chunk = MIN_CHUNK_PAGES
        self.requests = 0  # PAGE_REQUESTs received (QEMU's postcopy-requests)
        self.request_pages_sent = 0
        self.bytes = 0  # stream bytes of pages sent in postcopy (QEMU's postcopy-bytes)
        self.pages = 0
        self.zero_pages = 0

    def received_bitmap(self, block_id: int, bitmap: bytes) -> None:
        """RECEIVED_BITMAP after a recovery: pages the destination has are not sent again; pages
        sent but lost on the broken link are sent again."""
        i = block_id - 1
        if not 0 <= i < len(self.blocks):
            raise MigrationError(f"received bitmap for unknown RAM block id {block_id}")
        have = bitmap_to_mask(bitmap, self.blocks[i].npages)
        # Only pages that were to come can be missing there; the rest it has by construction.
        self.unsent[i] = self._to_send[i] & ~have
        self.left = int(sum(int(np.count_nonzero(m)) for m in self.unsent))

    def request(self, block_id: int, first_page: int, count: int) -> None:
        """A PAGE_REQUEST (from the return path's thread)."""
        with self._lock:
            self._requests.append((block_id, first_page, count))
            self.requests += 1
        self.wakeup.set()

    def done(self) -> bool:
        return self.left == 0

    def has_requests(self) -> bool:
        return bool(self._requests)

    def take_request(self, block_id: int, first_page: int, count: int, *, send: Send,
                     encoder: StreamEncoder) -> int:
        """postcopy-preempt: a PAGE_REQUEST served at once on the preempt channel (its own
        `send` and `encoder`), from the preempt sender's thread; the background push goes on
        from just after it. Returns the stream bytes sent."""
        i = block_id - 1
        if not 0 <= i < len(self.blocks) or first_page < 0 or first_page + count > self.blocks[i].npages:
            raise MigrationError(f"the destination requested pages {first_page}+{count} of unknown "
                                 f"RAM block id {block_id}")
        end = min(self.blocks[i].npages, first_page + count + REQUEST_AHEAD_PAGES)
        if end - first_page > SMALL_REQUEST_PAGES:
            with self._lock:
                self.requests += 1
            idx = first_page + np.flatnonzero(self.unsent[i][first_page:end])
            sent = 0
            if idx.size:
                sent = self._send(send, i, idx, encoder)
                with self._lock:
                    self.request_pages_sent += int(np.count_nonzero(idx < first_page + count))
        else:
            sent = self._send_few(send, i, first_page, end, first_page + count, encoder)
        self._cursor = (i, end)
        return sent

    def _send_few(self, send: Send, i: int, first: int, end: int, requested_end: int,
                  encoder: StreamEncoder) -> int:
        """_send for a request's few pages (first..end-1 of block i, those before requested_end
        requested): the same records, without the vector machinery meant for thousands of pages
        (it costs ~0.1 ms a call; this is on every fault's way)."""
        with self._lock:
            self.requests += 1
            mask = self.unsent[i]
            take = [p for p in range(first, end) if mask[p]]
            for p in take:
                mask[p] = False
            self.left -= len(take)
            self.request_pages_sent += sum(1 for p in take if p < requested_end)
        if not take:
            return 0
        lo, hi = take[0], take[-1] + 1
        # A view made per call and dropped with it (see _send); the vCPUs are stopped: stable.
        guest = np.frombuffer(self.blocks[i].mem, dtype=np.uint64, count=(hi - lo) * WORDS_PER_PAGE,
                              offset=lo * PAGE_SIZE).reshape(-1, WORDS_PER_PAGE)
        is_zero = zero_pages(guest).tolist()
        bufs: list[bytes | memoryview] = []
        pages = zero = 0
        k = 0
        while k < len(take):  # records of consecutive pages, all zero or all not
            f, z = take[k], is_zero[take[k] - lo]
            n = 1
            while k + n < len(take) and take[k + n] == f + n and is_zero[f + n - lo] == z:
                n += 1
            if z:
                bufs.extend(encoder.encode_buffers(RamZero(i + 1, f, n)))
                zero += n
            else:
                data = memoryview(guest[f - lo : f - lo + n]).cast("B")
                bufs.extend(encoder.encode_ram_pages(i + 1, f, data))
                pages += n
            k += n
        sent = send(bufs)
        del bufs, guest
        with self._lock:
            self.pages += pages
            self.zero_pages += zero
            self.bytes += sent
        return sent

    def step(self, send: Send, background: bool = True) -> int:
        """Send what was requested (and a few pages after each), then (with `background`) one
        background chunk; returns the background chunk's bytes."""
        while True:
            with self._lock:
                if not self._requests:
                    break
                bid, first, count = self._requests.popleft()
            i = bid - 1
            if not 0 <= i < len(self.blocks) or first < 0 or first + count > self.blocks[i].npages:
                raise MigrationError(f"the destination requested pages {first}+{count} of unknown "
                                     f"RAM block id {bid}")
            end = min(self.blocks[i].npages, first + count + REQUEST_AHEAD_PAGES)
            idx = first + np.flatnonzero(self.unsent[i][first:end])
            if idx.size:
                self.request_pages_sent += int(np.count_nonzero(idx < first + count))
                self._send(send, i, idx)
            self._cursor = (i, end)
            self._chunk = max(MIN_CHUNK_PAGES, self._chunk // 2)
        if self.left and background:
            before = self.bytes
            self._background(send)
            return self.bytes - before
        return 0

    def _background(self, send: Send) -> None:
        i, page = self._cursor
        for _ in range(len(self.blocks) + 1):
            # A window first: a whole 4 GiB block's mask is 1 Mi entries to scan per chunk.
            found = np.flatnonzero(self.unsent[i][page : page + SCAN_WINDOW_PAGES])
            if found.size < self._chunk:
                found = np.flatnonzero(self.unsent[i][page:])
            if found.size:
                idx = page + found[: self._chunk]
                self._send(send, i, idx)
                self._cursor = (i, int(idx[-1]) + 1)
                self._chunk = min(MAX_CHUNK_PAGES, self._chunk * 2)
                return
            i, page = (i + 1) % len(self.blocks), 0
        # Nothing after the cursor anywhere: wrap to the start of the first block.
        self._cursor = (0, 0)

    def _send(self, send: Send, i: int, idx: np.ndarray, encoder: StreamEncoder | None = None) -> int:
        """Send pages `idx` of block i that no other thread took yet (with postcopy-preempt two
        threads send: each page goes on exactly one stream). Returns the stream bytes sent."""
        with self._lock:
            idx = idx[self.unsent[i][idx]]
            self.unsent[i][idx] = False
            self.left -= int(idx.size)
        if not idx.size:
            return 0
        encoder = encoder or self.encoder
        # A view made per call and dropped with it: a view kept would stop the RAM's mapping from
        # closing at exit.
        guest = np.frombuffer(self.blocks[i].mem, dtype=np.uint64).reshape(-1, WORDS_PER_PAGE)
        bufs: list[bytes | memoryview] = []
        first, n = int(idx[0]), int(idx.size)
        # The vCPUs are stopped: guest RAM is stable, a run is sent from it without a copy.
        contiguous = int(idx[-1]) - first == n - 1
        held = guest[first : first + n] if contiguous else guest[idx]
        is_zero = zero_pages(held)
        zero = int(np.count_nonzero(is_zero))
        for f, count in runs(idx[is_zero], MAX_LIST_PAGES):
            bufs.extend(encoder.encode_buffers(RamZero(i + 1, f, count)))
        pages = n - zero
        if pages:
            # The non-zero pages in one record, however scattered (RAM_PAGE_LIST): one header,
            # one checksum and one parse on the destination instead of one per run.
            data, listed = (held, idx) if not zero else (held[~is_zero], idx[~is_zero])
            if int(listed[-1]) - int(listed[0]) == pages - 1:
                bufs.extend(encoder.encode_ram_pages(i + 1, int(listed[0]), memoryview(data).cast("B")))
            else:
                bufs.extend(encoder.encode_ram_page_list(i + 1, listed.astype(np.uint32),
                                                         memoryview(data).cast("B")))
        sent = send(bufs)
        del bufs, guest, held
        with self._lock:
            self.pages += pages
            self.zero_pages += zero
            self.bytes += sent
        return sent
