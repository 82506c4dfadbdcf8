"""The dirty guest's modes. Fills (fill=text, fill=sparse) on real KVM: the guest's own check and
the host verifier pass, a corrupted word is caught by both readings of the layout, text pages
compress like text, and a sparse rewrite changes only the two stamp words of a page. compute=1:
a second vCPU started by INIT/SIPI reports its loop rate, under QEMU and under vmferry, and keeps
running after a migration."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from polling import wait_for
from test_guests import run_qemu
from vmferry.guests.verify import (
    FILL_RANDOM,
    FILL_SPARSE,
    FILL_STAMP,
    FILL_TEXT,
    MAGIC,
    PAGE_U64S,
    DirtyHeader,
    expected_pages,
    read_header,
    verify_dirty,
)
from vmferry.machine.machine import Machine
from vmferry.vmm import guest_image
from vmproc import VmProcess

MiB = 1 << 20
PAGE = 4096


def test_text_pages_are_text_that_compresses_like_text() -> None:
    pages = expected_pages(FILL_TEXT, np.arange(64), np.arange(1, 65))
    body = pages[:, 1:-1].tobytes()
    assert all(32 <= c < 127 for c in body)
    one = len(zlib.compress(pages[0].tobytes(), 1))
    assert 4096 / 8 < one < 4096 / 2.5  # compressible within a page, yet not a repeated pattern
    # No page repeats another: a batch compresses about as well as one page does.
    assert len(zlib.compress(pages.tobytes(), 1)) > 64 * one * 0.6


def test_random_pages_do_not_compress() -> None:
    pages = expected_pages(FILL_RANDOM, np.arange(64), np.arange(1, 65)).tobytes()
    assert len(zlib.compress(pages, 9)) > len(pages) * 0.99


@pytest.mark.parametrize("fill", [FILL_STAMP, FILL_TEXT, FILL_SPARSE, FILL_RANDOM])
def test_expected_pages_have_their_stamps(fill: int) -> None:
    pages = np.array([0, 5, 2047, 9000])
    gens = np.array([1, 7, 2**32 - 1, 3])
    out = expected_pages(fill, pages, gens)
    stamps = (gens.astype(np.uint64) << np.uint64(32)) | pages.astype(np.uint64)
    assert (out[:, 0] == stamps).all() and (out[:, PAGE_U64S - 1] == stamps).all()
    if fill == FILL_SPARSE:  # the body depends on the page only
        assert (expected_pages(fill, pages, gens + 1)[:, 1:-1] == out[:, 1:-1]).all()
    if fill in (FILL_TEXT, FILL_RANDOM):  # and changes with every write
        assert (expected_pages(fill, pages, gens + 1)[:, 1:-1] != out[:, 1:-1]).any(axis=1).all()


def _boot(m: Machine, append: str) -> DirtyHeader:
    m.load_kernel(guest_image("dirty"), append)
    ram = m.ram_block("pc.ram")
    m.start()

    def filled() -> DirtyHeader | None:
        h = read_header([(0, ram.mem)])
        return h if h is not None and h.magic == MAGIC and 0 < h.npages == h.filled else None

    return wait_for(filled, "the working set filled")


@pytest.mark.kvm
@pytest.mark.parametrize("name,fill", [("text", FILL_TEXT), ("sparse", FILL_SPARSE), ("random", FILL_RANDOM)])
def test_fill_mode_verifies_in_the_guest_and_on_the_host(tmp_path: Path, name: str, fill: int) -> None:
    serial = tmp_path / "serial"
    with Machine(memory=64 * MiB, serial=f"file:{serial}") as m:
        h = _boot(m, f"ws=4 rate=8 verify=1 fill={name}")
        assert (h.version, h.fill) == (2, fill)
        wait_for(lambda: "verify ok" in serial.read_text(), "the guest's own check", timeout_s=60)
        wait_for(lambda: read_header([(0, m.ram_block("pc.ram").mem)]).writes > h.writes + 64, "rewrites")
        m.pause()
        ram = bytearray(m.ram_block("pc.ram").mem)
    assert "FAIL" not in serial.read_text()
    assert f"fill={name}" in serial.read_text().splitlines()[0]
    assert verify_dirty([(0, ram)]).ok
    ws = ram[h.ws_gpa : h.ws_gpa + h.npages * PAGE]
    if fill == FILL_RANDOM:
        assert len(zlib.compress(bytes(ws), 1)) > len(ws) * 0.99  # incompressible
    else:
        assert len(zlib.compress(bytes(ws), 1)) < len(ws) / 2.5  # compressible
    # A corrupted text word (not a stamp) in any page is caught.
    at = h.ws_gpa + 3 * PAGE + 100 * 8
    ram[at] ^= 0x20
    bad = verify_dirty([(0, ram)])
    assert not bad.ok and bad.first_bad_page == 3 and "u64 100 " in bad.reason, bad


@pytest.mark.kvm
def test_sparse_rewrite_changes_only_the_stamps() -> None:
    with Machine(memory=64 * MiB) as m:
        h = _boot(m, "ws=1 rate=4 verify=0 fill=sparse")
        ram = m.ram_block("pc.ram").mem
        before = np.frombuffer(bytes(ram[h.ws_gpa : h.ws_gpa + h.npages * PAGE]), dtype="<u8")
        wait_for(lambda: read_header([(0, ram)]).writes > h.writes + 64, "rewrites")
        m.pause()
        after = np.frombuffer(bytes(ram[h.ws_gpa : h.ws_gpa + h.npages * PAGE]), dtype="<u8")
    changed = (before != after).reshape(-1, PAGE_U64S)
    assert changed.any()
    assert not changed[:, 1:-1].any()  # only u64 0 and 511 of each page ever change after the fill


def _text_ram(fill: int) -> tuple[bytearray, list[int]]:
    """Synthetic RAM of a version 2 guest with `fill`, every page at its generation."""
    from test_guests_verify import NPAGES, WS_GPA, gens_for, make_ram, set_header

    gens = gens_for(NPAGES)
    ram = make_ram(gens)
    pages = np.frombuffer(ram, dtype="<u8", count=NPAGES * PAGE_U64S, offset=WS_GPA).reshape(NPAGES, -1)
    pages[:] = expected_pages(fill, np.arange(NPAGES), np.array(gens))
    set_header(ram, version=2, fill=fill)
    return ram, gens


@pytest.mark.parametrize("fill", [FILL_TEXT, FILL_SPARSE, FILL_RANDOM])
def test_synthetic_fill_pages_verify_and_a_stale_page_fails(fill: int) -> None:
    from test_guests_verify import WS_GPA

    ram, gens = _text_ram(fill)
    assert verify_dirty([(0, ram)]).ok
    # Page 9 holding its previous generation's content (stamps and, for text, its words): stale.
    old = expected_pages(fill, np.array([9]), np.array([gens[9] - 1]))[0]
    ram[WS_GPA + 9 * PAGE : WS_GPA + 10 * PAGE] = old.tobytes()
    bad = verify_dirty([(0, ram)])
    assert not bad.ok and bad.first_bad_page == 9, bad


@pytest.mark.parametrize("fill", [FILL_TEXT, FILL_SPARSE, FILL_RANDOM])
def test_synthetic_inflight_page_of_old_and_new_words_passes(fill: int) -> None:
    from test_guests_verify import WS_GPA, set_header

    ram, gens = _text_ram(fill)
    h = read_header([(0, ram)])
    assert h is not None
    nxt = h.generation + 1
    new = expected_pages(fill, np.array([5]), np.array([nxt]))[0]
    page = np.frombuffer(ram, dtype="<u8", count=PAGE_U64S, offset=WS_GPA + 5 * PAGE)
    page[: PAGE_U64S // 2] = new[: PAGE_U64S // 2]  # paused halfway through the rewrite
    set_header(ram, inflight=5)
    assert verify_dirty([(0, ram)]).ok
    page[200] ^= 1  # a word that is neither
    assert not verify_dirty([(0, ram)]).ok


RATE = re.compile(r"compute: t=\d+ rate=(\d+) loops/s")


def test_compute_vcpu_reports_its_rate_under_qemu() -> None:
    value, lines = run_qemu("dirty", "ws=4 rate=4 verify=1 runtime=3 compute=1", extra=("-smp", "2"),
                            timeout=120)
    assert value == 0, lines
    assert "dirty: compute vCPU started" in lines
    rates = [int(m.group(1)) for line in lines if (m := RATE.fullmatch(line))]
    assert rates and all(r > 0 for r in rates), lines


def test_compute_without_a_second_vcpu_is_a_bad_parameter() -> None:
    value, lines = run_qemu("dirty", "ws=4 compute=1", timeout=120)
    assert value == 2 and "dirty: compute=1 needs a second vCPU, and it did not start" in lines, lines


@pytest.mark.kvm
def test_compute_vcpu_runs_under_vmferry_and_after_a_migration(tmp_path: Path) -> None:
    src = VmProcess(tmp_path, "src", "-m", "64M", "--smp", "2", "--guest", "dirty",
                    "--append", "ws=4 rate=8 verify=1 compute=1")
    dst = VmProcess(tmp_path, "dst", "-m", "64M", "--smp", "2", "--incoming", "tcp:127.0.0.1:0")
    try:
        src.wait_serial(r"compute: t=\d+ rate=[1-9]\d* loops/s", timeout=60)
        src.wait_serial(r"verify ok")
        src.cmd("migrate", uri=dst.incoming_uri())
        assert src.wait_migration()["status"] == "completed"
        assert dst.wait_migration()["status"] == "completed"
        start = len(dst.serial())
        # The second vCPU moved with its state: it still counts on the destination.
        dst.wait_serial(r"compute: t=\d+ rate=[1-9]\d* loops/s", after=start, timeout=60)
        dst.wait_serial(r"verify ok", after=start, timeout=60)
        assert "FAIL" not in dst.serial()
    finally:
        src.close()
        dst.close()
