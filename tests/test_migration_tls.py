"""Encrypted, authenticated migration on real `vmferry run` processes on KVM, driven by the
official QMP client with QEMU's command sequence (object-add on both sides, migrate-set-parameters
tls-creds, migrate-incoming, migrate): mutual x509 TLS completes with memory verified and nothing
readable on the wire; every refusal of the matrix fails the source with its named reason, leaves
it running and the destination waiting; no traceback anywhere. Certificates come from trustme."""

from __future__ import annotations

import contextlib
import datetime
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import trustme

from vmferry.guests.verify import MAGIC as DIRTY_GUEST_MAGIC
from vmferry.stream.format import MAGIC as STREAM_MAGIC
from vmproc import QmpReplyError, VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "64M"
DIRTY = "ws=8 rate=5 verify=1"
CLIENT_DN = "CN=src.example.com,OU=migration,O=Example Org"
TIMEOUT = 120  # generous: the machine may be busy; nothing here asserts a duration


# -- certificates -------------------------------------------------------------------------------


def _write(d: Path, ca: trustme.CA, leaf: trustme.LeafCert, role: str) -> Path:
    d.mkdir()
    ca.cert_pem.write_to_path(str(d / "ca-cert.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / f"{role}-cert.pem"))
    leaf.private_key_pem.write_to_path(str(d / f"{role}-key.pem"))
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    now = datetime.datetime.now(datetime.UTC)

    def client(signer: trustme.CA, cn: str = "src.example.com", **kw: object) -> trustme.LeafCert:
        return signer.issue_cert(cn, common_name=cn, organization_name="Example Org",
                                 organization_unit_name="migration", **kw)  # type: ignore[arg-type]

    return {
        "server": _write(root / "server", ca, ca.issue_cert("127.0.0.1", "localhost"), "server"),
        "client": _write(root / "client", ca, client(ca), "client"),
        "wrong-ca": _write(root / "wrong-ca", other, client(ca), "client"),
        "foreign": _write(root / "foreign", ca, client(other), "client"),
        "expired": _write(root / "expired", ca, client(ca, not_before=now - datetime.timedelta(days=2),
                                                         not_after=now - datetime.timedelta(days=1)),
                          "client"),
        "other-dn": _write(root / "other-dn", ca, client(ca, "intruder.example.com"), "client"),
    }


# -- processes ----------------------------------------------------------------------------------


def _source(tmp: Path, procs: list[VmProcess]) -> VmProcess:
    src = VmProcess(tmp, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    src.wait_serial(r"verify ok", timeout=TIMEOUT)
    return src


def _listen(dst: VmProcess) -> int:
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    return int(dst.cmd("query-migrate")["socket-address"][0]["port"])


def _x509(vm: VmProcess, d: Path, endpoint: str, **extra: object) -> None:
    with contextlib.suppress(QmpReplyError):
        vm.cmd("object-del", id="tls0")
    vm.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(d),
                            "endpoint": endpoint, **extra})


def _no_traceback(*vms: VmProcess) -> None:
    for vm in vms:
        assert "Traceback" not in vm.log(), vm.log()


class Relay:
    """A TCP relay between the source and the destination that records what the source sends on
    each connection it relays (the main one first, then any data channels); `cut_after` forwards
    only that many bytes of the destination's answer, then cuts both connections (a handshake cut
    midway)."""

    def __init__(self, target_port: int, *, cut_after: int | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.cut_after = cut_after
        self.captures: list[bytearray] = []  # per connection, in the order they came
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    @property
    def captured(self) -> bytearray:
        return self.captures[0] if self.captures else bytearray()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [conn, up]
            record = bytearray()
            self.captures.append(record)
            pair = [conn, up]
            for args in ((conn, up, pair, record, None), (up, conn, pair, None, self.cut_after)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, a: socket.socket, b: socket.socket, pair: list[socket.socket],
              record: bytearray | None, limit: int | None) -> None:
        try:
            while data := a.recv(65536):
                if record is not None:
                    record += data
                if limit is not None:
                    b.sendall(data[:limit])
                    limit -= min(limit, len(data))
                    if limit == 0:
                        for s in pair:
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                        return
                else:
                    b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(10)
        for s in self._socks:
            s.close()


# -- tests --------------------------------------------------------------------------------------


def test_mutual_tls_migration_completes_verified_and_the_wire_shows_no_plaintext(
    tmp_path: Path, procs: list[VmProcess], pki: dict[str, Path]
) -> None:
    src = _source(tmp_path, procs)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "defer")
    procs.append(dst)
    # QEMU's sequence, through qemu.qmp: credentials on both sides, then the parameters.
    _x509(dst, pki["server"], "server")
    dst.cmd("object-add", **{"qom-type": "authz-simple", "id": "auth0", "identity": CLIENT_DN})
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
    port = _listen(dst)
    _x509(src, pki["client"], "client")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": "localhost"})
    relay = Relay(port)
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
        info = src.wait_migration(timeout=TIMEOUT)
        assert info["status"] == "completed", info
        assert dst.wait_migration(timeout=TIMEOUT)["status"] == "completed"
    finally:
        relay.close()
    verdict = dst.cmd("x-verify-dirty-guest")
    assert verdict["ok"], verdict
    wire = bytes(relay.captured)
    # The whole stream went through the relay, as TLS records (handshake first: 0x16 0x03).
    assert len(wire) >= info["ram"]["transferred"] and wire[:2] == b"\x16\x03"
    # In plain text the stream starts with its magic and the guest's first page holds its header.
    assert STREAM_MAGIC not in wire and DIRTY_GUEST_MAGIC not in wire
    _no_traceback(src, dst)


REFUSALS = [
    # (case, the source's credentials, its extra object properties, tls-hostname, error-desc pattern)
    ("wrong CA", "wrong-ca", {}, "", r"TLS handshake on tcp:\S+ failed: certificate verify failed"),
    ("client cert of another CA", "foreign", {}, "",
     r"the destination on tcp:\S+ refused the TLS connection: .*(unknown ca|certificate)"),
    ("expired client cert", "expired", {"sanity-check": False}, "",
     r"the destination on tcp:\S+ refused the TLS connection: .*certificate expired"),
    ("hostname mismatch", "client", {}, "dst.example.com",
     r"certificate verify failed: Hostname mismatch.*dst\.example\.com"),
    ("DN not allowed", "other-dn", {}, "",
     r"refused the TLS connection: client 'CN=intruder\.example\.com,OU=migration,O=Example Org' "
     r"is not allowed by tls-authz 'auth0'"),
]


def test_refusal_matrix_source_keeps_running_destination_keeps_waiting(
    tmp_path: Path, procs: list[VmProcess], pki: dict[str, Path]
) -> None:
    src = _source(tmp_path, procs)
    # The destination's objects from the command line, QEMU's spelling (",," is a comma).
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "defer",
                    "--object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server,verify-peer=on",
                    "--object", "authz-simple,id=auth0,identity=" + CLIENT_DN.replace(",", ",,"))
    procs.append(dst)
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
    port = _listen(dst)
    refusals = 0

    def refused(uri: str, pattern: str) -> None:
        nonlocal refusals
        src.cmd("migrate", uri=uri)
        info = src.wait_migration(timeout=TIMEOUT)
        assert info["status"] == "failed", info
        assert re.search(pattern, info["error-desc"]), info["error-desc"]
        assert src.status() == "running"
        refusals += 1
        # The destination logs the refusal and waits on.
        deadline = time.monotonic() + TIMEOUT
        while dst.log().count("incoming migration connection refused") < refusals:
            assert time.monotonic() < deadline, dst.log()
            time.sleep(0.05)
        assert dst.status() == "inmigrate" and dst.cmd("query-migrate")["status"] == "setup"

    for case, creds, extra, hostname, pattern in REFUSALS:
        _x509(src, pki[creds], "client", **extra)
        src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": hostname})
        try:
            refused(f"tcp:127.0.0.1:{port}", pattern)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from e

    # A handshake cut midway: the relay forwards the ClientHello and a little of the answer.
    _x509(src, pki["client"], "client")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": "localhost"})
    relay = Relay(port, cut_after=40)
    try:
        refused(f"tcp:127.0.0.1:{relay.port}", r"TLS handshake on tcp:\S+ failed: .*closed the connection")
    finally:
        relay.close()

    # A plain-text source against the TLS destination: the destination refuses the handshake.
    src.cmd("migrate-set-parameters", **{"tls-creds": ""})
    refused(f"tcp:127.0.0.1:{port}", r"the destination requires TLS \(tls-creds 'tls0'\); this "
                                     r"connection is plain text")

    # Still waiting: the right client migrates, memory verified.
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(timeout=TIMEOUT)["status"] == "completed"
    assert dst.wait_migration(timeout=TIMEOUT)["status"] == "completed"
    assert dst.cmd("x-verify-dirty-guest")["ok"]
    _no_traceback(src, dst)


