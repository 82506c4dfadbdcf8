"""The dirty-guest verifier on synthetic guest RAM built here, field by field, from the layout in
guests/dirty_layout.h (restated in vmferry.guests.verify's docstring)."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from vmferry.guests.verify import (
    HEADER_GPA,
    MAGIC,
    NO_PAGE,
    PAGE_SIZE,
    Verdict,
    read_header,
    verify_dirty,
)

TABLE_GPA = 0xA000
WS_GPA = 0x20000
NPAGES = 96


def make_ram(gens: list[int], *, filled: int | None = None, inflight: int = NO_PAGE) -> bytearray:
    """Guest RAM from GPA 0 as the dirty guest would leave it with page i at generation gens[i]
    (0 = never written), every page consistent with the table, no write in flight."""
    npages = len(gens)
    ram = bytearray(WS_GPA + npages * PAGE_SIZE)
    table = np.frombuffer(ram, dtype="<u4", count=npages, offset=TABLE_GPA)
    table[:] = gens
    pages = np.frombuffer(ram, dtype="<u8", count=npages * 512, offset=WS_GPA).reshape(npages, 512)
    idx = np.arange(npages, dtype=np.uint64)
    pages[:] = ((np.array(gens, dtype=np.uint64) << np.uint64(32)) | idx)[:, None]
    pages[np.array(gens) == 0] = 0
    set_header(
        ram,
        npages=npages,
        generation=max(gens),
        filled=npages if filled is None else filled,
        inflight=inflight,
        writes=sum(1 for g in gens if g),
        table_sum=sum(gens),
    )
    return ram


def set_header(ram: bytearray, **fields: int | bytes) -> None:
    cur = read_header([(0, ram)])
    values = {
        "magic": MAGIC, "version": 1, "header_size": 0x80, "ws_gpa": WS_GPA, "npages": 0,
        "table_gpa": TABLE_GPA, "entry_size": 4, "page_size": PAGE_SIZE, "generation": 0,
        "inflight": NO_PAGE, "filled": 0, "writes": 0, "verify_passes": 0, "verify_fails": 0,
        "rate_mib_s": 1, "pattern": 1, "fill": 0, "hot_percent": 10, "hot_writes": 90, "seed": 1,
        "table_sum": 0,
    }  # fmt: skip
    if cur is not None and cur.magic == MAGIC:
        values.update(vars(cur))
    values.update(fields)
    struct.pack_into("<8sIIQQQIIQQQQQQIHHIIQQ", ram, HEADER_GPA, *values.values())


def page_offset(page: int, word: int = 0) -> int:
    return WS_GPA + page * PAGE_SIZE + word * 8


def gens_for(n: int, seed: int = 7) -> list[int]:
    # Distinct generations, as the guest's write counter gives: a fill 1..n then rewrites.
    rng = random.Random(seed)
    gens = list(range(1, n + 1))
    nxt = n
    for _ in range(3 * n):
        nxt += 1
        gens[rng.randrange(n)] = nxt
    return gens


def test_consistent_ram_passes():
    gens = gens_for(NPAGES)
    v = verify_dirty([(0, make_ram(gens))])
    assert v == Verdict(True, NPAGES, max(gens), None, "")
    assert str(v) == f"verify ok gen={max(gens)} pages={NPAGES}"


@pytest.mark.parametrize("seed", range(8))
def test_one_corrupted_byte_in_a_page_fails_naming_it(seed):
    rng = random.Random(seed)
    ram = make_ram(gens_for(NPAGES))
    page, byte = rng.randrange(NPAGES), rng.randrange(PAGE_SIZE)
    ram[page_offset(page) + byte] ^= 1 << rng.randrange(8)
    v = verify_dirty([(0, ram)])
    assert not v.ok and v.first_bad_page == page
    assert str(v).startswith(f"verify FAIL page={page}: u64 {byte // 8} holds")


def test_corrupted_table_entry_fails_naming_its_page():
    ram = make_ram(gens_for(NPAGES))
    ram[TABLE_GPA + 4 * 17 + 1] ^= 0x40
    v = verify_dirty([(0, ram)])
    assert not v.ok and v.first_bad_page == 17
    assert "the table says generation" in v.reason


def test_stale_table_and_stale_pages_fail_on_the_table_sum():
    # A migration that lost a table page AND the data pages it describes: each page agrees with
    # its (stale) table entry, only the header's running sum knows.
    gens = gens_for(NPAGES)
    ram = make_ram(gens)
    assert gens[5] != 1
    stale = make_ram([g if i != 5 else 1 for i, g in enumerate(gens)])
    lo, hi = page_offset(5), page_offset(6)
    ram[lo:hi] = stale[lo:hi]
    ram[TABLE_GPA + 4 * 5 : TABLE_GPA + 4 * 6] = stale[TABLE_GPA + 4 * 5 : TABLE_GPA + 4 * 6]
    v = verify_dirty([(0, ram)])
    assert not v.ok and "table sum" in v.reason


def test_page_newer_than_the_header_fails():
    gens = gens_for(NPAGES)
    ram = make_ram(gens)
    set_header(ram, generation=max(gens) - 1)
    v = verify_dirty([(0, ram)])
    assert not v.ok and v.first_bad_page == gens.index(max(gens))


def _inflight_ram(stage: str, split_word: int) -> tuple[bytearray, int]:
    """A rewrite of page 9 to the next generation, stopped at `stage` of the guest's sequence."""
    gens = gens_for(NPAGES)
    page, old, new = 9, gens[9], max(gens) + 1
    ram = make_ram(gens)
    set_header(ram, inflight=page)
    words = np.frombuffer(ram, dtype="<u8", count=512, offset=page_offset(page))
    words[:split_word] = (new << 32) | page  # rep stosq got this far
    if stage in ("sum", "table", "generation"):
        set_header(ram, table_sum=sum(gens) - old + new)
    if stage in ("table", "generation"):
        struct.pack_into("<I", ram, TABLE_GPA + 4 * page, new)
    if stage == "generation":
        set_header(ram, generation=new, writes=read_header([(0, ram)]).writes + 1)
    return ram, page


