"""The command line every generated doc shares: write the doc, or `--check` that the committed
file still equals what the code generates (docs/qmp.md, docs/machine-types.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def main(argv: list[str] | None, *, description: str, default_path: Path, render: Callable[[], str],
         module: str) -> int:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from the code")
    p.add_argument("path", nargs="?", default=str(default_path))
    ns = p.parse_args(argv)
    path, text = Path(ns.path), render()
    if ns.check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale: run python -m {module}", file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return 0
