"""`VMState`: a declared section of device state, its binding to a device, save and load.

```python
class SerialState(VMState):
    name = "serial"; version = 3; minimum_version = 2
    ier: U8
    divisor: U16
    fcr: U8 = field(since=3, default=0)
    subsections = (SerialFifo,)            # SerialFifo.needed(dev) -> bool
```

The class is a description, never instantiated: everything is a classmethod. It binds to a device
object by attribute name (`field(attr=...)` to rename); a device whose state is not plain
attributes overrides `capture` / `apply`. Loading is all-or-nothing: the whole payload, its
subsections included, is decoded and validated before the first attribute is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

from vmferry.errors import StateLoadError
from vmferry.vmstate import description as desc
from vmferry.vmstate.compound import Array, List, Struct
from vmferry.vmstate.fields import (
    MAX_NESTING,
    Field,
    FieldOptions,
    FieldType,
    Reader,
    decode_fields,
    encode_fields,
)


@dataclasses.dataclass
class Section:
    """Decoded (or captured) values of one section: the version they are at, the field values
    (nested structs as dicts, lists as lists of dicts, bitfields as dicts, padding absent) and
    the subsections present, by name."""

    name: str
    version: int
    fields: dict[str, Any]
    subsections: dict[str, Section] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON form (bytes as lowercase hex): what `vmferry analyze` shows, plus name and version."""
        return {
            "name": self.name,
            "version": self.version,
            "fields": jsonable(self.fields),
            "subsections": {n: s.to_json() for n, s in self.subsections.items()},
        }


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


