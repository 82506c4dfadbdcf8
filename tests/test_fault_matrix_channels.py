"""The fault matrix again, on the capabilities that add connections or state beside RAM: several
channels (capability multifd: the faults hit while pages travel on the data connections; plain
and under TLS-PSK) and
non-shared storage (`blk`: the faults hit while the disk's contents are in the stream). Same
outcomes as plain precopy (docs/migration.md, "Nothing lost"): the source keeps running and its
guest verifies, the destination ends `failed` with its guest never started, and neither side
prints a traceback.

Mid-pass is made deterministic as in test_fault_matrix.py: a small max-bandwidth, and each test
waits until the part under test has carried bytes before it acts."""

from __future__ import annotations

import re
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vmproc import VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "64M"
SLOW = 1 << 20  # max-bandwidth: the migration is still mid-pass for many seconds
DETECTED_WITHIN_S = 15.0  # heartbeats notice in ~3 s; generous so load cannot fail it
DISK = 64 << 20


class Kind:
    """How to start a pair for one kind of migration, and how to tell it is mid-way."""

    def __init__(self, name: str) -> None:
        self.name = name

    def pair(self, tmp: Path, procs: list[VmProcess]) -> tuple[VmProcess, VmProcess]:
        if self.name.startswith("multifd"):
            src = VmProcess(tmp, "src", "-m", MEM, "--guest", "dirty", "--append", "ws=8 rate=5 verify=1")
            procs.append(src)
            src.wait_serial(r"verify ok")
            src.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
            src.cmd("migrate-set-parameters", **{"multifd-channels": 2})
            dst = VmProcess(tmp, "dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0")
            if self.name == "multifd-psk":  # every connection, the data channels too, under TLS-PSK
                (tmp / "keys.psk").write_text(f"qemu:{secrets.token_hex(32)}\n")
                for vm, endpoint in ((dst, "server"), (src, "client")):
                    vm.cmd("object-add", **{"qom-type": "tls-creds-psk", "id": "tls0", "dir": str(tmp),
                                            "endpoint": endpoint})
                    vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        else:
            images = [tmp / "src.img", tmp / "dst.img"]
            for img in images:
                with open(img, "wb") as f:
                    f.truncate(DISK)
            src = VmProcess(tmp, "src", "-m", MEM, "--guest", "disk", "--append", "dws=8 drate=4 verify=1",
                            "--drive", f"file={images[0]},format=raw,id=disk0")
            procs.append(src)
            src.wait_serial(r"disk verify ok gen=\d+", timeout=60)
            dst = VmProcess(tmp, "dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0",
                            "--drive", f"file={images[1]},format=raw,id=disk0")
        procs.append(dst)
        return src, dst

    def underway(self, info: dict) -> bool:
        """The part under test has carried something: the data channels, or the disk."""
        if self.name.startswith("multifd"):
            return info.get("ram", {}).get("multifd-bytes", 0) >= 1 << 20
        return info.get("disk", {}).get("transferred", 0) >= 1 << 20

    def verifies(self, vm: VmProcess) -> None:
        word = r"verify ok gen=\d+" if self.name.startswith("multifd") else r"disk verify ok gen=\d+"
        start = len(vm.serial())
        vm.wait_serial(word, after=start, timeout=60)
        assert "FAIL" not in vm.serial()


KINDS = [Kind("multifd"), Kind("multifd-psk"), Kind("blk")]


def _mid_way(kind: Kind, src: VmProcess, dst: VmProcess) -> None:
    src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW})
    src.cmd("migrate", uri=dst.incoming_uri(), **({"blk": True} if kind.name == "blk" else {}))
    deadline = time.monotonic() + 90
    while True:
        info = src.cmd("query-migrate")
        assert info.get("status") in ("setup", "active"), info
        if kind.underway(info):
            return
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def _no_traceback(vm: VmProcess) -> None:
    assert "Traceback" not in vm.log(), vm.log()


def _source_survives(kind: Kind, src: VmProcess) -> None:
    assert src.status() == "running"
    kind.verifies(src)
    _no_traceback(src)


def _dest_failed(dst: VmProcess, pattern: str = "") -> None:
    info = dst.wait_migration(timeout=60)
    assert info["status"] == "failed", info
    assert re.search(pattern, info.get("error-desc", "")), info
    assert dst.status() == "inmigrate"  # the guest never started
    _no_traceback(dst)


def _cancel_source(kind: Kind, src: VmProcess, dst: VmProcess) -> None:
    src.cmd("migrate_cancel")
    assert src.wait_migration()["status"] == "cancelled"
    _source_survives(kind, src)
    _dest_failed(dst)


def _cancel_destination(kind: Kind, src: VmProcess, dst: VmProcess) -> None:
    dst.cmd("migrate_cancel")
    info = src.wait_migration()
    assert info["status"] == "failed" and "cancelled on the destination" in info["error-desc"], info
    _source_survives(kind, src)
    _dest_failed(dst, "cancelled on the destination")


def _kill_source(kind: Kind, src: VmProcess, dst: VmProcess) -> None:
    src.proc.kill()
    src.proc.wait()
    _dest_failed(dst)


def _kill_destination(kind: Kind, src: VmProcess, dst: VmProcess) -> None:
    dst.proc.kill()
    dst.proc.wait()
    assert src.wait_migration()["status"] == "failed"
    _source_survives(kind, src)


def _stop_destination(kind: Kind, src: VmProcess, dst: VmProcess) -> None:
    t0 = time.monotonic()
    dst.proc.send_signal(signal.SIGSTOP)
    info = src.wait_migration(timeout=60)
    took = time.monotonic() - t0
    print(f"\n[fault-matrix] {kind.name}: destination SIGSTOPped, source noticed in {took:.2f} s")
    assert info["status"] == "failed" and "no heartbeat from the destination" in info["error-desc"], info
    assert took < DETECTED_WITHIN_S
    _source_survives(kind, src)
    dst.proc.send_signal(signal.SIGCONT)
    _dest_failed(dst)


FAULTS: dict[str, Callable[[Kind, VmProcess, VmProcess], None]] = {
    "cancel-source": _cancel_source,
    "cancel-destination": _cancel_destination,
    "kill-source": _kill_source,
    "kill-destination": _kill_destination,
    "stop-destination": _stop_destination,
}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_mid_way(tmp_path: Path, procs: list[VmProcess], kind: Kind, fault: str) -> None:
    src, dst = kind.pair(tmp_path, procs)
    _mid_way(kind, src, dst)
    FAULTS[fault](kind, src, dst)
