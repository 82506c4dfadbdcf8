"""Device state inside the downtime: how long `DeviceSaver.complete` (capture + encode + send of
every section, vCPUs paused) and the destination's staging + `DeviceLoader.complete` (apply)
take on a real KVM machine. Not a test: it prints medians.

    PYTHONPATH=src python bench/bench_device_state.py --runs 20

The sections go through a real socketpair (a thread drains the source end); the destination's
records are decoded by the stream decoder, staged through the loader's handlers as they arrive,
then applied. Comparing builds: run the same script with PYTHONPATH pointing at the other tree.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from vmferry.devices.state import MachineDeviceState
from vmferry.machine.machine import Machine
from vmferry.migration.device_state import DeviceLoader, DeviceSaver
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.vmm import guest_image

MiB = 1 << 20


class Out:
    """A SaverOutput over one end of a socketpair; a thread keeps the other end drained."""

    def __init__(self, sock: socket.socket) -> None:
        self.encoder = StreamEncoder(machine_type="vmferry-0.1")
        self.sock = sock
        self.sent: list[bytes] = []

    def send(self, bufs: Sequence[Any]) -> int:
        data = b"".join(bytes(b) for b in bufs)
        self.sock.sendall(data)
        self.sent.append(data)
        return len(data)

    def cancelled(self) -> bool:
        return False


def drain(sock: socket.socket) -> None:
    while sock.recv(1 << 20):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    serial = os.path.join(tempfile.mkdtemp(), "serial")
    with Machine(memory=32 * MiB, serial=f"file:{serial}") as src, Machine(memory=32 * MiB) as dst:
        src.load_kernel(guest_image("heartbeat"), "hz=100")
        src.start()
        time.sleep(0.5)
        a, b = socket.socketpair()
        threading.Thread(target=drain, args=(b,), daemon=True).start()
        complete_ms, apply_ms, stage_ms, first = [], [], [], None
        for i in range(args.runs + 1):
            saver = DeviceSaver(MachineDeviceState(src))
            out = Out(a)
            saver.setup(out)  # the VM runs: setup cost is outside the downtime
            src.pause()
            t = time.perf_counter()
            saver.complete(out)
            elapsed = time.perf_counter() - t
            src.resume()
            loader = DeviceLoader(MachineDeviceState(dst))
            handlers = loader.handlers()
            dec = StreamDecoder()
            dec.feed(out.encoder.header() + out.sent[0])
            for rec in dec.records():
                if type(rec) in handlers:  # DESCRIPTION (after the header): at setup
                    handlers[type(rec)](rec)
            t = time.perf_counter()
            for chunk in out.sent[1:]:
                dec.feed(chunk)
                for rec in dec.records():
                    handlers[type(rec)](rec)
            t1 = time.perf_counter()
            loader.complete()
            t2 = time.perf_counter()
            if i == 0:
                first = (elapsed * 1e3, (t1 - t) * 1e3, (t2 - t1) * 1e3)
                continue
            complete_ms.append(elapsed * 1e3)
            stage_ms.append((t1 - t) * 1e3)
            apply_ms.append((t2 - t1) * 1e3)
        a.close()

    def row(name: str, xs: list[float]) -> str:
        return f"| {name} | {statistics.median(xs):.2f} | {min(xs):.2f} | {max(xs):.2f} |"

    print(f"load average: {os.getloadavg()}")
    print(f"first run (ms): complete {first[0]:.2f}, stage {first[1]:.2f}, apply {first[2]:.2f}")
    print("| step | median ms | min | max |\n|---|---|---|---|")
    print(row("DeviceSaver.complete", complete_ms))
    print(row("destination staging", stage_ms))
    print(row("DeviceLoader.complete (apply)", apply_ms))


if __name__ == "__main__":
    main()
