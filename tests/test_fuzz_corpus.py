"""The fuzz targets' contracts, replayed on the committed seed corpus and on every input a fuzzer
once found breaking them (tests/fuzz/regressions/). No atheris needed: each target's `check` is
plain Python. The fuzzing itself runs in CI after the tests (tests/fuzz/run.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).parent / "fuzz"
SRC = Path(__file__).parent.parent / "src"
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


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_corpus_reproduces_the_committed_corpus(tmp_path: Path) -> None:
    """The committed seeds are what make_corpus.py writes from this code: run twice in fresh
    interpreters with different hash seeds (set and dict order), each must write the same files."""
    made = []
    for hash_seed in ("0", "12345"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed,
               "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
        subprocess.run([sys.executable, str(FUZZ / "make_corpus.py"), "--out", str(out)], env=env,
                       check=True, capture_output=True, timeout=120)
        made.append(_files(out))
    assert made[0] == made[1], "make_corpus.py wrote different seeds on two runs"
    committed = _files(FUZZ / "corpus")
    stale = sorted(set(committed) ^ set(made[0]))
    assert not stale, f"tests/fuzz/corpus is stale (rerun tests/fuzz/make_corpus.py and commit): {stale}"
    assert committed == made[0]


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