def test_tls_source_against_a_plain_text_destination(
    tmp_path: Path, procs: list[VmProcess], pki: dict[str, Path]
) -> None:
    src = _source(tmp_path, procs)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "defer")
    procs.append(dst)
    port = _listen(dst)
    _x509(src, pki["client"], "client")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": "localhost"})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(timeout=TIMEOUT)
    assert info["status"] == "failed", info
    assert re.search(r"TLS handshake on tcp:\S+ failed: ", info["error-desc"]), info
    assert src.status() == "running"
    # The plain destination reads a ClientHello where the stream header should be: it fails, as
    # docs/migration.md says for a stream that is not one, and the guest never starts.
    dinfo = dst.wait_migration(timeout=TIMEOUT)
    assert dinfo["status"] == "failed" and "magic" in dinfo["error-desc"], dinfo
    assert dst.status() == "inmigrate"
    _no_traceback(src, dst)


def test_object_add_refuses_by_name(tmp_path: Path, procs: list[VmProcess], pki: dict[str, Path]) -> None:
    vm = VmProcess(tmp_path, "vm", "-m", "16M", "--incoming", "defer")
    procs.append(vm)
    x509 = {"qom-type": "tls-creds-x509", "id": "t"}
    cases = [
        ({"qom-type": "memory-backend-ram", "id": "m"}, "Object type 'memory-backend-ram' is not supported"),
        ({"qom-type": "tls-creds-psk", "id": "p", "dir": str(tmp_path), "endpoint": "client"},
         r"tls-creds-psk 'p': Unable to access credentials .*keys\.psk"),
        ({"qom-type": "tls-creds-psk", "id": "p", "dir": str(tmp_path), "endpoint": "server",
          "username": "qemu"}, "username should not be set when endpoint=server"),
        ({"qom-type": "tls-creds-psk", "id": "p", "dir": str(tmp_path), "verify-peer": True},
         "Property 'tls-creds-psk.verify-peer' not found"),
        ({**x509, "dir": str(pki["server"]), "identity": "x"},
         "Property 'tls-creds-x509.identity' not found"),
        ({**x509, "dir": str(pki["server"]), "priority": "NORMAL"}, "Parameter 'priority' is unexpected"),
        ({**x509, "endpoint": "server"}, "Missing 'dir' property value"),
        ({**x509, "dir": str(tmp_path), "endpoint": "server"}, "ca-cert.pem: No such file or directory"),
        ({**x509, "dir": str(pki["client"]), "endpoint": "server"}, "server-cert.pem: No such file"),
        ({**x509, "dir": str(pki["server"]), "endpoint": "sideways"}, "'endpoint' does not accept"),
        ({**x509, "dir": str(pki["server"]), "verify-peer": "yes"}, "'verify-peer', expected: boolean"),
        ({**x509, "dir": str(pki["expired"])}, r"certificate .*client-cert\.pem has expired"),
        ({"qom-type": "authz-simple", "id": "a"}, "Parameter 'identity' is missing"),
    ]
    for args, message in cases:
        with pytest.raises(QmpReplyError) as info:
            vm.cmd("object-add", **args)
        assert re.search(message, info.value.desc), (args, info.value.desc)
    vm.cmd("object-add", **{**x509, "dir": str(pki["server"]), "endpoint": "server"})
    with pytest.raises(QmpReplyError, match="duplicate property 't'"):
        vm.cmd("object-add", **{**x509, "dir": str(pki["server"]), "endpoint": "server"})
    vm.cmd("object-del", id="t")
    with pytest.raises(QmpReplyError, match="object 't' not found"):
        vm.cmd("object-del", id="t")
    # The wrong endpoint is refused by migrate-incoming's stream arrival, and by migrate at once.
    vm.cmd("object-add", **{**x509, "dir": str(pki["client"]), "endpoint": "client"})
    _no_traceback(vm)


