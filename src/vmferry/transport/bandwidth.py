"""Bandwidth: pacing sends to a limit, and measuring what the wire really took.

Pure arithmetic over an injected clock (and, for the limiter, an injected sleep), so tests drive
it with a fake clock and never assert on real time.

Both are fed the same number: bytes the socket accepted, as returned by `Channel.sendmsg`, reported
*after* the call returns. Not bytes queued in a Python buffer — the talk's point is that speed
measured into a buffer is a fiction; the kernel's socket buffer is small next to a migration.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

Clock = Callable[[], float]  # seconds, monotonic
Sleep = Callable[[float], None]

# The limiter sleeps in slices no longer than this, so a cancel or a new limit is noticed within
# about 10 ms even when the limit is tiny and the debt large.
MAX_SLEEP_SLICE_S = 0.010


class RateLimiter:
    """Paces a sender to `bytes_per_s` on average; 0 means unlimited.

    Model: `_ready_at` is the clock time at which everything reported so far would have left at
    exactly the limit. A sender that stays under the limit never waits, and idle time earns no
    credit (no burst after a pause). The limit may change at any moment, from any thread: the bytes
    still owed are re-priced at the new rate.
    """

    def __init__(self, bytes_per_s: int = 0, *, clock: Clock = time.monotonic, sleep: Sleep = time.sleep):
        if bytes_per_s < 0:
            raise ValueError(f"bandwidth limit must be >= 0 bytes/s, got {bytes_per_s}")
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()  # set_limit comes from the monitor thread
        self._bytes_per_s = bytes_per_s
        self._ready_at = clock()

    @property
    def bytes_per_s(self) -> int:
        return self._bytes_per_s

    def set_limit(self, bytes_per_s: int) -> None:
        if bytes_per_s < 0:
            raise ValueError(f"bandwidth limit must be >= 0 bytes/s, got {bytes_per_s}")
        with self._lock:
            now = self._clock()
            owed_s = max(0.0, self._ready_at - now)
            if self._bytes_per_s and bytes_per_s:
                owed_bytes = owed_s * self._bytes_per_s
                self._ready_at = now + owed_bytes / bytes_per_s
            else:
                # To or from unlimited: nothing is owed under no limit, and a fresh limit starts now.
                self._ready_at = now
            self._bytes_per_s = bytes_per_s

    def record(self, nbytes: int) -> None:
        """Report bytes that just left (what sendmsg returned)."""
        with self._lock:
            if not self._bytes_per_s:
                return
            now = self._clock()
            self._ready_at = max(self._ready_at, now) + nbytes / self._bytes_per_s

    def delay_s(self) -> float:
        """How long the sender must wait before its next send to stay within the limit."""
        with self._lock:
            if not self._bytes_per_s:
                return 0.0
            return max(0.0, self._ready_at - self._clock())

    def wait(self, cancelled: Callable[[], bool] | None = None) -> bool:
        """Sleep until sending may resume. Returns False if `cancelled()` became true first.

        Sleeps in slices of at most MAX_SLEEP_SLICE_S and re-reads the delay after each one, so a
        raised (or removed) limit takes effect mid-wait.
        """
        while True:
            if cancelled is not None and cancelled():
                return False
            delay = self.delay_s()
            if delay <= 0:
                return True
            self._sleep(min(delay, MAX_SLEEP_SLICE_S))


class ThroughputMeter:
    """Bytes accepted by the socket over wall time: since start, and over a sliding window.

    Definitions:
      average_bps()        = bytes recorded since start / seconds since start
      window_bps(window_s) = bytes recorded in the last `window_s` seconds / `window_s`,
                             or over the time since start if that is shorter.
    Samples are coalesced into `resolution_s` buckets so a long migration with millions of sends
    keeps a bounded history (window / resolution entries).
    """

    def __init__(self, *, clock: Clock = time.monotonic, window_s: float = 1.0, resolution_s: float = 0.01):
        if window_s <= 0 or resolution_s <= 0:
            raise ValueError("window_s and resolution_s must be positive")
        self._clock = clock
        self.window_s = window_s
        self._resolution_s = resolution_s
        self.reset()

    def reset(self) -> None:
        """Start measuring afresh (e.g. at the start of a migration)."""
        self._start = self._clock()
        self.total_bytes = 0
        # (bucket start time, cumulative bytes at the end of that bucket), oldest first; the first
        # entry is a baseline at the start with 0 bytes so the first window has a left edge.
        self._samples: deque[tuple[float, int]] = deque([(self._start, 0)])

    def record(self, nbytes: int) -> None:
        now = self._clock()
        self.total_bytes += nbytes
        last_t, _ = self._samples[-1]
        if now - last_t < self._resolution_s and len(self._samples) > 1:
            self._samples[-1] = (last_t, self.total_bytes)
        else:
            self._samples.append((now, self.total_bytes))
        self._prune(now, self.window_s)

    def elapsed_s(self) -> float:
        return self._clock() - self._start

    def average_bps(self) -> float:
        elapsed = self.elapsed_s()
        return self.total_bytes / elapsed if elapsed > 0 else 0.0

    def window_bps(self, window_s: float | None = None) -> float:
        """Rate over the last window_s seconds (at most the meter's own window)."""
        now = self._clock()
        window = min(self.window_s if window_s is None else window_s, self.window_s)
        left = now - window
        # The newest sample at or before the window's left edge is the baseline: bytes counted
        # after it fell inside the window (to within one resolution bucket).
        base_bytes = self._samples[0][1]
        for t, cum in self._samples:
            if t > left:
                break
            base_bytes = cum
        span = min(window, now - self._start)
        return (self.total_bytes - base_bytes) / span if span > 0 else 0.0

    def _prune(self, now: float, window_s: float) -> None:
        # Keep exactly one sample at or before the window's left edge as its baseline.
        left = now - window_s
        while len(self._samples) >= 2 and self._samples[1][0] <= left:
            self._samples.popleft()
