"""The return path: the destination's commands back to the source over a duplex channel.

It is a stream of its own (docs/stream-format.md): a stream header, COMMAND records, END. The
source reads it on a thread of its own for the whole migration, so a destination that gives up
(SHUT with a reason) stops the source at once with that reason instead of a bare "broken pipe".
The destination reports PROGRESS (stream bytes applied) as it goes, from which the source
measures the end-to-end bandwidth and what is still in flight; ACK confirms the switchover and
carries the destination's apply and start times (JSON); END closes the return path. HEARTBEAT
says the destination is alive (migration/heartbeat.py); the reader notes when it last heard
anything, for the source's watchdog.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from vmferry.errors import StreamError, TransportError
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Command, CommandCode, EndOfStream
from vmferry.transport.channel import Channel
from vmferry.transport.tls import TlsAlert

log = logging.getLogger("vmferry.migration")


class ReturnPathWriter:
    """Destination side: send commands to the source."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.encoder = StreamEncoder()
        self._lock = threading.Lock()
        self._started = False
        self._ended = False

    def send(self, cmd: Command) -> None:
        with self._lock:
            if self._ended:
                return
            bufs: list[bytes] = [] if self._started else [self.encoder.header()]
            self._started = True
            bufs.append(self.encoder.encode(cmd))
            self.channel.sendmsg(bufs)

    def progress(self, applied: int) -> None:
        """PROGRESS: `applied` stream bytes are in and handled."""
        self.send(Command(CommandCode.PROGRESS, index=applied))

    def heartbeat(self) -> None:
        """HEARTBEAT: the destination is alive (advisory: a source that does not know it skips it)."""
        self.send(Command(CommandCode.HEARTBEAT))

    def ack(self, record_count: int, timings: Mapping[str, float]) -> None:
        """ACK the whole stream (its record count), with where the destination's time went."""
        data = json.dumps(dict(timings), separators=(",", ":")).encode()
        self.send(Command(CommandCode.ACK, index=record_count, data=data))

    def end(self) -> None:
        """END closes the return path, as the spec requires. Best effort: after ACK or SHUT
        the source may have gone already."""
        with contextlib.suppress(TransportError, OSError, ValueError), self._lock:
            if self._ended:
                return
            bufs: list[bytes] = [] if self._started else [self.encoder.header()]
            self._started = self._ended = True
            bufs.append(self.encoder.encode(EndOfStream()))
            self.channel.sendmsg(bufs)

    def shut(self, reason: str) -> None:
        """Tell the source we give up, and why, then end. Best effort: the channel may be gone."""
        with contextlib.suppress(TransportError, OSError, ValueError):
            self.send(Command(CommandCode.SHUT, data=reason.encode()[:4096]))
        self.end()


class ReturnPathReader:
    """Source side: a thread that reads commands and records what the source must act on.

    `sent` tells it how many stream bytes the source had sent when a PROGRESS arrived."""

    def __init__(self, channel: Channel, sent: Callable[[], int] = lambda: 0,
                 on_heartbeat: Callable[[], None] = lambda: None) -> None:
        self.channel = channel
        self._sent = sent
        self._on_heartbeat = on_heartbeat
        self.heard_at = time.monotonic()  # when bytes last arrived from the destination
        self.acked = threading.Event()
        self.ack_index: int | None = None
        self.ack_timings: dict[str, float] = {}
        self.shut_reason: str | None = None
        self.ended = False  # END arrived, verified
        self.closed = threading.Event()  # the destination's side ended (END, EOF, error or SHUT)
        self.progressed = threading.Condition()
        self._progress: deque[tuple[int, int, float]] = deque()
        self._thread = threading.Thread(target=self._run, name="migration-return-path", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take_progress(self) -> list[tuple[int, int, float]]:
        """PROGRESS reports since the last call: (applied, sent then, arrival time)."""
        with self.progressed:
            out = list(self._progress)
            self._progress.clear()
        return out

    def wait_progress(self, timeout: float) -> None:
        """Block until a PROGRESS report (or the end) arrives, at most `timeout` seconds."""
        with self.progressed:
            if not self._progress and not self.closed.is_set():
                self.progressed.wait(timeout)

    def _run(self) -> None:
        dec = StreamDecoder()
        try:
            while True:
                buf = dec.get_buffer()
                n = self.channel.recv_into(buf)
                if n == 0:
                    return
                self.heard_at = time.monotonic()
                dec.buffer_updated(n)
                while (rec := dec.next_record()) is not None:
                    if isinstance(rec, Command):
                        self._on_command(rec)
                    elif isinstance(rec, EndOfStream):
                        self.ended = True
                        return
        except TlsAlert as e:
            # The destination's TLS layer refused our stream (a record altered in flight fails
            # its MAC: "bad record mac"): that alert is its reason, as a SHUT would be.
            self.shut_reason = f"TLS: {e.alert}"
            log.warning("destination gave up: %s", self.shut_reason)
            self.channel.shutdown()
        except (TransportError, StreamError, OSError) as e:
            log.debug("return path ended: %s", e)
        finally:
            self.closed.set()
            self.acked.set()  # wake a waiter; it checks ack_index
            with self.progressed:
                self.progressed.notify_all()

    def _on_command(self, cmd: Command) -> None:
        if cmd.code == CommandCode.PROGRESS:
            with self.progressed:
                self._progress.append((cmd.index, self._sent(), time.monotonic()))
                self.progressed.notify_all()
        elif cmd.code == CommandCode.HEARTBEAT:
            self._on_heartbeat()
        elif cmd.code == CommandCode.ACK:
            self.ack_timings = _timings(cmd.data)
            self.ack_index = cmd.index
            self.acked.set()
        elif cmd.code == CommandCode.SHUT:
            self.shut_reason = cmd.message
            log.warning("destination gave up: %s", self.shut_reason)
            # Unblock the sender at once; it reports shut_reason.
            self.channel.shutdown()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)


def _timings(data: bytes) -> dict[str, float]:
    """An ACK's JSON timings; an older destination sends none, a malformed one is ignored."""
    if not data:
        return {}
    try:
        doc = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: float(v) for k, v in doc.items() if isinstance(k, str) and isinstance(v, int | float)}