def test_bad_object_on_the_command_line_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    from vmproc import REPO

    env_path = str(REPO / "src")
    for spec, message in [
        ("tls-creds-x509,id=t,dir=/nonexistent,endpoint=server", "ca-cert.pem: No such file"),
        ("tls-creds-x509,id=t,dir=/tmp,verify-peer=maybe", "'verify-peer' expects 'on' or 'off'"),
        ("id=t,tls-creds-x509", "the object type comes first"),
    ]:
        run = subprocess.run([sys.executable, "-m", "vmferry", "run", "-m", "16M", "--incoming", "defer",
                              "--qmp", f"unix:{tmp_path / 'q.sock'}", "--object", spec],
                             capture_output=True, text=True, timeout=60,
                             env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
        assert run.returncode != 0 and message in run.stderr, (spec, run.stderr)
        assert "Traceback" not in run.stderr, run.stderr


def test_multifd_data_channels_are_tls_too(
    tmp_path: Path, procs: list[VmProcess], pki: dict[str, Path]
) -> None:
    """With tls-creds set, every data connection does the handshake (and passes tls-authz): the
    destination refuses a plain-text connection, so a completed multifd migration whose pages
    went on the data channels proves they were TLS."""
    src = _source(tmp_path, procs)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "defer")
    procs.append(dst)
    _x509(dst, pki["server"], "server")
    dst.cmd("object-add", **{"qom-type": "authz-simple", "id": "auth0", "identity": CLIENT_DN})
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
    port = _listen(dst)
    _x509(src, pki["client"], "client")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": "localhost",
                                         "multifd-channels": 2})
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(timeout=TIMEOUT)
    assert info["status"] == "completed", info
    dinfo = dst.wait_migration(timeout=TIMEOUT)
    assert dinfo["status"] == "completed", dinfo
    assert dinfo["ram"]["multifd-bytes"] > dinfo["ram"]["transferred"] // 2, dinfo
    verdict = dst.cmd("x-verify-dirty-guest")
    assert verdict["ok"], verdict
    assert "plain text" not in dst.log()


