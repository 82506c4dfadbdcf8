"""Several channels (capability multifd) between two real `vmferry run` processes on real KVM.

The proof is the `dirty` guest's own full-memory check on the destination after switchover; the
`multifd-bytes` of query-migrate, on both sides, shows the pages did travel on the data channels.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmproc import QmpReplyError, VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "256M"
DIRTY = "ws=32 rate=20 verify=1 check=full"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[VmProcess]]:
    started: list[VmProcess] = []
    yield started
    for p in started:
        p.close()


def _source(tmp: Path, procs: list[VmProcess], channels: int, compression: str = "none") -> VmProcess:
    src = VmProcess(tmp, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    src.wait_serial(r"verify ok")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    src.cmd("migrate-set-parameters", **{"multifd-channels": channels, "multifd-compression": compression})
    return src


def _dest(tmp: Path, procs: list[VmProcess], incoming: str) -> VmProcess:
    dst = VmProcess(tmp, "dst", "-m", MEM, "--incoming", incoming)
    procs.append(dst)
    return dst


def _listen_uri(dst: VmProcess) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"incoming migration on (\S+)", dst.log())
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise AssertionError(f"destination never listened: {dst.log()}")


def _assert_verified(dst: VmProcess) -> None:
    start = len(dst.serial())
    dst.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
    assert "FAIL" not in dst.serial()


def _assert_source_survives(src: VmProcess) -> None:
    assert src.status() == "running"
    start = len(src.serial())
    src.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
    assert "FAIL" not in src.serial()


@pytest.mark.parametrize(("transport", "channels", "compression"),
                         [("tcp", 2, "none"), ("unix", 2, "zstd"), ("tcp", 3, "auto")])
def test_multifd_migrates_a_dirtying_guest_and_it_verifies(
    tmp_path: Path, procs: list[VmProcess], transport: str, channels: int, compression: str
) -> None:
    src = _source(tmp_path, procs, channels, compression)
    incoming = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/mig.sock"
    dst = _dest(tmp_path, procs, incoming)
    src.cmd("migrate", uri=_listen_uri(dst))
    info = src.wait_migration(timeout=120)
    assert info["status"] == "completed", info
    assert info["ram"]["transferred"] > 0
    dinfo = dst.wait_migration(timeout=120)
    assert dinfo["status"] == "completed", dinfo
    assert dst.status() == "running"
    # The pages went on the data channels: nearly all bytes, on both sides.
    assert info["ram"]["multifd-bytes"] > info["ram"]["transferred"] // 2, info
    assert dinfo["ram"]["multifd-bytes"] > dinfo["ram"]["transferred"] // 2, dinfo
    _assert_verified(dst)


def test_multifd_with_a_file_uri_is_refused_by_name(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = _source(tmp_path, procs, 2)
    with pytest.raises(QmpReplyError, match="multifd needs a tcp: or unix: URI"):
        src.cmd("migrate", uri=f"file:{tmp_path}/vm.snap")
    _assert_source_survives(src)


class _CuttingProxy:
    """A TCP relay that passes the main connection through and cuts the first data connection
    (the second connection) after `cut_after` bytes of it."""

    def __init__(self, target: tuple[str, int], cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, limit: int | None) -> None:
        seen = 0
        try:
            while data := a.recv(1 << 16):
                seen += len(data)
                if limit is not None and seen > limit:
                    self.cut.set()
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        n = 0
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
                self._socks += [client, server]
                limit = self.cut_after if n == 1 else None
                n += 1
                threading.Thread(target=self._pipe, args=(client, server, limit), daemon=True).start()
                threading.Thread(target=self._pipe, args=(server, client, None), daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


def test_losing_a_data_channel_fails_cleanly_and_the_source_keeps_running(
    tmp_path: Path, procs: list[VmProcess]
) -> None:
    """Not re-queued on the other channels (yet): the migration fails with a reason naming the
    data channel, on both sides, the guest never starts on the destination and the source runs on."""
    src = _source(tmp_path, procs, 2)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})  # precopy lasts seconds
    dst = _dest(tmp_path, procs, "tcp:127.0.0.1:0")
    host, port = _listen_uri(dst).removeprefix("tcp:").rsplit(":", 1)
    proxy = _CuttingProxy((host, int(port)), cut_after=2 << 20)
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
        info = src.wait_migration(timeout=120)
        assert proxy.cut.is_set()
        assert info["status"] == "failed", info
        assert "channel" in info["error-desc"], info
        dinfo = dst.wait_migration(timeout=60)
        assert dinfo["status"] == "failed", dinfo
        assert "channel" in dinfo["error-desc"], dinfo
        assert dst.status() == "inmigrate"  # the guest never started there
        _assert_source_survives(src)
    finally:
        proxy.close()
