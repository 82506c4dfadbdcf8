"""Live migration with a disk that is not shared: vmferry against QEMU 7.2's two ways.

Scenario D1 (issue 10): a 1 GiB raw image with 512 MiB written, the guest writing 20 MiB/s to
it and dirtying its RAM at 50 MiB/s. The same `disk` guest image on every side
(guests/README.md): `dws=512 dfill=512 drate=20 dreq=64 ws=256 rate=50` in 1 GiB of RAM — it
writes the first 512 MiB of the disk once, fills 256 MiB of RAM, then writes 64 KiB requests at
random places of those 512 MiB (20 MiB/s) and rewrites random RAM pages (50 MiB/s). Every
destination starts from an empty (all-hole) image of the same size.

Sides:
  vmferry      `migrate` with `blk: true`: the disk in the stream, on RAM's passes
  qemu-blk     QEMU 7.2 + KVM, microvm + virtio-blk-device, `migrate` with `blk: true` (its
               in-stream block migration; removed in QEMU 9.1)
  qemu-mirror  the same QEMU, the libvirt sequence: destination `-incoming ... -S`,
               `nbd-server-start` + `nbd-server-add` (writable); source `drive-mirror`
               (`sync: full`, `mode: existing`, target `nbd:HOST:PORT:exportname=d0`), wait for
               the job's `ready`, `migrate` the RAM with the `pause-before-switchover`
               capability; at `pre-switchover` (source paused) `block-job-cancel` (a ready
               mirror's point-in-time end: the target equals the paused source) and
               `migrate-continue`; after completion the destination's `nbd-server-stop` and
               `cont`. (Cancelling only after completion, as the plain reading of the sequence
               has it, crashes QEMU 7.2: the completed migration inactivates the source's images
               under the running mirror, `bdrv_co_write_req_prepare: Assertion ... failed`.)
  vmferry-shared  (not by default) vmferry with the image shared: the pause of shared storage
  vmferry-compress  (not by default) vmferry as `vmferry`, with `x-block-compression` set to
               --block-compression (default auto): data runs of the disk as BLOCK_COMPRESSED
               With --ram-compression also the RAM on multifd's channels (2, QEMU's default),
               compressed so (`multifd` capability, `multifd-compression`)
  qemu-mirror-compress  (not by default) qemu-mirror with the RAM on multifd's channels
               compressed with --ram-compression (zstd or zlib: QEMU 7.2's), set on both QEMUs
               before the migration; the mirror's NBD connection carries the disk raw (QEMU has
               no compression there)
  vmferry-before  (not by default, needs --before-src) `vmferry`, but its processes run the
               vmferry source tree at --before-src (another build's src/): an A/B of two builds
               interleaved under the same load

Disk data (--disk-data): `stamped` (the default) is the guest's own: it fills the 512 MiB itself
(`dfill=512`) with generation-stamped, checksummed sectors, which compress very well (most
words of a sector differ from each other in a few low bits). `random` fills those 512 MiB from
the host before the guest starts with bytes from a seeded generator (incompressible) and the
guest skips its fill (`dfill=0`); its paced writes while migrating are still stamped sectors.
The destination's image is then checked block by block: each 4 KiB block either holds the
guest's stamped sectors (the host verifier's check) or equals the random fill byte for byte.

QEMU's drives use `cache=writeback` (its default); `--qemu-cache none` gives them O_DIRECT
(`cache=none`, the usual production setting), as vmferry's destination writes a copied drive.

Links: `loopback` (127.0.0.1) and `1g`: the destination in a network namespace of its own,
reached over a veth pair shaped with `tc tbf rate 1gbit` (/work/shared/BENCHMARKS.md; needs
root). Every side runs with `max-bandwidth` raised to 100 GiB/s: the link is the limit.

Each run: start the source, wait for the disk and RAM fills and 3 progress lines (the guest's
rates), start the destination, migrate, poll to the end (a migration not done after --timeout
seconds is cancelled and reported so; the source must then run on). Reported:
- total ms: vmferry and qemu-blk their own `total-time` (from `migrate` to completion);
  qemu-mirror from `drive-mirror` to the destination's `cont` returning (the whole sequence);
- pause ms: each side's own — vmferry's `downtime` (vCPUs pausing on the source to the
  destination's ACK: its guest runs), qemu-blk's `downtime` (its source pausing to its last byte
  sent), qemu-mirror's `downtime` plus the time from seeing the migration completed to `cont`
  returned (the mirror's end, `nbd-server-stop`, `cont`: the guest cannot run before);
- guest stall ms: the pause as the guest saw it, the same ruler on every side: the `stall=` of
  the destination guest's first progress line (its longest gap by the TSC);
- disk MiB on the wire: vmferry and qemu-blk the `disk.transferred` of `query-migrate`;
  qemu-mirror the bytes the NBD connection carried (TCP `bytes_acked` of the source's socket,
  sampled with `ss` every 100 ms and before the cancel); and the bound of issue 10: what the
  guest wrote while migrating (`query-blockstats` wr_bytes, from the first command to the end)
  plus one bulk copy of the allocated blocks (512 MiB);
- stream MiB: the migration connection's TCP bytes (`ss`), RAM and disk together;
- the guest's disk while migrating: its write rate (wr_bytes over the total time; before: from
  its progress lines) and the device's mean service time of a write (`wr_total_time_ns` /
  `wr_operations`), each side's own query-blockstats;
- the destination's guest `disk verify ok` (its own check of every block its table names) after
  the migration, the host verifier on the destination's image (guests/verify_disk.py), and
  whether the image's holes stayed holes (no data past the guest's 512 MiB; allocated MiB).

The guest verifies every --verify (30) seconds; a migration starts at its t=3 line, so a verify
pass (a quiet window for the disk) falls inside only a migration longer than ~25 s (`verify_inside`
in the JSON). Medians [min-max] over --runs, sides interleaved. Every child process is killed on
every way out (bench_procs.py) and the network namespace removed.

  python bench/bench_disk.py [--runs 3] [--links loopback,1g] [--sides vmferry,qemu-blk,qemu-mirror]
                             [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench_procs import install_signal_handlers, spawn, stop, stop_all
from migration_vm import BenchError, connect_qmp, free_port
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmferry.guests import image_path
from vmferry.guests.verify_disk import verify_disk_image
from vmferry.testing.netns import GIGABIT, VethLink, veth_link

MiB = 1 << 20
GiB = 1 << 30
DISK_BYTES = GiB
MEMORY = "1G"
FILL_MIB = 512
GUEST = f"dws={FILL_MIB} dfill={FILL_MIB} drate=20 dreq=64 ws=256 rate=50"
DISK_DATA = "stamped"  # --disk-data; `random`: GUEST with dfill=0 and the host's random fill
RANDOM_SEED = 10
BLOCK_COMPRESSION = "auto"  # --block-compression: vmferry-compress's x-block-compression
QEMU_CACHE = "writeback"  # --qemu-cache: QEMU's drives' cache mode (none: O_DIRECT, as vmferry's copy)
RAM_COMPRESSION = "none"  # --ram-compression: multifd-compression of the -compress sides
UNCAPPED = 100 * GiB
POLL_S = 0.01
SIDES = ("vmferry", "qemu-blk", "qemu-mirror", "vmferry-shared", "vmferry-compress", "vmferry-before",
         "qemu-mirror-compress")
BEFORE_SRC: Path | None = None  # --before-src: vmferry-before's PYTHONPATH
DEFAULT_SIDES = SIDES[:3]
LINKS = ("loopback", "1g")
PROGRESS_RX = re.compile(r"disk: t=(\d+) gen=\d+ written=(\d+) KiB ram=(\d+) MiB stall=(\d+) us\n")


# --- the 1 Gbit/s link ---

class Link:
    """Loopback, or a veth pair into a network namespace of its own shaped to 1 Gbit/s
    (vmferry.testing.netns: the tests' links, blackhole route and stale-namespace cleanup
    included)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.dst_ip = "127.0.0.1"
        self._stack = contextlib.ExitStack()
        self._veth: VethLink | None = None

    def up(self) -> None:
        if self.kind == "loopback":
            return
        self._veth = self._stack.enter_context(veth_link(GIGABIT))
        self.dst_ip = self._veth.address

    def down(self) -> None:
        self._stack.close()
        self._veth = None

    def dest_prefix(self) -> list[str]:
        return [] if self._veth is None else list(self._veth.exec_prefix)


