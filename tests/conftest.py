"""Shared test setup: real-KVM tests are marked `kvm`; without /dev/kvm they skip, unless
VMFERRY_REQUIRE_KVM=1 (as on CI), where a missing /dev/kvm is a failure. Hypothesis runs without
its per-example deadline: on a loaded host an example of pure logic may take 300 ms once and 1 ms
the next time, and a test must not fail for the machine being busy."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator

import pytest
from hypothesis import settings

from vmferry.testing import netns
from vmferry.testing.netns import VethLink
from vmproc import VmProcess

settings.register_profile("vmferry", deadline=None)
settings.load_profile("vmferry")

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
REQUIRE_KVM = os.environ.get("VMFERRY_REQUIRE_KVM") == "1"
HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kvm" in item.keywords and not HAVE_KVM:
            if REQUIRE_KVM:
                item.add_marker(pytest.mark.usefixtures("_fail_without_kvm"))
            else:
                item.add_marker(pytest.mark.skip(reason="no usable /dev/kvm"))
        if "qemu" in item.keywords and not HAVE_QEMU:
            if REQUIRE_KVM:
                item.add_marker(pytest.mark.usefixtures("_fail_without_qemu"))
            else:
                item.add_marker(pytest.mark.skip(reason="qemu-system-x86_64 not installed"))


@pytest.fixture
def _fail_without_kvm() -> None:
    pytest.fail("VMFERRY_REQUIRE_KVM=1 but /dev/kvm is missing or not accessible")


@pytest.fixture
def _fail_without_qemu() -> None:
    pytest.fail("VMFERRY_REQUIRE_KVM=1 (CI) but qemu-system-x86_64 is not installed")


@pytest.fixture
def procs() -> Iterator[list[VmProcess]]:
    """VM processes a test starts (append each): all stopped at the end, whatever happened —
    continued first, since a SIGSTOPped process cannot handle SIGTERM."""
    started: list[VmProcess] = []
    try:
        yield started
    finally:
        for p in started:
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(signal.SIGCONT)
            p.close()


@pytest.fixture
def netns_link() -> Iterator[VethLink]:
    """A network namespace of its own behind a veth pair (unshaped), removed afterwards: run a
    destination in it with `wrap=netns_link.exec_prefix`, cut the link with `netns_link.down()`.
    Needs root and iproute2; on CI (VMFERRY_REQUIRE_KVM=1) their absence fails."""
    why_not = netns.available()
    if why_not:
        if REQUIRE_KVM:
            pytest.fail(why_not)
        pytest.skip(why_not)
    with netns.veth_link() as link:
        yield link
