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
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable

from vmferry.errors import VmferryError
from vmferry.kvm import ioctls as nr
from vmferry.kvm.vcpu import Vcpu

KICK_SIGNAL = signal.SIGUSR1
# How often a pauser re-sends the kick while waiting (covers a thread that was not yet in
# KVM_RUN when first kicked and somehow missed immediate_exit; cheap insurance).
_REKICK_S = 0.05


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
                # KVM_RUN releases the GIL; the guest runs until an exit or the kick.
                entered = self.vcpu.run()
                self._pending_completion = False
                if not entered:
                    continue  # EINTR: kicked
                self._handle_exit(self.vcpu)
                reason = self.vcpu.run_struct.exit_reason
                self._pending_completion = reason in (nr.Exit.IO, nr.Exit.MMIO)
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

    def request_stop(self) -> None:
        with self._cond:
            self._stop = True
            self._kick()
            self._cond.notify_all()

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
