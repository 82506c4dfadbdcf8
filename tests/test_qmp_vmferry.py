"""The monitor on a real VM: `vmferry run` processes on real KVM, driven by the official async
qemu.qmp client (`QMPClient`) and by raw sockets, as an independent peer would.

The guest is `heartbeat` with hz=20: it prints `tick N` on COM1 (a file here), so "the guest is
running" is checked by watching the file grow, never by timing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from vmproc import VmProcess

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]

TIMEOUT = 60  # a bound on one test's body, for a hung VM or socket; nothing asserts on it
HEARTBEAT = ("-m", "16M", "--guest", "heartbeat", "--append", "hz=20")
REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "qmp.md"
_TICK = re.compile(r"tick (\d+)\n")


class Vm(VmProcess):
    """One `vmferry run` process: a QMP unix socket and COM1 in a file. Nothing else talks to
    its monitor, so every client in these tests is the official qemu.qmp one or a raw socket."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        super().__init__(tmp, name, *args, connect=False)

    def last_tick(self) -> int:
        ticks = _TICK.findall(self.serial())
        return int(ticks[-1]) if ticks else 0

    async def wait_ticks(self, more: int = 3, timeout: float = 30) -> int:
        """Wait until the guest printed `more` ticks beyond the last one printed so far."""
        start = self.last_tick()
        deadline = time.monotonic() + timeout
        while (now := self.last_tick()) < start + more:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: the guest stopped ticking at {now} (exit {self.proc.poll()}):\n"
                    f"{self.serial()[-500:]}\n--- log:\n{self.log()[-2000:]}")
            await asyncio.sleep(0.05)
        return now

    async def wait_exit(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running:\n{self.log()[-2000:]}")
            await asyncio.sleep(0.05)
        return code


@pytest.fixture
def start_vm(tmp_path: Path) -> Iterator[Callable[..., Vm]]:
    started: list[Vm] = []

    def start(*args: str, name: str = "vm") -> Vm:
        vm = Vm(tmp_path, name, *args)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.close()


def run(body: Awaitable[None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(body, TIMEOUT)

    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def qmp_client(vm: Vm, name: str = "test") -> AsyncIterator[QMPClient]:
    qmp = QMPClient(name)
    await qmp.connect(str(vm.qmp_path))
    try:
        yield qmp
    finally:
        # After quit / powerdown the server has hung up: disconnect re-raises that EOF.
        with contextlib.suppress(EOFError, ConnectionError):
            await qmp.disconnect()


async def error_of(qmp: QMPClient, cmd: str, args: dict | None = None) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as info:
        await qmp.execute(cmd, args)
    return info.value.error_class, info.value.error.error.desc


async def next_event(qmp: QMPClient) -> dict[str, Any]:
    return dict(await asyncio.wait_for(qmp.events.get(), 30))


def documented_commands() -> set[str]:
    text = DOCS.read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"^### `([^`]+)`", section, re.M))
    assert len(names) > 15, names  # the parse found the reference, not an empty section
    return names


# --- a running VM, every query and every refusal ------------------------------------------------


def test_session_queries_and_migration_settings_on_a_running_vm(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm(*HEARTBEAT, "--smp", "2")

    async def body() -> None:
        await vm.wait_ticks(1)
        async with qmp_client(vm) as qmp:
            greeting = qmp.greeting
            assert greeting is not None
            assert greeting.QMP.version["qemu"] == {"micro": 0, "minor": 2, "major": 7}
            assert greeting.QMP.version["package"].startswith("vmferry-")
            assert greeting.QMP.capabilities == ["oob"]  # and qemu.qmp negotiated {"enable": ["oob"]}
            version = await qmp.execute("query-version")
            assert version["qemu"] == {"micro": 0, "minor": 2, "major": 7}
            assert version["package"] == greeting.QMP.version["package"]

            names = [c["name"] for c in await qmp.execute("query-commands")]
            assert len(names) == len(set(names))
            assert documented_commands() <= set(names), documented_commands() - set(names)

            assert await qmp.execute("query-status") == {"status": "running", "running": True,
                                                         "singlestep": False}

            cpus = await qmp.execute("query-cpus-fast")
            assert [c["cpu-index"] for c in cpus] == [0, 1]
            tids = [c["thread-id"] for c in cpus]
            assert len(set(tids)) == 2 and vm.proc.pid not in tids
            for tid in tids:
                tasks = os.listdir(f"/proc/{vm.proc.pid}/task")
                assert str(tid) in tasks, (tid, tasks)
            assert all(c["target"] == "x86_64" and c["qom-path"] for c in cpus)

            assert await qmp.execute("query-migrate") == {}

            # Parameters: defaults, a round trip, all-or-nothing refusal naming the parameter.
            params = await qmp.execute("query-migrate-parameters")
            assert (params["downtime-limit"], params["max-bandwidth"]) == (300, 0)
            assert await qmp.execute("migrate-set-parameters",
                                     {"downtime-limit": 1234, "max-bandwidth": 5 << 20}) == {}
            params = await qmp.execute("query-migrate-parameters")
            assert (params["downtime-limit"], params["max-bandwidth"]) == (1234, 5 << 20)
            assert await error_of(qmp, "migrate-set-parameters",
                                  {"max-bandwidth": 1, "downtime-limit": 2_000_001}) == (
                "GenericError",
                "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 ms")
            klass, desc = await error_of(qmp, "migrate-set-parameters", {"cpu-throttle-initial": 0})
            assert klass == "GenericError" and "'cpu-throttle-initial'" in desc
            params = await qmp.execute("query-migrate-parameters")
            assert (params["downtime-limit"], params["max-bandwidth"]) == (1234, 5 << 20)

            # Capabilities: QEMU 7.2's list, a round trip; what vmferry cannot do is refused by name.
            caps = await qmp.execute("query-migrate-capabilities")
            assert [c["capability"] for c in caps if c["state"]] == ["return-path"]
            assert {"events", "xbzrle", "postcopy-ram", "multifd"} <= {c["capability"] for c in caps}
            assert await error_of(qmp, "migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}, {"capability": "postcopy-ram", "state": True}]}) == (
                "GenericError", "Capability 'postcopy-ram' is not supported by vmferry yet")
            await qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}, {"capability": "postcopy-ram", "state": False}]})
            on = {c["capability"] for c in await qmp.execute("query-migrate-capabilities") if c["state"]}
            assert on == {"events", "return-path"}

            assert await error_of(qmp, "migrate-start-postcopy") == (
                "GenericError", "Enable postcopy with migrate_set_capability before the start of migration")
            assert await error_of(qmp, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"}) == (
                "GenericError", "'-incoming' was not specified on the command line")

            # Bad URIs: refused naming the URI; no migration starts; the guest never notices.
            for uri, why in [("gopher:x", "unknown migration URI scheme"),
                             ("tcp:127.0.0.1:1", "Connection refused"),
                             (f"unix:{vm.qmp_path}.nothing-here", "No such file")]:
                klass, desc = await error_of(qmp, "migrate", {"uri": uri})
                assert klass == "GenericError" and uri in desc and why in desc, desc
            assert (await qmp.execute("query-migrate")).get("status") in (None, "failed")
            assert qmp.events.empty()  # not even a MIGRATION event with the capability on
            assert (await qmp.execute("query-status"))["status"] == "running"
            await vm.wait_ticks(3)

            # Refusals in QEMU's words.
            assert await error_of(qmp, "no-such-command") == (
                "CommandNotFound", "The command no-such-command has not been found")
            assert await error_of(qmp, "query-status", {"x": 1}) == (
                "GenericError", "Parameter 'x' is unexpected")
            assert await error_of(qmp, "migrate", {"uri": 5}) == (
                "GenericError", "Invalid parameter type for 'uri', expected: string")
            assert await error_of(qmp, "migrate-set-parameters", {"downtime-limit": "3"}) == (
                "GenericError", "Invalid parameter type for 'downtime-limit', expected: integer")
            assert await error_of(qmp, "migrate", {}) == ("GenericError", "Parameter 'uri' is missing")
            assert await error_of(qmp, "qmp_capabilities") == (
                "CommandNotFound", "Capabilities negotiation is already complete, command ignored")

            assert (await qmp.execute("query-status"))["status"] == "running"
        await vm.wait_ticks(3)

    run(body())


