"""auto-converge and dirty-limit: when to slow the guest's vCPUs, and by how much. Pure logic,
QEMU's rule.

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

dirty-limit (QEMU 8.1) uses the same trigger; when it fires, instead of a percentage for every
vCPU it sets `vcpu-dirty-limit` as every vCPU's dirty-rate quota, and the dirty limiter
(machine/dirty_limit.py) then slows only the vCPUs whose dirty rate exceeds it.
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


class ThrottleTrigger:
    """QEMU's migration_trigger_throttle: the period bookkeeping and the high-period count.
    `on_sync` answers (fired, dirty bytes, threshold bytes) of the period it closed."""

    def __init__(self) -> None:
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

    def on_sync(self, now: float, dirty_pages: int, transferred: int,
                threshold_pct: int) -> tuple[bool, int, int]:
        if self._period_start is None:
            self.start(now, transferred)
        assert self._period_start is not None
        self._dirty_pages += dirty_pages
        if now - self._period_start < PERIOD_S:
            return False, 0, 0
        dirty = self._dirty_pages * PAGE_SIZE
        threshold = (transferred - self._transferred0) * threshold_pct // 100
        self.start(now, transferred)
        self.evaluations += 1
        if dirty <= threshold:
            return False, dirty, threshold
        self.high_count += 1
        if self.high_count < 2:
            return False, dirty, threshold
        self.high_count = 0
        return True, dirty, threshold


class AutoConverge(ThrottleTrigger):
    """The trigger's state between syncs. Feed every sync to `on_sync`; it returns the new
    throttle percentage when it changes, else None."""

    def __init__(self) -> None:
        super().__init__()
        self.percentage = 0
        self.history: list[int] = []  # every percentage set, in order

    def on_sync(self, now: float, dirty_pages: int, transferred: int,  # type: ignore[override]
                p: ThrottleParams) -> int | None:
        """A sync found `dirty_pages` pages dirtied since the previous sync; `transferred` is
        every byte the migration has sent so far (a running total)."""
        fired, dirty, threshold = ThrottleTrigger.on_sync(self, now, dirty_pages, transferred,
                                                          p.throttle_trigger_threshold)
        if not fired:
            return None
        new = next_percentage(self.percentage, dirty, threshold, p)
        if new == self.percentage:
            return None
        self.percentage = new
        self.history.append(new)
        return new


class DirtyLimitConverge(ThrottleTrigger):
    """dirty-limit's use of the same trigger (QEMU 8.1's migration_dirty_limit_guest): when it
    fires, every vCPU gets `vcpu-dirty-limit` as its quota — unless the limit is in service with
    that quota already. `on_sync` returns the quota to set, else None."""

    def __init__(self) -> None:
        super().__init__()
        self.quota = 0  # MB/s set on every vCPU; 0 = not set yet
        self.history: list[int] = []  # every quota set, in order

    def on_sync(self, now: float, dirty_pages: int, transferred: int,  # type: ignore[override]
                threshold_pct: int, vcpu_dirty_limit: int = 1) -> int | None:
        fired, _, _ = ThrottleTrigger.on_sync(self, now, dirty_pages, transferred, threshold_pct)
        if not fired or vcpu_dirty_limit == self.quota:
            return None
        self.quota = vcpu_dirty_limit
        self.history.append(vcpu_dirty_limit)
        return vcpu_dirty_limit
