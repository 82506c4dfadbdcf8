"""QAPI-style argument types and the validation that runs before any command handler.

Errors use QEMU's wording, because tools match on it:
  "Parameter 'x' is unexpected" / "Parameter 'x' is missing" /
  "Invalid parameter type for 'x', expected: integer" /
  "Parameter 'x' does not accept value 'y'" / "Parameter 'x' expects uint8".
Nested members are named as QEMU's input visitor names them: `capabilities[0].state`.
As in QEMU, members are checked in schema order and unexpected members are reported last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vmferry.errors import QmpError

INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


class QType:
    """A type an argument may have. `name` is what docs show (QAPI's name)."""

    name: str

    def check(self, value: object, path: str) -> object:
        raise NotImplementedError


def _type_error(path: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{path}', expected: {expected}")


def _is_int(v: object) -> bool:
    # bool is an int subclass in Python; JSON true is not an integer.
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Scalar(QType):
    name: str
    expected: str  # the word in "Invalid parameter type for 'x', expected: <expected>"
    accepts: Callable[[object], bool]

    def check(self, value: object, path: str) -> object:
        if not self.accepts(value):
            raise _type_error(path, self.expected)
        return value


@dataclass(frozen=True)
class Integer(QType):
    """A JSON integer within [lo, hi]; outside it QEMU says "Parameter 'x' expects uint8".
    uint64/size accept negative values like QEMU's visitor does (it wraps them), so that the
    command can refuse them with its own, more useful, range message."""

    name: str
    lo: int
    hi: int

    def check(self, value: object, path: str) -> object:
        if not _is_int(value) or not INT64_MIN <= value <= UINT64_MAX:  # type: ignore[operator]
            raise _type_error(path, "integer")
        if not self.lo <= value <= self.hi:  # type: ignore[operator]
            raise QmpError(f"Parameter '{path}' expects {self.name}")
        return value


@dataclass(frozen=True)
class Enum(QType):
    name: str
    values: tuple[str, ...]

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, str):
            raise _type_error(path, "string")
        if value not in self.values:
            raise QmpError(f"Parameter '{path}' does not accept value '{value}'")
        return value


@dataclass(frozen=True)
class ListOf(QType):
    item: QType

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"[{self.item.name}]"

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, list):
            raise _type_error(path, "array")
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Arg:
    """One member of a command's arguments (or of a struct)."""

    name: str
    type: QType
    optional: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Struct(QType):
    name: str
    members: tuple[Arg, ...]

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, dict):
            raise _type_error(path, "object")
        return validate(self.members, value, prefix=f"{path}.")


STR = Scalar("str", "string", lambda v: isinstance(v, str))
BOOL = Scalar("bool", "boolean", lambda v: isinstance(v, bool))
NUMBER = Scalar("number", "number", lambda v: _is_int(v) or isinstance(v, float))
STR_OR_NULL = Scalar("StrOrNull", "StrOrNull", lambda v: v is None or isinstance(v, str))
INT = Integer("int", INT64_MIN, INT64_MAX)
UINT8 = Integer("uint8", 0, 255)
UINT16 = Integer("uint16", 0, 2**16 - 1)
UINT32 = Integer("uint32", 0, 2**32 - 1)
UINT64 = Integer("uint64", INT64_MIN, UINT64_MAX)
SIZE = Integer("size", INT64_MIN, UINT64_MAX)

SCALARS_BY_NAME: dict[str, QType] = {
    t.name: t for t in (STR, BOOL, NUMBER, STR_OR_NULL, INT, UINT8, UINT16, UINT32, UINT64, SIZE)
}


def validate(members: tuple[Arg, ...], args: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Check `args` against `members`; return the checked arguments. Raises QmpError (GenericError)."""
    out: dict[str, object] = {}
    for m in members:
        if m.name not in args:
            if not m.optional:
                raise QmpError(f"Parameter '{prefix}{m.name}' is missing")
            continue
        out[m.name] = m.type.check(args[m.name], f"{prefix}{m.name}")
    known = {m.name for m in members}
    for key in args:
        if key not in known:
            raise QmpError(f"Parameter '{prefix}{key}' is unexpected")
    return out
