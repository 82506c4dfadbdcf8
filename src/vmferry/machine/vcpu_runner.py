"""One thread per vCPU running KVM_RUN, and the kick that gets it out in bounded time.

Pausing a vCPU from another thread (KVM-FACTS.md): set `immediate_exit` in its kvm_run page, then
`pthread_kill(thread, SIGUSR1)`. A vCPU inside the guest is interrupted by the signal and KVM_RUN
returns EINTR; one about to enter sees immediate_exit and returns EINTR at once. The signal needs
a real handler (SIG_IGN does not interrupt KVM_RUN), and Python only installs handlers from the
main thread: `install_kick_handler()` does it once, when the first Machine is built.

An I/O or MMIO exit is complete only after the next KVM_RUN (the kernel then stores an IN's
value into the guest's registers). So a vCPU whose last exit was I/O re-enters once with
immediate_exit set — finishing the instruction, running nothing else — before it parks: the
state migration saves from a parked vCPU is always consistent.

Throttling (auto-converge; QEMU's cpu_throttle): a vCPU throttled at p % runs THROTTLE_TIMESLICE_NS,
then sleeps p/(100-p) of that, so it sleeps p % of the wall time. A timer thread per throttled vCPU
kicks it once per period (timeslice + sleep); the vCPU thread, out of KVM_RUN, sleeps its share
on its condition variable, so a pause or stop cuts the sleep short. The runner accounts what it
slept (`throttle_slept_ns`, `throttle_sleeps`).

Dirty limit (QEMU's dirtylimit; machine/dirty_limit.py sets `dirty_limit_us`): with KVM's dirty
ring on, a vCPU whose ring fills exits with KVM_EXIT_DIRTY_RING_FULL; after its ring is harvested
(machine.py) it sleeps `dirty_limit_us` before re-entering. Only a vCPU that writes fills its
ring, so only writers sleep. A pause or stop cuts the sleep short (`dirty_limit_slept_ns`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable

from vmferry.errors import VmferryError
from vmferry.kvm import ioctls as nr
from vmferry.kvm.vcpu import Vcpu

KICK_SIGNAL = signal.SIGUSR1
# How often a pauser re-sends the kick while waiting (covers a thread that was not yet in
# KVM_RUN when first kicked and somehow missed immediate_exit; cheap insurance).
_REKICK_S = 0.05

# QEMU's CPU_THROTTLE_TIMESLICE_NS: how long a throttled vCPU runs between two sleeps.
THROTTLE_TIMESLICE_NS = 10_000_000


def throttle_sleep_ns(percentage: int) -> int:
    """How long a vCPU throttled at `percentage` (0..99) sleeps after each timeslice, so that it
    sleeps `percentage` % of the wall time: pct/(1-pct) x timeslice (QEMU's cpu_throttle_thread)."""
    if not 0 <= percentage <= 99:
        raise ValueError(f"throttle percentage {percentage} is not within 0..99")
    return THROTTLE_TIMESLICE_NS * percentage // (100 - percentage)


def throttle_period_ns(percentage: int) -> int:
    """Time between two throttle kicks: one timeslice run plus one sleep."""
    return THROTTLE_TIMESLICE_NS + throttle_sleep_ns(percentage)


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick's only job is to interrupt KVM_RUN; nothing to do when Python runs it."""


def install_kick_handler() -> None:
    if signal.getsignal(KICK_SIGNAL) is _ignore_kick:
        return
    if threading.current_thread() is not threading.main_thread():
        current = signal.getsignal(KICK_SIGNAL)
        if callable(current):
            return  # someone installed a real handler already; that interrupts KVM_RUN too
        raise VmferryError("build the first Machine from the main thread (it installs the SIGUSR1 vCPU kick)")
    signal.signal(KICK_SIGNAL, _ignore_kick)


# Called on the vCPU thread with the vCPU out of KVM_RUN and its exit in run_struct.
ExitHandler = Callable[[Vcpu], None]


class VcpuRunner:
    def __init__(self, vcpu: Vcpu, handle_exit: ExitHandler, on_crash: Callable[[str], None]) -> None:
        self.vcpu = vcpu
        self._handle_exit = handle_exit
        self._on_crash = on_crash
        self._cond = threading.Condition()
        self._pause = False
        self._stop = False
        self.parked = False
        self.exited = False
        self._pending_completion = False
        self.thread = threading.Thread(target=self._loop, name=f"vcpu{vcpu.id}", daemon=True)
        # Throttling: the percentage, the sleep the timer asked for and not yet taken, what was
        # slept, and the timer thread (alive only while the percentage is above 0).
        self.throttle_percentage = 0
        self.throttle_slept_ns = 0
        self.throttle_sleeps = 0
        self.throttle_last_end_ns = 0  # when the last throttle sleep ended (monotonic)
        self._throttle_owed_ns = 0
        self._throttle_timer: threading.Thread | None = None
        self._throttle_stop = threading.Event()
        # Dirty limit: microseconds to sleep after each dirty-ring-full exit (0 = none).
        self.dirty_limit_us = 0
        self.dirty_limit_slept_ns = 0
        self.dirty_limit_sleeps = 0

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        # Leave SIGINT/SIGTERM to the main thread (Ctrl-C handling); keep the kick deliverable.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        crash: str | None = None
        try:
            while True:
                with self._cond:
                    while (self._pause or self._stop) and not self._pending_completion:
                        if self._stop:
                            return
                        self.parked = True
                        self._cond.notify_all()
                        self._cond.wait()
                    self.parked = False
                    if self._throttle_owed_ns:
                        self._sleep_throttled()
                        if self._pause or self._stop:
                            continue  # park first; the kick's immediate_exit stays set
                    if not (self._pause or self._stop):
                        # Only a pause or a stop (set under this lock before their kick) needs
                        # immediate_exit kept. Any other kick is the throttle timer's, whose
                        # sleep may already be gone (set_throttle(0) drops it): consume it here,
                        # or every KVM_RUN would return EINTR at once and the guest never run.
                        self.vcpu.immediate_exit = False
                # KVM_RUN releases the GIL; the guest runs until an exit or the kick.
                entered = self.vcpu.run()
                self._pending_completion = False
                if not entered:
                    continue  # EINTR: kicked
                self._handle_exit(self.vcpu)
                reason = self.vcpu.run_struct.exit_reason
                self._pending_completion = reason in (nr.Exit.IO, nr.Exit.MMIO)
                if reason == nr.Exit.DIRTY_RING_FULL and self.dirty_limit_us:
                    with self._cond:
                        self._sleep_dirty_limited()
        except Exception as e:  # a bug or a KVM error must stop the machine, never hang it
            crash = f"vCPU {self.vcpu.id}: {e}"
        finally:
            # Exited first, then report: a pauser waiting for this thread must see it gone
            # whatever on_crash waits for.
            with self._cond:
                self.exited = True
                self.parked = False
                self._cond.notify_all()
        if crash is not None:
            self._on_crash(crash)

    def _sleep_throttled(self) -> None:
        """Sleep the share the timer asked for, under _cond; a pause, a stop or the throttle
        going to 0 ends it early. Counted when it starts, under the lock set_throttle takes:
        once set_throttle(0) returned, no sleep starts."""
        owed, self._throttle_owed_ns = self._throttle_owed_ns, 0
        self.throttle_sleeps += 1
        t0 = time.monotonic_ns()
        deadline = t0 + owed
        while not (self._pause or self._stop) and self.throttle_percentage:
            left = deadline - time.monotonic_ns()
            if left <= 0:
                break
            self._cond.wait(left / 1e9)
        self.throttle_last_end_ns = time.monotonic_ns()
        self.throttle_slept_ns += self.throttle_last_end_ns - t0

    def _sleep_dirty_limited(self) -> None:
        """Sleep dirty_limit_us under _cond; a pause, a stop or the limit going to 0 ends it."""
        self.dirty_limit_sleeps += 1
        t0 = time.monotonic_ns()
        deadline = t0 + self.dirty_limit_us * 1000
        while not (self._pause or self._stop) and self.dirty_limit_us:
            left = deadline - time.monotonic_ns()
            if left <= 0:
                break
            self._cond.wait(left / 1e9)
        self.dirty_limit_slept_ns += time.monotonic_ns() - t0

    def set_dirty_limit_sleep(self, us: int) -> None:
        """Sleep `us` microseconds after each dirty-ring-full exit from now on (0 = never); a
        change to 0 ends a sleep under way."""
        with self._cond:
            self.dirty_limit_us = max(0, int(us))
            if not self.dirty_limit_us:
                self._cond.notify_all()

    # --- throttling, from any thread ---

    def set_throttle(self, percentage: int) -> None:
        """Throttle this vCPU to `percentage` % sleeping (0 = full speed; at most 99). A change
        takes effect at the next period; 0 stops the timer and drops a sleep not yet taken."""
        throttle_sleep_ns(percentage)  # validates
        with self._cond:
            self.throttle_percentage = percentage
            timer = self._throttle_timer
            if percentage == 0:
                self._throttle_owed_ns = 0
                self._throttle_stop.set()
                self._throttle_timer = None
                self._cond.notify_all()
            elif timer is None and not self._stop:
                # A fresh stop event per timer: stopping an old timer never stops a new one.
                self._throttle_stop = threading.Event()
                timer = threading.Thread(target=self._throttle_loop, args=(self._throttle_stop,),
                                         name=f"vcpu{self.vcpu.id}-throttle", daemon=True)
                self._throttle_timer = timer
                timer.start()
        if percentage == 0 and timer is not None:
            timer.join()

    def _throttle_loop(self, stop: threading.Event) -> None:
        """Kick the vCPU once per period with the sleep it owes (QEMU's throttle timer)."""
        while True:
            with self._cond:
                pct = self.throttle_percentage
            if pct == 0 or stop.wait(throttle_period_ns(pct) / 1e9):
                return
            with self._cond:
                pct = self.throttle_percentage
                if pct == 0 or stop.is_set() or self._stop or self.exited:
                    return
                if not self._pause:  # a parked vCPU owes nothing: it is not running
                    self._throttle_owed_ns = throttle_sleep_ns(pct)
                    self._kick()

    def _kick(self) -> None:
        self.vcpu.immediate_exit = True
        ident = self.thread.ident
        if ident is not None and self.thread.is_alive():
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(ident, KICK_SIGNAL)

    def request_pause(self) -> None:
        with self._cond:
            self._pause = True
            self._kick()
            self._cond.notify_all()  # ends a throttle sleep

    def request_stop(self) -> None:
        with self._cond:
            self._stop = True
            self._kick()
            self._cond.notify_all()
            self._throttle_stop.set()

    def wait_parked(self) -> None:
        """Return once the thread is parked (or gone). Safe to call from the thread itself."""
        if threading.current_thread() is self.thread or self.thread.ident is None:
            return
        with self._cond:
            while not (self.parked or self.exited):
                if not self._cond.wait(_REKICK_S):
                    self._kick()

    def resume(self) -> None:
        with self._cond:
            self._pause = False
            # Cleared only while parked: a running vCPU would otherwise miss a pending pause.
            self.vcpu.immediate_exit = False
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self.thread.ident is not None and threading.current_thread() is not self.thread:
            self.thread.join(timeout)
