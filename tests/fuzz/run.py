"""Run every fuzz target for a bounded time; exit non-zero on a crash, naming the crashing input.

    PYTHONPATH=src python tests/fuzz/run.py --seconds 20          # what CI runs
    PYTHONPATH=src python tests/fuzz/run.py --seconds 300 stream  # one target, longer

Each target runs as its own atheris (libFuzzer) process over a scratch copy of its committed seed
corpus (tests/fuzz/corpus/<target>/), so new inputs never touch the repository. An input that
breaks the target's contract, or takes longer than --input-timeout seconds, stops that target;
its file is kept in --artifacts and its path (and, if short, its bytes) printed; replay it with
`python tests/fuzz/fuzz.py <target> <path>`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("stream", "vmstate", "qmp")


def run_target(name: str, seconds: int, input_timeout: int, artifacts: Path) -> bool:
    """-> True when the target ran its time without a crash."""
    scratch = Path(tempfile.mkdtemp(prefix=f"vmferry-fuzz-{name}-"))
    try:
        shutil.copytree(HERE / "corpus" / name, scratch, dirs_exist_ok=True)
        prefix = artifacts / f"{name}-"
        cmd = [sys.executable, str(HERE / "fuzz.py"), name, f"-max_total_time={seconds}",
               f"-timeout={input_timeout}", "-report_slow_units=3600", "-rss_limit_mb=2048",
               "-print_final_stats=1", f"-artifact_prefix={prefix}", str(scratch)]
        print(f"== fuzz {name}: {seconds} s", flush=True)
        # The fuzzer stops itself after `seconds`; this bound only catches a fuzzer that does not
        # (generous: start-up and the corpus pass are slow on a loaded machine).
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=3 * seconds + 300, env=os.environ.copy(), check=False)
        except subprocess.TimeoutExpired:
            print(f"!! fuzz {name} did not stop within {3 * seconds + 300} s")
            return False
        tail = proc.stdout.strip().splitlines()
        for line in tail[-8:]:
            print(f"   {line}")
        crashes = sorted(artifacts.glob(f"{name}-*"))
        if proc.returncode == 0 and not crashes:
            return True
        if not crashes:
            print("\n".join(tail[-60:]))
        print(f"!! fuzz {name} FAILED (exit {proc.returncode})")
        for path in crashes:
            data = path.read_bytes()
            print(f"!! crashing input: {path} ({len(data)} bytes)")
            if len(data) <= 1024:
                print(f"!! bytes (hex): {data.hex()}")
        return False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", metavar="target", help=f"of {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--seconds", type=int, default=20, help="fuzzing time per target")
    ap.add_argument("--input-timeout", type=int, default=10, help="seconds one input may take")
    ap.add_argument("--artifacts", type=Path, default=None,
                    help="where crashing inputs are kept (default: a new temporary folder)")
    args = ap.parse_args()
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; the targets are {', '.join(TARGETS)}")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install -e '.[test]'", file=sys.stderr)
        return 2
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="vmferry-fuzz-artifacts-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    targets = args.targets or list(TARGETS)
    failed = [t for t in targets if not run_target(t, args.seconds, args.input_timeout, artifacts)]
    if failed:
        print(f"fuzzing found crashes in: {', '.join(failed)} (inputs under {artifacts})")
        return 1
    print(f"fuzzing: {', '.join(targets)} ran {args.seconds} s each without a crash")
    return 0


if __name__ == "__main__":
    sys.exit(main())
