"""The mutation suite of `check-compat --dynamic`: seeded incompatibilities between a released
machine type and this build's same machine type, every one of which must be caught, with a
message naming the section, the field and the machine type.

The release ("m-0.1" of the release) and this build ("m-0.1" of this build, after a compatible
evolution: a field in a new section version the machine type does not send, and a subsection
switched off by a compat property) are migratable both ways; the suite first proves the pass
finds nothing there (no false positives, for any seed), then breaks this build one way at a time.
Some mutations only the dynamic pass can see (a `needed()` that reads the wrong field, a
`validate()` that refuses what the release sends); those are checked to be invisible to the
static check, which is why the dynamic pass exists.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import StateLoadError
from vmferry.vmstate import (
    I8,
    U8,
    U16,
    U32,
    U64,
    Array,
    Bits,
    Bool,
    Bytes,
    List,
    Pad,
    Str,
    Struct,
    VarBytes,
    VMState,
    field,
)
from vmferry.vmstate import compat as static
from vmferry.vmstate import dynamic as dyn
from vmferry.vmstate.description import qemu_description

MACHINE = "m-0.1"


def make(name: str, fields: dict[str, Any], *, version: int = 1, minimum: int = 1,
         subsections: tuple[type[VMState], ...] = (), needed: Callable[[Any], bool] | None = None,
         validate: Callable[[dict[str, Any], int], None] | None = None) -> type[VMState]:
    """A section class from data: `fields` maps name -> type or (type, since)."""
    ns: dict[str, Any] = {"name": name, "version": version, "minimum_version": minimum,
                          "subsections": subsections, "__annotations__": {}}
    for fname, spec in fields.items():
        ftype, since = spec if isinstance(spec, tuple) else (spec, 0)
        ns["__annotations__"][fname] = ftype
        ns[fname] = field(since=since)
    if needed is not None:
        ns["needed"] = classmethod(lambda cls, obj: needed(obj))
    if validate is not None:
        ns["validate"] = classmethod(lambda cls, values, version: validate(values, version))
    return type(name.replace("/", "_"), (VMState,), ns)


LCR = {"word_length": 2, "stop_bits": 1, "parity": 3}


@dataclasses.dataclass
class Build:
    """One build's m-0.1, as data a mutation edits: sections (name -> make() arguments and the
    version m-0.1 sends) and the compat properties m-0.1 pins."""

    sections: dict[str, dict[str, Any]]
    pinned: dict[str, int]
    compat: dict[str, Any]

    def side(self, label: str) -> dyn.Side:
        specs = {}
        for name, kw in self.sections.items():
            kw = dict(kw)
            subs = tuple(make(**s) for s in kw.pop("subsections", []))
            specs[name] = dyn.SectionSpec(make(name, subsections=subs, **kw), self.pinned[name])
        return dyn.Side(MACHINE, label, specs, dict(self.compat))

    def description(self) -> dict[str, Any]:
        side = self.side("static")
        return {"vmschkmachine": {"Name": MACHINE},
                **{n: qemu_description(s.cls, s.version) for n, s in side.sections.items()}}


def release() -> Build:
    return Build(
        sections={
            "uart": {"version": 2, "fields": {"ier": U8, "lcr": Bits(U8, LCR), "divisor": U16,
                                              "fcr": (U8, 2)},
                     "subsections": [
                         {"name": "uart/fifo", "fields": {"fifo": VarBytes(max=16)},
                          "needed": lambda o: len(o.fifo) > 0},
                         {"name": "uart/timeout", "fields": {"timeout_ns": U64},
                          "needed": lambda o: o.timeout_ns != 0},
                     ]},
            "timer": {"fields": {"count": U32, "mode": U8, "channels": Array(U16, 3),
                                 "latch": Struct(make("timer-latch", {"value": U16, "flags": U8}))}},
            "queue": {"fields": {"requests": List(make("queue-req", {"id": U32, "data": Bytes(4)}), max=8),
                                 "label": Str(max=16), "enabled": Bool}},
            "nic": {"version": 3, "minimum": 3, "fields": {"mac": Bytes(6), "mtu": U16, "features": U32},
                    "subsections": [{"name": "nic/offload", "fields": {"tso": Bool, "csum": Bool},
                                     "needed": lambda o: o.tso or o.csum}]},
        },
        pinned={"uart": 2, "timer": 1, "queue": 1, "nic": 3},
        compat={},
    )


def this_build() -> Build:
    """The release evolved compatibly: uart version 3 adds `scr` (m-0.1 still sends version 2),
    and a new subsection `uart/coalesce` that m-0.1 switches off (compat property coalesce_us=0)."""
    b = release()
    uart = b.sections["uart"]
    uart["version"] = 3
    uart["fields"]["scr"] = (U8, 3)
    uart["subsections"].append({"name": "uart/coalesce", "fields": {"coalesce_us": U16},
                                "needed": lambda o: o.coalesce_us != 0})
    b.compat["uart.coalesce_us"] = 0
    return b


def _fields(b: Build, section: str) -> dict[str, Any]:
    return b.sections[section]["fields"]


def _sub(b: Build, name: str) -> dict[str, Any]:
    return next(s for sec in b.sections.values() for s in sec.get("subsections", []) if s["name"] == name)


def _reorder(d: dict[str, Any], order: list[str]) -> None:
    items = {k: d[k] for k in order}
    d.clear()
    d.update(items)


def _rename_key(d: dict[str, Any], old: str, new: str) -> None:
    items = [(new if k == old else k, v) for k, v in d.items()]
    d.clear()
    d.update(items)


def _mtu_limit(values: dict[str, Any], version: int) -> None:
    if values["mtu"] > 9000:
        raise StateLoadError(f"mtu {values['mtu']} above 9000", section="nic", field="mtu")


def _edit(fn: Callable[[Build], None]) -> Callable[[], Build]:
    def mutated() -> Build:
        b = this_build()
        fn(b)
        return b
    return mutated


def _set(section: str, **types: Any) -> Callable[[], Build]:
    """A mutation: these fields of `section` get these types (a new field is appended)."""
    return _edit(lambda b: _fields(b, section).update(types))


def _needed(subsection: str, needed: Callable[[Any], bool]) -> Callable[[], Build]:
    return _edit(lambda b: _sub(b, subsection).update(needed=needed))


REQ = {"id": U32, "data": Bytes(4)}
LATCH = {"value": U16, "flags": U8}

# (id, mutation, section and fields a message must name, whether the static check can tell it from
# the unmutated build). 100 % must be caught by the dynamic pass.
MUTATIONS: list[tuple[str, Callable[[], Build], str, set[str], bool]] = [
    ("field-resized", _set("timer", count=U16), "timer", {"count"}, True),
    ("field-signedness-changed", _set("timer", mode=I8), "timer", {"mode"}, True),
    ("fields-reordered",
     _edit(lambda b: _reorder(_fields(b, "uart"), ["lcr", "ier", "divisor", "fcr", "scr"])),
     "uart", {"ier", "lcr"}, True),
    ("field-removed", _edit(lambda b: _fields(b, "queue").pop("enabled")), "queue", {"enabled"}, True),
    ("field-added-without-version-bump", _set("timer", reload=U16), "timer", {"reload"}, True),
    ("field-renamed", _edit(lambda b: _rename_key(_fields(b, "timer"), "mode", "op_mode")),
     "timer", {"mode", "op_mode"}, True),
    ("bool-became-u8", _set("queue", enabled=U8), "queue", {"enabled"}, True),
    ("retired-to-padding-of-another-size", _set("queue", enabled=Pad(2)), "queue", {"enabled"}, True),
    ("array-length-changed", _set("timer", channels=Array(U16, 4)), "timer", {"channels"}, True),
    ("nested-struct-field-resized", _set("timer", latch=Struct(make("timer-latch", {**LATCH, "value": U32}))),
     "timer", {"latch.value"}, True),
    ("list-element-field-resized",
     _set("queue", requests=List(make("queue-req", {**REQ, "data": Bytes(8)}), max=8)),
     "queue", {"requests.data"}, True),
    ("list-max-lowered", _set("queue", requests=List(make("queue-req", REQ), max=2)),
     "queue", {"requests"}, True),
    ("str-max-lowered", _set("queue", label=Str(max=4)), "queue", {"label"}, True),
    ("bitfields-reordered", _set("uart", lcr=Bits(U8, {"word_length": 2, "parity": 3, "stop_bits": 1})),
     "uart", {"lcr"}, True),
    ("bitfield-narrowed", _set("uart", lcr=Bits(U8, {**LCR, "parity": 2})), "uart", {"lcr"}, True),
    ("subsection-removed", _edit(lambda b: b.sections["uart"]["subsections"].pop(0)),
     "uart/fifo", {"fifo"}, True),
    ("subsection-renamed", _edit(lambda b: _sub(b, "uart/fifo").update(name="uart/rx-fifo")),
     "uart/fifo", {"fifo"}, True),
    ("needed-reads-the-wrong-field", _needed("uart/timeout", lambda o: o.divisor != 0),
     "uart/timeout", {"timeout_ns"}, False),
    ("needed-always-false", _needed("nic/offload", lambda o: False), "nic/offload", {"tso", "csum"}, False),
    ("version-bump-without-raising-the-minimum",
     _edit(lambda b: (b.sections["timer"].update(version=2), _fields(b, "timer").update(count=U64))),
     "timer", {"count"}, True),
    ("missing-compat-entry-version", _edit(lambda b: b.pinned.update(uart=3)), "uart", {"scr"}, True),
    # The static check reports uart/coalesce for the unmutated build too: it cannot see the pin.
    ("missing-compat-entry-property", _edit(lambda b: b.compat.pop("uart.coalesce_us")),
     "uart/coalesce", {"coalesce_us"}, False),
    ("minimum-version-raised",
     _edit(lambda b: (b.sections["nic"].update(version=4, minimum=4), b.pinned.update(nic=4),
                      _fields(b, "nic").update(mtu2=(U32, 4)))),
     "nic", {"mac", "mtu2"}, True),
    ("section-removed", _edit(lambda b: (b.sections.pop("queue"), b.pinned.pop("queue"))),
     "queue", {"requests"}, True),
    ("validate-refuses-what-the-release-sends",
     _edit(lambda b: b.sections["nic"].update(validate=_mtu_limit)),
     "nic", {"mtu"}, False),
]


def test_the_suite_has_at_least_twenty_mutations() -> None:
    assert len(MUTATIONS) >= 20
    assert len({m[0] for m in MUTATIONS}) == len(MUTATIONS)


def test_the_unmutated_build_is_compatible_both_ways() -> None:
    coverage = dyn.Coverage()
    old, new = release().side("release"), this_build().side("this build")
    assert dyn.check_dynamic(old, new, coverage=coverage) == []
    assert dyn.check_dynamic(new, old, coverage=coverage) == []
    assert coverage.unreached() == []
    assert static.check_compat(release().description(), this_build().description()) == []


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_no_false_positives_for_any_seed(seed: int) -> None:
    old, new = release().side("release"), this_build().side("this build")
    assert dyn.check_both_ways(old, new, seed=seed, examples=24) == []


def test_the_generator_sends_every_subsection_and_leaves_it_out() -> None:
    """Every conditional subsection is seen present and absent (each needed() both ways)."""
    side = this_build().side("this build")
    seen: dict[str, set[bool]] = {}
    for name, spec in side.sections.items():
        for ex in dyn._examples(spec, spec.version, {}, random.Random(name), dyn.DEFAULT_EXAMPLES):
            for sub in spec.cls.subsections:
                seen.setdefault(sub.name, set()).add(sub.name in ex.section.subsections)
    assert seen == {"uart/fifo": {True, False}, "uart/timeout": {True, False}, "uart/coalesce": {True, False},
                    "nic/offload": {True, False}}


@pytest.mark.parametrize(("mutate", "section", "fields", "static_sees_it"),
                         [pytest.param(*m[1:], id=m[0]) for m in MUTATIONS])
def test_every_seeded_incompatibility_is_caught(mutate: Callable[[], Build], section: str, fields: set[str],
                                                static_sees_it: bool) -> None:
    old, new = release().side("release"), mutate().side("this build")
    findings = dyn.check_both_ways(old, new)
    named = [f for f in findings if f.section == section and f.field in fields]
    assert named, "\n".join(map(str, findings)) or "nothing found"
    for f in named:
        text = str(f)
        assert f"section '{section}'" in text and f"field '{f.field}'" in text
        assert f"{MACHINE} (release)" in text and f"{MACHINE} (this build)" in text
    assert bool(_static_findings(mutate()) - _static_findings(this_build())) == static_sees_it


def _static_findings(build: Build) -> set[str]:
    """The static check both ways. Even the unmutated build has one: it cannot know that m-0.1
    never sends uart/coalesce (a compat property switches it off), so it reports it may."""
    old, new = release().description(), build.description()
    return {str(p) for p in static.check_compat(old, new) + static.check_compat(new, old)}
