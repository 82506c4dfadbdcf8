"""exec: channels — a /bin/sh command at the other end of a pipe.

On the source the stream goes into the command's stdin (`exec:gzip > vm.gz`, `exec:ssh host ...`);
on the destination it comes out of the command's stdout (`exec:gunzip < vm.gz`). The command's
stderr is inherited, so its complaints reach the operator the way QEMU's do.

The channel owns the child: close() reaps it and turns a non-zero exit into a TransportError,
because a compressor or ssh that failed means the stream is lost even if every write succeeded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from vmferry.errors import TransportError
from vmferry.transport.channel import FdChannel

# How long close() waits for the command to finish after its pipe is closed. A writer-side command
# may still be compressing or flushing to a slow disk; past this it is killed and reported.
DEFAULT_EXIT_TIMEOUT_S = 60.0


class ExecChannel(FdChannel):
    """One end of a pipe to a child `/bin/sh -c COMMAND`; owns both the pipe and the child."""

    def __init__(self, command: str, *, writing: bool, exit_timeout_s: float = DEFAULT_EXIT_TIMEOUT_S):
        self.command = command
        self._writing = writing
        self._exit_timeout_s = exit_timeout_s
        self._eof_seen = False
        read_fd, write_fd = os.pipe()  # both close-on-exec; Popen dup2()s the child's end to 0 or 1
        child_fd, our_fd = (read_fd, write_fd) if writing else (write_fd, read_fd)
        try:
            self.process = subprocess.Popen(
                ["/bin/sh", "-c", command],
                stdin=child_fd if writing else subprocess.DEVNULL,
                stdout=child_fd if not writing else None,
                close_fds=True,
                # Its own process group, so a cancel reaches a whole pipeline (`gzip | ssh ...`),
                # not only the shell that started it.
                process_group=0,
            )
        except OSError as e:
            os.close(our_fd)
            raise TransportError(f"exec:{command}: cannot start /bin/sh: {e.strerror}") from e
        finally:
            # The child holds its own copy; ours must go, or the reader never sees EOF.
            os.close(child_fd)
        super().__init__(our_fd, f"exec:{command}")

    def _read_into(self, view: memoryview) -> int:
        n = super()._read_into(view)
        if n == 0:
            self._eof_seen = True
        return n

    def _error(self, op: str, exc: OSError) -> TransportError:
        err = super()._error(op, exc)
        status = self.process.poll()
        if status is not None and not self._shut_down:
            # EPIPE alone says little; the command's own exit status says why it stopped reading.
            return TransportError(f"{err} ({_describe_status(status)})")
        return err

    def shutdown(self) -> None:
        """Cancel: wake any blocked thread and stop the command; its exit status no longer matters."""
        super().shutdown()
        self._signal_group(signal.SIGTERM)

    def close(self) -> None:
        """Close our end, reap the command; raise TransportError if it failed (unless cancelled)."""
        if self._closed:
            return
        closed_early = not self._writing and not self._eof_seen
        super().close()
        try:
            status = self.process.wait(timeout=self._exit_timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait()
            raise TransportError(
                f"{self.label}: the command did not exit within {self._exit_timeout_s} s and was killed"
            ) from None
        if status == 0 or self._shut_down:
            return
        # We stopped reading before the end: its SIGPIPE is our doing, not its failure. The shell
        # reports a child killed by a signal as 128 + the signal number.
        if closed_early and status in (-signal.SIGPIPE, 128 + signal.SIGPIPE):
            return
        raise TransportError(f"{self.label}: {_describe_status(status)}")

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            # ProcessLookupError: the group emptied between poll() and now; nothing left to stop.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"the command was killed by {name}"
    hint = " (command not found)" if status == 127 else ""
    return f"the command exited with status {status}{hint}"
