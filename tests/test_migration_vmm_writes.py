"""A write the VMM itself makes to guest RAM during precopy reaches the destination.

The source is a Machine in this process (real KVM, running the heartbeat guest) migrating with
OutgoingMigration over a real TCP socket to a `vmferry run --incoming` process. At the start of
the first pass, the VMM writes a page the guest never touched: the setup's population scan did
not mark it and KVM's dirty log never sees host writes, so only the dirty log's VMM producer
(`RamBlock.write` noting the page) gets it sent. The destination then snapshots itself to a file
and the page is read back from that stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from vmferry.devices.state import MachineDeviceState
from vmferry.machine.machine import Machine
from vmferry.migration.params import MigrationParameters
from vmferry.migration.source import OutgoingMigration
from vmferry.migration.state import MigrationState, MigrationStatus
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.records import RamBlocks, RamPageList, RamPages, RamZero
from vmferry.transport.channel import Channel
from vmferry.transport.connect import connect_outgoing
from vmferry.vmm import guest_image
from vmproc import VmProcess

pytestmark = [pytest.mark.kvm]

MiB = 1 << 20
PAGE = 4096
MARKER_GPA = 48 * MiB  # in pc.ram, far above anything the heartbeat guest touches
MARKER = b"written by the VMM during precopy".ljust(PAGE, b"!")


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[VmProcess]:
    dst = VmProcess(tmp_path, "dst", "-m", "64M", "--incoming", "tcp:127.0.0.1:0")
    try:
        yield dst
    finally:
        dst.close()


def page_in_stream(path: Path, block_name: str, page: int) -> bytes | None:
    """The content a stream gives one page of one RAM block (None: never sent)."""
    dec = StreamDecoder()
    dec.feed(path.read_bytes())
    dec.feed_eof()
    block_id, content = None, None
    for rec in dec.records():
        if isinstance(rec, RamBlocks):
            block_id = next(b.id for b in rec.blocks if b.name == block_name)
        elif isinstance(rec, RamPages) and rec.block_id == block_id:
            if rec.first_page <= page < rec.first_page + rec.page_count:
                at = (page - rec.first_page) * PAGE
                content = bytes(rec.data[at : at + PAGE])
        elif isinstance(rec, RamPageList) and rec.block_id == block_id:
            hits = [i for i, p in enumerate(rec.pages.tolist()) if p == page]
            if hits:
                content = bytes(rec.data[hits[0] * PAGE : (hits[0] + 1) * PAGE])
        elif (isinstance(rec, RamZero) and rec.block_id == block_id
              and rec.first_page <= page < rec.first_page + rec.page_count):
            content = bytes(PAGE)
    return content


def test_a_vmm_write_during_precopy_reaches_the_destination(tmp_path: Path, destination: VmProcess) -> None:
    with Machine(memory=64 * MiB) as src:
        src.load_kernel(guest_image("heartbeat"), "hz=100")
        src.start()
        ram = src.ram_block_at(MARKER_GPA)
        assert not ram.populated_pages()[(MARKER_GPA - ram.gpa) // PAGE]  # nothing marks it at setup
        written: list[int] = []

        def on_pass(number: int) -> None:  # on the migration thread, before the pass sends
            if number == 1:
                src.write_gpa(MARKER_GPA, MARKER)
                written.append(number)

        channel: Future[Channel] = Future()
        channel.set_result(connect_outgoing(destination.incoming_uri()))
        state = MigrationState()
        out = OutgoingMigration(src, MachineDeviceState(src), channel, MigrationParameters(), state, on_pass)
        out.start()
        out.join(120)
        assert not out._thread.is_alive(), "the migration did not finish"
        assert written == [1]
        assert state.status == MigrationStatus.COMPLETED, out.stats
        assert destination.wait_migration()["status"] == "completed"
        src.shutdown()

    snapshot = tmp_path / "dst.snap"
    destination.cmd("migrate", uri=f"file:{snapshot}")
    assert destination.wait_migration()["status"] == "completed"
    assert page_in_stream(snapshot, "pc.ram", MARKER_GPA // PAGE) == MARKER
