"""The operation registry: each operation names its request type, its reply type and how many
file descriptors travel with each, so a frame whose fds do not match its message is refused
at the boundary (and the fds closed) before any handler sees it.

A *request* expects exactly one reply or error; a *notice* is one-way (interrupts on the
direct path, events) and is never answered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from msixhub.protocol.schema import Message, message


@message
class Empty(Message):
    """The body of a request or reply that carries nothing."""


FdCount = int | Callable[[Any], int]


@dataclass(frozen=True, slots=True)
class OpSpec:
    name: str
    request: type[Message]
    reply: type[Message]
    request_fds: FdCount
    reply_fds: FdCount
    oneway: bool

    def expected_request_fds(self, body: Message) -> int:
        return self.request_fds if isinstance(self.request_fds, int) else self.request_fds(body)

    def expected_reply_fds(self, body: Message) -> int:
        return self.reply_fds if isinstance(self.reply_fds, int) else self.reply_fds(body)


OPS: dict[str, OpSpec] = {}
_BY_TYPE: dict[type[Message], OpSpec] = {}
M = TypeVar("M", bound=type[Message])


def _register(spec: OpSpec) -> None:
    if spec.name in OPS:
        raise ValueError(f"operation {spec.name!r} registered twice")
    OPS[spec.name] = spec
    _BY_TYPE[spec.request] = spec


def request(
    name: str,
    *,
    reply: type[Message] | Literal["self"] = Empty,
    fds: FdCount = 0,
    reply_fds: FdCount = 0,
) -> Callable[[M], M]:
    """Register a message class as the request of operation ``name``
    (``reply="self"``: the reply has the request's own type, as an echo does)."""

    def register(cls: M) -> M:
        reply_type = cls if reply == "self" else reply
        _register(OpSpec(name, cls, reply_type, fds, reply_fds, oneway=False))
        return cls

    return register


def notice(name: str, *, fds: FdCount = 0) -> Callable[[M], M]:
    """Register a message class as a one-way notice ``name``."""

    def register(cls: M) -> M:
        _register(OpSpec(name, cls, Empty, fds, 0, oneway=True))
        return cls

    return register


def spec_of(body: Message) -> OpSpec:
    """The operation a request or notice body belongs to."""
    try:
        return _BY_TYPE[type(body)]
    except KeyError:
        raise TypeError(f"{type(body).__name__} is not a registered request or notice") from None
