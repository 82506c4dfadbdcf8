"""The monitor through the official qemu.qmp client, over real unix and tcp sockets."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest
from qemu.qmp import ExecuteError, QMPClient

from vmferry.errors import MigrationError
from vmferry.migration.params import (
    CAPABILITIES,
    EFFECTIVE_CAPABILITIES,
    EFFECTIVE_PARAMETERS,
    PARAMETER_SPECS,
    MigrationCapabilities,
    MigrationParameters,
)
from vmferry.monitor import CommandDispatcher, QmpServer
from vmferry.monitor.backend import MonitorBackend
from vmferry.monitor.objects import ObjectRegistry

TIMEOUT = 20


class FakeVm:
    """A stand-in VMM with just enough state to exercise every command; emits events as the real
    one must (through `emit`, wired to the server after it starts)."""

    def __init__(self, status: str = "running") -> None:
        self.status = status
        self.migration: dict = {}
        self.migration_parameters = MigrationParameters()
        self.migration_capabilities = MigrationCapabilities()
        self.objects = ObjectRegistry()
        self.migrate_calls: list[str] = []
        self.emit: Callable[..., None] = lambda name, data=None: None
        self.quit_requested = threading.Event()
        self.incoming: str | None = None
        self.powerdowns = 0

    def query_status(self) -> dict:
        return {"status": self.status, "running": self.status == "running"}

    def stop(self) -> None:
        if self.status == "running":
            self.status = "paused"
            self.emit("STOP")

    def cont(self) -> None:
        self.status = "running"
        self.emit("RESUME")

    def quit(self) -> None:
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.quit_requested.set()

    def system_powerdown(self) -> None:
        self.powerdowns += 1
        self.emit("POWERDOWN")

    def query_cpus_fast(self) -> list[dict]:
        return [{"cpu-index": i, "thread-id": 1000 + i} for i in range(2)]

    def _migration_event(self, status: str) -> None:
        self.migration = {"status": status}
        if self.migration_capabilities.enabled("events"):
            self.emit("MIGRATION", {"status": status})

    def migrate(self, uri: str) -> None:
        self.migrate_calls.append(uri)
        if uri == "crash:":
            raise RuntimeError("a bug in the migration code")
        if not uri.startswith(("tcp:", "unix:")):
            raise MigrationError(f"unsupported migration URI '{uri}'")
        self._migration_event("setup")
        if self.migration_capabilities.enabled("events"):
            self.emit("MIGRATION_PASS", {"pass": 1})
        self._migration_event("active")

    def migrate_incoming(self, uri: str) -> None:
        if self.incoming is not None:
            raise MigrationError("The incoming migration has already been started")
        self.incoming = uri

    def migrate_cancel(self) -> None:
        if self.migration.get("status") == "active":
            self._migration_event("cancelled")

    def query_migrate(self) -> dict:
        return dict(self.migration)


def test_fake_vm_is_a_monitor_backend() -> None:
    assert isinstance(FakeVm(), MonitorBackend)


@pytest.fixture
def vm_server(tmp_path) -> Iterator[tuple[FakeVm, QmpServer]]:
    vm = FakeVm()
    server = QmpServer(CommandDispatcher(vm), [f"unix:{tmp_path}/qmp.sock", "tcp:127.0.0.1:0"])
    vm.emit = server.emit_event
    yield vm, server
    server.close()


def _client_address(address: str) -> str | tuple[str, int]:
    kind, _, rest = address.partition(":")
    if kind == "unix":
        return rest
    host, _, port = rest.rpartition(":")
    return host, int(port)


def run(server: QmpServer, body: Callable[..., Awaitable[None]], n: int = 1, which: int = 0) -> None:
    """Connect `n` qemu.qmp clients to the server's address number `which`; run body(*clients)."""

    async def main() -> None:
        clients = [QMPClient(f"test{i}") for i in range(n)]
        for c in clients:
            await c.connect(_client_address(server.addresses[which]))
        try:
            await asyncio.wait_for(body(*clients), TIMEOUT)
        finally:
            for c in clients:
                await c.disconnect()

    asyncio.run(main())


async def error_of(qmp: QMPClient, cmd: str, args: dict | None = None) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as info:
        await qmp.execute(cmd, args)
    return info.value.error_class, info.value.error.error.desc