def test_stop_and_cont_reach_two_clients_and_the_guest(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm(*HEARTBEAT)

    async def body() -> None:
        await vm.wait_ticks(1)
        async with qmp_client(vm, "a") as a, qmp_client(vm, "b") as b:
            assert await a.execute("stop") == {}
            for qmp in (a, b):
                ev = await next_event(qmp)
                assert ev["event"] == "STOP" and "data" not in ev
                assert set(ev["timestamp"]) == {"seconds", "microseconds"}
            assert await b.execute("query-status") == {"status": "paused", "running": False,
                                                       "singlestep": False}
            # `stop` returns once every vCPU is out of KVM_RUN: nothing more reaches COM1.
            frozen = vm.serial()
            await asyncio.sleep(0.5)  # ten ticks' worth at hz=20
            assert vm.serial() == frozen
            assert await a.execute("stop") == {}  # already paused: no second STOP

            assert await b.execute("cont") == {}
            for qmp in (a, b):
                assert (await next_event(qmp))["event"] == "RESUME"
            assert (await a.execute("query-status"))["status"] == "running"
            await vm.wait_ticks(3)
            assert a.events.empty() and b.events.empty()

    run(body())


def test_quit_emits_shutdown_and_exits_0(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm(*HEARTBEAT)

    async def body() -> None:
        await vm.wait_ticks(1)
        async with qmp_client(vm, "a") as a, qmp_client(vm, "b") as b:
            assert await a.execute("quit") == {}
            for qmp in (a, b):
                ev = await next_event(qmp)
                assert ev["event"] == "SHUTDOWN"
                assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
            assert await vm.wait_exit() == 0
        assert not vm.qmp_path.exists()  # the monitor removed its socket

    run(body())


def test_system_powerdown_emits_powerdown_then_shutdown_and_exits(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm(*HEARTBEAT)

    async def body() -> None:
        await vm.wait_ticks(1)
        async with qmp_client(vm) as qmp:
            assert await qmp.execute("system_powerdown") == {}
            assert (await next_event(qmp))["event"] == "POWERDOWN"
            ev = await next_event(qmp)
            assert ev["event"] == "SHUTDOWN"
            assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}
            assert await vm.wait_exit() == 0

    run(body())


# --- a destination waiting for its stream -------------------------------------------------------


def test_destination_with_incoming_defer(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm("-m", "16M", "--incoming", "defer")

    async def body() -> None:
        async with qmp_client(vm) as qmp:
            assert await qmp.execute("query-status") == {"status": "inmigrate", "running": False,
                                                         "singlestep": False}
            assert await qmp.execute("query-migrate") == {}
            assert await error_of(qmp, "migrate", {"uri": "tcp:127.0.0.1:1"}) == (
                "GenericError", "Guest is waiting for an incoming migration")

            assert await qmp.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}) == {}
            info = await qmp.execute("query-migrate")
            assert info["status"] == "setup"
            [address] = info["socket-address"]
            assert address["type"] == "inet" and address["host"] == "127.0.0.1"
            port = int(address["port"])  # a string, as in QEMU's InetSocketAddress
            assert port > 0

            assert await error_of(qmp, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"}) == (
                "GenericError", "The incoming migration has already been started")
            assert await error_of(qmp, "migrate", {"uri": "tcp:127.0.0.1:1"}) == (
                "GenericError", "Guest is waiting for an incoming migration")
            assert (await qmp.execute("query-status"))["status"] == "inmigrate"

            # The reported port is the one listening: a peer sending garbage fails the incoming
            # migration and nothing else; the monitor keeps answering.
            with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
                peer.sendall(b"this is not a migration stream\n" * 4)
            deadline = time.monotonic() + 30
            while (info := await qmp.execute("query-migrate"))["status"] not in ("failed", "cancelled"):
                assert time.monotonic() < deadline, info
                await asyncio.sleep(0.05)
            assert info["status"] == "failed"
            assert vm.proc.poll() is None
            assert (await qmp.execute("query-version"))["qemu"]["major"] == 7

            assert await qmp.execute("quit") == {}
            assert (await next_event(qmp))["data"] == {"guest": False, "reason": "host-qmp-quit"}
            assert await vm.wait_exit() == 0

    run(body())


# --- raw sockets against the real process ---------------------------------------------------------


class Raw:
    """A bare QMP peer on the unix socket: bytes out, one JSON object per line back."""

    def __init__(self, vm: Vm) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(vm.qmp_path))
        self.file = self.sock.makefile("rb")
        self.greeting = self.recv()

    def negotiate(self) -> None:
        self.send(b'{"execute": "qmp_capabilities"}')
        assert self.recv() == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict:
        while True:
            line = self.file.readline()
            assert line.endswith(b"\n"), f"connection closed: {line!r}"
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture(scope="module")
def raw_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    vm = Vm(tmp_path_factory.mktemp("raw"), "raw", *HEARTBEAT)
    try:
        yield vm
    finally:
        vm.close()


