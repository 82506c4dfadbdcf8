"""Run one fuzz target under atheris: `python tests/fuzz/fuzz.py TARGET [libFuzzer flags] [corpus...]`.

    python tests/fuzz/fuzz.py stream -max_total_time=60 tests/fuzz/corpus/stream
    python tests/fuzz/fuzz.py qmp path/to/crash-input          # replay one input

Only vmferry and the target itself are instrumented for coverage, as they are imported: the
third-party modules (numpy, xxhash, json) are imported first and left alone, which keeps start-up
to seconds rather than the minute instrumenting everything loaded takes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
TARGETS = ("stream", "vmstate", "qmp")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: fuzz.py {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus or input...]")
    name = sys.argv[1]
    import json  # noqa: F401 - imported before instrumenting: not ours, not instrumented

    import numpy  # noqa: F401
    import xxhash  # noqa: F401

    module_name = f"fuzz_{name}"
    with atheris.instrument_imports(include=["vmferry", module_name]):
        spec = importlib.util.spec_from_file_location(module_name, HERE / f"{module_name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # VMState resolves field annotations through it
        spec.loader.exec_module(module)
    atheris.Setup([sys.argv[0], *sys.argv[2:]], module.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
