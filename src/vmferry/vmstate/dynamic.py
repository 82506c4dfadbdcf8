"""`vmferry check-compat --dynamic`: run device states through both sides' code, not only compare
their declarations.

The static check (`compat.py`) reads two descriptions, as QEMU's vmstate-static-checker does, and
so cannot see what a side's code does with a state: which subsections its `needed()` really sends,
what its `validate()` refuses, whether a version it claims to read is the layout it decodes. This
pass generates device states, seeded and systematic, that exercise every conditional subsection
and every version both sides share; encodes each with the sending side's code at the version its
machine type pins (and at every other version the receiver claims to read); and decodes it with
the receiving side's code exactly as a destination does (against the sender's description). It
reports every state the receiver refuses or reads differently, and every state the sender drops
without saying so (a subsection whose `needed()` is false while it holds more than its reset
values: the destination would keep its reset values, and the state is lost without an error).

A side is one machine type of one build (`Side`): this build's own code (`build_side`), or a
description JSON (`description_side`: what `vmferry describe` printed, e.g. a committed schema
of a release), whose sections become VMState classes here. A described side has no `needed()` of
its own, so its subsections are generated both present and absent.

The contract the `needed()` check relies on: a subsection not sent means "every field of it is
at its reset value" (that is what the destination keeps). The generator draws each field on its
own; a device whose fields are tied together says so in `validate()`, and states the sender's own
`validate()` refuses are never generated (they are not states that device can be in).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Mapping
from typing import Any

from vmferry.errors import StateLoadError, VmferryError
from vmferry.vmstate.compound import Array, Bits, List, Struct
from vmferry.vmstate.fields import (
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
    Bytes,
    Field,
    FieldOptions,
    FieldType,
    Int,
    Pad,
    Str,
    VarBytes,
)
from vmferry.vmstate.state import Section, VMState

DEFAULT_EXAMPLES = 64
DEFAULT_SEED = 1

# Finding kinds (the static check's kinds where they are the same question).
SECTION_REMOVED = "section-removed"
VERSION_TOO_NEW = "version-too-new"
MINIMUM_RAISED = "minimum-version-raised"
SUBSECTION_UNKNOWN = "subsection-unknown"
REFUSED = "state-refused"
MISREAD = "state-misread"
NEEDED_LOSES_STATE = "needed-loses-state"
CLAIMED_VERSION_MISREAD = "claimed-version-misread"


@dataclasses.dataclass(frozen=True)
class SectionSpec:
    """One section a side sends (or, if `load_only`, only accepts)."""

    cls: type[VMState]
    version: int
    load_only: bool = False
    # Whether `needed()` is this side's real code (False: a described side; generate both ways).
    has_code: bool = True


@dataclasses.dataclass(frozen=True)
class Side:
    """One machine type of one build: `label` says which build ("this build", a file name)."""

    machine: str
    label: str
    sections: Mapping[str, SectionSpec]
    # Compat properties the machine type pins: "section.attribute" -> value, set on every
    # generated state before `needed()` is asked (a device feature switched off by an old type).
    compat: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.machine} ({self.label})"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One reason a migration between two sides would fail or lose state."""

    kind: str
    source: str  # "vmferry-0.1 (this build)"
    destination: str
    section: str
    field: str | None
    detail: str

    def __str__(self) -> str:
        where = f"section '{self.section}'" + (f", field '{self.field}'" if self.field else "")
        return f"{self.source} -> {self.destination}: {where}: {self.detail} [{self.kind}]"


# --- sides -------------------------------------------------------------------------------------


def build_side(machine: str, label: str = "this build") -> Side:
    """This build's code for `machine`: its sections at the versions the machine type pins, and
    the compat properties it sets."""
    from vmferry.machine.machine_type import MACHINE_ALIASES, MACHINE_TYPES, section_registry

    machine = MACHINE_ALIASES.get(machine, machine)  # build:vmferry is the newest, as -M vmferry
    entries = section_registry().entries(machine)
    sections = {e.cls.name: SectionSpec(e.cls, e.version, e.load_only) for e in entries}
    # The devices' properties as the machine type sets them ("serial.properties" -> {...}), so a
    # needed() that reads a compat property ("lsr-overrun") is asked with the type's value.
    mt = MACHINE_TYPES.get(machine)
    compat: dict[str, Any] = {}
    if mt is not None:
        props = mt.device_properties()
        compat = {f"{s.section.name}.properties": props[s.id] for s in mt.devices if s.id in props}
    return Side(machine, label, sections, compat)