def _status(id_: object) -> bytes:
    return json.dumps({"execute": "query-status", "id": id_}).encode()


def _running(id_: object) -> dict:
    return {"return": {"status": "running", "running": True, "singlestep": False}, "id": id_}


def _malformed_json(raw: Raw) -> None:
    raw.negotiate()
    raw.send(b'{"execute": "query-status",}')
    reply = raw.recv()
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith("JSON parse error, "), reply
    raw.send(b"]")
    assert raw.recv()["error"]["desc"] == "JSON parse error, unexpected ']'"
    raw.send(_status("after"))
    assert raw.recv() == _running("after")


def _one_byte_writes(raw: Raw) -> None:
    # An id full of what the scanner must not take for structure: quotes, brackets, escapes.
    tricky = {"s": r'a "quoted" {brace} [bracket] \ back\"slash'}
    for request, reply in [
        (b'{"execute": "qmp_capabilities", "id": "neg"}', {"return": {}, "id": "neg"}),
        (_status(tricky), _running(tricky)),
        (_status(2), _running(2)),
    ]:
        for byte in request:
            raw.send(bytes([byte]))
            time.sleep(0.001)  # give the server a chance to read each byte on its own
        assert raw.recv() == reply


def _several_objects_in_one_write(raw: Raw) -> None:
    raw.send(b'{"execute": "qmp_capabilities", "id": 0}' + _status(1) + b" \n" + _status(2)
             + b'{"execute": "nope", "id": 3}' + _status(4))
    assert raw.recv() == {"return": {}, "id": 0}
    assert raw.recv() == _running(1)
    assert raw.recv() == _running(2)
    assert raw.recv()["error"] == {"class": "CommandNotFound", "desc": "The command nope has not been found"}
    assert raw.recv() == _running(4)