class VMState:
    """Base of every state description. Subclasses set `name`, `version`, `minimum_version`,
    optionally `subsections`, and annotate fields with field types."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    minimum_version: ClassVar[int] = 1
    subsections: ClassVar[tuple[type[VMState], ...]] = ()
    fields: ClassVar[tuple[Field, ...]] = ()
    # Subsections only: the parent section's version from which this subsection exists. A
    # parent sent at an older version neither describes nor sends it, so a machine type pinned
    # to that version keeps the older stream byte for byte (0: always there).
    since: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.fields = tuple(cls.fields) + tuple(_own_fields(cls))
        _check_class(cls)

    # --- hooks: override as classmethods -----------------------------------------------------

    @classmethod
    def subsections_at(cls, version: int) -> tuple[type[VMState], ...]:
        """The subsections a stream of this section's `version` describes (and may send)."""
        return tuple(sub for sub in cls.subsections if sub.since <= version)

    @classmethod
    def needed(cls, obj: Any) -> bool:
        """Subsections only: send this subsection for `obj`? (Default: always.)"""
        return True

    @classmethod
    def pre_save(cls, obj: Any) -> None:
        """Bring `obj`'s attributes up to date before they are captured (e.g. sync from KVM)."""

    @classmethod
    def validate(cls, values: dict[str, Any], version: int) -> None:
        """Refuse semantically impossible values by raising StateLoadError; runs after decoding,
        before anything is applied, so a refusal leaves the device untouched."""

    @classmethod
    def pre_load(cls, obj: Any) -> None:
        """Runs once the whole section is decoded and valid, before any value is applied."""

    @classmethod
    def post_load(cls, obj: Any, version: int) -> None:
        """Runs after every value (subsections included) is applied; `version` is the stream's."""

    # --- binding: how values reach a device ----------------------------------------------------

    @classmethod
    def capture(cls, obj: Any) -> dict[str, Any]:
        """The device's current values: attribute `f.attr` for each field. Nested structures may
        be dicts or objects (captured through their own VMState's `capture`)."""
        return {f.name: _capture(f.type, getattr(obj, f.attr)) for f in cls.fields if f.type.carries_value}

    @classmethod
    def apply(cls, obj: Any, values: dict[str, Any]) -> None:
        """Write decoded values to the device. Must not fail: refusals belong in `validate`."""
        for f in cls.fields:
            if f.type.carries_value:
                setattr(obj, f.attr, _build(f.type, values[f.name]))

    @classmethod
    def build(cls, values: dict[str, Any]) -> Any:
        """As a nested structure: the object an element becomes on load (default: the dict)."""
        return values

    # --- save ------------------------------------------------------------------------------------

    @classmethod
    def snapshot(cls, obj: Any, version: int | None = None) -> Section:
        """Capture `obj` as a Section: pre_save, the fields, then each subsection whose
        `needed(obj)` is true. `version` pins an older layout (a machine type's).

        A device whose state another thread may change offers `state_lock()` (a re-entrant
        lock's context): it is held across the whole capture — section, every `needed()` and
        every subsection — so they are one consistent snapshot."""
        with _state_lock(obj):
            v = cls.version if version is None else version
            cls.pre_save(obj)
            sec = Section(cls.name, v, cls.capture(obj))
            for sub in cls.subsections_at(v):
                if sub.needed(obj):
                    sec.subsections[sub.name] = sub.snapshot(obj)
            return sec

    @classmethod
    def save(cls, obj: Any, version: int | None = None) -> bytes:
        """The SECTION_FULL payload for `obj`."""
        return cls.encode(cls.snapshot(obj, version))

    @classmethod
    def encode(cls, sec: Section) -> bytes:
        """Payload bytes of `sec`: its fields, then the subsection block (docs/vmstate.md)."""
        if not cls.minimum_version <= sec.version <= cls.version:
            raise ValueError(f"section '{cls.name}': cannot encode version {sec.version}")
        out = bytearray()
        encode_fields(cls.fields, sec.fields, out, sec.version)
        described = cls.subsections_at(sec.version)
        known = {sub.name for sub in described}
        unknown = sorted(set(sec.subsections) - known)
        if unknown:
            raise ValueError(f"section '{cls.name}': unknown subsections {unknown} at version {sec.version}")
        present = [(i, sub) for i, sub in enumerate(described) if sub.name in sec.subsections]
        out += len(present).to_bytes(2, "little")
        for index, sub in present:
            if sec.subsections[sub.name].version != sub.version:
                # The description announces every subsection at its newest version.
                raise ValueError(f"subsection '{sub.name}': can only be sent at version {sub.version}")
            body = sub.encode(sec.subsections[sub.name])
            out += index.to_bytes(2, "little") + len(body).to_bytes(4, "little") + body
        return bytes(out)

    # --- load ------------------------------------------------------------------------------------

    @classmethod
    def decode(cls, payload: bytes, *, version: int | None = None,
               description: dict[str, Any] | None = None) -> Section:
        """Decode and validate a payload without touching any device. The sender's
        `description` (its DESCRIPTION entry) gives the stream's version and subsection list, and
        is checked against this build's layout of that version; without one, the payload is
        taken to be this build's own encoding at `version` (default: newest)."""
        if description is None:
            description = cls.stream_description(version)
        return cls._decode(Reader(payload, cls.name), description)

    @classmethod
    def load(cls, obj: Any, payload: bytes, *, version: int | None = None,
             description: dict[str, Any] | None = None) -> Section:
        """Decode, validate, then apply to `obj`; on StateLoadError `obj` was not touched."""
        sec = cls.decode(payload, version=version, description=description)
        cls.apply_section(obj, sec)
        return sec

    @classmethod
    def apply_section(cls, obj: Any, sec: Section) -> None:
        """Apply already validated values: every pre_load, then the values, then every post_load
        (subsections' before the section's own, as QEMU orders them)."""
        with _state_lock(obj):  # all of it or none of it, as another thread sees the device
            cls._apply_section(obj, sec)

    @classmethod
    def _apply_section(cls, obj: Any, sec: Section) -> None:
        present = [(sub, sec.subsections[sub.name]) for sub in cls.subsections if sub.name in sec.subsections]
        cls.pre_load(obj)
        for sub, _ in present:
            sub.pre_load(obj)
        cls.apply(obj, sec.fields)
        for sub, subsec in present:
            sub.apply(obj, subsec.fields)
        for sub, subsec in present:
            sub.post_load(obj, subsec.version)
        cls.post_load(obj, sec.version)

    @classmethod
    def _decode(cls, r: Reader, description: Any) -> Section:
        v = _described_version(cls, description)
        if v > cls.version:
            raise StateLoadError(
                f"stream has version {v}, this build reads versions {cls.minimum_version}..{cls.version}",
                section=cls.name,
            )
        if v < cls.minimum_version:
            raise StateLoadError(
                f"stream version {v} is older than the minimum this build reads ({cls.minimum_version})",
                section=cls.name,
            )
        found = desc.layout_mismatch(cls.stream_description(v)["fields"], description.get("fields"))
        if found:
            raise StateLoadError(found[1], section=cls.name, field=found[0])
        values = decode_fields(cls.fields, r, v)
        sec = Section(cls.name, v, values, cls._decode_subsections(r, description.get("subsections")))
        if r.remaining:
            raise r.fail(f"{r.remaining} bytes left over after the section", None)
        cls.validate(values, v)
        return sec

    @classmethod
    def _decode_subsections(cls, r: Reader, described: Any) -> dict[str, Section]:
        described = described if isinstance(described, list) else []
        ours = {sub.name: sub for sub in cls.subsections}
        subsections: dict[str, Section] = {}
        last = -1
        for _ in range(r.uint(2, "subsection count")):
            index = r.uint(2, "subsection index")
            if index <= last or index >= len(described) or not isinstance(described[index], dict):
                raise r.fail(f"subsection index {index} is out of order or not in the description", None)
            last = index
            nbytes = r.uint(4, "subsection length")
            body = r.take(nbytes, "subsection body")
            name = described[index].get("name")
            sub = ours.get(name) if isinstance(name, str) else None
            if sub is None:
                # Never skipped: unknown state is state this build would silently lose.
                raise r.fail(f"unknown subsection '{name}': this build cannot load it", None)
            subsections[sub.name] = sub._decode(Reader(body, sub.name), described[index])
        return subsections

    # --- descriptions ----------------------------------------------------------------------------

    @classmethod
    def stream_description(cls, version: int | None = None) -> dict[str, Any]:
        """This section's DESCRIPTION entry (docs/stream-format.md) at `version`."""
        return desc.stream_entry(cls, version)

    @classmethod
    def to_description(cls, version: int | None = None) -> dict[str, Any]:
        """`-dump-vmstate`-shaped description (what `vmferry describe` prints)."""
        return desc.qemu_description(cls, version)


