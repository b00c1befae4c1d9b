"""Typed message definitions, validated once at the boundary.

A message is a frozen dataclass whose field types say what the wire may carry:
``int``/``bool``/``str``/``bytes``/``float``, nested messages, ``list[X]``, ``X | None``,
``Literal[...]`` and ``Opaque`` (any msgpack map, e.g. a status report). Bounds come from
``typing.Annotated``: ``Annotated[int, Range(0, 2047)]``, ``Annotated[str, MaxLen(64)]``.

The checks are compiled once per class into a list of closures, so decoding a message
costs one dict lookup and one small call per field. A bad body raises ``MessageError``
with code ``bad-field`` (wrong type, missing or unknown field) or ``bad-range``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from msixhub.protocol.errors import ErrorCode, MessageError


@dataclass(frozen=True, slots=True)
class Range:
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class MaxLen:
    limit: int


class Opaque(dict):  # type: ignore[type-arg]
    """A msgpack map passed through unvalidated except for its shape (string keys)."""


U8 = Annotated[int, Range(0, 0xFF)]
U16 = Annotated[int, Range(0, 0xFFFF)]
U32 = Annotated[int, Range(0, 0xFFFF_FFFF)]
U64 = Annotated[int, Range(0, 0xFFFF_FFFF_FFFF_FFFF)]
Name = Annotated[str, MaxLen(128)]

Checker = Callable[[Any, str], Any]
M = TypeVar("M", bound="Message")


class Message:
    """Base of every wire message; subclasses are frozen slotted dataclasses."""

    __slots__ = ()
    _decoders: ClassVar[tuple[tuple[str, Checker, bool], ...]]
    _nested: ClassVar[tuple[str, ...]]
    _field_names: ClassVar[frozenset[str]]

    def to_wire(self) -> dict[str, Any]:
        body = {f: getattr(self, f) for f, _, _ in self._decoders}
        for name in self._nested:
            body[name] = _encode(body[name])
        return body

    @classmethod
    def from_wire(cls: type[M], body: object) -> M:
        if not isinstance(body, dict):
            raise MessageError(ErrorCode.BAD_FIELD, f"{cls.__name__}: body is not a map")
        if not cls._field_names.issuperset(body):
            unknown = sorted(str(k) for k in body if k not in cls._field_names)
            raise MessageError(ErrorCode.BAD_FIELD, f"{cls.__name__}: unknown field(s) {unknown}")
        values = {}
        for name, check, required in cls._decoders:
            if name in body:
                values[name] = check(body[name], name)
            elif required:
                raise MessageError(ErrorCode.BAD_FIELD, f"{cls.__name__}: missing field {name!r}")
        return cls(**values)


def _encode(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def message(cls: type[M]) -> type[M]:
    """Make ``cls`` a frozen slotted dataclass message with compiled field checks."""
    cls = dataclass(frozen=True, slots=True)(cls)  # type: ignore[assignment]
    hints = typing.get_type_hints(cls, include_extras=True)
    decoders = []
    nested = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        decoders.append((f.name, _checker(hint, cls.__name__), required))
        if _may_nest(hint):
            nested.append(f.name)
    cls._decoders = tuple(decoders)
    cls._nested = tuple(nested)
    cls._field_names = frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    return cls


def _may_nest(hint: Any) -> bool:
    origin = get_origin(hint)
    if origin is Annotated:
        return _may_nest(get_args(hint)[0])
    if origin in (list, Union, types.UnionType):
        return any(_may_nest(a) for a in get_args(hint))
    return isinstance(hint, type) and issubclass(hint, Message)


def _fail(code: ErrorCode, owner: str, name: str, why: str) -> MessageError:
    return MessageError(code, f"{owner}.{name}: {why}")


def _checker(hint: Any, owner: str) -> Checker:
    bounds: list[Any] = []
    if get_origin(hint) is Annotated:
        hint, *bounds = get_args(hint)
    origin = get_origin(hint)
    limit = next((b.limit for b in bounds if isinstance(b, MaxLen)), None)
    if hint is bool:

        def check_bool(v: Any, name: str) -> bool:
            if v is True or v is False:
                return v
            raise _fail(ErrorCode.BAD_FIELD, owner, name, f"expected bool, got {type(v).__name__}")

        return check_bool
    if hint is int:
        rng = next((b for b in bounds if isinstance(b, Range)), None)
        low, high = (rng.low, rng.high) if rng else (-(2**63), 2**64 - 1)

        def check_int(v: Any, name: str) -> int:
            if type(v) is not int:
                raise _fail(
                    ErrorCode.BAD_FIELD, owner, name, f"expected int, got {type(v).__name__}"
                )
            if not low <= v <= high:
                raise _fail(ErrorCode.BAD_RANGE, owner, name, f"{v} not in [{low}, {high}]")
            return v

        return check_int
    if hint is float:

        def check_float(v: Any, name: str) -> float:
            if type(v) not in (int, float):
                raise _fail(ErrorCode.BAD_FIELD, owner, name, "expected a number")
            return float(v)

        return check_float
    if hint in (str, bytes):
        wanted = hint

        def check_sized(v: Any, name: str) -> Any:
            if type(v) is not wanted:
                raise _fail(
                    ErrorCode.BAD_FIELD,
                    owner,
                    name,
                    f"expected {wanted.__name__}, got {type(v).__name__}",
                )
            if limit is not None and len(v) > limit:
                raise _fail(ErrorCode.BAD_RANGE, owner, name, f"longer than {limit}")
            return v

        return check_sized
    if hint is Opaque:

        def check_opaque(v: Any, name: str) -> Opaque:
            if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                raise _fail(ErrorCode.BAD_FIELD, owner, name, "expected a map with string keys")
            return Opaque(v)

        return check_opaque
    if origin is Literal:
        choices = get_args(hint)

        def check_literal(v: Any, name: str) -> Any:
            for choice in choices:  # by type too: 1.0 and True are not the literal 1
                if type(v) is type(choice) and v == choice:
                    return v
            raise _fail(ErrorCode.BAD_RANGE, owner, name, f"{v!r} not one of {list(choices)}")

        return check_literal
    if origin is list:
        (item_hint,) = get_args(hint)
        check_item = _checker(item_hint, owner)

        def check_list(v: Any, name: str) -> list[Any]:
            if not isinstance(v, list | tuple):
                raise _fail(ErrorCode.BAD_FIELD, owner, name, "expected a list")
            if limit is not None and len(v) > limit:
                raise _fail(ErrorCode.BAD_RANGE, owner, name, f"more than {limit} items")
            return [check_item(item, name) for item in v]

        return check_list
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"{owner}: only 'X | None' unions are supported")
        check_some = _checker(options[0], owner)

        def check_optional(v: Any, name: str) -> Any:
            return None if v is None else check_some(v, name)

        return check_optional
    if isinstance(hint, type) and issubclass(hint, Message):
        nested_cls = hint

        def check_nested(v: Any, name: str) -> Message:
            return nested_cls.from_wire(v)

        return check_nested
    raise TypeError(f"{owner}: unsupported field type {hint!r}")
