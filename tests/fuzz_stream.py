"""Coverage-guided fuzzing of the stream decoder (atheris). Not collected by pytest.

    pip install atheris && python tests/fuzz_stream.py -max_total_time=60

The only acceptable outcomes for any input are records or a StreamError; anything else (another
exception, a hang) is a bug the fuzzer reports with the input that caused it. Seeded with a valid
sample stream; the first input byte picks the chunk size, so chunk boundaries are fuzzed too.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

try:
    import atheris
except ImportError:  # optional: nothing to do without it
    print("atheris is not installed; skipping the stream fuzzer", file=sys.stderr)
    sys.exit(0)

with atheris.instrument_imports():
    from vmferry.errors import StreamError
    from vmferry.stream import StreamDecoder
    from vmferry.stream.sections import decode_section
    from vmferry.stream.testing import sample_stream


def one_input(data: bytes) -> None:
    if not data:
        return
    chunk, body = data[0] + 1, data[1:]
    dec = StreamDecoder()
    try:
        for i in range(0, len(body), chunk):
            dec.feed(body[i:i + chunk])
        dec.feed_eof()
        for rec in dec.records():
            if rec.__class__.__name__ == "DeviceSection" and dec.rules is not None:
                decode_section(dec.rules.sections[rec.section_id].schema, rec.data)
    except StreamError:
        pass


def main() -> None:
    corpus = Path(tempfile.mkdtemp(prefix="vmferry-fuzz-"))
    (corpus / "sample").write_bytes(b"\x3f" + sample_stream())
    argv = list(sys.argv)
    if not any(a.startswith("-max_total_time") for a in argv):
        argv.append("-max_total_time=60")  # time-limited by default
    atheris.Setup(argv + [str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