def description_side(description: Mapping[str, Any], label: str) -> Side:
    """A side from a `vmferry describe` description: each section becomes a VMState class of the
    versions it describes (fields whose version_id is above the section's are not in it)."""
    if not isinstance(description, Mapping):
        raise VmferryError(f"{label}: a description must be a JSON object")
    machine = str((description.get("vmschkmachine") or {}).get("Name") or label)
    sections: dict[str, SectionSpec] = {}
    for name, d in description.items():
        if name == "vmschkmachine" or not isinstance(d, Mapping):
            continue
        try:
            cls = _described_class(d)
        except (KeyError, TypeError, ValueError) as e:
            raise VmferryError(f"{label}: section '{name}' has a malformed description: {e}") from None
        sections[cls.name] = SectionSpec(cls, int(d["version_id"]), bool(d.get("load_only")), has_code=False)
    return Side(machine, label, sections)


_INTS = {t.type_name: t for t in (U8, U16, U32, U64, I8, I16, I32, I64)}


def _described_class(d: Mapping[str, Any]) -> type[VMState]:
    version = int(d["version_id"])
    ns: dict[str, Any] = {"name": d["name"], "version": version,
                          "minimum_version": min(int(d["minimum_version_id"]), version),
                          "subsections": tuple(_described_class(s) for s in d.get("subsections", [])),
                          "__annotations__": {}, "__module__": __name__}
    _described_fields(d["fields"], ns)
    return type(f"Described[{d['name']}]", (VMState,), ns)


def _described_fields(entries: list[Mapping[str, Any]], ns: dict[str, Any]) -> None:
    for i, e in enumerate(entries):
        name = e["field"]
        ns["__annotations__"][name] = _described_type(e, i)
        ns[name] = FieldOptions(since=int(e.get("version_id", 0)))


def _described_type(e: Mapping[str, Any], i: int) -> FieldType:
    kind = e["type"]
    if e.get("pad"):
        t: FieldType = Pad(int(e["size"]) * int(e.get("count", 1)))
        return t
    if kind in ("struct", "list"):
        nested = e["Description"]
        ns: dict[str, Any] = {"name": nested.get("name") or e["field"], "__annotations__": {},
                              "__module__": __name__, "version": 1 << 30}
        _described_fields(nested["fields"], ns)
        inner = type(f"Described[{ns['name']}]", (VMState,), ns)
        t = Struct(inner) if kind == "struct" else List(inner, int(e["max"]))
    elif kind in _INTS:
        t = _INTS[kind]
        if e.get("bits"):
            t = Bits(t, {b["name"]: int(b["width"]) for b in e["bits"]})  # type: ignore[arg-type]
    elif kind == "bool":
        t = Bool
    elif kind == "bytes":
        t = Bytes(int(e["size"]))
    elif kind == "vbytes":
        t = VarBytes(int(e["max"]))
    elif kind == "str":
        t = Str(int(e["max"]))
    else:
        raise ValueError(f"field {i} '{e.get('field')}' has unknown type {kind!r}")
    return Array(t, int(e["count"])) if "count" in e and kind != "list" else t


# --- generated states ----------------------------------------------------------------------------


# The three shapes of a generated state: every field at its reset value, every field at the end
# of its range, and each field drawn on its own (reset, extreme or random).
DEFAULTS, EXTREMES, MIXED = "defaults", "extremes", "mixed"


