"""Child processes of the benchmarks, and the promise that none outlives its benchmark.

Every child is started by `spawn()`: in its own process group (so killing the group takes its
threads and any children with it), with PR_SET_PDEATHSIG = SIGKILL (so it dies even if the
benchmark itself is SIGKILLed), and recorded, so that `stop_all()` can kill what is still running.
`main()` of a benchmark calls `install_signal_handlers()` once and `stop_all()` in a `finally`:
a normal end, an exception, Ctrl-C, SIGTERM and SIGHUP all take that way out.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from typing import IO, Any

PR_SET_PDEATHSIG = 1
_children: list[subprocess.Popen[bytes]] = []


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(cmd: list[str], stdout: IO[Any] | int, **kw: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=_die_with_parent, **kw)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it if it is not gone after grace_s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    # The leader may be gone while others of its group are not: SIGKILL the group regardless.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    for proc in reversed(list(_children)):
        stop(proc, grace_s=3.0)


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP unwind through every `finally` on the way out.

    SIGINT too: a shell starting a background job (`cmd &`) makes it ignore SIGINT, and Python then
    leaves it ignored; the benchmark wants Ctrl-C or `kill -INT` to stop it however it was started.
    """

    def _raise(signum: int, _frame: object) -> None:
        # Unwinding once is enough: a second signal during the cleanup must not cut it short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise)