def _oversized_input(raw: Raw) -> None:
    raw.negotiate()
    pad = "A" * (3 << 20)
    raw.send(json.dumps({"execute": "query-status", "id": "big", "arguments": {"pad": pad}}).encode())
    assert raw.recv() == {"error": {"class": "GenericError",
                                    "desc": "JSON parse error, input exceeds the limit of 1048576 bytes"}}
    raw.send(b"[" * 10000 + b"]" * 10000)  # nesting beyond any command
    assert raw.recv()["error"]["desc"] == "JSON parse error, nesting too deep"
    raw.send(_status("after"))
    assert raw.recv() == _running("after")


def _command_before_negotiation(raw: Raw) -> None:
    assert raw.greeting["QMP"]["capabilities"] == ["oob"]
    raw.send(_status(7))
    assert raw.recv() == {"error": {"class": "CommandNotFound",
                                    "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
                          "id": 7}
    raw.send(b'{"execute": "stop"}')  # refused: the guest keeps running
    assert raw.recv()["error"]["class"] == "CommandNotFound"
    raw.negotiate()
    raw.send(_status(8))
    assert raw.recv() == _running(8)


def _half_a_command_then_gone(raw: Raw) -> None:
    raw.negotiate()
    raw.send(b'{"execute": "query-st')


def _commands_unread_then_gone(raw: Raw) -> None:
    raw.negotiate()
    raw.send(b"".join(_status(i) for i in range(200)))


@pytest.mark.parametrize("case", [
    _malformed_json, _one_byte_writes, _several_objects_in_one_write, _oversized_input,
    _command_before_negotiation, _half_a_command_then_gone, _commands_unread_then_gone,
], ids=lambda f: f.__name__.strip("_"))
def test_raw_socket(raw_vm: Vm, case: Callable[[Raw], None]) -> None:
    raw = Raw(raw_vm)
    try:
        case(raw)
    finally:
        raw.close()

    async def still_serving() -> None:
        async with qmp_client(raw_vm) as qmp:
            assert (await qmp.execute("query-status"))["status"] == "running"
        await raw_vm.wait_ticks(3)

    run(still_serving())
    assert raw_vm.proc.poll() is None


# --- known bug ------------------------------------------------------------------------------------


def _syn_sent_to(port: int) -> bool:
    """A connect to 127.0.0.1:`port` is waiting for its SYN to be answered (/proc/net/tcp)."""
    target = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[2] == target and line.split()[3] == "02" for line in list(f)[1:])


def test_monitor_answers_while_migrate_connects(start_vm: Callable[..., Vm]) -> None:
    vm = start_vm(*HEARTBEAT)
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect hangs
    # (as to a host that drops packets) until connect_outgoing's timeout.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):

            async def body() -> None:
                async with qmp_client(vm, "a") as a, qmp_client(vm, "b") as b:
                    migrate = asyncio.create_task(a.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"}))
                    while not _syn_sent_to(port):  # the migrate is connecting now
                        assert not migrate.done(), migrate
                        await asyncio.sleep(0.02)
                    assert (await b.execute("query-status"))["status"] == "running"
                    # The other client was answered while the migration was still connecting
                    # (or after migrate returned at once, as QEMU's does).
                    assert not migrate.done() or migrate.exception() is None, migrate.exception()
                    with contextlib.suppress(ExecuteError):
                        await migrate

            run(body())