def _value(t: FieldType, default: Any, rng: random.Random, shape: str) -> Any:
    """One value of `t`: the field's reset value, the extreme of its range, or (mixed) either
    of those or a random one, drawn field by field."""
    if shape == DEFAULTS:
        return default
    if shape == MIXED:
        r = rng.random()
        if r < 0.4:
            return default
        shape = EXTREMES if r < 0.55 else "random"
    extreme = shape == EXTREMES
    if isinstance(t, Bits):
        return {n: ((1 << w) - 1 if extreme else rng.randrange(1 << w)) for n, w in t.layout.items()}
    if isinstance(t, Int):
        return (t.lo if t.signed and rng.random() < 0.5 else t.hi) if extreme else rng.randint(t.lo, t.hi)
    if t is Bool:
        return True if extreme else rng.random() < 0.5
    if isinstance(t, Str):
        n = min(t.max, 12 if extreme else rng.randint(0, 12))
        return "".join(rng.choice("abcxyz") for _ in range(n))
    if isinstance(t, VarBytes):
        n = min(t.max, 12 if extreme else rng.randint(0, 12))
        return bytes(rng.randrange(256) for _ in range(n))
    if isinstance(t, Bytes):
        return b"\xff" * t.nbytes if extreme else bytes(rng.randrange(256) for _ in range(t.nbytes))
    if isinstance(t, Array):
        return [_value(t.elem, t.elem.default(), rng, shape) for _ in range(t.count)]
    if isinstance(t, Struct):
        return _values(t.cls.fields, rng, shape)
    if isinstance(t, List):
        n = min(t.max, 2 if extreme else rng.randint(0, 3))
        return [_values(t.cls.fields, rng, shape) for _ in range(n)]
    return default


def _values(fields: tuple[Field, ...], rng: random.Random, shape: str) -> dict[str, Any]:
    return {f.name: _value(f.type, f.default_value(), rng, shape) for f in fields if f.type.carries_value}


def _reset_values(cls: type[VMState]) -> dict[str, Any]:
    return {f.name: f.default_value() for f in cls.fields if f.type.carries_value}


class _StateObject:
    """A device as the generated state describes it: every field of the section and of its
    subsections as an attribute (by the attribute name it binds to), then the machine type's
    compat properties. `needed()` is asked about this object."""

    def __init__(self, spec_cls: type[VMState], values: dict[str, Any], subs: dict[str, dict[str, Any]],
                 props: Mapping[str, Any]) -> None:
        for f in spec_cls.fields:
            if f.name in values:
                setattr(self, f.attr, values[f.name])
        for sub in spec_cls.subsections:
            for f in sub.fields:
                if f.name in subs.get(sub.name, {}):
                    setattr(self, f.attr, subs[sub.name][f.name])
        for attr, value in props.items():
            setattr(self, attr, value)


@dataclasses.dataclass
class _Example:
    section: Section
    lost: list[tuple[str, str, Any, Any]]  # (subsection, field, value held, reset value) never sent


def _examples(spec: SectionSpec, version: int, props: Mapping[str, Any], rng: random.Random,
              count: int) -> Iterator[_Example]:
    """Generated states of one section at `version`: all reset values, all extremes, then mixed
    ones; each subsection present when the sender's `needed()` says so (or, without code, in
    turn present and absent, so every one is seen both ways)."""
    cls = spec.cls
    for i in range(count):
        shape = DEFAULTS if i == 0 else EXTREMES if i == 1 else MIXED
        values = _values(tuple(f for f in cls.fields if f.since <= version), rng, shape)
        for f in cls.fields:
            if f.since > version and f.type.carries_value:
                values[f.name] = f.default_value()
        subs = {sub.name: _values(sub.fields, rng, shape) for sub in cls.subsections_at(version)}
        for key, value in props.items():
            for bag in (values, *subs.values()):
                if key in bag:
                    bag[key] = value
        obj = _StateObject(cls, values, subs, props)
        sec = Section(cls.name, version, values)
        lost: list[tuple[str, str, Any, Any]] = []
        for j, sub in enumerate(cls.subsections_at(version)):
            needed = _needed(sub, obj, spec.has_code)
            if needed is None:  # no code to ask: alternate, so each is seen present and absent
                present = (i + j) % 2 == 1 if shape == MIXED else shape == EXTREMES
            else:
                present = needed
            if present:
                sec.subsections[sub.name] = Section(sub.name, sub.version, subs[sub.name])
            elif needed is False:  # the sender's own code chose not to send it
                reset = _reset_values(sub)
                lost += [(sub.name, n, v, reset[n]) for n, v in subs[sub.name].items() if v != reset[n]]
        yield _Example(sec, lost)