@pytest.mark.parametrize("which", [0, 1], ids=["unix", "tcp"])
def test_greeting_negotiation_and_basic_commands(vm_server, which: int) -> None:
    vm, server = vm_server

    async def body(qmp: QMPClient) -> None:
        assert qmp.greeting is not None
        assert qmp.greeting.QMP.version["qemu"] == {"micro": 0, "minor": 2, "major": 7}
        assert "oob" in qmp.greeting.QMP.capabilities  # and qemu.qmp negotiated {"enable": ["oob"]}
        assert (await qmp.execute("query-version"))["package"].startswith("vmferry-")
        names = {c["name"] for c in await qmp.execute("query-commands")}
        assert {"qmp_capabilities", "migrate", "query-migrate-parameters", "migrate-start-postcopy"} <= names
        assert await qmp.execute("query-status") == {
            "status": "running",
            "running": True,
            "singlestep": False,
        }
        cpus = await qmp.execute("query-cpus-fast")
        assert [c["cpu-index"] for c in cpus] == [0, 1]
        assert cpus[1]["thread-id"] == 1001 and cpus[1]["target"] == "x86_64" and "qom-path" in cpus[1]
        assert await error_of(qmp, "qmp_capabilities") == (
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
        )
        assert await error_of(qmp, "no-such-command") == (
            "CommandNotFound",
            "The command no-such-command has not been found",
        )

    run(server, body, which=which)


def test_stop_cont_quit_powerdown_and_their_events(vm_server) -> None:
    vm, server = vm_server

    async def body(qmp: QMPClient) -> None:
        assert await qmp.execute("stop") == {}
        assert (await qmp.events.get())["event"] == "STOP"
        assert (await qmp.execute("query-status"))["status"] == "paused"
        await qmp.execute("cont")
        assert (await qmp.events.get())["event"] == "RESUME"
        await qmp.execute("system_powerdown")
        assert (await qmp.events.get())["event"] == "POWERDOWN"
        assert await qmp.execute("quit") == {}
        ev = await qmp.events.get()
        assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}

    run(server, body)
    assert vm.quit_requested.is_set() and vm.powerdowns == 1


def test_argument_validation_errors_in_qemu_words(vm_server) -> None:
    vm, server = vm_server

    async def body(qmp: QMPClient) -> None:
        assert await error_of(qmp, "stop", {"x": 1}) == ("GenericError", "Parameter 'x' is unexpected")
        assert await error_of(qmp, "migrate", {}) == ("GenericError", "Parameter 'uri' is missing")
        assert await error_of(qmp, "migrate", {"uri": 5}) == (
            "GenericError",
            "Invalid parameter type for 'uri', expected: string",
        )
        assert await error_of(qmp, "migrate-set-parameters", {"downtime-limit": "3"}) == (
            "GenericError",
            "Invalid parameter type for 'downtime-limit', expected: integer",
        )
        assert await error_of(qmp, "migrate-set-parameters", {"multifd-channels": 300}) == (
            "GenericError",
            "Parameter 'multifd-channels' expects uint8",
        )
        assert await error_of(
            qmp, "migrate-set-capabilities", {"capabilities": [{"capability": "events"}]}
        ) == ("GenericError", "Parameter 'capabilities[0].state' is missing")
        assert await error_of(
            qmp, "migrate-set-capabilities", {"capabilities": [{"capability": "warp", "state": True}]}
        ) == ("GenericError", "Parameter 'capabilities[0].capability' does not accept value 'warp'")

    run(server, body)


def test_migration_parameters_and_capabilities(vm_server) -> None:
    vm, server = vm_server

    async def body(qmp: QMPClient) -> None:
        params = await qmp.execute("query-migrate-parameters")
        assert params["max-bandwidth"] == 0 and params["downtime-limit"] == 300
        assert params["multifd-channels"] == 2 and params["multifd-compression"] == "none"
        assert params["tls-creds"] == "" and params["cpu-throttle-initial"] == 20
        await qmp.execute(
            "migrate-set-parameters",
            {
                "max-bandwidth": 1 << 30,
                "downtime-limit": 500,
                "tls-creds": None,
                "multifd-compression": "none",  # its default: accepted, changes nothing
            },
        )
        params = await qmp.execute("query-migrate-parameters")
        assert (params["max-bandwidth"], params["downtime-limit"], params["multifd-compression"]) == (
            1 << 30,
            500,
            "none",
        )
        await qmp.execute("migrate-set-parameters", {"multifd-compression": "zstd"})  # effective
        assert (await qmp.execute("query-migrate-parameters"))["multifd-compression"] == "zstd"
        assert await error_of(qmp, "migrate-set-parameters", {"compress-level": 5}) == (
            "GenericError", "Parameter 'compress-level' is not supported by vmferry yet")
        assert await error_of(
            qmp, "migrate-set-parameters", {"downtime-limit": 2_000_001, "max-bandwidth": 1}
        ) == ("GenericError", "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 ms")
        assert await error_of(qmp, "migrate-set-parameters", {"max-bandwidth": -1}) == (
            "GenericError",
            "Parameter 'max-bandwidth' expects an integer in the range of 0 to "
            "18446744073709551615 bytes/second",
        )
        assert (await qmp.execute("query-migrate-parameters"))["max-bandwidth"] == 1 << 30  # all or nothing

        caps = await qmp.execute("query-migrate-capabilities")
        assert [c["capability"] for c in caps] == list(CAPABILITIES)
        assert [c["capability"] for c in caps if c["state"]] == ["return-path"]
        await qmp.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )
        assert {"capability": "events", "state": True} in await qmp.execute("query-migrate-capabilities")
        assert await error_of(
            qmp,
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "postcopy-preempt", "state": True}]},
        ) == ("GenericError", "Capability 'postcopy-preempt' is not supported by vmferry yet")

    run(server, body)
    assert vm.migration_parameters.downtime_limit == 500  # what the migration thread will read


