"""Records -> bytes. Sans-I/O: the caller writes what it gets wherever it likes.

Page data is never copied: `encode_ram_pages`, `encode_ram_page_list` and `encode_buffers` return
the record as a list of buffers (header bytes, [index bytes,] the caller's own memoryview, trailer
bytes) that a sender passes straight to `socket.sendmsg` or `os.writev`. The encoder is stateful
only to count records and fold each trailer into the running digest that END carries, so every
record must go through one encoder, in order.
"""

from __future__ import annotations

import numpy as np
import xxhash

from vmferry import __version__
from vmferry.stream.format import (
    FLAG_SKIPPABLE,
    MAX_PAYLOAD,
    TRAILER,
    chain_digest,
    checksum,
    pack_record_header,
    pack_stream_header,
)
from vmferry.stream.payloads import encode_payload, page_list_payload
from vmferry.stream.records import Buffer, EndOfStream, Record, RecordType


class StreamEncoder:
    def __init__(self, page_size: int = 4096, producer: str = f"vmferry {__version__}",
                 machine_type: str = "") -> None:
        self.page_size = page_size
        self._header = pack_stream_header(page_size, producer, machine_type)
        self._digest = TRAILER.unpack(self._header[-8:])[0]  # the header check seeds the digest
        self.record_count = 0
        self.ended = False

    def header(self) -> bytes:
        """The 80-byte stream header; write it first."""
        return self._header

    def encode(self, rec: Record) -> bytes:
        """One record as a single bytes object (copies the payload: use for small records)."""
        return b"".join(self.encode_buffers(rec))

    def encode_buffers(self, rec: Record, *, skippable: bool = False) -> list[Buffer]:
        """One record as [header, payload, trailer] without copying the payload."""
        if isinstance(rec, EndOfStream):
            rec = EndOfStream(self.record_count, self._digest)
        frame, parts = encode_payload(rec, self.page_size)
        return self._frame(frame.rtype, frame.section, frame.count, frame.index, parts,
                           FLAG_SKIPPABLE if skippable else 0)

    def encode_ram_pages(self, block_id: int, first_page: int, data: Buffer) -> list[Buffer]:
        """A RAM_PAGES record for len(data) // page_size pages starting at `first_page` of block
        `block_id`: [32-byte header, data itself, 8-byte trailer]. The fast path for the RAM saver."""
        view = memoryview(data)
        page_count, rest = divmod(view.nbytes, self.page_size)
        if rest or not page_count:
            raise ValueError(f"RAM data of {view.nbytes} bytes is not a whole number of "
                             f"{self.page_size}-byte pages")
        return self._frame(RecordType.RAM_PAGES, block_id, page_count, first_page, [view], 0)

    def encode_ram_page_list(self, block_id: int, pages: np.ndarray, data: Buffer) -> list[Buffer]:
        """A RAM_PAGE_LIST record: the pages `pages` (strictly increasing indexes) of block
        `block_id`, whose contents are `data` back to back (len(pages) * page_size bytes, e.g.
        gathered from a dirty bitmap). -> [32-byte header, index bytes + padding, data itself,
        8-byte trailer]; the page data is not copied (the index area is, 4 bytes a page)."""
        frame, parts = page_list_payload(block_id, pages, data, self.page_size)
        return self._frame(frame.rtype, frame.section, frame.count, frame.index, parts, 0)

    def end(self) -> bytes:
        """The END record, carrying the record count and running digest; nothing may follow it."""
        return self.encode(EndOfStream())

    def raw_record(self, rtype: int, payload: bytes = b"", *, section: int = 0, count: int = 0,
                   index: int = 0, flags: int = 0) -> bytes:
        """Any header at all, unchecked: for tests and for future record types."""
        return b"".join(self._frame(rtype, section, count, index, [payload], flags))

    def _frame(self, rtype: int, section: int, count: int, index: int, parts: list[Buffer],
               flags: int) -> list[Buffer]:
        """[header, *parts, trailer]: `parts` are the payload's pieces, sent back to back."""
        if self.ended:
            raise ValueError("the stream has ended: nothing may follow END")
        length = sum(memoryview(p).nbytes for p in parts)
        if length > MAX_PAYLOAD:
            raise ValueError(f"payload of {length} bytes exceeds the format's {MAX_PAYLOAD}-byte limit")
        head, hcheck = pack_record_header(rtype, flags, section, length, count, index)
        if len(parts) == 1:
            trailer = checksum(parts[0], hcheck)
        else:
            # Streaming xxh3 over the pieces gives the one-call digest of their concatenation,
            # without joining (copying) the page data.
            h = xxhash.xxh3_64(seed=hcheck)
            for p in parts:
                h.update(p)
            trailer = h.intdigest()
        if rtype == RecordType.END:
            self.ended = True
        else:
            self.record_count += 1
            self._digest = chain_digest(self._digest, trailer)
        return [head, *parts, TRAILER.pack(trailer)]
