"""auto-converge: when to slow the guest's vCPUs, and by how much. Pure logic, QEMU's rule.

QEMU 7.2 (migration/ram.c, migration_trigger_throttle / mig_throttle_guest_down), restated:

- A *period* runs from one evaluation to the next; an evaluation happens at a dirty-log sync,
  but only once at least PERIOD_S (1 s) has passed since the previous one, so short passes add
  up into one period.
- In a period, `dirty` = bytes of pages the syncs found dirty, `transferred` = bytes the
  migration sent. The period is *high* when dirty > transferred * throttle-trigger-threshold / 100.
- The second high period (counted since throttling last changed; a low period does not reset
  the count) changes the throttle: off -> cpu-throttle-initial; on -> + cpu-throttle-increment,
  or with cpu-throttle-tailslow the smaller of the increment and what brings the guest's CPU
  share down to the share that would make dirty equal the threshold:
  `cpu_now - floor(cpu_now * threshold_bytes / dirty)`, cpu_now = 100 - throttle. Capped at
  max-cpu-throttle (and always within 1..99, QEMU's cpu_throttle_set bounds).

The parameters are read at each evaluation, so migrate-set-parameters during a migration takes
effect at the next one, as in QEMU. What a percentage does to a vCPU is machine/vcpu_runner.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.migration.pages import PAGE_SIZE

PERIOD_S = 1.0
THROTTLE_MIN = 1
THROTTLE_MAX = 99


@dataclass(frozen=True)
class ThrottleParams:
    """The parameters one evaluation reads (QMP names with `-` -> `_`)."""

    throttle_trigger_threshold: int = 50
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99


def next_percentage(current: int, dirty_bytes: int, threshold_bytes: int, p: ThrottleParams) -> int:
    """mig_throttle_guest_down: the throttle after a second high period. `current` 0 = off."""
    if current == 0:
        new = p.cpu_throttle_initial
    else:
        inc = p.cpu_throttle_increment
        if p.cpu_throttle_tailslow and dirty_bytes > 0:
            cpu_now = 100 - current
            # QEMU stores the ideal share in a uint64_t: it truncates toward zero.
            cpu_ideal = int(cpu_now * (threshold_bytes / dirty_bytes))
            inc = min(cpu_now - cpu_ideal, inc)
        new = min(current + inc, p.max_cpu_throttle)
    return max(THROTTLE_MIN, min(THROTTLE_MAX, new))


class AutoConverge:
    """The trigger's state between syncs. Feed every sync to `on_sync`; it returns the new
    throttle percentage when it changes, else None."""

    def __init__(self) -> None:
        self.percentage = 0
        self.history: list[int] = []  # every percentage set, in order
        self.high_count = 0
        self.evaluations = 0
        self._period_start: float | None = None
        self._dirty_pages = 0
        self._transferred0 = 0

    def start(self, now: float, transferred: int) -> None:
        """The setup's bitmap is the first sync: the first period starts here."""
        self._period_start = now
        self._transferred0 = transferred
        self._dirty_pages = 0

    def on_sync(self, now: float, dirty_pages: int, transferred: int, p: ThrottleParams) -> int | None:
        """A sync found `dirty_pages` pages dirtied since the previous sync; `transferred` is
        every byte the migration has sent so far (a running total)."""
        if self._period_start is None:
            self.start(now, transferred)
        assert self._period_start is not None
        self._dirty_pages += dirty_pages
        if now - self._period_start < PERIOD_S:
            return None
        dirty = self._dirty_pages * PAGE_SIZE
        threshold = (transferred - self._transferred0) * p.throttle_trigger_threshold // 100
        self.start(now, transferred)
        self.evaluations += 1
        if dirty <= threshold:
            return None
        self.high_count += 1
        if self.high_count < 2:
            return None
        self.high_count = 0
        new = next_percentage(self.percentage, dirty, threshold, p)
        if new == self.percentage:
            return None
        self.percentage = new
        self.history.append(new)
        return new
