"""virtio-mmio + virtio-blk as pure logic: guest RAM is a bytearray (a driver written here in
Python fills the rings), the backend a real image file. Checks negotiation, each request type,
the interrupt line, reset, the thread requests run on, and the state description."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest

from polling import wait_for
from vmferry.block.options import DriveSpec
from vmferry.block.raw import RawImage
from vmferry.devices import virtio_mmio as vm
from vmferry.devices.virtio_blk import (
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    VirtioBlk,
    VirtioBlkState,
)
from vmferry.errors import StateLoadError

RAM = 1 << 20
DESC, AVAIL, USED, HDR, STATUS, DATA = 0x1000, 0x2000, 0x3000, 0x4000, 0x4100, 0x10000
QSIZE = 8


class FakeRam:
    def __init__(self) -> None:
        self.mem = bytearray(RAM)
        self.writers: set[str] = set()

    def read_gpa(self, gpa: int, nbytes: int) -> bytes:
        return bytes(self.mem[gpa : gpa + nbytes])

    def write_gpa(self, gpa: int, data: bytes) -> None:
        self.writers.add(threading.current_thread().name)
        self.mem[gpa : gpa + len(data)] = data


class Driver:
    """The guest's side, in the order the spec prescribes."""

    def __init__(self, dev: VirtioBlk, ram: FakeRam) -> None:
        self.t, self.ram, self.last_used = dev.transport, ram, 0

    def reg(self, off: int, value: int | None = None) -> int:
        if value is None:
            return self.t.read(off, 4)
        self.t.write(off, 4, value)
        return 0

    def negotiate(self, features: int) -> bool:
        self.reg(vm.R_STATUS, 0)
        self.reg(vm.R_STATUS, vm.STATUS_ACKNOWLEDGE | vm.STATUS_DRIVER)
        for sel in (0, 1):
            self.reg(vm.R_DRIVER_FEATURES_SEL, sel)
            self.reg(vm.R_DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.reg(vm.R_STATUS, vm.STATUS_ACKNOWLEDGE | vm.STATUS_DRIVER | vm.STATUS_FEATURES_OK)
        return bool(self.reg(vm.R_STATUS) & vm.STATUS_FEATURES_OK)

    def offered(self) -> int:
        out = 0
        for sel in (0, 1):
            self.reg(vm.R_DEVICE_FEATURES_SEL, sel)
            out |= self.reg(vm.R_DEVICE_FEATURES) << (32 * sel)
        return out

    def start(self) -> None:
        assert self.negotiate(vm.F_VERSION_1)
        self.reg(vm.R_QUEUE_SEL, 0)
        self.reg(vm.R_QUEUE_NUM, QSIZE)
        rings = ((vm.R_QUEUE_DESC_LOW, DESC), (vm.R_QUEUE_DRIVER_LOW, AVAIL), (vm.R_QUEUE_DEVICE_LOW, USED))
        for off, gpa in rings:
            self.reg(off, gpa)
            self.reg(off + 4, 0)
        self.reg(vm.R_QUEUE_READY, 1)
        self.reg(vm.R_STATUS, vm.STATUS_ACKNOWLEDGE | vm.STATUS_DRIVER | vm.STATUS_FEATURES_OK
                 | vm.STATUS_DRIVER_OK)

    def request(self, kind: int, sector: int, data: bytes = b"", in_len: int = 0) -> tuple[int, int]:
        """Submit one request and wait for it; returns (status byte, used.len)."""
        m = self.ram.mem
        struct.pack_into("<IIQ", m, HDR, kind, 0, sector)
        m[STATUS] = 0xFF
        descs = [(HDR, 16, 0)]
        if data:
            m[DATA : DATA + len(data)] = data
            descs.append((DATA, len(data), 0))
        if in_len:
            descs.append((DATA, in_len, 2))
        descs.append((STATUS, 1, 2))
        for i, (addr, n, flags) in enumerate(descs):
            last = i == len(descs) - 1
            struct.pack_into("<QIHH", m, DESC + 16 * i, addr, n, flags | (0 if last else 1), i + 1)
        idx = struct.unpack_from("<H", m, AVAIL + 2)[0]
        struct.pack_into("<H", m, AVAIL + 4 + 2 * (idx % QSIZE), 0)
        struct.pack_into("<H", m, AVAIL + 2, (idx + 1) & 0xFFFF)
        self.reg(vm.R_QUEUE_NOTIFY, 0)
        wait_for(lambda: struct.unpack_from("<H", m, USED + 2)[0] != self.last_used, "the used ring", 30)
        slot = USED + 4 + 8 * (self.last_used % QSIZE)
        self.last_used = (self.last_used + 1) & 0xFFFF
        head, length = struct.unpack_from("<II", m, slot)
        assert head == 0
        return m[STATUS], length


@pytest.fixture
def blk(tmp_path: Path):
    img = tmp_path / "d.img"
    img.write_bytes(b"")
    with open(img, "r+b") as f:
        f.truncate(64 << 10)
    ram, irq = FakeRam(), []
    dev = VirtioBlk("disk0", RawImage(DriveSpec("disk0", str(img))), ram, irq.append)
    yield dev, ram, irq, img
    dev.close()


def test_identity_and_config(blk) -> None:
    dev, ram, _, _ = blk
    d = Driver(dev, ram)
    assert (d.reg(vm.R_MAGIC), d.reg(vm.R_VERSION), d.reg(vm.R_DEVICE_ID)) == (vm.MAGIC, 2, 2)
    assert d.offered() & vm.F_VERSION_1
    assert dev.transport.read(vm.CONFIG_OFFSET, 8) == (64 << 10) // 512  # capacity in sectors


def test_features_ok_refused_without_version_1_or_with_unoffered_bits(blk) -> None:
    dev, ram, _, _ = blk
    d = Driver(dev, ram)
    assert not d.negotiate(0)
    assert not d.negotiate(vm.F_VERSION_1 | (1 << 20))
    assert d.negotiate(vm.F_VERSION_1)


def test_write_read_flush_get_id_on_the_io_thread(blk) -> None:
    dev, ram, irq, img = blk
    d = Driver(dev, ram)
    d.start()
    payload = bytes(range(256)) * 4
    assert d.request(T_OUT, 3, payload) == (S_OK, 1)
    assert img.read_bytes()[3 * 512 : 5 * 512] == payload
    assert d.request(T_IN, 3, in_len=1024) == (S_OK, 1025)
    assert bytes(ram.mem[DATA : DATA + 1024]) == payload
    assert d.request(T_FLUSH, 0) == (S_OK, 1)
    assert d.request(T_GET_ID, 0, in_len=20) == (S_OK, 21)
    assert bytes(ram.mem[DATA : DATA + 20]) == b"disk0".ljust(20, b"\0")
    assert d.request(99, 0) == (S_UNSUPP, 1)
    assert ram.writers == {"iothread-disk0"}  # never a vCPU's (here: the test's) thread
    stats = dev.query_blockstats()["stats"]
    assert (stats["wr_operations"], stats["rd_operations"], stats["flush_operations"]) == (1, 1, 1)
    # Level-triggered: raised on completion, dropped once the driver acknowledges.
    assert irq and irq[-1] == 1 and d.reg(vm.R_INTERRUPT_STATUS) == vm.INT_USED_RING
    d.reg(vm.R_INTERRUPT_ACK, vm.INT_USED_RING)
    assert irq[-1] == 0 and d.reg(vm.R_INTERRUPT_STATUS) == 0


def test_out_of_range_request_is_an_ioerr_counted_invalid(blk) -> None:
    dev, ram, _, _ = blk
    d = Driver(dev, ram)
    d.start()
    assert d.request(T_IN, 127, in_len=1024)[0] == S_IOERR  # 64 KiB = 128 sectors
    assert d.request(T_OUT, 0, b"x" * 100)[0] == S_IOERR  # not whole sectors
    assert dev.query_blockstats()["stats"]["invalid_rd_operations"] == 1
    assert dev.query_blockstats()["stats"]["invalid_wr_operations"] == 1


def test_read_only_drive_offers_ro_and_refuses_writes(tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(b"\x5a" * 4096)
    ram = FakeRam()
    dev = VirtioBlk("ro", RawImage(DriveSpec("ro", str(img), readonly=True)), ram, lambda level: None)
    try:
        d = Driver(dev, ram)
        assert d.offered() & (1 << 5)
        d.start()
        assert d.request(T_OUT, 0, b"\0" * 512)[0] == S_IOERR
        assert img.read_bytes() == b"\x5a" * 4096
    finally:
        dev.close()


def test_reset_clears_queues_and_interrupt(blk) -> None:
    dev, ram, irq, _ = blk
    d = Driver(dev, ram)
    d.start()
    d.request(T_FLUSH, 0)
    epoch = dev.transport.epoch
    d.reg(vm.R_STATUS, 0)
    assert dev.transport.epoch == epoch + 1 and irq[-1] == 0
    assert dev.transport.queues[0].num == 0 and d.reg(vm.R_STATUS) == 0


def test_state_round_trips_into_a_second_device(blk, tmp_path: Path) -> None:
    dev, ram, _, img = blk
    d = Driver(dev, ram)
    d.start()
    d.request(T_FLUSH, 0)
    sec = VirtioBlkState.decode(VirtioBlkState.save(dev))
    t = sec.fields["transport"]
    assert sec.fields["capacity"] == 128 and t["driver_features"] == vm.F_VERSION_1
    assert t["queues"][0]["used_idx"] == 1 and t["queues"][0]["last_avail_idx"] == 1
    # The destination's own copy of the image (the source holds the lock on the original).
    copy = tmp_path / "copy.img"
    copy.write_bytes(img.read_bytes())
    small = tmp_path / "small.img"
    small.write_bytes(bytes(32 << 10))
    ro = VirtioBlk("disk0", RawImage(DriveSpec("disk0", str(small), readonly=True)), ram, lambda level: None)
    try:
        with pytest.raises(StateLoadError, match="'capacity'.*capacity is 128, this drive's 64"):
            ro.check_loadable(sec.fields)
    finally:
        ro.close()
    dev2 = VirtioBlk("disk0", RawImage(DriveSpec("disk0", str(copy))), ram, lambda level: None)
    try:
        dev2.check_loadable(sec.fields)
        VirtioBlkState.apply_section(dev2, sec)
        assert dev2.transport.get_state() == dev.transport.get_state()
        assert Driver(dev2, ram).reg(vm.R_STATUS) & vm.STATUS_DRIVER_OK
    finally:
        dev2.close()
