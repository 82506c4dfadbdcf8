"""A network link on one machine: a network namespace, a veth pair into it, and `tc tbf` shaping.

The recipe of /work/shared/BENCHMARKS.md ("A 1 Gbit/s link on one machine"): the destination runs
in the namespace (`exec_prefix`), the source on the host reaches it at `address` over the veth
pair. The link can go down and up (failure tests) and be shaped to a rate. Root and iproute2
(`ip`, `tc`) are needed.

Nothing is left behind: `veth_link()` deletes the namespace however its block ends, which also
destroys the veth pair (the namespace's end is deleted with the namespace, and a veth's peer
with it). The pair is made with its peer already in the namespace, in one command, so no
failure can leave a lone pair on the host. A process killed outright (SIGKILL) runs no
`finally`: its namespace carries its pid in its name, and the next `veth_link()` of any process
deletes those whose process has gone.

This kernel has no `netem`: delay and loss cannot be added. tbf's `latency` is not a delay but
the longest a packet may wait in the shaper's queue before it is dropped.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NAME_PREFIX = "vmferry-"
_OURS = re.compile(rf"{NAME_PREFIX}(\d+)-[0-9a-f]{{6}}")
# Subnets are picked from here at random, and never one that an address on the host is in.
_SUBNETS = ipaddress.ip_network("10.200.0.0/14")
TIMEOUT_S = 30


class LinkError(RuntimeError):
    """A command setting up or changing the link failed; says which, and what it printed."""


def available() -> str | None:
    """Why a link cannot be made here (no root, no iproute2), or None when it can."""
    if os.geteuid() != 0:
        return "a network namespace link needs root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"a network namespace link needs iproute2 ({', '.join(missing)} not found)"
    return None


def _run(*cmd: str) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LinkError(f"{' '.join(cmd)}: {e}") from e
    if r.returncode:
        raise LinkError(f"{' '.join(cmd)}: {r.stderr.strip() or f'exit status {r.returncode}'}")
    return r.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete the namespaces of ours whose process is gone (killed before it could clean up);
    returns their names. Another live process's namespaces are left alone."""
    removed = []
    for name in (line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()):
        m = _OURS.fullmatch(name)
        if m and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(LinkError):
                _run("ip", "netns", "del", name)
                removed.append(name)
    return removed


def _free_subnet() -> ipaddress.IPv4Network:
    used = [ipaddress.ip_interface(a).network for a in
            re.findall(r"inet (\S+)", _run("ip", "-4", "-o", "addr", "show"))]
    for _ in range(100):
        index = secrets.randbelow(1 << (24 - _SUBNETS.prefixlen))
        net = ipaddress.ip_network((int(_SUBNETS.network_address) + (index << 8), 24))
        if not any(net.overlaps(u) for u in used):
            return net
    raise LinkError(f"no free /24 in {_SUBNETS} after 100 tries")


@dataclass
class Shaping:
    """tc tbf parameters: `rate` as tc spells it ("1gbit", "500mbit"); `burst` the bucket;
    `latency` the longest a packet may queue before tbf drops it (not an added delay)."""

    rate: str
    burst: str = "256kb"
    latency: str = "50ms"

    def args(self) -> list[str]:
        return ["tbf", "rate", self.rate, "burst", self.burst, "latency", self.latency]


GIGABIT = Shaping("1gbit")


@dataclass
class VethLink:
    """A link made by `veth_link()`: the namespace, the host's end of the veth pair (the side
    the source is on) and the namespace's end, with each end's address."""

    namespace: str
    host_if: str
    peer_if: str
    host_address: str
    address: str  # the namespace's end: where a destination in the namespace listens

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        """Runs a command in the namespace (`ip netns exec` execs it in place: same pid)."""
        return ("ip", "netns", "exec", self.namespace)

    def down(self) -> None:
        """The host's end goes down: nothing passes either way until `up()`."""
        _run("ip", "link", "set", self.host_if, "down")

    def up(self) -> None:
        _run("ip", "link", "set", self.host_if, "up")

    def shape(self, shaping: Shaping | None, *, both_ways: bool = False) -> None:
        """Shape what the host sends (and with `both_ways` what the namespace sends back) with
        tbf; None removes the shaping."""
        ends = [((), self.host_if, True), (("-n", self.namespace), self.peer_if, both_ways)]
        for netns, dev, shaped in ends:
            if shaping is not None and shaped:
                _run("tc", *netns, "qdisc", "replace", "dev", dev, "root", *shaping.args())
            else:
                with contextlib.suppress(LinkError):  # fails when there is no shaping to remove
                    _run("tc", *netns, "qdisc", "del", "dev", dev, "root")

    def qdisc(self, *, peer: bool = False) -> str:
        """`tc qdisc show` of one end."""
        netns = ("-n", self.namespace) if peer else ()
        return _run("tc", *netns, "qdisc", "show", "dev", self.peer_if if peer else self.host_if)

    def tx_bytes(self) -> int:
        """Bytes the host's end has sent (every byte on the wire, headers included)."""
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/tx_bytes").read_text())


@contextlib.contextmanager
def veth_link(shaping: Shaping | None = None, *, both_ways: bool = False) -> Iterator[VethLink]:
    """A namespace of its own with a veth pair into it, up and addressed, shaped with `shaping`
    on the host's end (both ends with `both_ways`); deleted however the block ends."""
    why_not = available()
    if why_not:
        raise LinkError(why_not)
    remove_stale()
    tag = secrets.token_hex(3)
    namespace = f"{NAME_PREFIX}{os.getpid()}-{tag}"
    host_if, peer_if = f"vmf{tag}h", f"vmf{tag}n"  # interface names: 15 characters at most
    net = _free_subnet()
    host_address, address = str(net[1]), str(net[2])
    _run("ip", "netns", "add", namespace)
    try:
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", namespace)
        _run("ip", "addr", "add", f"{host_address}/24", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", peer_if)
        _run("ip", "-n", namespace, "link", "set", peer_if, "up")
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        # While the veth is down its route is gone, and the host's default route would take
        # packets for the namespace elsewhere (where a sandbox's proxy may even accept them):
        # a blackhole route behind the veth's keeps them on a dead link, as a real one is.
        _run("ip", "route", "add", "blackhole", str(net), "metric", "1000")
        link = VethLink(namespace, host_if, peer_if, host_address, address)
        if shaping is not None:
            link.shape(shaping, both_ways=both_ways)
        yield link
    finally:
        # The namespace's end goes with the namespace, the host's end with its peer; deleting
        # the host's end first too keeps the pair from outliving a namespace still held open by
        # a process running in it.
        with contextlib.suppress(LinkError):
            _run("ip", "route", "del", "blackhole", str(net), "metric", "1000")
        with contextlib.suppress(LinkError):
            _run("ip", "link", "del", host_if)
        _run("ip", "netns", "del", namespace)
