"""The Sans-I/O interfaces the engine drives: a network peer's opening
(:class:`Handshake`, inbound) and a dial-out's (:class:`Connector`, outbound).

Codecs implement them (:mod:`daemons.codecs.tcp`, :mod:`daemons.codecs.tlswrap`,
ipc-websocketd's upgrade); the engine (:mod:`daemons.engine.daemon`,
:mod:`daemons.engine.outbound`) does the I/O around them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast, runtime_checkable

from ipc_core import Layer
from ipc_core.peerinfo import PeerInfo

from .addresses import Uri

__all__ = [
    "FORBIDDEN",
    "NOT_FOUND",
    "UNAVAILABLE",
    "Connector",
    "ConnectorFactory",
    "DescribesPeer",
    "Front",
    "HandsOver",
    "Handshake",
    "HandshakeFactory",
    "KnowsClient",
    "NamesPeer",
    "Settles",
    "describes_peer",
    "hands_over",
    "knows_client",
    "names_peer",
    "settles",
]


class Handshake(Protocol):
    """The Sans-I/O opening of one network connection.

    ``receive_data(b"")`` means EOF. ``service`` becomes the requested service
    name; ``finished`` means "flush data_to_send() and close" (a refusal, an
    HTTP response). Bad input raises ProtocolError.
    """

    @property
    def service(self) -> str | None: ...

    @property
    def finished(self) -> bool: ...

    def receive_data(self, data: bytes) -> None: ...

    def data_to_send(self) -> bytes: ...

    def accept(self) -> tuple[Layer | None, bytes]: ...

    def reject(self, reason: str, status: int) -> None: ...


@runtime_checkable
class Settles(Protocol):
    """Optional: a handshake whose end may be a pause (TCPd's name without a
    terminator). While ``settle_after`` is not None, the engine calls
    :meth:`settle` once no byte has come for that many seconds.

    Checked once per connection (:func:`settles` at accept), not per read."""

    @property
    def settle_after(self) -> float | None: ...

    def settle(self) -> None: ...


@runtime_checkable
class NamesPeer(Protocol):
    """Optional: a handshake that knows the peer better than the socket
    (ipc-websocketd ``--trust-proxy``: X-Forwarded-For); None: ask the socket."""

    @property
    def peer(self) -> str | None: ...


@runtime_checkable
class DescribesPeer(Protocol):
    """Optional: a handshake that knows facts about its peer for the peer
    information of a service that asked for it (:mod:`ipc_core.peerinfo`).

    Called once, after ``service`` is known and before ``accept()``, only when
    the service opted in. ``info`` is the engine's record (transport ``tcp``,
    the socket's peer and local addresses); the handshake returns it with its
    own facts (``dataclasses.replace``), asking any inner handshake first: the
    PROXY wrapper puts in the header's addresses, the TLS wrapper the session
    and turns ``tcp``/``ws`` into ``tls``/``wss``, the WebSocket upgrade the
    request facts and the token's name."""

    def describe(self, info: PeerInfo) -> PeerInfo: ...


@runtime_checkable
class KnowsClient(Protocol):
    """Optional: a handshake that learns the real client from the protocol (a
    PROXY header, a trusted forwarding header): ``(ip, port)``, None until
    then or when the socket's peer is the client. The engine names the peer
    by it in logs and counts ``--max-connections-per-ip`` under it."""

    @property
    def client(self) -> tuple[str, int | None] | None: ...


@runtime_checkable
class HandsOver(Protocol):
    """Optional: a handshake whose socket can be handed to a service that
    speaks its stream: plain LibIPC after TCPd's handshake (lock mark
    ``handoff``), or WebSocket, handed before the 101 (mark
    ``handoff-websocket``, see ``ipc_core.Context.take_handoff``).

    ``handoff_mark`` is the lock mark a service must carry to be given this
    connection. ``handover()`` gives the handshake away and returns
    ``(reply, early)``: the bytes the service must write to the client first
    (TCPd's ``ok``; b"" for WebSocket, whose service answers the handshake
    itself) and the bytes read past what this side consumed (for WebSocket,
    everything the client sent, its request head first); None when this
    connection cannot be handed over after all (a wrapper around a TLS
    handshake), with nothing done."""

    @property
    def handoff_mark(self) -> str: ...

    def handover(self) -> tuple[bytes, bytes] | None: ...


class Front(Protocol):
    """What every accepted connection goes through first, before the daemon's
    own handshake (``Daemon.front``: the PROXY protocol gate)."""

    def wrap(self, addr: Any, handshake: Handshake) -> Handshake:
        """``handshake`` behind this front, for a peer at ``addr`` (accept()'s)."""
        ...


#: Capabilities by class: ``isinstance`` with a runtime Protocol costs ~20 µs
#: (it probes every member), too much per connection on the handshake path;
#: a capability belongs to the class, so its first instance decides.
_CAPABILITIES: dict[type, tuple[bool, bool, bool, bool, bool]] = {}


def _capabilities(handshake: object) -> tuple[bool, bool, bool, bool, bool]:
    cls = type(handshake)
    caps = _CAPABILITIES.get(cls)
    if caps is None:
        caps = _CAPABILITIES[cls] = (
            isinstance(handshake, Settles),
            isinstance(handshake, NamesPeer),
            isinstance(handshake, DescribesPeer),
            isinstance(handshake, KnowsClient),
            isinstance(handshake, HandsOver),
        )
    return caps


def settles(handshake: object) -> Settles | None:
    """``handshake`` as a :class:`Settles`, or None if it has no pause rule."""
    return cast(Settles, handshake) if _capabilities(handshake)[0] else None


def names_peer(handshake: object) -> NamesPeer | None:
    """``handshake`` as a :class:`NamesPeer`, or None if only the socket knows."""
    return cast(NamesPeer, handshake) if _capabilities(handshake)[1] else None


def describes_peer(handshake: object) -> DescribesPeer | None:
    """``handshake`` as a :class:`DescribesPeer`, or None if it adds nothing."""
    return cast(DescribesPeer, handshake) if _capabilities(handshake)[2] else None


def knows_client(handshake: object) -> KnowsClient | None:
    """``handshake`` as a :class:`KnowsClient`, or None if only the socket knows."""
    return cast(KnowsClient, handshake) if _capabilities(handshake)[3] else None


def hands_over(handshake: object) -> HandsOver | None:
    """``handshake`` as a :class:`HandsOver`, or None if its stream is never plain."""
    return cast(HandsOver, handshake) if _capabilities(handshake)[4] else None


HandshakeFactory = Callable[[str], Handshake]

# HTTP-style statuses the engine passes to Handshake.reject.
FORBIDDEN, NOT_FOUND, UNAVAILABLE = 403, 404, 503


class Connector(Protocol):
    """Client side of a daemon handshake, Sans-I/O."""

    @property
    def done(self) -> bool: ...

    def data_to_send(self) -> bytes: ...

    def receive_data(self, data: bytes) -> None: ...

    def result(self) -> tuple[Layer | None, bytes]: ...


ConnectorFactory = Callable[[Uri], Connector]
