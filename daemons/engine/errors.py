"""What goes wrong in a daemon, as values: the kinds the metrics count and
the exceptions that carry them.

* :class:`StartupError`: a daemon could not start; the one place that prints
  it is :func:`daemons.engine.startup.run_command` (``PROG: reason``, exit 1).
* :class:`Failure`: why a network peer's handshake ended without a switch
  (``ipc_handshake_failures_total{reason=...}``).
* :class:`ErrorKind`: why a connection was closed on an error
  (``ipc_errors_total{kind=...}``).
* :class:`LocalRefused`: a local service cannot be connected, with its
  :class:`Failure` (refused, unknown, unavailable) and the HTTP-style status a
  handshake answers with.

Kinds are chosen where the error is raised, never found again by reading a
message's text.
"""

from __future__ import annotations

import enum

from ipc_core import IPCError, MessageTooLarge, PeerNotReading, ProtocolError

__all__ = ["ErrorKind", "Failure", "HandshakeRefused", "LocalRefused", "StartupError"]


class StartupError(IPCError):
    """A daemon could not start; the message names the flag and value at fault."""


class Failure(enum.StrEnum):
    """Why a handshake ended without a switch (a metric label value)."""

    READ_ERROR = "read error"
    PEER_CLOSED = "peer closed"
    PROTOCOL_ERROR = "protocol error"
    REFUSED = "refused"
    UNKNOWN_SERVICE = "unknown service"
    SERVICE_UNAVAILABLE = "service unavailable"
    #: The service read the peer information and said no (``ctx.refuse``).
    SERVICE_REFUSED = "service refused"
    #: No valid credential (ipc-websocketd's tokens: 401, or 403 for a token
    #: of another service).
    UNAUTHORIZED = "unauthorized"
    TIMEOUT = "timeout"
    TOO_MANY = "too many connections"
    TOO_MANY_FROM_SOURCE = "too many from one address"
    INTERNAL = "internal"

    @property
    def status(self) -> int:
        """The HTTP-style status a handshake answers a refusal with. A name
        that is refused answers like one that does not exist (404), so a peer
        cannot probe what runs here."""
        if self is Failure.SERVICE_REFUSED:
            return 403  # the service knows the peer and said no: nothing to hide
        return 503 if self is Failure.SERVICE_UNAVAILABLE else 404


class ErrorKind(enum.StrEnum):
    """Why a connection was closed on an error (a metric label value)."""

    OVERSIZE = "oversize"
    SLOW_PEER = "slow peer"
    PROTOCOL = "protocol"
    IO = "io"
    INTERNAL = "internal"
    ACCEPT = "accept"
    METRICS_BUSY = "metrics busy"

    @classmethod
    def of(cls, error: type[BaseException] | None) -> ErrorKind:
        """The kind of the error class a DISCONNECTION carries
        (``Event.error``): its class decides, never its message."""
        if error is None:
            return cls.IO
        if issubclass(error, MessageTooLarge):
            return cls.OVERSIZE
        if issubclass(error, PeerNotReading):
            return cls.SLOW_PEER
        if issubclass(error, ProtocolError):
            return cls.PROTOCOL
        return cls.IO


class HandshakeRefused(ProtocolError):
    """A handshake refused its peer for a reason that has its own kind (a
    missing token is not a protocol error): the engine counts ``failure``."""

    def __init__(self, failure: Failure, reason: str) -> None:
        super().__init__(reason)
        self.failure = failure


class LocalRefused(IPCError):
    """A local service cannot be connected; ``failure`` says why."""

    def __init__(self, failure: Failure, reason: str) -> None:
        super().__init__(reason)
        self.failure = failure
        self.reason = reason
