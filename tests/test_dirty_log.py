"""The dirty log: unit and property tests of `DirtyLog` (units, producers, consumers), and a
RamBlock without a VM, whose only producer is the VMM's own writes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import VmferryError
from vmferry.machine.dirty_log import DirtyLog, bitmap_to_units, set_bit_range, units_to_bitmap
from vmferry.machine.ramblock import PAGE_SIZE, RamBlock


@given(st.integers(1, 300).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(0, n - 1).flatmap(lambda f: st.tuples(st.just(f), st.integers(0, n - f))))))
def test_set_bit_range_sets_exactly_the_range(case):
    n, (first, count) = case
    bm = np.zeros((n + 63) // 64, dtype=np.uint64)
    set_bit_range(bm, first, count)
    assert bitmap_to_units(bm, n).tolist() == list(range(first, first + count))


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_unit_mask_and_bitmap_round_trip(mask):
    units = np.array(mask)
    assert bitmap_to_units(units_to_bitmap(units), len(mask)).tolist() == np.flatnonzero(units).tolist()


# One step of a random session: ("note", first, count), ("harvest", units), ("sync",),
# ("claim", consumer) = the consumer takes and clears its bits, ("add", consumer).
STEP = st.one_of(
    st.tuples(st.just("note"), st.integers(0, 199), st.integers(0, 40)),
    st.tuples(st.just("harvest"), st.sets(st.integers(0, 199), max_size=20)),
    st.tuples(st.just("sync")),
    st.tuples(st.just("claim"), st.sampled_from(["a", "b"])),
    st.tuples(st.just("add"), st.just("b")),
)


@settings(max_examples=300)
@given(st.lists(STEP, max_size=40))
def test_every_consumer_sees_what_any_producer_reported_after_it_joined(steps):
    """Model: after a sync, each consumer's bitmap = what it had plus every unit any producer
    reported since the previous sync; consumers never affect each other."""
    n = 200
    log = DirtyLog(n)
    harvested: set[int] = set()  # the harvester's own pending units (like KVM's log)

    def harvest(out: np.ndarray) -> None:
        out |= units_to_bitmap(np.isin(np.arange(n), sorted(harvested)))
        harvested.clear()

    log.add_harvester("guest", harvest)
    log.add_consumer("a")
    log.start()
    pending: set[int] = set()
    model: dict[str, set[int]] = {"a": set()}
    for step in steps:
        match step:
            case ("note", first, count):
                count = min(count, n - first)
                log.note(first, count)
                pending |= set(range(first, first + count))
            case ("harvest", units):
                harvested.update(units)
                pending |= units
            case ("sync",):
                found = log.sync()
                assert found == len(pending)
                for units in model.values():
                    units |= pending
                pending = set()
            case ("claim", name) if name in model:
                assert set(log.units(name).tolist()) == model[name]
                log.bitmap(name)[:] = 0
                model[name] = set()
            case ("add", name) if name not in model:
                log.add_consumer(name)  # folds what was pending into the others first
                for units in model.values():
                    units |= pending
                pending = set()
                model[name] = set()
    log.sync()
    for name, units in model.items():
        assert set(log.units(name).tolist()) == units | pending


def test_producers_record_only_while_the_log_is_active():
    log = DirtyLog(10)
    log.add_consumer("a")
    log.note(1, 2)  # not started: nothing recorded
    assert log.sync() == 0
    log.start()
    log.note(3, 1)
    log.stop()
    log.note(5, 1)
    log.start()  # starting again drops what was held from before
    log.note(7, 1)
    assert log.sync() == 1 and log.units("a").tolist() == [7]


def test_a_note_outside_the_units_is_refused_by_name():
    log = DirtyLog(10, "RAM block x")
    log.start()
    with pytest.raises(VmferryError, match=r"RAM block x: units \[8, \+3\) outside 0..10"):
        log.note(8, 3)


def test_a_writer_thread_racing_a_claiming_consumer_loses_nothing():
    # The consumer syncs and clears its bitmap in a loop (as a migration pass claims pages)
    # while another thread notes writes; every noted unit is seen by the consumer at least once.
    n = 4096
    log = DirtyLog(n)
    log.add_consumer("m")
    log.start()
    noted = np.random.default_rng(7).integers(0, n, 20000)
    done = threading.Event()

    def writer() -> None:
        for u in noted:
            log.note(int(u), 1)
        done.set()

    seen = np.zeros(n, dtype=bool)
    t = threading.Thread(target=writer)
    t.start()
    while not done.is_set():
        log.sync()
        seen[log.units("m")] = True
        log.bitmap("m")[:] = 0
    t.join()
    log.sync()
    seen[log.units("m")] = True
    assert seen[noted].all()


def test_a_block_without_a_vm_logs_the_vmm_writes():
    block = RamBlock("mem", 0x100000, 64 * PAGE_SIZE)  # no VM, no KVM slot
    try:
        block.write(0x100000 + 5 * PAGE_SIZE, b"before")  # log not started: not recorded
        block.start_dirty_log()
        block.add_dirty_consumer("m")
        block.write(0x100000 + 3 * PAGE_SIZE - 2, b"span")  # crosses pages 2 and 3
        view = block.view()
        view[40 * PAGE_SIZE : 40 * PAGE_SIZE + 1] = b"x"
        view.release()
        block.note_written(0x100000 + 40 * PAGE_SIZE, 1)
        assert block.dirty_pages("m").tolist() == []  # consumers see producers at sync only
        assert block.sync_dirty() == 3
        assert block.dirty_pages("m").tolist() == [2, 3, 40]
        with pytest.raises(VmferryError, match="outside the block"):
            block.note_written(0x100000 + 64 * PAGE_SIZE - 1, 2)
        block.stop_dirty_log()
        block.write(0x100000, b"after")
        assert block.sync_dirty() == 0
    finally:
        block.close()


def test_take_while_another_consumer_syncs_loses_nothing():
    # One consumer takes its bitmap (copy + clear in one step) while another thread syncs the
    # log for its own consumer — which folds into every consumer's bitmap, this one's too.
    n = 4096
    log = DirtyLog(n)
    log.add_consumer("migration")
    log.add_consumer("dirty-rate")
    log.start()
    noted = np.random.default_rng(11).integers(0, n, 20000)
    done = threading.Event()

    def writer_and_syncer() -> None:
        for k, u in enumerate(noted):
            log.note(int(u), 1)
            if k % 7 == 0:
                log.sync()
        done.set()

    seen = np.zeros(n, dtype=bool)
    t = threading.Thread(target=writer_and_syncer)
    t.start()
    while not done.is_set():
        taken = log.take("migration")
        if taken is not None:
            seen[bitmap_to_units(taken, n)] = True
    t.join()
    log.sync()
    taken = log.take("migration")
    if taken is not None:
        seen[bitmap_to_units(taken, n)] = True
    assert seen[noted].all()
    assert log.take("migration") is None
