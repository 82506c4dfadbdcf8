"""Run every fuzz target, bounded; exit non-zero on a crash, naming the crashing input.

    python3 tests/fuzz/run.py                         # what CI runs: fixed seed and run count
    python3 tests/fuzz/run.py --seconds 300 stream    # one target for 5 minutes, a random seed

By default (CI) each target runs a fixed number of inputs (RUNS, about 15 s of CPU each) from a
fixed seed, so the job is deterministic for a given code and corpus: libFuzzer's mutations follow
the seed, Python's hashing is pinned (PYTHONHASHSEED=0) and address randomisation is off for the
fuzzer (so set and dict orders, and with them the coverage the fuzzer steers by, do not change
between runs), and the seeds are passed by name
in sorted order (-seed_inputs), not read from a folder in whatever order it lists. The job passes
or fails the same way every time, on a quiet machine or a loaded one: no limit in it is a time
but the per-input timeout, which is far above what any input takes. `--seconds` runs each target
for a time instead (a random seed unless `--seed`), for developers hunting longer.

Each target is its own atheris (libFuzzer) process seeded with its committed corpus
(tests/fuzz/corpus/<target>/); inputs it adds stay in memory, never written to the repository.
An input that breaks the target's contract, or takes longer than --input-timeout seconds, stops
that target; its file is kept in --artifacts and its path (and, if short, its bytes) printed;
replay it with `python3 tests/fuzz/fuzz.py <target> <path>`.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("stream", "vmstate", "qmp")
# Inputs per target in CI: about 15 s of CPU each (measured on the project's 2-core machine),
# the three well under two minutes together.
RUNS = {"stream": 20_000, "vmstate": 40_000, "qmp": 16_000}
CI_SEED = 1
ADDR_NO_RANDOMIZE = 0x0040000  # personality(2): no address space layout randomisation
# A fuzzer that neither finishes its runs nor reports a crash in this long is stuck (a hang the
# per-input timeout did not catch); a generous bound, not a measure of speed.
STUCK_SECONDS = 900


def fuzz_command(name: str, *, runs: int | None, seconds: int | None, seed: int | None,
                 input_timeout: int, artifacts: Path, work: Path) -> list[str]:
    seeds = sorted((HERE / "corpus" / name).iterdir())
    seed_list = work / "seeds"
    seed_list.write_text(",".join(str(p) for p in seeds))
    cmd = [sys.executable, str(HERE / "fuzz.py"), name, f"-seed_inputs=@{seed_list}",
           f"-timeout={input_timeout}", "-report_slow_units=3600", "-rss_limit_mb=2048",
           "-print_final_stats=1", f"-artifact_prefix={artifacts / f'{name}-'}"]
    if runs is not None:
        cmd.append(f"-runs={runs}")
    if seconds is not None:
        cmd.append(f"-max_total_time={seconds}")
    if seed is not None:
        cmd.append(f"-seed={seed}")
    # No corpus folder: new inputs stay in memory, so none is written and none is read back
    # (libFuzzer rereads its output folder every second: a time-dependent step). -reload=0 too.
    return [*cmd, "-reload=0"]


def _fixed_addresses() -> None:
    """Run the fuzzer without address space randomisation (in the child, before exec): objects
    then sit at the same addresses every run, and so do the orders and comparisons that depend on
    them (id-keyed sets and dicts, default hashes), which otherwise steer the fuzzer differently
    each run even with a fixed seed."""
    libc = ctypes.CDLL(None, use_errno=True)
    current = libc.personality(0xFFFFFFFF)
    if current == -1 or libc.personality(current | ADDR_NO_RANDOMIZE) == -1:
        os.write(2, b"run.py: cannot turn off address randomisation; runs may differ\n")


def run_target(name: str, cmd: list[str], what: str, artifacts: Path, stuck: int) -> bool:
    """-> True when the target ran to its end without a crash."""
    print(f"== fuzz {name}: {what}", flush=True)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=stuck, env=env, check=False, preexec_fn=_fixed_addresses)
    except subprocess.TimeoutExpired:
        print(f"!! fuzz {name} did not stop within {stuck} s")
        return False
    lines = proc.stdout.strip().splitlines()
    done = [line for line in lines if "DONE" in line or "seed corpus:" in line]
    for line in done or lines[-8:]:
        print(f"   {line}")
    crashes = sorted(artifacts.glob(f"{name}-*"))
    if proc.returncode == 0 and not crashes:
        return True
    if not crashes:
        print("\n".join(lines[-60:]))
    print(f"!! fuzz {name} FAILED (exit {proc.returncode})")
    for path in crashes:
        data = path.read_bytes()
        print(f"!! crashing input: {path} ({len(data)} bytes)")
        if len(data) <= 1024:
            print(f"!! bytes (hex): {data.hex()}")
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", metavar="target", help=f"of {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--seconds", type=int, default=None,
                    help="fuzz each target this long instead of a fixed number of inputs")
    ap.add_argument("--runs", type=int, default=None,
                    help=f"inputs per target (default: {', '.join(f'{t} {n}' for t, n in RUNS.items())}; "
                         "with --seconds: no limit)")
    ap.add_argument("--seed", type=int, default=None,
                    help=f"libFuzzer's seed (default: {CI_SEED}; with --seconds: random)")
    ap.add_argument("--input-timeout", type=int, default=30, help="seconds one input may take")
    ap.add_argument("--artifacts", type=Path, default=None,
                    help="where crashing inputs are kept (default: a new temporary folder)")
    args = ap.parse_args()
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; the targets are {', '.join(TARGETS)}")
    for flag in ("seconds", "runs", "input_timeout"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install -e '.[test]'", file=sys.stderr)
        return 2
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="vmferry-fuzz-artifacts-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    timed = args.seconds is not None
    seed = args.seed if args.seed is not None or timed else CI_SEED
    targets = args.targets or list(TARGETS)
    failed = []
    for name in targets:
        runs = args.runs if args.runs is not None or timed else RUNS[name]
        what = ", ".join(x for x in (f"{args.seconds} s" if timed else "", f"{runs} inputs" if runs else "",
                                     f"seed {seed}" if seed is not None else "random seed") if x)
        work = Path(tempfile.mkdtemp(prefix=f"vmferry-fuzz-{name}-"))
        try:
            cmd = fuzz_command(name, runs=runs, seconds=args.seconds, seed=seed,
                               input_timeout=args.input_timeout, artifacts=artifacts, work=work)
            stuck = 3 * args.seconds + 300 if timed else STUCK_SECONDS
            if not run_target(name, cmd, what, artifacts, stuck):
                failed.append(name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"fuzzing found crashes in: {', '.join(failed)} (inputs under {artifacts})")
        return 1
    print(f"fuzzing: {', '.join(targets)} ran without a crash")
    return 0


if __name__ == "__main__":
    sys.exit(main())