# --- TCP bytes of a connection, from the source's side ---

class WireCounter:
    """Largest `bytes_acked` seen per source socket whose peer port is one of `ports`."""

    def __init__(self) -> None:
        self.ports: set[int] = set()
        self.acked: dict[tuple[int, str], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> None:
        if not self.ports:
            return
        out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True, text=True,
                             timeout=10).stdout
        cur: tuple[int, str] | None = None
        for line in out.splitlines():
            if not line.startswith((" ", "\t")):
                parts = line.split()
                cur = None
                if len(parts) >= 4:
                    peer = parts[3].rsplit(":", 1)
                    if len(peer) == 2 and peer[1].isdigit() and int(peer[1]) in self.ports:
                        cur = (int(peer[1]), parts[2])
                continue
            m = re.search(r"bytes_acked:(\d+)", line)
            if cur is not None and m:
                self.acked[cur] = max(self.acked.get(cur, 0), int(m.group(1)))

    def bytes_to(self, port: int) -> int:
        return sum(v for (p, _), v in self.acked.items() if p == port)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(Exception):
                self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --- the VM processes ---

class DiskVm:
    """One VM (QEMU or vmferry) with the disk guest, a QMP socket and COM1 in a file."""

    def __init__(self, side: str, tmp: Path, name: str, img: Path, *, incoming: str | None = None,
                 paused: bool = False, prefix: list[str] | None = None) -> None:
        self.side, self.name = side, f"{side}-{name}"
        self.qmp_path = tmp / f"{self.name}.qmp"
        self.serial_path = tmp / f"{self.name}.serial"
        self.log_path = tmp / f"{self.name}.log"
        if side.startswith("qemu"):
            cmd = ["qemu-system-x86_64", "-accel", "kvm", "-M", "microvm",
                   "-global", "virtio-mmio.force-legacy=false", "-nodefaults", "-display", "none",
                   "-m", MEMORY, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                   "-drive", f"if=none,file={img},format=raw,id=d0,cache={QEMU_CACHE}",
                   "-device", "virtio-blk-device,drive=d0,serial=disk0",
                   "-kernel", str(image_path("disk")), "-append", f"{GUEST} verify={VERIFY_S}",
                   "-serial", f"file:{self.serial_path}", "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
            if incoming:
                cmd += ["-incoming", incoming]
            if paused:
                cmd.append("-S")
        else:
            cmd = [sys.executable, "-m", "vmferry", "run", "-m", MEMORY, "--qmp", f"unix:{self.qmp_path}",
                   "--serial", f"file:{self.serial_path}", "--drive", f"file={img},format=raw,id=disk0"]
            cmd += ["--incoming", incoming] if incoming else ["--guest", "disk", "--append",
                                                              f"{GUEST} verify={VERIFY_S}"]
            if paused:
                cmd.append("-S")
            if side == "vmferry-before":
                assert BEFORE_SRC is not None
                cmd = ["env", f"PYTHONPATH={BEFORE_SRC}", *cmd]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.qmp: QEMUMonitorProtocol | None = None
        self.proc = spawn([*(prefix or []), *cmd], self._log)
        self.progress: list[tuple[float, int, int, int]] = []  # (seen, t, written KiB, stall us)
        self._seen = 0

    def connect(self) -> None:
        self.qmp = connect_qmp(self.qmp_path, self.proc, self.name, self.log())

    def cmd(self, name: str, **args: Any) -> Any:
        assert self.qmp is not None
        reply = self.qmp.cmd_raw(name, args or None)
        if "error" in reply:
            raise BenchError(f"{self.name}: {name}: {reply['error']['class']}: {reply['error']['desc']}")
        return reply["return"]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def serial(self) -> str:
        try:
            text = self.serial_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        now = time.monotonic()
        for m in PROGRESS_RX.finditer(text, self._seen):
            self.progress.append((now, int(m.group(1)), int(m.group(2)), int(m.group(4))))
            self._seen = m.end()
        return text

    def wait_serial(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.serial()
            m = rx.search(text, after)
            if m:
                return m
            if "FAIL" in text[after:]:
                raise BenchError(f"{self.name}: guest reported a failure: {text[-1500:]}")
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no /{pattern}/ after {timeout} s (exit {self.proc.poll()}):"
                                 f"\n{text[-1500:]}\n--- log:\n{self.log()[-1500:]}")
            time.sleep(0.05)

    def wr_stats(self) -> tuple[int, int, int]:
        """(bytes written, write requests, their summed service time in ns) of the guest's drive."""
        st = self.cmd("query-blockstats")[0]["stats"]
        return int(st["wr_bytes"]), int(st["wr_operations"]), int(st["wr_total_time_ns"])

    def close(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.close()
        stop(self.proc)
        self._log.close()


VERIFY_S = 30  # set from --verify in main()


def listen_uri(dst: DiskVm, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"incoming migration on (\S+)", dst.log())
        if m:
            return m.group(1)
        if dst.proc.poll() is not None:
            break
        time.sleep(0.02)
    raise BenchError(f"{dst.name} never listened: {dst.log()[-2000:]}")


def allocated(path: Path) -> list[tuple[int, int]]:
    out, pos = [], 0
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            pos = hole
    return out


def image(path: Path, random_fill: bool = False) -> Path:
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
        if random_fill:
            for off, chunk in random_chunks():
                f.seek(off)
                f.write(chunk)
    return path


def random_chunks() -> Any:
    """--disk-data random: the first FILL_MIB MiB, 16 MiB at a time, the same bytes every time."""
    import numpy as np

    rng = np.random.default_rng(RANDOM_SEED)
    for off in range(0, FILL_MIB * MiB, 16 * MiB):
        yield off, rng.bytes(16 * MiB)


def verify_random_fill(path: Path) -> tuple[bool, str]:
    """Each 4 KiB block of the first FILL_MIB MiB either equals the random fill or holds the
    guest's stamped sectors (verify_disk's check, on that block alone)."""
    import numpy as np

    from vmferry.guests.verify_disk import _check_chunk

    stamped = 0
    with open(path, "rb") as f:
        for off, want in random_chunks():
            have = os.pread(f.fileno(), len(want), off)
            a = np.frombuffer(have, dtype=np.uint8).reshape(-1, 4096)
            b = np.frombuffer(want, dtype=np.uint8).reshape(-1, 4096)
            for i in np.flatnonzero((a != b).any(axis=1)):
                block = have[i * 4096:(i + 1) * 4096]
                count, bad, why = _check_chunk(block, (off + int(i) * 4096) // 512)
                if bad is not None or count != 8:
                    return False, f"block at {off + int(i) * 4096}: neither the fill nor stamped ({why})"
                stamped += 1
    return True, f"random fill intact, {stamped} blocks stamped by the guest"


# --- one run ---

def wait_status(vm: DiskVm, want: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while vm.cmd("query-status")["status"] != want:
        if time.monotonic() > deadline:
            raise BenchError(f"{vm.name}: not {want} after {timeout} s")
        time.sleep(POLL_S)


def poll_migration(src: DiskVm, timeout: float, res: dict[str, Any], wire: WireCounter,
                   mirror: bool = False) -> dict[str, Any]:
    """Poll to the end. With `mirror`, the source stops at pre-switchover (paused): the mirror is
    ended there (`block-job-cancel` of a ready job: the target now equals the paused source) and
    the migration continued — libvirt's order; the source's image is never inactivated under a
    running mirror."""
    t0 = time.monotonic()
    limit = timeout
    while True:
        info = src.cmd("query-migrate")
        src.serial()
        status = info.get("status")
        if status in ("completed", "failed", "cancelled"):
            return info
        if mirror and status == "pre-switchover":
            t = time.monotonic()
            wire.sample()
            src.cmd("block-job-cancel", device="mirror0")
            while src.cmd("query-block-jobs"):
                time.sleep(POLL_S / 5)
            src.cmd("migrate-continue", state="pre-switchover")
            res["mirror_cancel_ms"] = round((time.monotonic() - t) * 1000, 1)
            mirror = False
            continue
        if time.monotonic() - t0 > limit:
            res["gave_up_after_s"] = limit
            res["info_at_timeout"] = info
            wire.sample()
            src.cmd("migrate_cancel")
            limit = float("inf")
        time.sleep(POLL_S)


def run_once(side: str, link: Link, tmp: Path, timeout: float) -> dict[str, Any]:
    res: dict[str, Any] = {"side": side, "link": link.kind, "guest": f"{GUEST} verify={VERIFY_S}"}
    src_img = image(tmp / "src.img", random_fill=DISK_DATA == "random")
    # vmferry-shared: both sides open the one image (shared storage); nothing of it in the stream
    dst_img = src_img if side == "vmferry-shared" else image(tmp / "dst.img")
    started: list[DiskVm] = []
    wire = WireCounter()
    try:
        src = DiskVm(side, tmp, "src", src_img)
        started.append(src)
        src.connect()
        src.wait_serial(r"disk: ram filled \d+ MiB\n", timeout=300)
        n0 = len(src.progress)
        while len(src.progress) < n0 + 3:
            src.wait_serial(r"disk: t=\d+", timeout=30, after=0)
            time.sleep(0.1)
            if src.proc.poll() is not None:
                raise BenchError(f"{src.name} exited")
        p = src.progress[n0:]
        res["guest_disk_mibs"] = round((p[-1][2] - p[0][2]) / 1024 / (p[-1][0] - p[0][0]), 1)
        res["allocated_src_mib"] = round(sum(n for _, n in allocated(src_img)) / MiB, 1)
        prefix = link.dest_prefix()
        mig_port = free_port() if side.startswith("qemu") else 0
        incoming = f"tcp:{link.dst_ip}:{mig_port}"
        mirror = side.startswith("qemu-mirror")
        dst = DiskVm(side, tmp, "dst", dst_img, incoming=incoming, paused=mirror, prefix=prefix)
        started.append(dst)
        dst.connect()
        uri = incoming if side.startswith("qemu") else listen_uri(dst)
        mig_port = int(uri.rsplit(":", 1)[1])
        wire.ports.add(mig_port)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": UNCAPPED})
        wr0 = src.wr_stats()
        verify_mark = len(src.serial())
        wire.start()
        t0 = time.monotonic()
        if RAM_COMPRESSION != "none" and side in ("vmferry-compress", "qemu-mirror-compress"):
            for vm in (src, dst) if mirror else (src,):  # vmferry's destination follows the stream
                vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
                vm.cmd("migrate-set-parameters", **{"multifd-compression": RAM_COMPRESSION})
        if mirror:
            nbd_port = 10809 if link.kind != "loopback" else free_port()
            wire.ports.add(nbd_port)
            dst.cmd("nbd-server-start",
                    addr={"type": "inet", "data": {"host": link.dst_ip, "port": str(nbd_port)}})
            dst.cmd("nbd-server-add", device="d0", writable=True)
            src.cmd("drive-mirror", device="d0", target=f"nbd:{link.dst_ip}:{nbd_port}:exportname=d0",
                    format="raw", sync="full", mode="existing", **{"job-id": "mirror0"})
            while True:
                jobs = src.cmd("query-block-jobs")
                if not jobs:
                    raise BenchError("the mirror job vanished before it was ready")
                if jobs[0].get("ready"):
                    break
                if time.monotonic() - t0 > timeout:
                    res.update(status="not ready", gave_up_after_s=timeout, mirror_job=jobs[0])
                    src.cmd("block-job-cancel", device="mirror0", force=True)
                    return res
                src.serial()
                time.sleep(POLL_S)
            res["mirror_ready_ms"] = round((time.monotonic() - t0) * 1000)
            src.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "pause-before-switchover", "state": True}])
            src.cmd("migrate", uri=incoming)
        elif side == "qemu-blk":
            src.cmd("migrate", uri=incoming, blk=True)
        else:
            if side == "vmferry-compress":
                src.cmd("migrate-set-parameters", **{"x-block-compression": BLOCK_COMPRESSION})
            src.cmd("migrate", uri=uri, blk=side in ("vmferry", "vmferry-compress", "vmferry-before"))
        info = poll_migration(src, timeout, res, wire, mirror=mirror)
        t_done = time.monotonic()
        res["status"] = info["status"]
        res["error"] = info.get("error-desc")
        if mirror and info["status"] == "completed":
            dst.cmd("nbd-server-stop")
            dst.cmd("cont")
            t_cont = time.monotonic()
            res["after_completion_ms"] = round((t_cont - t_done) * 1000, 1)
            res["total_ms"] = round((t_cont - t0) * 1000)
            res["pause_ms"] = round(info.get("downtime", 0) + res["after_completion_ms"], 1)
        else:
            res["total_ms"] = info.get("total-time")
            res["pause_ms"] = info.get("downtime")
        wire.stop()
        res["downtime_ms"] = info.get("downtime")
        res["phases"] = info.get("downtime-phases")
        res["expected_ms"] = info.get("expected-downtime-at-switchover")
        res["passes"] = info.get("ram", {}).get("dirty-sync-count")
        res["stream_mib"] = round(wire.bytes_to(mig_port) / MiB, 1)
        res["ram_mib"] = round(info.get("ram", {}).get("transferred", 0) / MiB, 1)
        res["final_info"] = info
        if mirror:
            res["disk_wire_mib"] = round(wire.bytes_to(nbd_port) / MiB, 1)
        elif "disk" in info:
            res["disk_wire_mib"] = round(info["disk"]["transferred"] / MiB, 1)
        elif side == "qemu-blk":
            # QEMU 7.2 drops query-migrate's `disk` once block migration has ended; its
            # ram.transferred counts RAM alone, so the rest of the stream is the disk's.
            res["disk_wire_mib"] = round(res["stream_mib"] - res["ram_mib"], 1)
        if info["status"] != "completed":
            mark = len(src.serial())
            try:
                src.wait_serial(r"disk: t=\d+", timeout=30, after=mark)
                res["source_after"] = "running"
            except BenchError as e:
                res["source_after"] = f"not running: {str(e)[:300]}"
            if "gave_up_after_s" in res:
                last = res["info_at_timeout"]
                res["disk_remaining_mib"] = round(last.get("disk", {}).get("remaining", 0) / MiB, 1)
                res["passes"] = last.get("ram", {}).get("dirty-sync-count")
                res.pop("info_at_timeout")
            return res
        wr1 = src.wr_stats()
        res["guest_wrote_mib"] = round((wr1[0] - wr0[0]) / MiB, 1)
        # The guest's disk while it migrates: its write rate, and the device's mean service time
        # of a write (taken off the ring -> status written), both sides' own blockstats.
        res["guest_disk_during_mibs"] = round(res["guest_wrote_mib"] / (res["total_ms"] / 1000), 1)
        if wr1[1] > wr0[1]:
            res["write_ms_during"] = round((wr1[2] - wr0[2]) / (wr1[1] - wr0[1]) / 1e6, 2)
        res["bound_mib"] = round(res["guest_wrote_mib"] + res["allocated_src_mib"], 1)
        if side == "vmferry-shared":
            res["bound_mib"] = res["disk_wire_mib"] = 0
        res["verify_inside"] = "disk verify ok" in src.serial()[verify_mark:]
        wait_status(dst, "running", 30)
        res["wall_ms"] = round((time.monotonic() - t0) * 1000)
        check_destination(dst, dst_img, res)
    finally:
        wire.stop()
        for vm in reversed(started):
            vm.close()
    return res


def check_destination(dst: DiskVm, dst_img: Path, res: dict[str, Any]) -> None:
    try:
        first = dst.wait_serial(r"disk: t=\d+ [^\n]*stall=(\d+) us\n", timeout=30)
        res["stall_ms"] = int(first.group(1)) / 1000
        m = dst.wait_serial(r"disk verify (ok|FAIL)[^\n]*\n", timeout=VERIFY_S + 60)
        res["dest_verify"] = m.group(0).strip()
    except BenchError as e:
        res["dest_verify"] = f"FAIL: {str(e)[:500]}"
    with contextlib.suppress(BenchError):
        dst.cmd("stop")
    dst.close()  # the image is consistent: every write completed or never started
    if DISK_DATA == "random":
        ok, what = verify_random_fill(dst_img)
        v = type("Verdict", (), {"ok": ok, "__str__": lambda self: what})()
    else:
        v = verify_disk_image(dst_img)
    res["dest_image"] = str(v)
    ext = allocated(dst_img)
    res["allocated_dst_mib"] = round(sum(n for _, n in ext) / MiB, 1)
    res["holes_kept"] = all(off + n <= FILL_MIB * MiB for off, n in ext)  # nothing past the guest's
    res["dest_ok"] = res["dest_verify"].startswith("disk verify ok") and v.ok and res["holes_kept"]


# --- summaries ---

METRICS = ("total_ms", "pause_ms", "stall_ms", "downtime_ms", "expected_ms", "disk_wire_mib", "bound_mib",
           "guest_wrote_mib", "stream_mib", "passes", "allocated_dst_mib", "guest_disk_mibs", "wall_ms",
           "guest_disk_during_mibs", "write_ms_during")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in runs if r.get("status") == "completed"]
    out: dict[str, Any] = {"runs": len(runs), "completed": len(done),
                           "dest_ok": sum(1 for r in done if r.get("dest_ok"))}
    for k in METRICS:
        vals = [r[k] for r in done if r.get(k) is not None]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def fmt(s: dict[str, Any], key: str, digits: int = 0) -> str:
    v = s.get(key)
    if not v:
        return "-"
    f = f"{{:.{digits}f}}"
    if v["min"] == v["max"]:
        return f.format(v["median"])
    return f"{f.format(v['median'])} [{f.format(v['min'])}-{f.format(v['max'])}]"


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| link | side | completed | total ms | pause ms (own) | guest stall ms | disk MiB on the wire "
             "| bound MiB (wrote + bulk) | stream MiB | passes | guest disk MiB/s before / during "
             "| write ms during | dest image MiB | dest ok |",
             "|" + "---|" * 14]
    for link, per in results.items():
        for side, data in per.items():
            s = data["summary"]
            notes = [r.get("status", "?") for r in data["runs"] if r.get("status") != "completed"]
            done = f"{s['completed']}/{s['runs']}" + (f" ({', '.join(notes)})" if notes else "")
            lines.append(f"| {link} | {side} | {done} | {fmt(s, 'total_ms')} | {fmt(s, 'pause_ms')} "
                         f"| {fmt(s, 'stall_ms')} | {fmt(s, 'disk_wire_mib')} | {fmt(s, 'bound_mib')} "
                         f"| {fmt(s, 'stream_mib')} | {fmt(s, 'passes')} "
                         f"| {fmt(s, 'guest_disk_mibs')} / {fmt(s, 'guest_disk_during_mibs')} "
                         f"| {fmt(s, 'write_ms_during', 1)} | {fmt(s, 'allocated_dst_mib')} "
                         f"| {s['dest_ok']}/{s['completed']} |")
    return "\n".join(lines)


