"""The fuzz targets' contracts, replayed on the committed seed corpus and on every input a fuzzer
once found breaking them (tests/fuzz/regressions/). No atheris needed: each target's `check` is
plain Python. The fuzzing itself runs in CI after the tests (tests/fuzz/run.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).parent / "fuzz"
TARGETS = ("stream", "vmstate", "qmp")


def _target(name: str) -> ModuleType:
    key = f"fuzz_{name}"
    if key not in sys.modules:  # registered first: VMState resolves field annotations through it
        spec = importlib.util.spec_from_file_location(key, FUZZ / f"{key}.py")
        assert spec is not None and spec.loader is not None
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def _inputs() -> list[tuple[str, Path]]:
    return [(name, path) for name in TARGETS for kind in ("corpus", "regressions")
            for path in sorted((FUZZ / kind / name).glob("*"))]


def test_every_target_has_a_seed_corpus() -> None:
    for name in TARGETS:
        assert any((FUZZ / "corpus" / name).iterdir()), name
    total = sum(p.stat().st_size for p in (FUZZ / "corpus").rglob("*") if p.is_file())
    assert total < 1 << 20


@pytest.mark.parametrize(("name", "path"), _inputs(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_contract_holds(name: str, path: Path) -> None:
    _target(name).check(path.read_bytes())


def test_stream_seeds_decode_to_the_end() -> None:
    # The seeds are valid streams: the fuzzer starts from inputs that reach END, not from junk.
    stream = _target("stream")
    for path in sorted((FUZZ / "corpus" / "stream").glob("*")):
        data = path.read_bytes()
        if len(data) > 1000:
            records, error, _ = stream.decode(data[2:], 0, 0)
            assert error is None and records[-1] == "EndOfStream", path.name
