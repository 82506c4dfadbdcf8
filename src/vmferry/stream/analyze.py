"""`vmferry analyze FILE|-`: read a stream progressively and say what it holds.

Built on the decoder alone (no KVM, no device code): the stream's own DESCRIPTION names the
device sections and their fields. The input is read in 1 MiB chunks and page data is only
counted, so a multi-GiB file or a pipe costs constant memory. Every checksum is verified in
every mode; `--verify` prints only the verdict and also holds each device section to its
description. Errors are StreamErrors: the CLI prints them as one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import IO, Any

from vmferry.errors import StreamError
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.summary import StreamSummary

CHUNK = 1 << 20


def _open(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by main
    except OSError as e:
        raise StreamError(f"cannot open {path}: {e.strerror}") from None


def summarize(f: IO[bytes], summary: StreamSummary) -> StreamDecoder:
    """Drive a decoder over all of `f`, folding every record into `summary`. Reads to EOF even
    after END, so bytes trailing the stream are reported too."""
    dec = StreamDecoder()
    while True:
        # A fresh bytes object per read: the decoder may hand on views of it, and the summary
        # drops them before the next read.
        chunk = f.read(CHUNK)
        if chunk:
            dec.feed(chunk)
        else:
            dec.feed_eof()
        for rec in dec.records():  # the good records are folded in before an error is raised
            summary.add(rec)
        if not chunk:
            return dec


def main(args: argparse.Namespace) -> int:
    summary = StreamSummary(strict=args.verify)
    f = _open(args.file)
    dec: StreamDecoder | None = None
    try:
        dec = summarize(f, summary)
    except StreamError as e:
        if not args.verify:
            _emit(args, summary, error=str(e))
        raise
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    if args.verify:
        end = summary.end
        print(f"OK: {args.file}: {summary.records} records and END, {dec.bytes_consumed} bytes; "
              f"every checksum, the record count and the running digest "
              f"{end.digest:016x} verified")  # type: ignore[union-attr]
        return 0
    _emit(args, summary)
    return 0


def _emit(args: argparse.Namespace, summary: StreamSummary, error: str | None = None) -> None:
    try:
        if args.json:
            doc = summary.to_json()
            doc["error"] = error
            json.dump(doc, sys.stdout, indent=2)
            print()
        else:
            sys.stdout.write(render_text(summary))
        sys.stdout.flush()
    except BrokenPipeError:  # `vmferry analyze ... | head` is not an error
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def render_text(s: StreamSummary) -> str:
    out: list[str] = []
    put = out.append
    if s.header:
        h = s.header
        put(f"stream format {h.major}.{h.minor}, page size {h.page_size}, producer '{h.producer}', "
            f"machine type '{h.machine_type}'")
    if s.config is not None:
        put(f"config: {json.dumps(s.config, sort_keys=True)}")
    if s.sections:
        put(f"description: {len(s.sections)} section(s)")
        for sid, sec in s.sections.items():
            put(f"  [{sid}] {sec['name']} instance {sec['instance']} version {sec['version']}: "
                f"{len(sec['fields'])} field(s), {len(sec['subsections'])} subsection(s)")
    for d in s.devices:
        put(f"section {d['name']} (id {d['id']}, instance {d['instance']}) {d['phase']}, {d['bytes']} bytes"
            f", record {d['record']}")
        if "state" in d:
            _render_state(d["state"], "    ", put)
        else:
            if "undecoded" in d:
                put(f"    (not decodable with its description: {d['undecoded']})")
            put(f"    hex: {d['hex']}{'...' if d['bytes'] * 2 > len(d['hex']) else ''}")
    for title, table, word in (("RAM block", s.ram, "pages"), ("disk", s.disks, "sectors")):
        for r in table.values():
            passes = ",".join(map(str, sorted(r.passes))) or "-"
            types = ", ".join(f"{k} {v}" for k, v in sorted(r.types.items()))
            if r.shared:
                put(f"{title} {r.name}: {r.size} bytes ({r.size // r.unit} {word}), shared: its "
                    "contents stay in its image")
                continue
            put(f"{title} {r.name}: base {r.base:#x}, {r.size} bytes ({r.size // r.unit} {word}); "
                f"{word} sent {r.sent}, zero {r.zero}, {r.records} records ({types or 'none'}), "
                f"{r.nbytes} bytes; passes {passes}")
            if r.raw_compressed:
                put(f"    compressed: {r.raw_compressed} bytes in {r.wire_compressed} "
                    f"({r.wire_compressed / r.raw_compressed:.1%})")
    for p in s.passes:
        if p.number or p.pages or p.zero_pages:
            put(f"pass {p.number}: pages {p.pages}, zero pages {p.zero_pages}, {p.nbytes} bytes")
    if s.commands:
        put("commands: " + ", ".join(f"{k} x{v}" for k, v in sorted(s.commands.items())))
    if s.skipped:
        put("skipped unknown records: " + ", ".join(f"type {k} x{v}" for k, v in sorted(s.skipped.items())))
    if s.end is not None:
        put(f"end of stream: {s.end.record_count} records, digest {s.end.digest:016x} verified")
    return "\n".join(out) + "\n"


def _render_state(state: dict[str, Any], indent: str, put: Any) -> None:
    for name, value in state["fields"].items():
        put(f"{indent}{name} = {json.dumps(value)}")
    for name, sub in state["subsections"].items():
        put(f"{indent}subsection {name}:")
        _render_state(sub, indent + "    ", put)