def test_migration_commands_and_events(vm_server) -> None:
    vm, server = vm_server

    async def body(qmp: QMPClient) -> None:
        assert await qmp.execute("query-migrate") == {}
        await qmp.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )
        assert await qmp.execute("migrate", {"uri": "tcp:127.0.0.1:1", "detach": True}) == {}
        seen = [(await qmp.events.get()) for _ in range(3)]
        assert [(e["event"], e["data"]) for e in seen] == [
            ("MIGRATION", {"status": "setup"}),
            ("MIGRATION_PASS", {"pass": 1}),
            ("MIGRATION", {"status": "active"}),
        ]
        assert (await qmp.execute("query-migrate"))["status"] == "active"
        assert await error_of(qmp, "migrate", {"uri": "tcp:127.0.0.1:1"}) == (
            "GenericError",
            "There's a migration process in progress",
        )
        assert await error_of(
            qmp, "migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]}
        ) == ("GenericError", "There's a migration process in progress")
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 1000})  # allowed while migrating
        assert await error_of(qmp, "migrate-start-postcopy") == (
            "GenericError",
            "Postcopy is not supported yet",
        )
        assert await error_of(qmp, "migrate", {"uri": "tcp:x:1", "resume": True}) == (
            "GenericError",
            "Postcopy recovery is not supported yet",
        )
        await qmp.execute("migrate_cancel")
        assert (await qmp.events.get())["data"] == {"status": "cancelled"}
        assert await error_of(qmp, "migrate", {"uri": "gopher:x"}) == (
            "GenericError",
            "unsupported migration URI 'gopher:x'",
        )
        assert await error_of(qmp, "migrate", {"uri": "crash:"}) == (
            "GenericError",
            "Internal error: RuntimeError: a bug in the migration code",
        )
        assert await error_of(qmp, "migrate-incoming", {"uri": "tcp:0:1"}) == (
            "GenericError",
            "'-incoming' was not specified on the command line",
        )
        vm.status = "postmigrate"
        assert await error_of(qmp, "migrate", {"uri": "tcp:127.0.0.1:1"}) == (
            "GenericError",
            "Can't migrate the vm that was paused due to previous migration",
        )
        vm.status = "inmigrate"
        assert await error_of(qmp, "migrate", {"uri": "tcp:127.0.0.1:1"}) == (
            "GenericError",
            "Guest is waiting for an incoming migration",
        )
        assert await qmp.execute("migrate-incoming", {"uri": "tcp:0.0.0.0:4444"}) == {}
        assert await error_of(qmp, "migrate-incoming", {"uri": "tcp:0.0.0.0:4444"}) == (
            "GenericError",
            "The incoming migration has already been started",
        )

    run(server, body)
    assert vm.incoming == "tcp:0.0.0.0:4444"


_UNSUPPORTED_CAPS = [c for c in CAPABILITIES if c not in EFFECTIVE_CAPABILITIES]


@pytest.mark.parametrize("name", _UNSUPPORTED_CAPS)
def test_unsupported_capability_refused_over_qmp(vm_server, name: str) -> None:
    vm, server = vm_server

    async def body(qmp: QMPClient) -> None:
        assert await error_of(qmp, "migrate-set-capabilities",
                              {"capabilities": [{"capability": name, "state": True}]}) == (
            "GenericError", f"Capability '{name}' is not supported by vmferry yet")
        off = {"capabilities": [{"capability": name, "state": False}]}
        await qmp.execute("migrate-set-capabilities", off)
        caps = await qmp.execute("query-migrate-capabilities")
        assert {"capability": name, "state": False} in caps  # still listed for clients that probe

    run(server, body)


_UNSUPPORTED_PARAMS = [s for s in PARAMETER_SPECS if s.qmp_name not in EFFECTIVE_PARAMETERS]