def _state_lock(obj: Any) -> contextlib.AbstractContextManager[Any]:
    lock = getattr(obj, "state_lock", None)
    return lock() if callable(lock) else contextlib.nullcontext()


def _described_version(cls: type[VMState], description: Any) -> int:
    if not isinstance(description, dict):
        raise StateLoadError("the sender's description is not an object", section=cls.name)
    if description.get("name") != cls.name:
        raise StateLoadError(f"the description is for section '{description.get('name')}'", section=cls.name)
    v = description.get("version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise StateLoadError("the sender's description has no integer version", section=cls.name)
    return v


def _capture(t: FieldType, value: Any) -> Any:
    if isinstance(t, Struct):
        if isinstance(value, Mapping):
            # Missing keys stay missing: encoding then names the field instead of guessing.
            return {f.name: _capture(f.type, value[f.name]) for f in t.cls.fields if f.name in value}
        t.cls.pre_save(value)
        return t.cls.capture(value)
    if isinstance(t, List):
        return [_capture(t.item, v) for v in value]
    if isinstance(t, Array):
        return [_capture(t.elem, v) for v in value]
    return value


def _build(t: FieldType, value: Any) -> Any:
    if isinstance(t, Struct):
        nested = t.cls.fields
        return t.cls.build({f.name: _build(f.type, value[f.name]) for f in nested if f.type.carries_value})
    if isinstance(t, List):
        return [_build(t.item, v) for v in value]
    if isinstance(t, Array):
        return [_build(t.elem, v) for v in value]
    return value


_RESERVED = frozenset(n for n in dir(VMState) if not n.startswith("__"))


def _own_fields(cls: type) -> list[Field]:
    """The fields annotated in `cls`'s own body, in declaration order. String annotations (from
    `from __future__ import annotations`) are evaluated in the defining module, so field types
    must be module-level names there."""
    raw = cls.__dict__.get("__annotations__", {})
    module_globals = vars(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else {}
    result = []
    for name, ann in raw.items():
        if isinstance(ann, str):
            if ann.startswith(("ClassVar", "typing.ClassVar")):
                continue
            try:
                ann = eval(ann, dict(module_globals), dict(vars(cls)))  # noqa: S307 - our own source
            except Exception as e:
                raise TypeError(f"{cls.__name__}.{name}: cannot evaluate field type {ann!r}: {e}") from e
        if not isinstance(ann, FieldType):
            if "ClassVar" in repr(ann):
                continue
            raise TypeError(f"{cls.__name__}.{name}: {ann!r} is not a field type")
        opts = cls.__dict__.get(name, FieldOptions())
        if not isinstance(opts, FieldOptions):
            opts = FieldOptions(default=opts)  # `x: U8 = 5` is a plain default
        if name in cls.__dict__:
            delattr(cls, name)  # the class is a description; its fields are not class attributes
        result.append(Field(name, ann, opts.since, opts.default, opts.attr or name))
    return result


def _check_class(cls: type[VMState]) -> None:
    where = cls.__name__
    if not 1 <= cls.minimum_version <= cls.version:
        raise TypeError(f"{where}: needs 1 <= minimum_version <= version")
    names = [f.name for f in cls.fields]
    if len(set(names)) != len(names):
        raise TypeError(f"{where}: duplicate field names")
    for f in cls.fields:
        if f.name in _RESERVED:
            raise TypeError(f"{where}.{f.name}: the name is reserved by VMState; use field(attr=...)")
        if not 0 <= f.since <= cls.version:
            raise TypeError(f"{where}.{f.name}: since={f.since} is not within 0..version {cls.version}")
        if f.type.depth() > MAX_NESTING:
            raise TypeError(f"{where}.{f.name}: nests deeper than {MAX_NESTING}")
        try:
            f.type.check(f.default_value(), f.name)
        except ValueError as e:
            raise TypeError(f"{where}: bad default: {e}") from e
    for sub in cls.subsections:
        if isinstance(sub, type) and not 0 <= getattr(sub, "since", 0) <= cls.version:
            raise TypeError(f"{where}: subsection '{sub.name}' since={sub.since} is not within "
                            f"0..version {cls.version}")
    subnames = [getattr(sub, "name", "") for sub in cls.subsections]
    if not all(isinstance(sub, type) and issubclass(sub, VMState) and sub.name for sub in cls.subsections):
        raise TypeError(f"{where}: subsections must be named VMState classes")
    if len(set(subnames)) != len(subnames) or len(subnames) > 0xFFFF:
        raise TypeError(f"{where}: subsection names must be unique")
