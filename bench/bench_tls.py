"""TLS against plain text on loopback: the migration channel's raw copy rate, with and without TLS.

    python bench/bench_tls.py [--mib 1024] [--runs 3] [--batch-kib 256]

The sender (this process) sends --mib MiB as lists of 1000 4 KiB page views per `sendmsg` (the RAM
saver's shape) through a `SocketChannel` (plain) or a `TlsChannel` (TLS 1.3, mutual x509, the
certificates made with trustme); a receiver in a child process (its own GIL) reads with
`recv_into` into a 1 MiB buffer, the destination's bulk shape. Rate = bytes / wall time from the
first send to the receiver having everything (GB = 1e9 bytes); median of --runs, with the range.
`--batch-kib` sets the plaintext batch the TLS channel encrypts per system call.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trustme

from vmferry.transport import tls as tlsmod
from vmferry.transport.channel import Channel, SocketChannel
from vmferry.transport.tls import TlsFiles, make_context, tls_accept, tls_connect

PAGE = 4096
VIEWS = 1000


def _pki(root: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    srv, cli = ca.issue_cert("127.0.0.1"), ca.issue_cert("src.example", common_name="src.example")
    for name, leaf in (("server", srv), ("client", cli)):
        leaf.cert_chain_pems[0].write_to_path(str(root / f"{name}-cert.pem"))
        leaf.private_key_pem.write_to_path(str(root / f"{name}-key.pem"))
    ca.cert_pem.write_to_path(str(root / "ca-cert.pem"))
    ca_file = str(root / "ca-cert.pem")
    server = make_context(TlsFiles(ca_file, str(root / "server-cert.pem"), str(root / "server-key.pem")),
                          server=True, verify_peer=True)
    client = make_context(TlsFiles(ca_file, str(root / "client-cert.pem"), str(root / "client-key.pem")),
                          server=False, verify_peer=True)
    return server, client


def run_once(total: int, use_tls: bool, server: ssl.SSLContext, client: ssl.SSLContext) -> float:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the receiver
        try:
            conn, _ = listener.accept()
            ch: Channel = SocketChannel(conn, "recv")
            if use_tls:
                ch = tls_accept(ch, server, None)
            buf = bytearray(1 << 20)
            got = 0
            while got < total:
                n = ch.recv_into(buf)
                if n == 0:
                    break
                got += n
            ch.sendall(b"k")  # everything arrived
            ch.close()
        except BaseException as e:  # noqa: BLE001 - the child reports and exits
            print(f"receiver: {e}", file=sys.stderr)
        finally:
            os._exit(0)
    listener.close()
    ch = SocketChannel(socket.create_connection(("127.0.0.1", port)), "send")
    ch.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if use_tls:
        ch = tls_connect(ch, client, "127.0.0.1")
    ram = memoryview(bytearray(os.urandom(1 << 20)) * 16)  # 16 MiB of incompressible pages
    pages = [ram[i * PAGE : (i + 1) * PAGE] for i in range(len(ram) // PAGE)]
    t0 = time.perf_counter()
    sent, i = 0, 0
    while sent < total:
        count = min(VIEWS, (total - sent) // PAGE)  # exactly `total`: the receiver stops there
        views = [pages[(i + k) % len(pages)] for k in range(count)]
        i += VIEWS
        sent += ch.sendmsg(views)
    ch.recv_exactly(1)
    elapsed = time.perf_counter() - t0
    ch.close()
    os.waitpid(pid, 0)
    return sent / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-kib", type=int, default=tlsmod.BATCH_BYTES // 1024)
    a = ap.parse_args()
    tlsmod.BATCH_BYTES = a.batch_kib * 1024
    total = a.mib << 20
    with tempfile.TemporaryDirectory() as d:
        server, client = _pki(Path(d))
    print(f"# {platform.node()} {platform.machine()} cpus={os.cpu_count()} {platform.python_version()} "
          f"{ssl.OPENSSL_VERSION} kernel {platform.release()} load {os.getloadavg()[0]:.1f}")
    print(f"# ssl.OP_ENABLE_KTLS: {'yes' if hasattr(ssl, 'OP_ENABLE_KTLS') else 'absent'}; "
          f"/proc/net/tls_stat: {'yes' if os.path.exists('/proc/net/tls_stat') else 'absent'}")
    print(f"# {a.mib} MiB, {VIEWS} x 4 KiB views per sendmsg, TLS batch {a.batch_kib} KiB, {a.runs} runs")
    medians = {}
    for name, use_tls in (("plain", False), ("tls", True)):
        rates = []
        for _ in range(a.runs):
            rates.append(run_once(total, use_tls, server, client))
        medians[name] = statistics.median(rates)
        print(f"{name:6s} {medians[name] / 1e9:6.3f} GB/s  [{min(rates) / 1e9:.3f}-{max(rates) / 1e9:.3f}]")
    print(f"tls/plain {medians['tls'] / medians['plain']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
