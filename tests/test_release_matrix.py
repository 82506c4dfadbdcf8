"""The release matrix: this build migrates to and from every committed release (compat/), on real
KVM, between real processes.

For every machine type both ends know: the release -> this build and this build -> the release,
live (the `dirty` guest, running while its RAM moves) and by snapshot (`migrate file:` saved by
one, `--incoming file:` restored by the other). Each ends with the destination guest's own
full-memory check printing `verify ok`, and the host-side check (`x-verify-dirty-guest`) agreeing.
A stream of a machine type the destination does not know is refused before any RAM is loaded,
with an error naming that machine type — among them this build's newest type (vmferry-0.2) sent
live to a release that predates it; that type migrates live between two processes of this build.
And `-M vmferry-0.1` on this build writes device sections byte-identical to the release's
(host clock readings masked).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from releases import RELEASES, Release, Unpacked, unpack
from vmferry import __version__
from vmferry.errors import VmferryError
from vmferry.machine.machine_type import DEFAULT_MACHINE_TYPE, get_machine_type
from vmferry.stream import StreamDecoder, StreamEncoder, StreamHeader
from vmferry.stream.records import Command, Description, DeviceSection, EndOfStream, RamPages, RamZero
from vmproc import VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "64M"
# A small working set that fills in well under a second and checks itself every second.
DIRTY = "ws=8 rate=4 verify=1 check=full"
CURRENT = "current"
SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def _known_here(machine: str) -> bool:
    try:
        get_machine_type(machine)
    except VmferryError:
        return False
    return True


MATRIX = [(r, m) for r in RELEASES for m in r.machine_types if _known_here(m)]


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Unpacked]:
    """Every committed release, unpacked once per session."""
    into = tmp_path_factory.mktemp("releases")
    return {r.version: unpack(r, into) for r in RELEASES}


class Ends:
    """Starts processes of one release or of this build, and checks each runs what it should."""

    def __init__(self, tmp: Path, procs: list[VmProcess], releases: dict[str, Unpacked]) -> None:
        self.tmp, self.procs, self.releases = tmp, procs, releases

    def start(self, version: str, name: str, *args: str) -> VmProcess:
        env = None if version == CURRENT else self.releases[version].env()
        p = VmProcess(self.tmp, name, *args, env=env)
        self.procs.append(p)
        want = __version__ if version == CURRENT else version
        package = p.cmd("query-version")["package"]
        assert package == f"vmferry-{want}", f"{name} runs {package}, not vmferry-{want}"
        return p

    def source(self, version: str, machine: str) -> VmProcess:
        src = self.start(version, "src", "-M", machine, "-m", MEM, "--guest", "dirty", "--append", DIRTY)
        src.wait_serial(r"verify ok", timeout=60)
        return src

    def destination(self, version: str, machine: str, incoming: str) -> VmProcess:
        return self.start(version, "dst", "-M", machine, "-m", MEM, "--incoming", incoming)


def _assert_destination_verifies(dst: VmProcess) -> None:
    info = dst.wait_migration(timeout=120)
    assert info["status"] == "completed", info
    start = len(dst.serial())
    dst.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
    assert "FAIL" not in dst.serial()
    assert dst.status() == "running"
    check = dst.cmd("x-verify-dirty-guest")
    assert check["ok"], check


def _directions(release: Release) -> list[tuple[str, str]]:
    return [(release.version, CURRENT), (CURRENT, release.version)]


CASES = [pytest.param(r, m, s, d, id=f"{m}-{s}-to-{d}".replace(CURRENT, f"current({__version__})"))
         for r, m in MATRIX for s, d in _directions(r)]


def test_the_matrix_is_not_empty() -> None:
    """Every release shares at least one machine type with this build, or it is not migratable."""
    assert {r.version for r, _ in MATRIX} == {r.version for r in RELEASES}


@pytest.mark.parametrize(("release", "machine", "src_version", "dst_version"), CASES)
def test_live_migration_between_releases(tmp_path: Path, procs: list[VmProcess],
                                         releases: dict[str, Unpacked], release: Release, machine: str,
                                         src_version: str, dst_version: str) -> None:
    ends = Ends(tmp_path, procs, releases)
    src = ends.source(src_version, machine)
    dst = ends.destination(dst_version, machine, "tcp:127.0.0.1:0")
    src.cmd("migrate", uri=dst.incoming_uri())
    info = src.wait_migration(timeout=120)
    assert info["status"] == "completed", info
    assert info["ram"]["normal"] > 0
    _assert_destination_verifies(dst)


@pytest.mark.parametrize(("release", "machine", "src_version", "dst_version"), CASES)
def test_snapshot_between_releases(tmp_path: Path, procs: list[VmProcess], releases: dict[str, Unpacked],
                                   release: Release, machine: str, src_version: str,
                                   dst_version: str) -> None:
    ends = Ends(tmp_path, procs, releases)
    src = ends.source(src_version, machine)
    snap = tmp_path / "vm.snap"
    src.cmd("migrate", uri=f"file:{snap}")
    assert src.wait_migration(timeout=120)["status"] == "completed"
    src.close()
    _assert_destination_verifies(ends.destination(dst_version, machine, f"file:{snap}"))


@pytest.mark.parametrize(("release", "machine"),
                         [pytest.param(r, m, id=f"{r.version}-{m}") for r, m in MATRIX])
def test_release_describes_its_committed_schema_and_checks_compatible(
        tmp_path: Path, releases: dict[str, Unpacked], release: Release, machine: str) -> None:
    """The committed schema is what the release itself prints, and the dynamic check passes
    between the release's own description and this build's same machine type, both ways."""
    unpacked = releases[release.version]
    described = subprocess.run([sys.executable, "-m", "vmferry", "describe", "-M", machine],
                               capture_output=True, text=True, timeout=60,
                               env={**os.environ, **unpacked.env()})
    assert described.returncode == 0, described.stderr
    schema = SCHEMAS / f"{machine}.json"
    assert described.stdout == schema.read_text()
    theirs = tmp_path / f"{machine}-{release.version}.json"
    theirs.write_text(described.stdout)
    r = subprocess.run([sys.executable, "-m", "vmferry", "check-compat", "--dynamic", "--both-directions",
                        str(theirs), f"build:{machine}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _renamed(snapshot: bytes, machine: str) -> tuple[bytes, int]:
    """The same records re-encoded under another machine type (a valid stream, checksums and
    running digest included) -> (stream, how many RAM records it carries)."""
    dec = StreamDecoder()
    dec.feed(snapshot)
    dec.feed_eof()
    header, *records = dec.records()
    assert isinstance(header, StreamHeader) and isinstance(records[-1], EndOfStream)
    enc = StreamEncoder(header.page_size, header.producer, machine)
    body = b"".join(enc.encode(r) for r in records[:-1])
    return enc.header() + body + enc.end(), sum(isinstance(r, RamPages | RamZero) for r in records)


@pytest.mark.parametrize("dst_version", [r.version for r in RELEASES] + [CURRENT])
def test_unknown_machine_type_is_refused_before_any_ram(tmp_path: Path, procs: list[VmProcess],
                                                        releases: dict[str, Unpacked],
                                                        dst_version: str) -> None:
    ends = Ends(tmp_path, procs, releases)
    src = ends.source(CURRENT, "vmferry-0.1")
    snap = tmp_path / "vm.snap"
    src.cmd("migrate", uri=f"file:{snap}")
    assert src.wait_migration(timeout=120)["status"] == "completed"
    src.close()
    stream, ram_records = _renamed(snap.read_bytes(), "vmferry-9.9")
    assert ram_records > 0  # RAM follows the header: loading any of it would show below
    future = tmp_path / "future.snap"
    future.write_bytes(stream)

    dst = ends.destination(dst_version, "vmferry-0.1", f"file:{future}")
    info = dst.wait_migration(timeout=60)
    assert info["status"] == "failed", info
    assert "vmferry-9.9" in info.get("error-desc", ""), info
    ram = info.get("ram", {})
    assert ram.get("normal", 0) == 0 and ram.get("duplicate", 0) == 0, info
    assert dst.status() == "inmigrate"
    assert "verify" not in dst.serial()  # the guest never ran


def _releases_without(machine: str) -> list[Release]:
    return [r for r in RELEASES if machine not in r.machine_types]


@pytest.mark.parametrize("release", [pytest.param(r, id=r.version)
                                     for r in _releases_without(DEFAULT_MACHINE_TYPE)])
def test_newest_machine_type_to_an_older_release_is_refused_by_name_before_any_ram(
        tmp_path: Path, procs: list[VmProcess], releases: dict[str, Unpacked], release: Release) -> None:
    """This build's newest machine type, live, to a release that cannot run it: the release's
    destination (started with the newest type it has) refuses the stream at its header, naming
    the machine type, with no RAM loaded; the source fails and keeps running its guest."""
    ends = Ends(tmp_path, procs, releases)
    src = ends.source(CURRENT, DEFAULT_MACHINE_TYPE)
    dst = ends.destination(release.version, release.machine_types[-1], "tcp:127.0.0.1:0")
    src.cmd("migrate", uri=dst.incoming_uri())
    info = dst.wait_migration(timeout=120)
    assert info["status"] == "failed", info
    assert DEFAULT_MACHINE_TYPE in info.get("error-desc", ""), info
    ram = info.get("ram", {})
    assert ram.get("normal", 0) == 0 and ram.get("duplicate", 0) == 0, info
    assert dst.status() == "inmigrate"
    assert "verify" not in dst.serial()  # the guest never ran there
    src_info = src.wait_migration(timeout=120)
    assert src_info["status"] == "failed", src_info
    # (Its error-desc names the type when the destination's SHUT arrives before the source's
    # own send fails; which comes first is up to the scheduler, so it is not asserted.)
    assert src.status() == "running"
    start = len(src.serial())
    src.wait_serial(r"verify ok", after=start, timeout=60)  # the source guest goes on


def test_newest_machine_type_migrates_live_between_two_processes_of_this_build(
        tmp_path: Path, procs: list[VmProcess], releases: dict[str, Unpacked]) -> None:
    """The source names it by its alias (`-M vmferry`); the stream carries the versioned name,
    which the destination runs."""
    ends = Ends(tmp_path, procs, releases)
    src = ends.source(CURRENT, "vmferry")
    dst = ends.destination(CURRENT, DEFAULT_MACHINE_TYPE, "tcp:127.0.0.1:0")
    src.cmd("migrate", uri=dst.incoming_uri())
    info = src.wait_migration(timeout=120)
    assert info["status"] == "completed", info
    _assert_destination_verifies(dst)


# --- vmferry-0.1 on this build sends what release 0.1.0 sent ------------------------------------

# What differs between two recordings of one machine that never ran a guest instruction, even from
# one build: host clocks sampled when the state is captured or when the device was reset.
#   cpu:   MSR 0x10 (IA32_TSC): the TSC counts from the VM's creation
#   pit:   channels[].count_load_time: the host ktime (ns) at which KVM loaded each counter
#   clock: clock: kvmclock, ns of the host's monotonic clock
_TSC_MSR = 0x10


def _mask_clocks(name: str, fields: dict) -> dict:
    out = dict(fields)
    if name == "cpu":
        out["msrs"] = [{**m, "data": 0} if m["index"] == _TSC_MSR else m for m in fields["msrs"]]
    elif name == "pit":
        out["channels"] = [{**c, "count_load_time": 0} for c in fields["channels"]]
    elif name == "clock":
        out["clock"] = 0
    return out


def _recorded_sections(path: Path) -> tuple[list[type], dict[tuple[str, int], tuple[bytes, dict]]]:
    """-> (the record types, RAM runs aside), {(section, instance): (payload, description entry)}."""
    dec = StreamDecoder()
    dec.feed(path.read_bytes())
    dec.feed_eof()
    records = list(dec.records())
    (desc,) = [r for r in records if isinstance(r, Description)]
    by_id = {s.id: s for s in desc.sections}
    sections = {}
    for r in records:
        if isinstance(r, DeviceSection):
            info = by_id[r.section_id]
            sections[(info.name, info.instance)] = (r.data, dict(info.schema))
    kinds = [type(r) for r in records if not isinstance(r, RamPages | RamZero)]
    return kinds, sections


@pytest.mark.parametrize("release", [pytest.param(r, id=r.version) for r in RELEASES
                                     if "vmferry-0.1" in r.machine_types])
def test_vmferry_0_1_device_sections_are_byte_identical_to_the_release(
        tmp_path: Path, procs: list[VmProcess], releases: dict[str, Unpacked], release: Release) -> None:
    """A snapshot (`migrate file:`) of the same machine from the release and from this build with
    `-M vmferry-0.1`: the same records, the same descriptions, and every device section the
    same bytes once the host clock readings (_mask_clocks) are set to 0. The machine is started
    paused (-S) and never runs a guest instruction, so every register is a function of the
    machine type alone; a running guest would stop at a different instruction each time."""
    ends = Ends(tmp_path, procs, releases)
    recorded = {}
    for version in (release.version, CURRENT):
        p = ends.start(version, f"rec-{version}", "-M", "vmferry-0.1", "-m", "16M", "--guest", "heartbeat",
                       "-S")
        snap = tmp_path / f"{version}.snap"
        p.cmd("migrate", uri=f"file:{snap}")
        assert p.wait_migration(timeout=120)["status"] == "completed"
        p.close()
        recorded[version] = _recorded_sections(snap)
    (kinds_old, old), (kinds_new, new) = recorded[release.version], recorded[CURRENT]
    # The same records, no record the release did not write (no DEVICE_PROPERTIES); the engine
    # sends RAM's setup (block table, POPULATED_HINT) before the device description, the release
    # sent the hint after it: order among setup records is free, the destination reads either.
    assert Counter(k.__name__ for k in kinds_new) == Counter(k.__name__ for k in kinds_old)
    assert Command in kinds_new  # (POPULATED_HINT: both builds send it)
    assert sorted(new) == sorted(old)
    classes = {s.section.name: s.section for s in get_machine_type("vmferry-0.1").devices}
    masked = []
    for key, (payload_old, desc_old) in old.items():
        payload_new, desc_new = new[key]
        assert desc_new == desc_old, key
        assert len(payload_new) == len(payload_old), key
        if payload_new == payload_old:
            continue
        cls = classes[key[0]]
        a = cls.decode(payload_old, description=desc_old)
        b = cls.decode(payload_new, description=desc_new)
        # Decoding and re-encoding gives back the very bytes, so comparing re-encoded masked
        # sections is comparing the payloads with the clock fields' bytes zeroed.
        assert cls.encode(a) == payload_old and cls.encode(b) == payload_new, key
        a.fields, b.fields = _mask_clocks(key[0], a.fields), _mask_clocks(key[0], b.fields)
        assert cls.encode(b) == cls.encode(a), f"section {key} differs beyond its clock fields"
        masked.append(key[0])
    # The clock readings did differ (the mask is needed, and is all that was needed).
    assert "clock" in masked
    assert {"serial", "debug-exit", "irqchip"}.isdisjoint(masked)
