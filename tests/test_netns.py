"""vmferry.testing.netns: the namespace link the failure tests and the link benchmarks use.

Real namespaces, a real veth pair and real tc; needs root and iproute2 (on CI a missing one is a
failure, elsewhere a skip). No speed is asserted: only that the shaping is installed as asked,
that the link carries a connection, that a link down carries none, and that nothing is left."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from polling import wait_for
from vmferry.testing import netns
from vmferry.testing.netns import GIGABIT, LinkError, Shaping, VethLink, veth_link

ECHO = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hello"); c.close()
"""


@pytest.fixture(autouse=True)
def _need_link() -> None:
    why_not = netns.available()
    if why_not:
        if os.environ.get("VMFERRY_REQUIRE_KVM") == "1":
            pytest.fail(why_not)
        pytest.skip(why_not)


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _ours() -> tuple[set[str], set[str]]:
    """This process's namespaces and the module's veth ends (other jobs on the machine may make
    links of their own meanwhile: only ours are compared)."""
    mine = f"{netns.NAME_PREFIX}{os.getpid()}-"
    return ({n for n in _namespaces() if n.startswith(mine)},
            {i for i in os.listdir("/sys/class/net") if i.startswith("vmf")})


@pytest.fixture
def echo() -> Iterator[tuple[VethLink, int]]:
    """A link and the port of a server in its namespace that says hello to each connection."""
    with veth_link() as link:
        server = subprocess.Popen([*link.exec_prefix, sys.executable, "-c", ECHO, link.address],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            yield link, int(server.stdout.readline())
        finally:
            server.kill()
            server.wait()


def _hello(address: str, port: int, timeout_s: float) -> bytes:
    with socket.create_connection((address, port), timeout=timeout_s) as s:
        return s.recv(16)


def test_the_link_carries_a_connection_into_the_namespace(echo: tuple[VethLink, int]) -> None:
    link, port = echo
    assert link.namespace in _namespaces()
    assert _hello(link.address, port, 30) == b"hello"


def test_a_link_down_carries_nothing_until_it_is_up_again(echo: tuple[VethLink, int]) -> None:
    link, port = echo
    link.down()
    with pytest.raises(OSError):  # a timeout, or unreachable: never a connection
        _hello(link.address, port, 1)
    link.up()

    def connects() -> bool:
        try:
            return _hello(link.address, port, 5) == b"hello"
        except OSError:
            return False

    wait_for(connects, "a connection over the link up again")


def test_shaping_one_way_both_ways_and_off() -> None:
    with veth_link(GIGABIT) as link:
        assert "tbf" in link.qdisc() and "rate 1Gbit" in link.qdisc()
        assert "tbf" not in link.qdisc(peer=True)
        link.shape(Shaping("500mbit", latency="20ms"), both_ways=True)
        for peer in (False, True):
            assert "rate 500Mbit" in link.qdisc(peer=peer) and "lat 20ms" in link.qdisc(peer=peer)
        link.shape(GIGABIT)
        assert "rate 1Gbit" in link.qdisc() and "tbf" not in link.qdisc(peer=True)
        link.shape(None)
        assert "tbf" not in link.qdisc() and "tbf" not in link.qdisc(peer=True)


def test_nothing_is_left_when_the_block_raises() -> None:
    before = _ours()
    with pytest.raises(RuntimeError, match="inside"), veth_link(GIGABIT) as link:
        assert link.namespace in _ours()[0] and link.host_if in _ours()[1]
        raise RuntimeError("inside")
    assert _ours() == before


def test_a_bad_rate_is_an_error_naming_the_command_and_leaves_nothing() -> None:
    before = _ours()
    with pytest.raises(LinkError, match="tc .*qdisc replace .*rate fast"), veth_link(Shaping("fast")):
        pass
    assert _ours() == before


def test_a_killed_owners_namespace_is_removed_and_a_live_ones_kept() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = f"{netns.NAME_PREFIX}{gone.pid}-abcdef"
    alive = f"{netns.NAME_PREFIX}{os.getpid()}-fedcba"
    other = f"{netns.NAME_PREFIX}bench"  # not of the pattern: someone else's, never touched
    for name in (dead, alive, other):
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        removed = netns.remove_stale()
        assert dead in removed and dead not in _namespaces()
        assert alive in _namespaces() and other in _namespaces()
    finally:
        for name in (dead, alive, other):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
