"""The precopy fault matrix (docs/migration.md, "Nothing lost"): each fault injected into a real
migration between real `vmferry run` processes on KVM, and the outcome asserted on both sides —
the source's state, that it runs and its guest still verifies its whole memory, the
destination's state, and no Python traceback in either log.

"Mid-pass" is made deterministic by a small max-bandwidth: a 64 MiB guest at 1 MiB/s is in its
first pass for about a minute, and each test waits until some MiB went through before it acts.
Silent peers (SIGSTOP, a link that goes down) must be noticed by the heartbeats; the detection
time is measured and printed (`-s` shows it; bench/RESULTS.md records it) but only bounded
generously, so a loaded machine cannot make these tests flaky.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Config, DeviceSection
from vmferry.testing.netns import VethLink
from vmproc import VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "64M"
DIRTY = "ws=8 rate=5 verify=1"
SLOW = 1 << 20  # max-bandwidth of a migration that must still be in its first pass
# A silent peer is noticed in 3 heartbeat intervals (3 s by default); the bound asserted is
# generous so load cannot fail it; the measured time is printed.
DETECTED_WITHIN_S = 15.0
# Long enough past the 3 s limit that a heartbeat timeout would have fired.
BEYOND_LIMIT_S = 5.0


def _source(tmp: Path, procs: list[VmProcess], *params: tuple[str, int]) -> VmProcess:
    src = VmProcess(tmp, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    src.wait_serial(r"verify ok")
    for name, value in params:
        src.cmd("migrate-set-parameters", **{name: value})
    return src


def _dest(tmp: Path, procs: list[VmProcess], incoming: str = "tcp:127.0.0.1:0",
          wrap: tuple[str, ...] = ()) -> VmProcess:
    dst = VmProcess(tmp, "dst", "-m", MEM, "--incoming", incoming, wrap=wrap)
    procs.append(dst)
    return dst


def _mid_pass(src: VmProcess, uri: str, after_bytes: int = 2 << 20) -> None:
    """Start a slow migration and return once `after_bytes` of it went out: mid-pass."""
    src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW})
    src.cmd("migrate", uri=uri)
    deadline = time.monotonic() + 60
    while True:
        info = src.cmd("query-migrate")
        assert info.get("status") in ("setup", "active"), info
        if info.get("ram", {}).get("transferred", 0) >= after_bytes:
            return
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def _no_traceback(vm: VmProcess) -> None:
    assert "Traceback" not in vm.log(), vm.log()


def _source_survives(src: VmProcess) -> None:
    """Running, its guest still verifying all of its memory, nothing printed but named errors."""
    assert src.status() == "running"
    start = len(src.serial())
    src.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
    assert "FAIL" not in src.serial()
    _no_traceback(src)


def _dest_failed(dst: VmProcess, pattern: str = "") -> dict:
    info = dst.wait_migration(timeout=60)
    assert info["status"] == "failed", info
    assert re.search(pattern, info.get("error-desc", "")), info
    assert dst.status() == "inmigrate"  # the guest never started
    _no_traceback(dst)
    return info


def _until_failed(vm: VmProcess, since: float) -> tuple[dict, float]:
    """Poll until `vm`'s migration ends; (query-migrate, seconds since `since`)."""
    info = vm.wait_migration(timeout=60)
    return info, time.monotonic() - since


def _report(what: str, seconds: float) -> None:
    print(f"\n[fault-matrix] {what}: detected in {seconds:.2f} s")