def _needed(sub: type[VMState], obj: object, has_code: bool) -> bool | None:
    if not has_code:
        return None
    try:
        return bool(sub.needed(obj))
    except (AttributeError, KeyError, TypeError):
        return None  # bound to a real device's internals; it cannot be asked about a plain state


# --- the pass ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Coverage:
    """How many generated states ran through both sides, per section; and the sections none
    reached (a validate() refused every generated state as one no device can be in), which the
    pass therefore did not check."""

    ran: dict[str, int] = dataclasses.field(default_factory=dict)

    def unreached(self) -> list[str]:
        return sorted(name for name, n in self.ran.items() if n == 0)

    def __str__(self) -> str:
        total = sum(self.ran.values())
        text = f"{total} generated states of {len(self.ran)} sections ran through both sides"
        gaps = self.unreached()
        return text + (f"; not reached (validate() refused every generated state): {'; '.join(gaps)}"
                       if gaps else "")


def check_dynamic(source: Side, destination: Side, *, examples: int = DEFAULT_EXAMPLES,
                  seed: int = DEFAULT_SEED, coverage: Coverage | None = None) -> list[Finding]:
    """Everything that breaks (or silently loses state in) a migration from `source` to
    `destination`, found by running generated states through both sides' code."""
    coverage = Coverage() if coverage is None else coverage
    found: dict[tuple[str, str, str | None], Finding] = {}
    src, dst = str(source), str(destination)

    def add(kind: str, section: str, field: str | None, detail: str) -> None:
        found.setdefault((kind, section, field), Finding(kind, src, dst, section, field, detail))

    for name in sorted(source.sections):
        spec = source.sections[name]
        if spec.load_only:
            continue
        rng = random.Random(f"{seed}:{name}")
        props = {k.split(".", 1)[1]: v for k, v in source.compat.items() if k.split(".", 1)[0] == name}
        peer = destination.sections.get(name)
        if peer is None:
            add(SECTION_REMOVED, name, _first_field(spec.cls, spec.version),
                f"the source sends this section (fields {_names(spec.cls, spec.version)}); the "
                "destination's machine type has no such section")
            continue
        key = f"{src} -> {dst}: {name}"
        coverage.ran[key] = coverage.ran.get(key, 0)
        _check_section(spec, peer.cls, props, rng, examples, add, coverage.ran, key)
    return list(found.values())


def check_both_ways(a: Side, b: Side, **kw: Any) -> list[Finding]:
    """a -> b and b -> a: backward migration is the same question asked the other way."""
    return check_dynamic(a, b, **kw) + check_dynamic(b, a, **kw)


