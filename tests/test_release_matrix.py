"""The release matrix: this build migrates to and from every committed release (compat/), on real
KVM, between real processes.

For every machine type both ends know: the release -> this build and this build -> the release,
live (the `dirty` guest, running while its RAM moves) and by snapshot (`migrate file:` saved by
one, `--incoming file:` restored by the other). Each ends with the destination guest's own
full-memory check printing `verify ok`, and the host-side check (`x-verify-dirty-guest`) agreeing.
A stream of a machine type the destination does not know is refused before any RAM is loaded,
with an error naming that machine type.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from releases import RELEASES, Release, Unpacked, unpack
from vmferry import __version__
from vmferry.errors import VmferryError
from vmferry.machine.machine_type import get_machine_type
from vmferry.stream import StreamDecoder, StreamEncoder, StreamHeader
from vmferry.stream.records import EndOfStream, RamPages, RamZero
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


@pytest.fixture
def procs() -> Iterator[list[VmProcess]]:
    started: list[VmProcess] = []
    yield started
    for p in started:
        p.close()


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


def _listen_uri(dst: VmProcess) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"incoming migration on (\S+)", dst.log())
        if m:
            return m.group(1)
        if dst.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{dst.name} never listened: {dst.log()}")


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
    src.cmd("migrate", uri=_listen_uri(dst))
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


# TODO(issue 13, item 1): once this build has a machine type the release does not know
# (vmferry-0.2), also start this build's source with it and migrate live to the release.
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
