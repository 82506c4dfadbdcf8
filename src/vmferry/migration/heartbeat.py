"""Heartbeats: noticing a silent peer on a migration that is otherwise idle or blocked.

Each side tells the other it is alive every `interval` (source -> destination: a HEARTBEAT
command in the stream; destination -> source: a HEARTBEAT command on the return path), and a
watchdog thread on each side fails the migration when the peer has been silent for `limit`:
it shuts the channel down, which interrupts a send or receive blocked on the dead peer, and the
migration thread reports the watchdog's reason. Any bytes from the peer count as a sign of life,
not only heartbeats. A peer that never sent a HEARTBEAT (an older or QEMU-style one) is never
timed out: the watchdog arms on the first HEARTBEAT it hears. TCP keepalive
(transport/connect.py) is the backstop below this.

A silence this side caused is not the peer's: when the watchdog's own check comes more than an
interval late (this process was stopped — SIGSTOP, a suspended host — or not scheduled), the
peer's beats may be sitting unread in the socket, so it gets `limit` more from then on before it
is given up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("vmferry.migration")

# The limit is this many intervals: two beats may be lost or late before the peer is given up.
SILENT_INTERVALS = 3


class Watchdog:
    """Calls `on_silence(reason)` once when `silent_for()` exceeds the limit after `arm()`; while
    running, calls `beat()` every interval (on a thread of its own: a beat may block in a send on
    a dead link, and the watchdog must still see the silence)."""

    def __init__(self, interval_ms: int, silent_for: Callable[[], float],
                 on_silence: Callable[[str], None], beat: Callable[[], None] | None = None,
                 peer: str = "peer") -> None:
        self.interval_s = interval_ms / 1000
        self.limit_s = self.interval_s * SILENT_INTERVALS
        self._silent_for = silent_for
        self._on_silence = on_silence
        self._beat = beat
        self._peer = peer
        self._armed = threading.Event()
        self._stop = threading.Event()
        self.fired: str | None = None
        self._threads = [threading.Thread(target=self._watch, name="migration-watchdog", daemon=True)]
        if beat is not None:
            self._threads.append(threading.Thread(target=self._beats, name="migration-heartbeat",
                                                  daemon=True))

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def start(self) -> None:
        if self.enabled:
            for t in self._threads:
                t.start()

    def arm(self) -> None:
        """The peer speaks heartbeats: from now on its silence counts."""
        self._armed.set()

    @property
    def armed(self) -> bool:
        return self._armed.is_set()

    def stop(self) -> None:
        self._stop.set()

    def _beats(self) -> None:
        assert self._beat is not None
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except Exception as e:  # noqa: BLE001 - a dead channel: the watchdog or the migration reports it
                log.debug("heartbeat not sent: %s", e)
                return

    def _watch(self) -> None:
        tick = min(0.1, self.interval_s / 4)
        last = time.monotonic()
        grace_until = 0.0
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now - last > tick + self.interval_s:  # we did not run: the silence may be ours
                grace_until = now + self.limit_s
                log.info("heartbeat watchdog: this process did not run for %.1f s; the %s gets "
                         "%.1f s more", now - last, self._peer, self.limit_s)
            last = now
            if not self._armed.is_set():
                continue
            silent = self._silent_for()
            if silent > self.limit_s and now >= grace_until:
                self.fired = (f"no heartbeat from the {self._peer} for {silent:.1f} s (limit "
                              f"{self.limit_s:.1f} s, x-heartbeat-ms): it is stopped or the link is down")
                log.warning("%s", self.fired)
                self._on_silence(self.fired)
                return