def _check_section(spec: SectionSpec, receiver: type[VMState], props: Mapping[str, Any], rng: random.Random,
                   examples: int, add: Any, ran: dict[str, int], key: str) -> None:
    sender, pinned = spec.cls, spec.version
    name = sender.name
    if pinned > receiver.version:
        newer = [f.name for f in sender.fields if receiver.version < f.since <= pinned]
        add(VERSION_TOO_NEW, name, newer[0] if newer else _first_field(sender, pinned),
            f"the source's machine type sends version {pinned} (fields since version {receiver.version + 1}: "
            f"{', '.join(newer) or 'none'}); the destination reads at most version {receiver.version} "
            "(a machine type must pin the version its release sent)")
        return
    if pinned < receiver.minimum_version:
        add(MINIMUM_RAISED, name, _first_field(sender, pinned), f"the source sends version {pinned}; the "
            f"destination's minimum version is {receiver.minimum_version}")
        return
    # Every version both sides claim: the pinned one must load; the others are promises the
    # receiver's minimum_version makes, and a promise it cannot keep is a bug of its own.
    low = max(sender.minimum_version, receiver.minimum_version)
    shared = range(low, min(sender.version, receiver.version) + 1)
    for version in sorted(set(shared) | {pinned}, key=lambda v: v != pinned):
        kind = REFUSED if version == pinned else CLAIMED_VERSION_MISREAD
        n = examples if version == pinned else max(4, examples // 4)
        for ex in _examples(spec, version, props, rng, n):
            outcome = _one(sender, receiver, ex.section, version, kind, spec.has_code, add)
            if outcome is None:
                continue  # not a state the sender can be in
            ran[key] += 1
            if version == pinned:
                for sub, field, held, reset in ex.lost:
                    add(NEEDED_LOSES_STATE, f"{name}/{sub}" if not sub.startswith(name) else sub, field,
                        f"needed() is false for a state whose '{field}' is {held!r}, not its reset value "
                        f"{reset!r}: the subsection is not sent and the destination keeps {reset!r}")
            if outcome:
                break  # one finding per section and version is enough to name it


def _one(sender: type[VMState], receiver: type[VMState], sec: Section, version: int, kind: str,
         has_code: bool, add: Any) -> bool | None:
    """Encode `sec` with the sender's code, decode it with the receiver's: True if that failed,
    False if it worked, None if `sec` is not a state the sender can be in (skipped)."""
    name = sender.name
    try:
        payload = sender.encode(sec)
        expected = sender.decode(payload, description=sender.stream_description(version))
    except (StateLoadError, ValueError):
        return None  # not a state the sender can be in (its own validate() or field checks refuse it)
    if not has_code:
        # A described sender has no validate() of its own: a state the receiver refuses even as
        # its own (same layout, its own round trip) is one neither device can be in.
        try:
            receiver.decode(receiver.encode(sec), version=version)
        except StateLoadError:
            return None
        except (ValueError, KeyError, TypeError):
            pass  # the receiver's layout differs: the check below says how
    known = {s.name for s in receiver.subsections}
    for sub in sec.subsections:
        if sub not in known:
            sub_cls = next(s for s in sender.subsections if s.name == sub)
            add(SUBSECTION_UNKNOWN, sub, _first_field(sub_cls, sub_cls.version),
                f"subsection of '{name}' sent (its needed() is true for this state) but the destination "
                "does not know it and refuses the stream; subsection state: "
                f"{_short(sec.subsections[sub].fields)}")
            return True
    where = "" if kind == REFUSED else f"at version {version}, which it claims to read (minimum_version " \
                                          f"{receiver.minimum_version}): "
    try:
        got = receiver.decode(payload, description=sender.stream_description(version))
    except StateLoadError as e:
        hint = ""
        if kind == REFUSED and "layout differs" in e.reason and receiver.version > version:
            hint = (f" (the destination claims to read version {version} by its minimum_version "
                    f"{receiver.minimum_version}: a changed layout needs a raised minimum_version, or the "
                    "new layout in a new field with since=)")
        add(kind, e.section or name, e.field or _first_field(sender, version),
            f"{where}the destination refuses the source's state: {e.reason}{hint}; "
            f"state: {_short(sec.fields)}")
        return True
    diff = _difference(expected, got)
    if diff is not None:
        section, field, sent, read = diff
        add(MISREAD if kind == REFUSED else kind, section, field,
            f"{where}the source sends {sent!r}; the destination reads {read!r}")
        return True
    return False


def _difference(sent: Section, got: Section) -> tuple[str, str, Any, Any] | None:
    for field, value in sent.fields.items():
        if field in got.fields and got.fields[field] != value:
            return sent.name, field, value, got.fields[field]
    for sub, subsec in sent.subsections.items():
        if sub not in got.subsections:
            return sub, next(iter(subsec.fields), "(none)"), subsec.fields, None
        d = _difference(subsec, got.subsections[sub])
        if d is not None:
            return d
    return None


def _first_field(cls: type[VMState], version: int) -> str | None:
    names = [f.name for f in cls.fields if f.since <= version]
    return names[0] if names else None


def _names(cls: type[VMState], version: int) -> str:
    return ", ".join(f.name for f in cls.fields if f.since <= version) or "none"


def _short(values: dict[str, Any], limit: int = 160) -> str:
    text = repr(values)
    return text if len(text) <= limit else text[: limit - 3] + "..."