@pytest.mark.parametrize("spec", _UNSUPPORTED_PARAMS, ids=[s.qmp_name for s in _UNSUPPORTED_PARAMS])
def test_unsupported_parameter_refused_over_qmp(vm_server, spec) -> None:
    vm, server = vm_server
    default = MigrationParameters().to_qmp()[spec.qmp_name]
    if isinstance(default, bool):
        other: object = not default
    elif isinstance(default, str):
        other = next(c for c in spec.choices if c != default)
    else:
        other = default * 2 if spec.qmp_name == "xbzrle-cache-size" else (
            spec.lo if default != spec.lo else spec.lo + 1)

    async def body(qmp: QMPClient) -> None:
        assert await error_of(qmp, "migrate-set-parameters", {spec.qmp_name: other}) == (
            "GenericError", f"Parameter '{spec.qmp_name}' is not supported by vmferry yet")
        await qmp.execute("migrate-set-parameters", {spec.qmp_name: default})
        assert (await qmp.execute("query-migrate-parameters"))[spec.qmp_name] == default

    run(server, body)


def test_return_path_cannot_be_turned_off_over_qmp(vm_server) -> None:
    vm, server = vm_server

    async def body(qmp: QMPClient) -> None:
        klass, desc = await error_of(qmp, "migrate-set-capabilities",
                                     {"capabilities": [{"capability": "return-path", "state": False}]})
        assert klass == "GenericError" and desc.startswith("Capability 'return-path' cannot be turned off")
        await qmp.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "return-path", "state": True}]})

    run(server, body)
    assert vm.migration_capabilities.enabled("return-path")


def test_destination_accepts_capabilities_until_the_stream_arrives(vm_server) -> None:
    vm, server = vm_server
    vm.status = "inmigrate"
    vm.migration = {"status": "setup"}  # listening, as after --incoming tcp:...
    events_on = {"capabilities": [{"capability": "events", "state": True}]}

    async def body(qmp: QMPClient) -> None:
        assert await qmp.execute("migrate-set-capabilities", events_on) == {}
        await qmp.execute("migrate-set-parameters", {"downtime-limit": 100})
        vm.migration = {"status": "active"}  # the stream arrived
        assert await error_of(qmp, "migrate-set-capabilities", events_on) == (
            "GenericError", "There's a migration process in progress")
        vm.status, vm.migration = "running", {"status": "setup"}  # a source in setup: refused
        assert await error_of(qmp, "migrate-set-capabilities", events_on) == (
            "GenericError", "There's a migration process in progress")

    run(server, body)
    assert vm.migration_capabilities.enabled("events")


@pytest.mark.parametrize("uri", ["tcp:127.0.0.1:4444", "unix:/tmp/x.sock", "exec:cat > /dev/null",
                                 "file:/tmp/snap"])
def test_missing_tls_creds_refuse_migrate_before_anything_is_sent(vm_server, uri: str) -> None:
    vm, server = vm_server

    async def body(qmp: QMPClient) -> None:
        await qmp.execute("migrate-set-parameters", {"tls-creds": "tls0", "tls-hostname": "dst.example"})
        assert await error_of(qmp, "migrate", {"uri": uri}) == (
            "GenericError", "No TLS credentials with id 'tls0'")
        assert await qmp.execute("query-migrate") == {}
        await qmp.execute("migrate-set-parameters", {"tls-creds": ""})  # plain text asked: goes
        with contextlib.suppress(ExecuteError):  # the fake VMM knows only tcp: and unix:
            await qmp.execute("migrate", {"uri": uri})

    run(server, body)
    assert vm.migrate_calls == [uri]  # only the plain-text migration reached the VMM


def test_two_clients_both_receive_events_from_other_threads(vm_server) -> None:
    vm, server = vm_server

    async def body(a: QMPClient, b: QMPClient) -> None:
        def migration_thread() -> None:
            for n in range(1, 6):
                server.emit_event("MIGRATION_PASS", {"pass": n})

        threads = [threading.Thread(target=migration_thread) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for client in (a, b):
            passes = sorted([(await client.events.get())["data"]["pass"] for _ in range(10)])
            assert passes == sorted(list(range(1, 6)) * 2)
        # A command's events reach the other client too.
        await a.execute("stop")
        assert (await b.events.get())["event"] == "STOP"

    run(server, body, n=2)


def test_clients_on_unix_and_tcp_at_once(vm_server) -> None:
    vm, server = vm_server

    async def main() -> None:
        unix, tcp = QMPClient("u"), QMPClient("t")
        await unix.connect(_client_address(server.addresses[0]))
        await tcp.connect(_client_address(server.addresses[1]))
        await unix.execute("stop")
        assert (await asyncio.wait_for(tcp.events.get(), TIMEOUT))["event"] == "STOP"
        assert (await tcp.execute("query-status"))["status"] == "paused"
        await unix.disconnect()
        await tcp.disconnect()

    asyncio.run(main())