def _ratio(v: dict[str, Any], q: dict[str, Any], key: str) -> str:
    if key not in v or key not in q or not q[key]["median"]:
        return "-"
    return f"{v[key]['median'] / q[key]['median']:.2f}"


def goals(results: dict[str, dict[str, Any]]) -> str:
    """Each vmferry side (plain, compressing) against QEMU's better path (least median total)."""
    lines = ["| link | vmferry side | QEMU's better path (total) | vmferry total / it (goal ≤ 0.5) "
             "| vmferry pause / its pause (goal ≤ 1) | guest stall ratio | disk bytes ≤ bound |",
             "|---|---|---|---|---|---|---|"]
    for link, per in results.items():
        qs = {side: per[side]["summary"] for side in per if side.startswith("qemu")
              and per[side]["summary"].get("completed")}
        for vside in ("vmferry", "vmferry-compress"):
            if vside not in per:
                continue
            v = per[vside]["summary"]
            if not v.get("total_ms") or not qs:
                lines.append(f"| {link} | {vside} | {'none completed' if not qs else '-'} | - | - | - | - |")
                continue
            best = min(qs, key=lambda k: qs[k]["total_ms"]["median"])
            q = qs[best]
            wire_ok = all(x.get("disk_wire_mib", 0) <= x.get("bound_mib", 0) for x in per[vside]["runs"]
                          if x.get("status") == "completed")
            lines.append(f"| {link} | {vside} | {best} ({q['total_ms']['median']:.0f} ms) "
                         f"| {_ratio(v, q, 'total_ms')} | {_ratio(v, q, 'pause_ms')} "
                         f"| {_ratio(v, q, 'stall_ms')} "
                         f"| {'yes' if wire_ok else 'no'} (every run) |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "qemu": qemu.splitlines()[0] if qemu else "?",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": os.getloadavg()}


