"""The heartbeat watchdog (migration/heartbeat.py) on its own: it times out only a peer that
spoke heartbeats, and a beat blocked or failing on a dead channel does not stop it. The live
cells (SIGSTOP, link down, peers without heartbeats) are in test_fault_matrix.py."""

from __future__ import annotations

import threading
import time

from vmferry.migration.heartbeat import SILENT_INTERVALS, Watchdog

POLL_S = 30.0  # generous: a loaded machine may schedule these threads late


def _until(cond: threading.Event) -> bool:
    return cond.wait(POLL_S)


def test_an_unarmed_watchdog_never_fires_and_an_armed_one_does() -> None:
    fired = threading.Event()
    reasons: list[str] = []
    wd = Watchdog(100, lambda: 1e6, lambda r: (reasons.append(r), fired.set()), peer="source")
    wd.start()
    try:
        assert not fired.wait(1.0)  # ten intervals silent, but it never heard a heartbeat
        wd.arm()
        assert _until(fired)
        assert "no heartbeat from the source" in reasons[0] and "x-heartbeat-ms" in reasons[0]
        assert wd.fired == reasons[0]
    finally:
        wd.stop()


def test_a_peer_heard_recently_is_not_timed_out() -> None:
    fired = threading.Event()
    wd = Watchdog(100, lambda: 0.0, lambda r: fired.set())
    wd.arm()
    wd.start()
    try:
        assert not fired.wait(1.0)
    finally:
        wd.stop()
    assert wd.limit_s == SILENT_INTERVALS * 0.1


def test_beats_go_out_and_a_failing_beat_does_not_stop_the_watch() -> None:
    beats = 0
    beaten = threading.Event()
    fired = threading.Event()

    def beat() -> None:
        nonlocal beats
        beats += 1
        if beats == 2:
            beaten.set()
            raise OSError("the channel was shut down")

    silent = threading.Event()
    wd = Watchdog(100, lambda: 1e6 if silent.is_set() else 0.0, lambda r: fired.set(), beat=beat)
    wd.arm()
    wd.start()
    try:
        assert _until(beaten)
        silent.set()
        assert _until(fired)
        assert beats == 2  # no beat after the one that failed
    finally:
        wd.stop()


def test_interval_zero_is_off() -> None:
    called = threading.Event()
    wd = Watchdog(0, lambda: 1e6, lambda r: called.set(), beat=called.set)
    assert not wd.enabled
    wd.arm()
    wd.start()  # starts nothing: no beat, no timeout
    assert not called.wait(0.5)


class _StoppedOnce:
    """silent_for() of a side whose own process stops once (the first armed check blocks
    `stop_s`, as a SIGSTOP would hold every thread): afterwards the peer looks silent for
    `silent_checks` checks (its beats unread in the socket), then not at all unless `dead`."""

    def __init__(self, stop_s: float, silent_checks: int, dead: bool = False) -> None:
        self.stop_s, self.silent_checks, self.dead = stop_s, silent_checks, dead
        self.calls = 0
        self.resumed_at = 0.0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.stop_s)
            self.resumed_at = time.monotonic()
            return 0.0
        if self.dead or self.calls <= 1 + self.silent_checks:
            return self.stop_s + time.monotonic() - self.resumed_at
        return 0.0


def test_a_stop_of_this_process_is_not_blamed_on_the_peer() -> None:
    """Stopped for 10 limits, then the peer's beats are read within a few checks: not given up."""
    fired = threading.Event()
    silent = _StoppedOnce(stop_s=3.0, silent_checks=3)
    wd = Watchdog(100, silent, lambda r: fired.set())
    wd.arm()
    wd.start()
    try:
        assert not fired.wait(3.0 + 2.0)
        assert silent.calls > 4  # the checks went on after the stop
    finally:
        wd.stop()


def test_a_peer_still_silent_after_this_process_resumed_is_given_up_after_the_grace() -> None:
    at: list[float] = []
    fired = threading.Event()
    silent = _StoppedOnce(stop_s=3.0, silent_checks=0, dead=True)
    wd = Watchdog(100, silent, lambda r: (at.append(time.monotonic()), fired.set()))
    wd.arm()
    wd.start()
    try:
        assert _until(fired)
        # never before a whole limit since this process ran again (however late its thread runs)
        assert at[0] - silent.resumed_at >= wd.limit_s - 0.05
    finally:
        wd.stop()