# -- PSK ----------------------------------------------------------------------------------------

PSK_KEY = "6b3f1f4cc0ad9a3e2b8f4e0a1d7c55e0f2a9b4c3d6e7f8091a2b3c4d5e6f7081"


def _psk_dir(tmp: Path, name: str, text: str) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "keys.psk").write_text(text)
    return d


def _psk(vm: VmProcess, d: Path, endpoint: str, **extra: object) -> None:
    with contextlib.suppress(QmpReplyError):
        vm.cmd("object-del", id="tls0")
    vm.cmd("object-add", **{"qom-type": "tls-creds-psk", "id": "tls0", "dir": str(d),
                            "endpoint": endpoint, **extra})


def test_psk_migration_completes_verified_and_the_wire_shows_no_plaintext(
    tmp_path: Path, procs: list[VmProcess]
) -> None:
    keys = _psk_dir(tmp_path, "keys", f"qemu:{PSK_KEY}\nalice:{'5a' * 32}\n")
    src = _source(tmp_path, procs)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "defer")
    procs.append(dst)
    # QEMU's sequence, through qemu.qmp; under PSK tls-authz checks the client's username.
    _psk(dst, keys, "server")
    dst.cmd("object-add", **{"qom-type": "authz-simple", "id": "auth0", "identity": "alice"})
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
    port = _listen(dst)
    _psk(src, keys, "client", username="alice")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    relay = Relay(port)
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
        info = src.wait_migration(timeout=TIMEOUT)
        assert info["status"] == "completed", info
        assert dst.wait_migration(timeout=TIMEOUT)["status"] == "completed"
    finally:
        relay.close()
    verdict = dst.cmd("x-verify-dirty-guest")
    assert verdict["ok"], verdict
    wire = bytes(relay.captured)
    assert len(wire) >= info["ram"]["transferred"] and wire[:2] == b"\x16\x03"
    assert STREAM_MAGIC not in wire and DIRTY_GUEST_MAGIC not in wire
    _no_traceback(src, dst)