BRIEF = ("status", "total_ms", "pause_ms", "stall_ms", "downtime_ms",
         "after_completion_ms",
         "mirror_ready_ms", "mirror_cancel_ms",
         "expected_ms", "passes", "disk_wire_mib", "bound_mib", "guest_wrote_mib", "stream_mib", "ram_mib",
         "allocated_dst_mib", "holes_kept", "dest_verify", "dest_image", "verify_inside", "guest_disk_mibs",
         "guest_disk_during_mibs", "write_ms_during",
         "source_after", "disk_remaining_mib", "error", "phases")


def main() -> None:
    global VERIFY_S
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--links", default="loopback,1g")
    ap.add_argument("--sides", default=",".join(DEFAULT_SIDES),
                    help=f"of {', '.join(SIDES)} (vmferry-shared: the image shared, for the pause alone)")
    ap.add_argument("--timeout", type=float, default=60, help="give a migration up after this many s")
    ap.add_argument("--verify", type=int, default=30, help="the guest's verify= period, s")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="keep each run's files in this (existing) directory")
    ap.add_argument("--disk-data", choices=("stamped", "random"), default="stamped",
                    help="the 512 MiB on the disk: the guest's stamped fill, or random from the host")
    ap.add_argument("--before-src", type=Path, help="vmferry-before's vmferry source tree (a src/ dir)")
    ap.add_argument("--block-compression", default="auto", choices=("zstd", "zlib", "lz4", "auto"),
                    help="vmferry-compress's x-block-compression")
    ap.add_argument("--ram-compression", default="none", choices=("none", "zstd", "zlib", "lz4", "auto"),
                    help="vmferry-compress's and qemu-mirror-compress's RAM: multifd with this "
                         "multifd-compression (QEMU: zstd or zlib)")
    ap.add_argument("--qemu-cache", default="writeback", choices=("writeback", "none"),
                    help="QEMU's drives' cache= (none: O_DIRECT, as vmferry's destination writes a copy)")
    args = ap.parse_args()
    VERIFY_S = args.verify
    global GUEST, DISK_DATA, BLOCK_COMPRESSION, BEFORE_SRC
    DISK_DATA, BLOCK_COMPRESSION, BEFORE_SRC = args.disk_data, args.block_compression, args.before_src
    global RAM_COMPRESSION
    RAM_COMPRESSION = args.ram_compression
    global QEMU_CACHE
    QEMU_CACHE = args.qemu_cache
    if "qemu-mirror-compress" in args.sides and RAM_COMPRESSION not in ("zstd", "zlib"):
        ap.error("qemu-mirror-compress needs --ram-compression zstd or zlib (QEMU 7.2's)")
    if "vmferry-before" in args.sides and (BEFORE_SRC is None or not (BEFORE_SRC / "vmferry").is_dir()):
        ap.error("vmferry-before needs --before-src pointing at a src/ directory holding vmferry/")
    if DISK_DATA == "random":
        GUEST = GUEST.replace(f"dfill={FILL_MIB}", "dfill=0")
    links = [x.strip() for x in args.links.split(",") if x.strip()]
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    for x in links:
        if x not in LINKS:
            ap.error(f"unknown link {x}; known: {', '.join(LINKS)}")
    for x in sides:
        if x not in SIDES:
            ap.error(f"unknown side {x}; known: {', '.join(SIDES)}")
    if any(s.startswith("qemu") for s in sides) and not shutil.which("qemu-system-x86_64"):
        ap.error("qemu-system-x86_64 not found")
    if "1g" in links and os.geteuid() != 0:
        ap.error("the 1g link needs root (network namespaces, tc)")
    install_signal_handlers()
    info = machine_info()
    print(f"# {info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}, {info['qemu']}, "
          f"Python {info['python']}, {info['date']}, runs={args.runs}, guest: {GUEST} verify={VERIFY_S}",
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        with contextlib.ExitStack() as stack:
            tmpdir = str(args.keep) if args.keep else stack.enter_context(
                tempfile.TemporaryDirectory(prefix="bench-disk-"))
            for kind in links:
                link = Link(kind)
                try:
                    link.up()
                    per: dict[str, Any] = {side: {"runs": []} for side in sides}
                    results[kind] = per
                    for rep in range(args.runs):
                        for side in sides:
                            tmp = Path(tempfile.mkdtemp(prefix=f"{kind}-{side}-{rep}-", dir=tmpdir))
                            try:
                                r = run_once(side, link, tmp, args.timeout)
                            except Exception as e:  # noqa: BLE001 - one failed run is a row, not the end
                                r = {"side": side, "link": kind, "status": "error", "error": f"{e!r}"[:2000]}
                            finally:
                                if not args.keep:  # 2 GiB of images a run
                                    shutil.rmtree(tmp, ignore_errors=True)
                            r["loadavg"] = os.getloadavg()[0]
                            per[side]["runs"].append(r)
                            brief = {k: r[k] for k in BRIEF if r.get(k) is not None}
                            print(f"{kind} {side} run {rep + 1} (load {r['loadavg']:.2f}): "
                                  f"{json.dumps(brief)}", file=sys.stderr, flush=True)
                    for side in sides:
                        per[side]["summary"] = summarize(per[side]["runs"])
                finally:
                    link.down()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
    finally:
        stop_all()
    info["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1, default=str))
    print(f"# load average (1 min) at start {info['loadavg'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}")
    print()
    print(table(results))
    print()
    print(goals(results))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        sys.exit(f"bench_disk: stopped ({e or 'Ctrl-C'}); every process it started was stopped")
