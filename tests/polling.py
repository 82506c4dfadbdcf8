"""Small helpers the KVM tests share: wait for a condition, read a heartbeat's ticks."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def wait_for(pred: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
    """Poll until pred() is truthy; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def ticks(*paths: Path) -> list[int]:
    """The tick numbers in the concatenated serial output of `paths`."""
    text = "".join(p.read_text() for p in paths if p.exists())
    return [int(n) for n in re.findall(r"^tick (\d+)$", text, re.M)]
