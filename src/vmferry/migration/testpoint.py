"""Test-only hooks: stop this process at an exact step of a postcopy migration, or make the
fault resolver die, so a test can inject a failure at exactly that point
(tests/test_postcopy_matrix.py). Never set outside tests.

- `VMFERRY_TEST_PAUSE_AT=STEP`: the process stops itself (SIGSTOP) right after STEP, once. The
  test then kills it or its peer, or takes the link down, and continues it (SIGCONT). Steps: on
  the source `postcopy-advise`, `postcopy-discard` (DISCARD and LISTEN written), `postcopy-run`
  (RUN written), `postcopy-resumed` (a recovery's POSTCOPY_RESUMED written); on the destination
  `postcopy-advise`, `postcopy-listen`, `postcopy-devices` (RUN's device state applied, the guest
  not started yet), `postcopy-resumed` (a recovery answered).
- `VMFERRY_TEST_FAIL_AT=postcopy-resolver`: the destination's fault resolver thread raises when
  it sends its first page request, once (a resolver that dies after RUN).

Both are read once, when this module is imported.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("vmferry.migration")

PAUSE_AT = os.environ.get("VMFERRY_TEST_PAUSE_AT", "")
FAIL_AT = os.environ.get("VMFERRY_TEST_FAIL_AT", "")
_done: set[str] = set()


def reached(step: str) -> None:
    """`step` is done: stop here if the test asked for it (once per process)."""
    if step != PAUSE_AT or step in _done:
        return
    _done.add(step)
    log.warning("test hook: stopping at %s (VMFERRY_TEST_PAUSE_AT)", step)
    os.kill(os.getpid(), signal.SIGSTOP)


def fail(step: str) -> None:
    """Raise at `step` if the test asked for it (once per process)."""
    if step != FAIL_AT or step in _done:
        return
    _done.add(step)
    raise RuntimeError(f"test hook: {step} fails (VMFERRY_TEST_FAIL_AT)")
