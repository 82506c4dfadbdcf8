"""A test device that was split in two, proving an old section loads onto new devices.

Release 1 ("testdev-1") had one device, section `testdev` version 1 with fields a, b, c, d.
Release 2 ("testdev-2") has two devices: `testdev-front` (a, b) and `testdev-back` (c, d), each
at version 2. A release-2 destination still accepts a release-1 stream: `TestDevV1State` stays
registered there as a `load_only` section bound to the machine's device map, and its load hooks
route the old values to the new devices. Backward, release 2 started with the old machine type
"testdev-1" builds the two devices but sends the old single section (`capture` gathers it from
both), so a release-1 destination loads it. tests/fixtures/testdev-v1.* is a payload the
release-1 layout produced, committed once.

No machine type of a real vmferry release carries this device (release 0.1.0 has vmferry-0.1
only): it proves the split at the section and stream level, not between vmferry processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmferry.vmstate.compound import Array
from vmferry.vmstate.fields import U8, U16, U32, Bytes
from vmferry.vmstate.registry import Registry
from vmferry.vmstate.state import VMState


class TestDevFrontState(VMState):
    name = "testdev-front"
    version = 2
    minimum_version = 2
    a: U32
    b: U16

    @classmethod
    def post_load(cls, obj: Any, version: int) -> None:
        obj.recompute()


class TestDevBackState(VMState):
    name = "testdev-back"
    version = 2
    minimum_version = 2
    c: Array(U8, 4)
    d: Bytes(8)


class TestDevFront:
    """Release 2's front half. `ready` is derived state: never migrated, recomputed on load."""

    def __init__(self) -> None:
        self.a = 0
        self.b = 0
        self.ready = False

    def recompute(self) -> None:
        self.ready = self.a != 0


class TestDevBack:
    def __init__(self) -> None:
        self.c = [0, 0, 0, 0]
        self.d = bytes(8)


class TestDevV1State(VMState):
    """Release 1's single section. In release 1 it bound to the one `TestDev` device by
    attribute; in release 2 it is `load_only` and binds to the device map (name -> device)."""

    name = "testdev"
    version = 1
    a: U32
    b: U16
    c: Array(U8, 4)
    d: Bytes(8)

    @classmethod
    def capture(cls, obj: Any) -> dict[str, Any]:
        if not isinstance(obj, Mapping):
            return super().capture(obj)  # release 1: the one device itself
        # Release 2 on the old machine type: the one old section, gathered from both halves.
        front = TestDevFrontState.capture(obj["testdev-front"])
        return {**front, **TestDevBackState.capture(obj["testdev-back"])}

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        if not isinstance(obj, Mapping):
            super().apply(obj, values)  # release 1: the one device itself
            return
        # Release 2: the old section's values belong to two devices now. Each half is written
        # through its own state class, so its binding (attribute names, nested builds) applies.
        TestDevFrontState.apply(obj["testdev-front"], {"a": values["a"], "b": values["b"]})
        TestDevBackState.apply(obj["testdev-back"], {"c": values["c"], "d": values["d"]})

    @classmethod
    def post_load(cls, obj: Any, version: int) -> None:
        if isinstance(obj, Mapping):
            # What each new device's own load would have finished with.
            TestDevFrontState.post_load(obj["testdev-front"], version)
            TestDevBackState.post_load(obj["testdev-back"], version)


class TestDev:
    """Release 1's device, kept to produce the fixture and to test release-1 round trips."""

    def __init__(self, a: int = 0, b: int = 0, c: list[int] | None = None, d: bytes = bytes(8)) -> None:
        self.a, self.b, self.c, self.d = a, b, c if c is not None else [0, 0, 0, 0], d


def register_testdev(reg: Registry) -> None:
    """Machine types "testdev-1" and "testdev-2" as the two releases register them."""
    reg.register("testdev-1", TestDevV1State)
    reg.register("testdev-2", TestDevFrontState)
    reg.register("testdev-2", TestDevBackState)
    reg.register("testdev-2", TestDevV1State, load_only=True)