class _Relay:
    """A TCP relay between source and destination that flips one bit of the stream's byte at
    `flip_at`, or passes exactly `cut_at` bytes of the stream and then cuts both connections.
    The return path is passed through untouched."""

    def __init__(self, target: tuple[str, int], *, flip_at: int | None = None,
                 cut_at: int | None = None) -> None:
        self.target, self.flip_at, self.cut_at = target, flip_at, cut_at
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _cut(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _pipe(self, a: socket.socket, b: socket.socket, stream: bool) -> None:
        seen = 0
        try:
            while data := a.recv(1 << 16):
                if stream and self.cut_at is not None and seen + len(data) >= self.cut_at:
                    b.sendall(data[:self.cut_at - seen])
                    break
                if stream and self.flip_at is not None and seen <= self.flip_at < seen + len(data):
                    buf = bytearray(data)
                    buf[self.flip_at - seen] ^= 0x10
                    data = bytes(buf)
                seen += len(data)
                b.sendall(data)
        except OSError:
            pass
        finally:
            self._cut()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        self._socks = [client, server]
        threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
        self._pipe(server, client, False)

    def close(self) -> None:
        self._cut()
        for s in (*self._socks, self.listener):
            s.close()


# --- cancel and kill -9, either side, mid-pass ---

def test_cancel_on_the_source(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    _mid_pass(src, dst.incoming_uri())
    src.cmd("migrate_cancel")
    assert src.wait_migration()["status"] == "cancelled"
    _source_survives(src)
    _dest_failed(dst)


def test_cancel_on_the_destination(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    _mid_pass(src, dst.incoming_uri())
    dst.cmd("migrate_cancel")
    info = src.wait_migration()
    assert info["status"] == "failed" and "cancelled on the destination" in info["error-desc"], info
    _source_survives(src)
    _dest_failed(dst, "cancelled on the destination")


def test_source_killed(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    _mid_pass(src, dst.incoming_uri())
    src.proc.kill()
    src.proc.wait()
    _dest_failed(dst, r"(?i)truncated|without END|connection")


def test_destination_killed(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    _mid_pass(src, dst.incoming_uri())
    dst.proc.kill()
    dst.proc.wait()
    assert src.wait_migration()["status"] == "failed"
    _source_survives(src)


# --- silent peers: SIGSTOP, heartbeats ---

def test_destination_stopped_is_noticed_by_heartbeats(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    _mid_pass(src, dst.incoming_uri())
    t0 = time.monotonic()
    dst.proc.send_signal(signal.SIGSTOP)
    info, took = _until_failed(src, t0)
    _report("destination SIGSTOPped, source", took)
    assert info["status"] == "failed" and "no heartbeat from the destination" in info["error-desc"], info
    assert took < DETECTED_WITHIN_S
    _source_survives(src)
    dst.proc.send_signal(signal.SIGCONT)
    _dest_failed(dst)


def test_source_stopped_is_noticed_by_heartbeats(tmp_path: Path, procs: list[VmProcess]) -> None:
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    _mid_pass(src, dst.incoming_uri())
    t0 = time.monotonic()
    src.proc.send_signal(signal.SIGSTOP)
    info, took = _until_failed(dst, t0)
    _report("source SIGSTOPped, destination", took)
    assert info["status"] == "failed" and "no heartbeat from the source" in info["error-desc"], info
    assert took < DETECTED_WITHIN_S
    assert dst.status() == "inmigrate"
    _no_traceback(dst)
    src.proc.send_signal(signal.SIGCONT)
    assert src.wait_migration()["status"] == "failed"
    _source_survives(src)


def test_heartbeats_off_a_stopped_source_is_not_timed_out(tmp_path: Path, procs: list[VmProcess]) -> None:
    """x-heartbeat-ms 0 on the source: it sends none, so the destination (whose heartbeats are
    on) never times it out — as against a peer that does not speak heartbeats at all."""
    src, dst = _source(tmp_path, procs, ("x-heartbeat-ms", 0)), _dest(tmp_path, procs)
    _mid_pass(src, dst.incoming_uri())
    src.proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + BEYOND_LIMIT_S
    while time.monotonic() < deadline:
        assert dst.cmd("query-migrate")["status"] == "active"
        time.sleep(0.2)
    src.proc.send_signal(signal.SIGCONT)
    src.cmd("migrate_cancel")
    assert src.wait_migration()["status"] == "cancelled"
    _source_survives(src)
    _dest_failed(dst)


def test_a_destination_that_sends_no_heartbeat_is_not_timed_out(
    tmp_path: Path, procs: list[VmProcess]
) -> None:
    """A peer that reads the stream and never answers (no heartbeat, no PROGRESS): heartbeat
    silence does not apply to it."""
    src = _source(tmp_path, procs)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drain() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(0.2)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    if not conn.recv(1 << 16):
                        return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        _mid_pass(src, f"tcp:127.0.0.1:{listener.getsockname()[1]}", after_bytes=1 << 20)
        deadline = time.monotonic() + BEYOND_LIMIT_S
        while time.monotonic() < deadline:
            assert src.cmd("query-migrate")["status"] == "active"
            time.sleep(0.2)
        src.cmd("migrate_cancel")
        assert src.wait_migration()["status"] == "cancelled"
        _source_survives(src)
    finally:
        stop.set()
        reader.join(10)
        listener.close()


def test_a_source_that_sends_no_heartbeat_is_not_timed_out(tmp_path: Path, procs: list[VmProcess]) -> None:
    dst = _dest(tmp_path, procs)
    enc = StreamEncoder(machine_type="")
    with socket.create_connection(dst.incoming_address(), timeout=30) as sock:
        sock.sendall(enc.header() + enc.encode(Config({"producer": "a peer without heartbeats"})))
        dst.wait_migration(("active",), timeout=60)
        deadline = time.monotonic() + BEYOND_LIMIT_S
        while time.monotonic() < deadline:
            assert dst.cmd("query-migrate")["status"] == "active"
            time.sleep(0.2)
        # End the stream with a FIN, reading what the destination says back (HEARTBEAT) until
        # it closes: closing with unread bytes would send a reset instead.
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    _dest_failed(dst, "no END record")


# --- the link goes down (a network namespace and a veth pair) ---

def test_link_down_then_up(tmp_path: Path, procs: list[VmProcess], netns_link: VethLink) -> None:
    src = _source(tmp_path, procs)
    dst = _dest(tmp_path, procs, f"tcp:{netns_link.address}:0", wrap=netns_link.exec_prefix)
    _mid_pass(src, dst.incoming_uri())
    t0 = time.monotonic()
    netns_link.down()
    try:
        src_info, src_took = _until_failed(src, t0)
        dst_info, dst_took = _until_failed(dst, t0)
    finally:
        netns_link.up()
    _report("link down, source", src_took)
    _report("link down, destination", dst_took)
    assert src_info["status"] == "failed" and "no heartbeat" in src_info["error-desc"], src_info
    assert dst_info["status"] == "failed" and "no heartbeat" in dst_info["error-desc"], dst_info
    assert src_took < DETECTED_WITHIN_S and dst_took < DETECTED_WITHIN_S
    _source_survives(src)
    _dest_failed(dst)


# --- the stream damaged in flight: a flipped byte, a cut, at setup and mid-pass ---

@pytest.mark.parametrize(("where", "offset", "pattern"), [
    ("setup", 40, r"stream header checksum mismatch"),
    ("mid-pass", 3 << 20, r"checksum|mismatch|record"),
])
def test_a_flipped_byte(tmp_path: Path, procs: list[VmProcess], where: str, offset: int,
                        pattern: str) -> None:
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    relay = _Relay(dst.incoming_address(), flip_at=offset)
    try:
        src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW})
        src.cmd("migrate", uri=relay.uri)
        info = src.wait_migration()
        assert info["status"] == "failed" and "the destination refused the stream" in info["error-desc"], info
        _source_survives(src)
        _dest_failed(dst, pattern)
    finally:
        relay.close()


@pytest.mark.parametrize(("where", "offset"), [("setup", 40), ("mid-pass", 3 << 20)])
def test_a_truncated_stream(tmp_path: Path, procs: list[VmProcess], where: str, offset: int) -> None:
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    relay = _Relay(dst.incoming_address(), cut_at=offset)
    try:
        src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW})
        src.cmd("migrate", uri=relay.uri)
        assert src.wait_migration()["status"] == "failed"
        _source_survives(src)
        _dest_failed(dst, r"truncated")
    finally:
        relay.close()


# --- a snapshot damaged during device state (deterministic: the offsets are read from it) ---

def _device_section_end(data: bytes) -> int:
    """Where the first device section record ends in a snapshot (the decoder queues records as
    it is fed: feed it in steps, then byte by byte over the step that completed the record)."""
    def first_device_at(step: int, start: int, dec: StreamDecoder) -> int:
        for end in range(start + step, len(data) + step, step):
            dec.feed(data[end - step:end])
            while (rec := dec.next_record()) is not None:
                if isinstance(rec, DeviceSection):
                    return min(end, len(data))
        raise AssertionError("no device section in the snapshot")

    coarse = first_device_at(4096, 0, StreamDecoder())
    before = max(0, coarse - 4096)
    dec = StreamDecoder()
    dec.feed(data[:before])
    while dec.next_record() is not None:
        pass
    return first_device_at(1, before, dec)


@pytest.mark.parametrize("case", ["flipped", "cut"])
def test_a_snapshot_damaged_in_device_state(tmp_path: Path, procs: list[VmProcess], case: str) -> None:
    src = _source(tmp_path, procs)
    src.cmd("migrate", uri=f"file:{tmp_path / 'vm.snap'}")
    assert src.wait_migration()["status"] == "completed"
    data = bytearray((tmp_path / "vm.snap").read_bytes())
    end = _device_section_end(bytes(data))
    if case == "flipped":
        data[end - 12] ^= 0x01  # inside the section's payload or trailer
    else:
        data = data[:end - 12]
    (tmp_path / "bad.snap").write_bytes(data)
    dst = _dest(tmp_path, procs, f"file:{tmp_path / 'bad.snap'}")
    info = _dest_failed(dst, r"SECTION_FULL")
    print(f"\n[fault-matrix] snapshot {case} in device state: {info['error-desc']}")


# --- file: on a full disk ---

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, always unmounted. Needs root; on CI its absence fails."""
    if os.geteuid() != 0:
        if os.environ.get("VMFERRY_REQUIRE_KVM") == "1":
            pytest.fail("the full-disk cell needs root (mount -t tmpfs)")
        pytest.skip("the full-disk cell needs root (mount -t tmpfs)")
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def test_a_full_disk_for_file(tmp_path: Path, procs: list[VmProcess], small_tmpfs: Path) -> None:
    src = _source(tmp_path, procs)
    src.cmd("migrate", uri=f"file:{small_tmpfs / 'vm.snap'}")
    info = src.wait_migration()
    assert info["status"] == "failed" and "No space left on device" in info["error-desc"], info
    _source_survives(src)


# --- with TLS: the same faults inside TLS records (x509 and PSK) ---

@pytest.fixture(scope="module")
def tls_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Credentials for both ends: an x509 server + client pair (trustme) and a keys.psk."""
    import trustme

    root = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    dirs = {}
    for role, leaf in (("server", ca.issue_cert("127.0.0.1", "localhost")),
                       ("client", ca.issue_cert("src.example.com", common_name="src.example.com"))):
        d = root / role
        d.mkdir()
        ca.cert_pem.write_to_path(str(d / "ca-cert.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{role}-cert.pem"))
        leaf.private_key_pem.write_to_path(str(d / f"{role}-key.pem"))
        dirs[role] = d
    psk = root / "psk"
    psk.mkdir()
    (psk / "keys.psk").write_text(f"qemu:{secrets.token_hex(32)}\n")
    dirs["psk"] = psk
    return dirs


def _with_tls(src: VmProcess, dst: VmProcess, dirs: dict[str, Path], kind: str) -> None:
    """QEMU's sequence on both ends: the credentials object, then tls-creds."""
    qom_type = "tls-creds-x509" if kind == "x509" else "tls-creds-psk"
    for vm, endpoint in ((dst, "server"), (src, "client")):
        d = dirs["psk"] if kind == "psk" else dirs[endpoint]
        vm.cmd("object-add", **{"qom-type": qom_type, "id": "tls0", "dir": str(d), "endpoint": endpoint})
        vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": "localhost"})


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_tls_source_killed(tmp_path: Path, procs: list[VmProcess], tls_dirs: dict[str, Path],
                           kind: str) -> None:
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    _with_tls(src, dst, tls_dirs, kind)
    _mid_pass(src, dst.incoming_uri())
    src.proc.kill()
    src.proc.wait()
    _dest_failed(dst, r"without TLS close_notify \(truncated\)|Connection reset")


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_tls_destination_killed(tmp_path: Path, procs: list[VmProcess], tls_dirs: dict[str, Path],
                                kind: str) -> None:
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    _with_tls(src, dst, tls_dirs, kind)
    _mid_pass(src, dst.incoming_uri())
    dst.proc.kill()
    dst.proc.wait()
    info = src.wait_migration()
    assert info["status"] == "failed", info
    _source_survives(src)


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_tls_a_flipped_byte_is_a_record_mac_failure(tmp_path: Path, procs: list[VmProcess],
                                                    tls_dirs: dict[str, Path], kind: str) -> None:
    """A bit flipped inside a TLS record mid-pass: the destination's TLS layer rejects the record
    (its authentication tag) before any byte of it reaches the stream decoder."""
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    _with_tls(src, dst, tls_dirs, kind)
    relay = _Relay(dst.incoming_address(), flip_at=3 << 20)
    try:
        src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW})
        src.cmd("migrate", uri=relay.uri)
        info = src.wait_migration()
        # The destination's alert is the source's reason, as a SHUT would be.
        assert info["status"] == "failed", info
        assert re.search(r"the destination refused the stream: TLS: \S+ alert bad record mac",
                         info["error-desc"]), info
        _source_survives(src)
        _dest_failed(dst, r"TLS: (decryption failed or )?bad record mac")
    finally:
        relay.close()


def test_tls_stream_cut_mid_pass(tmp_path: Path, procs: list[VmProcess], tls_dirs: dict[str, Path]) -> None:
    src, dst = _source(tmp_path, procs), _dest(tmp_path, procs)
    _with_tls(src, dst, tls_dirs, "psk")
    relay = _Relay(dst.incoming_address(), cut_at=3 << 20)
    try:
        src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW})
        src.cmd("migrate", uri=relay.uri)
        assert src.wait_migration()["status"] == "failed"
        _source_survives(src)
        _dest_failed(dst, r"without TLS close_notify \(truncated\)")
    finally:
        relay.close()
