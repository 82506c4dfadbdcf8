"""The QMP server over raw sockets: hostile and clumsy clients never hurt the server or others."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator

import pytest

from test_monitor_qmp import FakeVm  # the same stand-in VMM as the qemu.qmp tests
from vmferry.errors import VmferryError
from vmferry.monitor import CommandDispatcher, QmpServer

TIMEOUT = 20
NEGOTIATE = b'{"execute": "qmp_capabilities"}'


class Raw:
    """A bare socket client that reads replies line by line."""

    def __init__(self, address: str) -> None:
        kind, _, rest = address.partition(":")
        if kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(rest)
        else:
            host, _, port = rest.rpartition(":")
            self.sock = socket.create_connection((host.strip("[]"), int(port)))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(TIMEOUT)
        self.buf = b""
        self.greeting = self.read()

    def read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, data: bytes) -> dict:
        self.send(data)
        return self.read()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[FakeVm, QmpServer]]:
    vm = FakeVm()
    server = QmpServer(
        CommandDispatcher(vm), [f"unix:{tmp_path}/qmp.sock", "tcp:127.0.0.1:0"], max_input_bytes=4096
    )
    vm.emit = server.emit_event
    yield vm, server
    server.close()


def healthy(server: QmpServer) -> None:
    """A fresh client on every address can still negotiate and run a command."""
    for address in server.addresses:
        c = Raw(address)
        assert c.cmd(NEGOTIATE) == {"return": {}}
        assert c.cmd(b'{"execute": "query-status", "id": "ok"}')["id"] == "ok"
        c.close()


def test_commands_before_negotiation(served) -> None:
    vm, server = served
    c = Raw(server.addresses[0])
    assert "QMP" in c.greeting
    assert c.cmd(b'{"execute": "query-status", "id": 1}') == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": 1,
    }
    assert c.cmd(NEGOTIATE) == {"return": {}}
    assert c.cmd(b'{"execute": "query-status"}')["return"]["status"] == "running"


def test_malformed_json_keeps_the_connection(served) -> None:
    vm, server = served
    c = Raw(server.addresses[1])
    c.cmd(NEGOTIATE)
    reply = c.cmd(b'{"execute": "stop",,}')
    assert reply["error"]["class"] == "GenericError" and reply["error"]["desc"].startswith(
        "JSON parse error, "
    )
    assert c.cmd(b'{"execute": "query-status", "id": 2}')["id"] == 2
    healthy(server)


def test_json_split_across_tiny_writes(served) -> None:
    vm, server = served
    c = Raw(server.addresses[1])
    for byte in NEGOTIATE + b'{"execute": "query-status", "id": "split"}':
        c.send(bytes([byte]))
    assert c.read() == {"return": {}}
    assert c.read()["id"] == "split"


def test_several_objects_in_one_write(served) -> None:
    vm, server = served
    c = Raw(server.addresses[0])
    c.send(
        NEGOTIATE + b'{"execute": "stop", "id": 1}{"execute": "query-status", "id": 2}\n'
        b'{"execute": "cont", "id": 3}'
    )
    got = [c.read() for _ in range(6)]  # negotiation reply, STOP, 3 replies, RESUME
    assert [m.get("event") for m in got if "event" in m] == ["STOP", "RESUME"]
    assert [m["id"] for m in got if "id" in m] == [1, 2, 3]
    assert [m for m in got if m.get("id") == 2][0]["return"]["status"] == "paused"


def test_oversized_input_is_refused_and_the_server_survives(served) -> None:
    vm, server = served
    c = Raw(server.addresses[1])
    c.cmd(NEGOTIATE)
    c.send(b'{"execute": "migrate", "arguments": {"uri": "' + b"x" * 100_000 + b'"}}')
    assert c.read() == {
        "error": {"class": "GenericError", "desc": "JSON parse error, input exceeds the limit of 4096 bytes"}
    }
    assert c.cmd(b'{"execute": "query-migrate", "id": 1}') == {"return": {}, "id": 1}
    healthy(server)


def test_client_disconnecting_mid_command(served) -> None:
    vm, server = served
    started, release = threading.Event(), threading.Event()
    real_query_status = vm.query_status

    def slow_query_status() -> dict:
        started.set()
        release.wait(TIMEOUT)
        return real_query_status()

    vm.query_status = slow_query_status  # type: ignore[method-assign]
    c = Raw(server.addresses[1])
    c.cmd(NEGOTIATE)
    c.send(b'{"execute": "query-status", "id": 1}')
    assert started.wait(TIMEOUT)
    # Reset the connection while the command runs, so the reply has nowhere to go.
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    release.set()
    vm.query_status = real_query_status  # type: ignore[method-assign]
    healthy(server)


def test_half_closed_client_still_gets_its_replies(served) -> None:
    vm, server = served
    c = Raw(server.addresses[0])
    c.send(NEGOTIATE + b'{"execute": "query-status", "id": 1}')
    c.sock.shutdown(socket.SHUT_WR)
    assert c.read() == {"return": {}}
    assert c.read()["id"] == 1
    with pytest.raises(EOFError):
        c.read()
    healthy(server)


def test_garbage_and_binary_noise(served) -> None:
    vm, server = served
    c = Raw(server.addresses[1])
    c.send(os.urandom(2000) + b'"]}' * 100)
    c.close()
    healthy(server)


def test_events_only_after_negotiation(served) -> None:
    vm, server = served
    early, late = Raw(server.addresses[0]), Raw(server.addresses[0])
    late.cmd(NEGOTIATE)
    server.emit_event("POWERDOWN")
    assert late.read()["event"] == "POWERDOWN"
    assert early.cmd(NEGOTIATE) == {"return": {}}  # the event was not queued for it


def test_client_that_never_reads_is_dropped_not_buffered(tmp_path) -> None:
    vm = FakeVm()
    with QmpServer(CommandDispatcher(vm), f"unix:{tmp_path}/q.sock", max_output_bytes=64 * 1024) as server:
        lazy = Raw(server.addresses[0])
        lazy.cmd(NEGOTIATE)
        lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for n in range(20_000):
            server.emit_event("MIGRATION_PASS", {"pass": n})
        healthy(server)
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                lazy.read()


def test_close_removes_unix_socket_and_disconnects_clients(tmp_path) -> None:
    path = tmp_path / "q.sock"
    server = QmpServer(CommandDispatcher(FakeVm()), f"unix:{path}")
    c = Raw(server.addresses[0])
    c.cmd(NEGOTIATE)
    server.close()
    assert not path.exists()
    with pytest.raises((EOFError, ConnectionResetError)):
        c.read()
    server.close()  # idempotent
    server.emit_event("STOP")  # after close: nothing to send to, no error


def test_stale_socket_is_replaced_but_a_regular_file_is_not(tmp_path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    with QmpServer(CommandDispatcher(FakeVm()), f"unix:{tmp_path}/stale.sock") as server:
        healthy(server)
    (tmp_path / "file").write_text("precious")
    with pytest.raises(VmferryError, match="cannot listen for QMP"):
        QmpServer(CommandDispatcher(FakeVm()), f"unix:{tmp_path}/file")
    assert (tmp_path / "file").read_text() == "precious"


def test_a_live_monitor_socket_is_never_taken_over(tmp_path) -> None:
    """Regression: a second VMM given the same --qmp path unlinked the first one's socket,
    leaving that VM without a monitor."""
    path = f"{tmp_path}/live.sock"
    with QmpServer(CommandDispatcher(FakeVm()), f"unix:{path}") as first:
        with pytest.raises(VmferryError, match="another process listens there"):
            QmpServer(CommandDispatcher(FakeVm()), f"unix:{path}")
        healthy(first)


@pytest.mark.parametrize("address", ["tcp:nohost", "tcp::", "udp:1.2.3.4:5", "unix:", "stdio"])
def test_invalid_addresses(address: str) -> None:
    with pytest.raises(VmferryError, match="invalid QMP address"):
        QmpServer(CommandDispatcher(FakeVm()), address)


def test_quit_handler_may_close_the_server_from_its_own_thread(tmp_path) -> None:
    vm = FakeVm()
    server = QmpServer(CommandDispatcher(vm), f"unix:{tmp_path}/q.sock")
    vm.emit = server.emit_event
    real_quit = vm.quit

    def quit_and_close() -> None:
        real_quit()
        server.close()  # runs on the server thread: must not join itself

    vm.quit = quit_and_close  # type: ignore[method-assign]
    c = Raw(server.addresses[0])
    c.cmd(NEGOTIATE)
    c.send(b'{"execute": "quit"}')
    got = []
    with pytest.raises((EOFError, ConnectionResetError)):
        while True:
            got.append(c.read())
    assert [m.get("event") for m in got] == ["SHUTDOWN", None]
    assert got[1] == {"return": {}}  # the reply goes out before the monitor stops
    assert vm.quit_requested.is_set()
    server.close()


def test_unix_socket_is_owner_only_and_appears_listening(tmp_path) -> None:
    path = tmp_path / "q.sock"
    old_umask = os.umask(0)  # the most permissive umask must not make it reachable by others
    try:
        server = QmpServer(CommandDispatcher(FakeVm()), f"unix:{path}")
    finally:
        os.umask(old_umask)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["q.sock"]  # no temporary name left
        healthy(server)
    finally:
        server.close()
    assert not path.exists()


def test_a_file_appearing_at_the_path_is_never_replaced(tmp_path) -> None:
    (tmp_path / "q.sock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(VmferryError, match="cannot listen for QMP on unix:.*File exists"):
        QmpServer(CommandDispatcher(FakeVm()), f"unix:{tmp_path}/q.sock")
    assert (tmp_path / "q.sock").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.sock"]


def _non_loopback_ipv4() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
        addr = s.getsockname()[0]
        return None if addr.startswith("127.") else addr
    return None


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "local-address"])
def test_tcp_beyond_loopback_needs_allow_remote(host: str) -> None:
    if host == "local-address":
        host = _non_loopback_ipv4() or pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(VmferryError, match=r"refusing to listen for QMP on tcp:.*no authentication.*"
                                           r"',allow-remote=on'"):
        QmpServer(CommandDispatcher(FakeVm()), f"tcp:{host}:0")
    with pytest.raises(VmferryError, match="refusing"):
        QmpServer(CommandDispatcher(FakeVm()), f"tcp:{host}:0,allow-remote=off")
    try:
        server = QmpServer(CommandDispatcher(FakeVm()), f"tcp:{host}:0,allow-remote=on")
    except VmferryError as e:  # e.g. no IPv6 on this machine: not what this test is about
        pytest.skip(str(e))
    with server:
        port = int(server.addresses[0].rpartition(":")[2])
        loop = "[::1]" if host.startswith("[") else "127.0.0.1"
        c = Raw(f"tcp:{loop if host in ('0.0.0.0', '[::]') else host}:{port}")
        assert c.cmd(NEGOTIATE) == {"return": {}}
        c.close()


@pytest.mark.parametrize("address", ["tcp:127.0.0.1:0", "tcp:localhost:0", "tcp:[::1]:0",
                                     "tcp:127.0.0.1:0,server=on,wait=off"])
def test_loopback_tcp_needs_no_option(address: str) -> None:
    try:
        server = QmpServer(CommandDispatcher(FakeVm()), address)
    except VmferryError as e:
        if "::1" in address:
            pytest.skip(f"no IPv6 loopback here: {e}")
        raise
    with server:
        healthy(server)


@pytest.mark.parametrize(("address", "option"), [
    ("tcp:127.0.0.1:0,allow-remote=yes", "allow-remote=yes"), ("tcp:127.0.0.1:0,wait=on", "wait=on"),
    ("tcp:127.0.0.1:0,server=off", "server=off"), ("unix:/tmp/x,tls=on", "tls=on"),
])
def test_unknown_or_unsupported_options_are_refused_by_name(address: str, option: str) -> None:
    with pytest.raises(VmferryError, match=f"option '{option}' is not supported"):
        QmpServer(CommandDispatcher(FakeVm()), address)


def test_an_event_racing_the_negotiation_never_precedes_its_reply(tmp_path) -> None:
    """An event emitted after the session turned negotiated but before the qmp_capabilities
    reply was queued must not reach the client first (qemu.qmp refuses such a greeting)."""

    class EmitsDuringNegotiation(CommandDispatcher):
        def dispatch(self, name, arguments, session):  # type: ignore[no-untyped-def]
            result = super().dispatch(name, arguments, session)
            if name == "qmp_capabilities":
                server.emit_event("STOP")  # what a vCPU thread may do at that moment
            return result

    server = QmpServer(EmitsDuringNegotiation(FakeVm()), [f"unix:{tmp_path}/qmp.sock"])
    try:
        c = Raw(server.addresses[0])
        assert c.cmd(NEGOTIATE) == {"return": {}}
        server.emit_event("RESUME")
        assert c.read()["event"] == "RESUME"  # events flow once the reply went out
        c.close()
    finally:
        server.close()
