"""Events returned by :meth:`Context.wait_event`: exactly the reference's set.

An event is a frozen dataclass, so it can be matched::

    match ctx.wait_event():
        case Event(EventType.MESSAGE_RX, fd, message):
            ctx.write(fd, message)
        case Event(EventType.DISCONNECTION, fd):
            ...
"""

from __future__ import annotations

import builtins
import enum
from dataclasses import dataclass

from .peerinfo import PeerInfo


class EventType(enum.IntEnum):
    """The reference's event types, in its order."""

    ERROR = 0
    CONNECTION = 1
    DISCONNECTION = 2
    MESSAGE_RX = 3
    MESSAGE_TX = 4
    TIMER = 5
    EXTERNAL = 6
    SWITCH_RX = 7
    SWITCH_TX = 8


@dataclass(frozen=True)
class Event:
    """One thing that happened in a context.

    ``fd`` is the descriptor concerned (-1 for TIMER); ``message`` the payload
    of MESSAGE_RX; ``origin`` the listening service's descriptor for a
    CONNECTION; ``reason`` why a DISCONNECTION or ERROR happened (None for an
    orderly close); ``error`` the class of the error behind a DISCONNECTION
    (``MessageTooLarge``, ``ProtocolError``, ``PeerNotReading``, an
    ``OSError``...; None when none), so a kind is a value, never read back
    from ``reason``'s text; ``peer`` who the client of a CONNECTION is, when
    it came through the service's door (see ``service_init(peer_info=True)``
    and :mod:`ipc_core.door`), else None.
    """

    type: EventType
    fd: int = -1
    message: bytes | None = None
    origin: int = -1
    reason: str | None = None
    error: builtins.type[BaseException] | None = None  # ``type`` is a field here
    peer: PeerInfo | None = None


# A fast constructor for the hot path: a frozen dataclass __init__ goes through
# object.__setattr__ for every field, while the defaults of the fields not set
# here (origin, reason, error, peer) are class attributes. Half the cost per message.
_new = object.__new__
_MESSAGE_RX = EventType.MESSAGE_RX


def message_rx(fd: int, message: bytes) -> Event:
    ev = _new(Event)
    ev.__dict__.update(type=_MESSAGE_RX, fd=fd, message=message)
    return ev


TIMER_EVENT = Event(EventType.TIMER)
