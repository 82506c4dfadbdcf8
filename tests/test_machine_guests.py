"""The bundled guests (src/vmferry/guests/images) under vmferry: heartbeat ticks on COM1; the
dirty guest dirties only its own pages per KVM's dirty log; a paused machine's complete state,
restored into a second machine, keeps the guest running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from polling import ticks, wait_for
from vmferry.devices.cpu import restore_vcpu, save_vcpu
from vmferry.guests.verify import HEADER_GPA, MAGIC, DirtyHeader, read_header, verify_dirty
from vmferry.machine.machine import Machine
from vmferry.vmm import guest_image

MiB = 1 << 20


@pytest.mark.kvm
def test_heartbeat_prints_ticks_under_vmferry_run() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vmferry", "run", "--guest", "heartbeat", "-m", "32M",
         "--append", "hz=50 count=3"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr
    assert "tick 1\ntick 2\ntick 3\nheartbeat: done" in r.stdout


@pytest.mark.kvm
def test_dirty_guest_dirties_only_its_own_pages(tmp_path: Path) -> None:
    with Machine(memory=64 * MiB, serial=f"file:{tmp_path / 'serial'}") as m:
        boot = m.load_kernel(guest_image("dirty"), "ws=4 rate=16 verify=1")
        ram = m.ram_block("pc.ram")
        m.start()
        def filled() -> DirtyHeader | None:
            h = read_header([(0, ram.mem)])
            return h if h is not None and h.magic == MAGIC and 0 < h.npages == h.filled else None

        header = wait_for(filled, "the working set filled")
        ram.start_dirty_log()
        ram.add_dirty_consumer("test")
        wait_for(lambda: read_header([(0, ram.mem)]).writes > header.writes + 64, "rewrites")
        m.pause()
        ram.sync_dirty()
        pages = ram.dirty_pages("test") * 4096
        verdict = verify_dirty([(0, ram.mem)])
    assert verdict.ok, verdict
    ws = (header.ws_gpa, header.ws_gpa + header.npages * 4096)
    table = (header.table_gpa, header.table_gpa + header.npages * 4)
    in_ws = (pages >= ws[0]) & (pages < ws[1])
    assert in_ws.any()
    others = pages[~in_ws]
    # Outside the working set: only its table, its header page, and the guest's own low RAM
    # (0x8000-0x9FFFF: stacks) and image (.bss) — never the loader's area or anything else.
    allowed = (others >= table[0] & ~0xFFF) & (others < table[1])
    allowed |= (others >= 0x8000) & (others < 0xA0000)
    allowed |= (others >= 1 * MiB) & (others < boot.image_end)
    assert np.all(allowed), [hex(p) for p in others[~allowed]]
    assert HEADER_GPA in others


@pytest.mark.kvm
def test_state_restored_into_a_second_machine_keeps_the_guest_running(tmp_path: Path) -> None:
    src_out, dst_out = tmp_path / "src", tmp_path / "dst"
    with Machine(memory=32 * MiB, serial=f"file:{src_out}") as src:
        src.load_kernel(guest_image("heartbeat"), "hz=50")
        src.start()
        wait_for(lambda: len(ticks(src_out)) >= 3, "source ticks")
        src.pause()
        last = ticks(src_out)[-1]
        with Machine(memory=32 * MiB, serial=f"file:{dst_out}") as dst:
            for a, b in zip(src.ram_blocks, dst.ram_blocks, strict=True):
                b.view()[:] = a.view()
            for a, b in zip(src.vcpus, dst.vcpus, strict=True):
                restore_vcpu(b, save_vcpu(a, src.msr_indices))
            for name in ("irqchip", "pit", "serial0", "clock"):
                dst.devices[name].set_state(src.devices[name].get_state())  # type: ignore[attr-defined]
            src.shutdown()
            dst.start()
            wait_for(lambda: ticks(dst_out) and ticks(dst_out)[-1] > last + 2, "destination ticks")
    # One serial stream across the switch (a line cut mid-way by the pause ends on the
    # destination), and the tick count continues with no gap and no repeat.
    both = ticks(src_out, dst_out)
    assert both == list(range(1, len(both) + 1))
