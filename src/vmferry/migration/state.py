"""The migration state machine, with QMP's state names.

The 2011 talk's "stage 1/2/3, -1 for error" becomes named states; transitions are data
(h11-style): a transition missing from the table is a bug, raised as MigrationError, never a
silent overwrite.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

from vmferry.errors import MigrationError


class MigrationStatus(enum.StrEnum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


S = MigrationStatus

# from -> the states it may move to. Destination and source share the table: a destination
# goes none -> setup -> active -> completed | failed | cancelled.
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset({S.SETUP, S.FAILED}),
    S.SETUP: frozenset({S.ACTIVE, S.FAILED, S.CANCELLING}),
    # active -> postcopy-paused: a destination whose link broke between LISTEN and RUN.
    S.ACTIVE: frozenset({S.DEVICE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.COMPLETED, S.FAILED,
                         S.CANCELLING}),
    # Postcopy: before the destination runs the guest a failure is `failed` (the source resumes);
    # after, both sides pause and keep their state until a recovery (docs/migration.md).
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.FAILED, S.CANCELLING, S.POSTCOPY_PAUSED}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER}),
    # postcopy-recover -> failed: the destination never got RUN (it never ran the guest); the
    # source resumes it.
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.FAILED}),
    S.DEVICE: frozenset({S.COMPLETED, S.FAILED, S.CANCELLING}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    # Terminal states may start over: a new `migrate` after a failure or a cancel.
    S.COMPLETED: frozenset({S.SETUP}),
    S.FAILED: frozenset({S.SETUP}),
    S.CANCELLED: frozenset({S.SETUP}),
}

IN_PROGRESS = frozenset({S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER,
                         S.DEVICE, S.CANCELLING})


class MigrationState:
    """A thread-safe holder of the current status that announces every change.

    `on_change(status)` is called after each transition, outside the lock (it emits the QMP
    `MIGRATION` event).
    """

    def __init__(self, on_change: Callable[[MigrationStatus], None] | None = None) -> None:
        self._status = S.NONE
        self._lock = threading.Lock()
        self._on_change = on_change

    @property
    def status(self) -> MigrationStatus:
        return self._status

    def set(self, new: MigrationStatus) -> None:
        with self._lock:
            if new not in TRANSITIONS[self._status]:
                raise MigrationError(f"migration state cannot go from '{self._status}' to '{new}'")
            self._status = new
        if self._on_change is not None:
            self._on_change(new)

    def try_set(self, expected: MigrationStatus, new: MigrationStatus) -> bool:
        """Move to `new` only if the status is still `expected` (compare and set)."""
        with self._lock:
            if self._status != expected or new not in TRANSITIONS[self._status]:
                return False
            self._status = new
        if self._on_change is not None:
            self._on_change(new)
        return True