@pytest.mark.parametrize(
    ("stage", "split_word"),
    [
        ("stosq", 0),
        ("stosq", 1),
        ("stosq", 300),
        ("stosq", 512),
        ("sum", 512),
        ("table", 512),
        ("generation", 512),
    ],
)
def test_page_in_flight_is_tolerated_at_every_step(stage, split_word):
    ram, _ = _inflight_ram(stage, split_word)
    v = verify_dirty([(0, ram)])
    assert v.ok, v


def test_page_in_flight_still_checked_for_foreign_content():
    ram, page = _inflight_ram("stosq", 300)
    ram[page_offset(page, 400) + 1] ^= 0x10  # an old word that is neither old nor new now
    v = verify_dirty([(0, ram)])
    assert not v.ok and v.first_bad_page == page


def test_only_the_in_flight_page_is_tolerated():
    ram, page = _inflight_ram("stosq", 300)
    ram[page_offset(page + 1, 3)] ^= 0x01
    v = verify_dirty([(0, ram)])
    assert not v.ok and v.first_bad_page == page + 1


def test_initial_fill_in_progress():
    n = 40
    gens = list(range(1, n + 1)) + [0] * (NPAGES - n)
    ram = make_ram(gens, filled=n)
    assert verify_dirty([(0, ram)]) == Verdict(True, n, n, None, "")
    # ...and with page n half-stamped, in flight.
    set_header(ram, inflight=n)
    np.frombuffer(ram, dtype="<u8", count=100, offset=page_offset(n))[:] = ((n + 1) << 32) | n
    assert verify_dirty([(0, ram)]).ok


def test_zero_table_entry_below_filled_fails():
    ram = make_ram(gens_for(NPAGES))
    struct.pack_into("<I", ram, TABLE_GPA + 4 * 3, 0)
    v = verify_dirty([(0, ram)])
    assert not v.ok and v.first_bad_page == 3 and "never written" in v.reason


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"magic": b"\0" * 8}, "no dirty guest header at GPA 0x9000"),
        ({"magic": b"VMFDIRTX"}, "no dirty guest header"),
        ({"version": 3}, "header layout version 3, this verifier reads (1, 2)"),
        ({"fill": 1}, "fill=1 in a version 1 header"),
        ({"version": 2, "fill": 4}, "fill=4 in a version 2 header"),
        ({"entry_size": 8}, "garbled header"),
        ({"npages": 0}, "garbled header"),
        ({"filled": NPAGES + 1}, "garbled header"),
        ({"inflight": NPAGES}, "inflight page"),
        ({"ws_gpa": WS_GPA + 1}, "garbled header"),
        ({"npages": 1 << 20}, "overlaps the working set"),
        ({"table_gpa": 1 << 40}, "is not (all) in the given regions"),
    ],
)
def test_bad_header_is_a_fail_not_an_exception(fields, reason):
    ram = make_ram(gens_for(NPAGES))
    set_header(ram, **fields)
    v = verify_dirty([(0, ram)])
    assert not v.ok and v.first_bad_page is None and reason in v.reason
    assert str(v).startswith("verify FAIL: ")


def test_all_zero_ram_and_missing_header():
    assert "no dirty guest header" in verify_dirty([(0, bytes(0x10000))]).reason
    assert "in none of the regions" in verify_dirty([(0, bytes(0x1000))]).reason
    assert "in none of the regions" in verify_dirty([]).reason


def test_regions_split_anywhere_and_given_in_any_order():
    gens = gens_for(NPAGES)
    ram = bytes(make_ram(gens))
    cut1, cut2 = page_offset(20) + 1234, page_offset(61)  # one cut mid-page
    regions = [(cut2, memoryview(ram)[cut2:]), (0, ram[:cut1]), (cut1, bytearray(ram[cut1:cut2]))]
    assert verify_dirty(regions).ok
    broken = bytearray(ram[cut1:cut2])
    broken[page_offset(20) + 2000 - cut1] ^= 0xFF  # in the straddling page
    regions[2] = (cut1, broken)
    assert verify_dirty(regions).first_bad_page == 20


def test_working_set_not_covered():
    ram = make_ram(gens_for(NPAGES))
    v = verify_dirty([(0, ram[: page_offset(50)])])
    assert not v.ok and f"GPA {page_offset(50):#x}" in v.reason


def test_numpy_and_mmap_buffers(tmp_path):
    import mmap

    ram = make_ram(gens_for(NPAGES))
    assert verify_dirty([(0, np.frombuffer(ram, dtype=np.uint8))]).ok
    path = tmp_path / "ram"
    path.write_bytes(ram)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert verify_dirty([(0, m)]).ok
