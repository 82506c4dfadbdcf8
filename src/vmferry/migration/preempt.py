"""Postcopy's preempt channel (capability `postcopy-preempt`, QEMU's name): requested pages on a
connection of their own, so that they never queue behind the background push.

With the capability on both sides, the source opens a second connection to the migration's
address right after CONFIG (TLS too when tls-creds is set, as multifd's data channels). It
carries a vmferry stream of its own, like a data channel (docs/stream-format.md): stream header,
COMMAND CHANNEL (JSON: the migration's id, `"channel": "postcopy-preempt"`), RAM_BLOCKS, then —
only after the switch to postcopy — the requested pages (RAM_PAGES / RAM_ZERO), then END with its
own record count and digest. The main stream's records and END are unchanged.

Source (`PreemptSender`): a thread of its own takes each PAGE_REQUEST as soon as the return
path's reader has it, takes the requested page (and a few after it) out of the postcopy set
(`PostcopySource.take_request`, under the set's lock: each page goes on exactly one of the two
streams) and writes it. Destination (`PreemptReceiver`, driven by a thread of its own): places
each page with UFFDIO_COPY at once (`PostcopyDestination`, which skips pages already placed and
treats EEXIST as done). A page can never be placed with stale content: the source's vCPUs are
stopped for all of postcopy, so every copy of a page that is sent is its final content.

After a postcopy recovery the preempt channel is not opened again: requests then go on the main
stream (priority framing), as without the capability.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from vmferry.errors import MigrationError, VmferryError
from vmferry.migration.multifd import DataChannelReceiver
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Buffer, Command, CommandCode, RamBlocks, record_type_name
from vmferry.transport.channel import Channel

if TYPE_CHECKING:
    from vmferry.migration.postcopy import PostcopyDestination, PostcopySource
    from vmferry.migration.ram import RamLoader

log = logging.getLogger("vmferry.migration")

PREEMPT_CHANNEL = "postcopy-preempt"
_STOP = (0, 0, 0)  # the sender thread's end marker (block ids start at 1)


def preempt_hello(migration_id: str) -> Command:
    doc = {"migration": migration_id, "channel": PREEMPT_CHANNEL}
    return Command(CommandCode.CHANNEL, data=json.dumps(doc, separators=(",", ":")).encode())


def no_delay(channel: Channel) -> None:
    """A requested page is one small write: it must leave at once (no Nagle)."""
    sock = getattr(channel, "socket", None)
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PreemptSender:
    """The source's preempt channel: its stream, and the thread that sends requested pages."""

    def __init__(self, channel: Channel, migration_id: str, table: RamBlocks, machine_type: str) -> None:
        self.channel = channel
        self.encoder = StreamEncoder(machine_type=machine_type)
        no_delay(channel)
        channel.sendmsg([self.encoder.header(), self.encoder.encode(preempt_hello(migration_id)),
                         self.encoder.encode(table)])
        self._requests: queue.SimpleQueue[tuple[int, int, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why the channel failed, if it did
        self.bytes = 0

    def start(self, pc: PostcopySource) -> None:
        """After RUN: serve requests from here on (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(pc,), name="postcopy-preempt",
                                            daemon=True)
            self._thread.start()

    def request(self, block_id: int, first_page: int, count: int) -> None:
        """A PAGE_REQUEST, from the return path's reader thread."""
        self._requests.put((block_id, first_page, count))

    def _run(self, pc: PostcopySource) -> None:
        send = self.channel.sendmsg
        try:
            while (req := self._requests.get()) != _STOP:
                self.bytes += pc.take_request(*req, send=send, encoder=self.encoder)
        except (VmferryError, OSError) as e:
            self.error = f"postcopy-preempt channel: {e}"
            log.warning("%s", self.error)

    def finish(self) -> None:
        """Every page was taken: stop the thread (requests still queued are for pages sent
        already) and end the channel's stream (END with its record count and digest)."""
        self._stop_thread()
        if self.error is not None:
            raise MigrationError(self.error)
        self.channel.sendmsg([self.encoder.end()])

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._requests.put(_STOP)
            self._thread.join(10.0)
            if self._thread.is_alive():
                self.error = self.error or "postcopy-preempt channel: its sender did not stop"
            self._thread = None

    def close(self) -> None:
        """Failure or the end of the migration: cut the connection, stop the thread. Idempotent."""
        with contextlib.suppress(VmferryError, OSError):
            self.channel.shutdown()
        self._stop_thread()
        with contextlib.suppress(VmferryError, OSError):
            self.channel.close()


class PreemptPages:
    """Where the preempt channel's pages go on the destination: straight to the postcopy placer
    (UFFDIO_COPY), never through guest memory. Pages before POSTCOPY_LISTEN are refused."""

    def __init__(self, ram: RamLoader, dest: Callable[[], PostcopyDestination | None]) -> None:
        self._ram = ram
        self._dest = dest

    def _placer(self) -> PostcopyDestination:
        d = self._dest()
        if d is None or d.uffd is None:
            raise MigrationError("postcopy-preempt: pages arrived before POSTCOPY_LISTEN")
        return d

    def apply_pages(self, block_id: int, pages: np.ndarray, data: Buffer, generation: int) -> None:
        self._placer().place_list(block_id, pages, data)

    def apply_zero(self, block_id: int, first: int, count: int, generation: int) -> None:
        self._placer().place_zero(block_id, first, count)

    def check_layout(self, table: RamBlocks) -> None:
        self._ram.check_layout(table)


class PreemptReceiver(DataChannelReceiver):
    """The destination's preempt channel (sans-I/O, as a data channel): its hello names the
    preempt channel of this migration."""

    def _where(self) -> str:
        return "the postcopy-preempt channel"

    def _hello(self, rec: object) -> None:
        if not (isinstance(rec, Command) and rec.code == CommandCode.CHANNEL):
            raise MigrationError(f"the postcopy-preempt channel began with {record_type_name(rec)}, "
                                 "not COMMAND CHANNEL")
        try:
            doc = json.loads(rec.data)
            mid, cid = doc["migration"], doc["channel"]
        except (ValueError, KeyError, TypeError):
            raise MigrationError("the postcopy-preempt channel's COMMAND CHANNEL is not {migration, channel} "
                                 "JSON") from None
        if cid != PREEMPT_CHANNEL:
            raise MigrationError(f"expected the postcopy-preempt channel, got channel {cid!r}")
        if self.expect_migration is not None and mid != self.expect_migration:
            raise MigrationError(f"the postcopy-preempt channel belongs to migration {mid!r}, not this one "
                                 f"({self.expect_migration!r})")
