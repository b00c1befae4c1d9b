"""Every exception msixhub raises on purpose, in one tree::

    MsixhubError
     ├── ProtocolError            the byte stream or handshake is broken; the connection closes
     │    └── VersionMismatch     hello named a protocol version we do not speak
     ├── MessageError             one message is invalid (code, message); answered, connection stays
     │    └── FdPassingUnsupported  fds cannot travel on this connection (TCP); code "unsupported"
     ├── RemoteError              the peer answered a request with an error (code, message)
     └── ConnectionClosed         the peer went away, or we closed the connection

``trio.Cancelled`` and ``trio.TooSlowError`` are never wrapped.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Codes of structured error replies ``{code, message}``."""

    UNKNOWN_OP = "unknown-op"
    BAD_FIELD = "bad-field"
    BAD_RANGE = "bad-range"
    BAD_STATE = "bad-state"
    NOT_FOUND = "not-found"
    CONFLICT = "conflict"
    NO_ROUTE = "no-route"
    UNSUPPORTED = "unsupported"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class MsixhubError(Exception):
    """Base of every error msixhub raises on purpose."""


class ProtocolError(MsixhubError):
    """The stream cannot be trusted any more (bad framing, fd mismatch, broken handshake)."""


class VersionMismatch(ProtocolError):
    def __init__(self, ours: int, theirs: object) -> None:
        super().__init__(f"protocol version mismatch: we speak {ours}, peer sent {theirs!r}")
        self.ours = ours
        self.theirs = theirs


class _CodedError(MsixhubError):
    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = str(code)
        self.message = message


class MessageError(_CodedError):
    """One message was invalid; it is answered with this code and the connection stays usable."""


class RemoteError(_CodedError):
    """The peer answered our request with a structured error."""


class ConnectionClosed(MsixhubError):
    """The peer went away or the connection was closed; pending requests fail with this."""


class FdPassingUnsupported(MessageError):
    """File descriptors cannot travel over this connection (TCP, or a peer without the
    ``fd-passing`` feature). Nothing was sent; the connection stays usable."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNSUPPORTED, message)
