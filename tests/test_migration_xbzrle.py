"""XBZRLE (capability xbzrle) between two real `vmferry run` processes on real KVM, on one
channel and with multifd (which QEMU does not allow with XBZRLE).

The `dirty` guest with fill=sparse rewrites only 16 bytes of a page after its first write: what
XBZRLE is for. The proof is the guest's own full-memory check on the destination after the
switchover; `xbzrle-cache` in query-migrate shows pages did go as deltas.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relays import CuttingRelay, migrate_through
from vmproc import VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "256M"
DIRTY = "ws=32 rate=16 verify=1 check=full fill=sparse"


@pytest.mark.parametrize("channels", [0, 2])
def test_xbzrle_migrates_a_sparse_writing_guest_and_it_verifies(
    tmp_path: Path, procs: list[VmProcess], channels: int
) -> None:
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    src.wait_serial(r"verify ok")
    caps = [{"capability": "xbzrle", "state": True}]
    if channels:
        caps.append({"capability": "multifd", "state": True})
        src.cmd("migrate-set-parameters", **{"multifd-channels": channels})
    src.cmd("migrate-set-capabilities", capabilities=caps)
    src.cmd("migrate-set-parameters", **{"xbzrle-cache-size": 64 << 20})
    # Passes must repeat for deltas to be sent: a small bandwidth cap makes pass 1 last long
    # enough that the guest dirties pages already sent; it is lifted once pass 2 began.
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    src.cmd("migrate", uri=dst.incoming_uri())
    deadline = time.monotonic() + 120
    while True:
        info = src.cmd("query-migrate")
        assert info["status"] in ("setup", "active", "device", "completed"), info
        if info["status"] == "completed" or info.get("xbzrle-cache", {}).get("pages", 0) > 0:
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    info = src.wait_migration(timeout=120)
    assert info["status"] == "completed", info
    cache = info["xbzrle-cache"]
    assert cache["cache-size"] == 64 << 20
    assert cache["pages"] > 0 and cache["bytes"] > 0, cache
    assert cache["bytes"] * 10 < cache["pages"] * 4096, cache  # 16 bytes changed: deltas are tiny
    assert cache["encoding-rate"] > 1, cache
    if channels:
        assert info["ram"]["multifd-bytes"] > 0, info
    dinfo = dst.wait_migration(timeout=120)
    assert dinfo["status"] == "completed", dinfo
    assert dst.status() == "running"
    start = len(dst.serial())
    dst.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
    assert "FAIL" not in dst.serial()


def test_xbzrle_survives_a_lost_data_channel(tmp_path: Path, procs: list[VmProcess]) -> None:
    """One of two data channels is reset mid-precopy (a CuttingRelay, as in test_migration_multifd.py):
    the deltas it carried are lost with their bases; every page it was given goes again, whole,
    on the other, and later deltas follow their bases there. The guest verifies on the
    destination."""
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    src.wait_serial(r"verify ok")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": True},
                                                      {"capability": "multifd", "state": True}])
    src.cmd("migrate-set-parameters", **{"multifd-channels": 2, "max-bandwidth": 8 << 20})
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    info = migrate_through(src, CuttingRelay(dst.incoming_address(), cut_after=2 << 20))
    assert info["status"] == "completed", info
    assert len(info["multifd-lost-channels"]) == 1, info
    assert info["xbzrle-cache"]["pages"] > 0, info
    dinfo = dst.wait_migration(timeout=60)
    assert dinfo["status"] == "completed", dinfo
    start = len(dst.serial())
    dst.wait_serial(r"verify ok gen=\d+", after=start, timeout=60)
    assert "FAIL" not in dst.serial()