def test_psk_refusals_source_keeps_running_destination_keeps_waiting(
    tmp_path: Path, procs: list[VmProcess], pki: dict[str, Path]
) -> None:
    keys = _psk_dir(tmp_path, "keys", f"qemu:{PSK_KEY}\n")
    src = _source(tmp_path, procs)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "defer",
                    "--object", f"tls-creds-psk,id=tls0,dir={keys},endpoint=server")
    procs.append(dst)
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    port = _listen(dst)
    refusals = 0

    def refused(pattern: str, dst_pattern: str) -> None:
        nonlocal refusals
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = src.wait_migration(timeout=TIMEOUT)
        assert info["status"] == "failed", info
        assert re.search(pattern, info["error-desc"]), info["error-desc"]
        assert src.status() == "running"
        refusals += 1
        deadline = time.monotonic() + TIMEOUT
        while dst.log().count("incoming migration connection refused") < refusals:
            assert time.monotonic() < deadline, dst.log()
            time.sleep(0.05)
        assert re.search(dst_pattern, dst.log()), dst.log()
        assert dst.status() == "inmigrate" and dst.cmd("query-migrate")["status"] == "setup"

    cases = [
        ("PSK mismatch", f"qemu:{'ff' * 32}\n", {},
         r"TLS handshake on tcp:\S+ failed: .*decrypt error \(the destination's key for PSK username 'qemu'",
         r"the client's key for PSK username 'qemu' does not match"),
        ("unknown username", f"bob:{PSK_KEY}\n", {"username": "bob"},
         r"TLS handshake on tcp:\S+ failed: .*PSK username 'bob'",
         r"PSK username 'bob' is not in \S+keys\.psk"),
    ]
    for number, (case, text, extra, pattern, dst_pattern) in enumerate(cases):
        _psk(src, _psk_dir(tmp_path, f"client{number}", text), "client", **extra)
        src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        try:
            refused(pattern, dst_pattern)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from e

    # x509 credentials against the PSK destination.
    _x509(src, pki["client"], "client")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": "localhost"})
    refused(r"TLS handshake on tcp:\S+ failed: ", r"incoming migration connection refused: TLS handshake")

    # A plain-text source against the PSK destination.
    src.cmd("migrate-set-parameters", **{"tls-creds": ""})
    refused(r"the destination requires TLS \(tls-creds 'tls0'\); this connection is plain text",
            r"this connection is plain text")

    # Still waiting: the right key migrates, memory verified.
    _psk(src, keys, "client")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(timeout=TIMEOUT)["status"] == "completed"
    assert dst.wait_migration(timeout=TIMEOUT)["status"] == "completed"
    assert dst.cmd("x-verify-dirty-guest")["ok"]
    _no_traceback(src, dst)


def test_psk_source_against_a_plain_text_destination(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "defer")
    procs.append(dst)
    port = _listen(dst)
    _psk(src, _psk_dir(tmp_path, "keys", f"qemu:{PSK_KEY}\n"), "client")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(timeout=TIMEOUT)
    assert info["status"] == "failed", info
    assert re.search(r"TLS handshake on tcp:\S+ failed: ", info["error-desc"]), info
    assert src.status() == "running"
    dinfo = dst.wait_migration(timeout=TIMEOUT)
    assert dinfo["status"] == "failed" and "magic" in dinfo["error-desc"], dinfo
    assert dst.status() == "inmigrate"
    _no_traceback(src, dst)


def test_multifd_data_channels_are_psk_too(tmp_path: Path, procs: list[VmProcess]) -> None:
    """PSK on every data connection: the migration goes through the relay, the data channels
    too (they connect to the same URI); a completed multifd migration whose pages went on the
    data channels, with memory verified and no plaintext page on any connection."""
    keys = _psk_dir(tmp_path, "keys", f"qemu:{PSK_KEY}\n")
    src = _source(tmp_path, procs)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "defer")
    procs.append(dst)
    _psk(dst, keys, "server")
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    port = _listen(dst)
    _psk(src, keys, "client")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "multifd-channels": 2})
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    relay = Relay(port)
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
        info = src.wait_migration(timeout=TIMEOUT)
        assert info["status"] == "completed", info
        dinfo = dst.wait_migration(timeout=TIMEOUT)
        assert dinfo["status"] == "completed", dinfo
    finally:
        relay.close()
    assert dinfo["ram"]["multifd-bytes"] > dinfo["ram"]["transferred"] // 2, dinfo
    assert dst.cmd("x-verify-dirty-guest")["ok"]
    assert len(relay.captures) == 3, [len(c) for c in relay.captures]  # main + 2 data channels
    for wire in relay.captures:
        assert wire[:2] == b"\x16\x03" and STREAM_MAGIC not in wire and DIRTY_GUEST_MAGIC not in wire
    assert "plain text" not in dst.log()
    _no_traceback(src, dst)
