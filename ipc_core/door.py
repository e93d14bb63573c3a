"""The door protocol: how a protocol daemon tells a service who its client is.

Sans-I/O (bytes in, values out, no socket here); the I/O is in
:class:`~ipc_core.Context` (the service's side) and in the daemons.

Why a door
----------
A service that asks for peer information (``service_init(name,
peer_info=True)``) listens on a second socket, ``$RUNDIR/NAME.door``, and
its lock file carries the mark ``peer-info``. A protocol daemon (ipc-tcpd,
ipc-tlsd, ipc-websocketd) that sees the mark connects its network client to
the door instead of ``NAME``, and the door's first frame is the client's
:class:`~ipc_core.peerinfo.PeerInfo`. A separate socket, because on ``NAME``
itself the first frame is the client's own first message: any local client
connecting to ``NAME`` directly could then send a frame that looks like peer
information and pass for whoever it likes. On the door, the first frame is
always an offer, and a connection to ``NAME`` never carries one (its bytes
are exactly what they were before this protocol existed).

Why SO_PASSCRED, not SO_PEERCRED
--------------------------------
Anyone allowed into the run directory may connect to the door, so the
service believes an offer only from a trusted uid: root, its own effective
uid, the run directory's owner, and the uids it lists (``trusted_uids``).
``SO_PEERCRED`` would name the process that *connected*; a trusted process
can hand the connected socket to an untrusted one (``SCM_RIGHTS``), which
would then write whatever it likes under the trusted name. The door listens
with ``SO_PASSCRED`` instead (inherited by the sockets it accepts, so no byte
arrives without), and every read of the offer comes with
``SCM_CREDENTIALS``: the credentials of the process that *wrote* those
bytes (the kernel never joins bytes of two writers in one such read). Every
read up to the end of the offer must come from a trusted uid.

Wire protocol (version 1)
-------------------------
Frames are LibIPC frames: a 4-byte big-endian length, then that many bytes.

1. The daemon connects to ``$RUNDIR/NAME.door`` and sends ONE frame, the
   *offer*: its payload is ``peerinfo.encode(info)`` (UTF-8 JSON, version
   ``[1, 0]``, at most :data:`~ipc_core.peerinfo.MAX_ENCODED` bytes; see
   :mod:`ipc_core.peerinfo` for the fields). :func:`offer_frame` builds it.
   It then sends nothing more until the verdict.
2. The service answers ONE frame, the *verdict*, a UTF-8 JSON object of at
   most :data:`MAX_VERDICT` bytes::

       {"v":[1,0],"accept":true}
       {"v":[1,0],"accept":false,"reason":"not from this network"}

   ``v`` is ``[major, minor]`` (a reader refuses another major and ignores
   keys it does not know), ``accept`` a boolean, ``reason`` a string (at most
   :data:`MAX_REASON` UTF-8 bytes, no control characters) or absent.
   :func:`accept_frame` and :func:`refuse_frame` build them.
3. After an accept, the door connection is an ordinary LibIPC connection:
   the daemon relays it both ways; bytes the service sent right behind its
   accept are the first of the relay (:attr:`VerdictReader.leftover`).
   After a refusal the service closes the connection.

The service waits 5 s for the offer; a connection from an untrusted uid,
with a malformed offer, or silent that long is closed without a verdict.

Hand-off (version 1.1)
----------------------
A service that accepts handed-over connections (``service_init(name,
handoff=True)``, lock mark ``handoff``) lets a daemon whose network stream is
plain LibIPC after its handshake (ipc-tcpd) give it the network socket
itself, so that no relay stays in the path:

1. The daemon sends, in one ``sendmsg`` whose ``SCM_RIGHTS`` carries the
   network socket (exactly one descriptor), the offer (as above) followed by
   ONE *hand-off frame* (:func:`handoff_frame`)::

       payload = 0x01, u16 big-endian N, N bytes "reply", then "early"

   ``reply`` is what the service must write to the client first once it
   accepts (TCPd's ``ok``, at most :data:`MAX_REPLY` bytes); ``early`` the
   LibIPC bytes the daemon read past the client's handshake (at most
   :data:`MAX_EARLY`), which the service reads before the socket's.
2. The service answers the verdict as above, on the door. On accept it
   writes ``reply`` to the handed-over socket before anything else, and
   the daemon closes its own copy of the socket: the connection is the
   service's alone. On a refusal both close their copies (the client sees
   the connection closed without ``reply``, as for any refusal).

A service that did not ask for hand-offs refuses a passed descriptor (and
closes it), as version 1 does.

WebSocket hand-off: a service with the lock mark ``handoff-websocket``
speaks WebSocket itself (``ipc exec``). ipc-websocketd hands it the client's
socket the same way, before answering the upgrade: the offer's transport is
``ws``, ``reply`` is empty (the service answers the 101 itself) and
``early`` every byte the client sent, its HTTP request head first. On a
refusal the daemon answers 403.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from . import peerinfo
from .errors import PeerClosed, ProtocolError, UsageError
from .framing import HEADER_SIZE, header
from .peerinfo import PeerInfo

__all__ = [
    "MAX_EARLY",
    "MAX_REASON",
    "MAX_REPLY",
    "MAX_VERDICT",
    "OFFER_SECONDS",
    "VERSION",
    "Handoff",
    "HandoffReader",
    "OfferReader",
    "Verdict",
    "VerdictReader",
    "accept_frame",
    "handoff_frame",
    "offer_frame",
    "refuse_frame",
]

VERSION = (1, 0)
"""(major, minor) of the verdict written by :func:`accept_frame` and
:func:`refuse_frame`."""
MAX_VERDICT = 4 * 1024
"""The largest verdict payload a :class:`VerdictReader` accepts."""
MAX_REASON = 512
"""A refusal's reason is cut to this many UTF-8 bytes."""
OFFER_SECONDS = 5.0
"""How long a service waits for the offer on a new door connection."""
MAX_REPLY = 256
"""The longest ``reply`` of a hand-off frame."""
MAX_EARLY = 256 * 1024
"""The most ``early`` bytes a hand-off frame carries."""
_HANDOFF_KIND = 0x01

# C0 and C1 controls, DEL, and lone surrogates (a JSON "\ud800" decodes to one).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The service's answer to an offer."""

    accepted: bool
    reason: str | None = None


def offer_frame(info: PeerInfo) -> bytes:
    """The daemon's first frame on a door;
    :class:`~ipc_core.peerinfo.PeerInfoTooLarge` over 16 KiB."""
    payload = peerinfo.encode(info)
    return header(len(payload)) + payload


def _verdict(data: dict[str, Any]) -> bytes:
    payload = json.dumps(
        {"v": list(VERSION), **data}, ensure_ascii=False, separators=(",", ":")
    ).encode("utf-8")
    return header(len(payload)) + payload


_ACCEPT = _verdict({"accept": True})


def accept_frame() -> bytes:
    """``{"v":[1,0],"accept":true}`` as a frame."""
    return _ACCEPT


def refuse_frame(reason: str) -> bytes:
    """``{"v":[1,0],"accept":false,"reason":...}`` as a frame; the reason is
    cleaned (see :func:`clean_reason`)."""
    return _verdict({"accept": False, "reason": clean_reason(reason)})


def clean_reason(reason: str) -> str:
    """``reason`` fit for a log line: control characters (and lone
    surrogates) replaced by U+FFFD, cut to :data:`MAX_REASON` UTF-8 bytes
    without splitting a character."""
    if not isinstance(reason, str):
        raise UsageError(f"a refusal's reason must be a str, not {type(reason).__name__}")
    text = _CONTROL.sub("\ufffd", reason)
    raw = text.encode("utf-8")
    if len(raw) <= MAX_REASON:
        return text
    return raw[:MAX_REASON].decode("utf-8", errors="ignore")


class _FrameReader:
    """One bounded frame out of a byte stream, and what came after it."""

    __slots__ = ("_buf", "_done", "_limit", "_what", "leftover")

    def __init__(self, limit: int, what: str) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._what = what
        self._done = False
        #: The bytes received after the frame (set when the frame completes).
        self.leftover = b""

    def _feed(self, data: bytes | bytearray | memoryview) -> bytes | None:
        if self._done:
            raise UsageError(f"the {self._what} was already read")
        if not data:
            raise PeerClosed(f"connection closed before the {self._what}")
        buf = self._buf
        view = memoryview(data)
        if len(buf) < HEADER_SIZE:
            take = HEADER_SIZE - len(buf)
            buf += view[:take]
            view = view[take:]
            if len(buf) < HEADER_SIZE:
                return None
            length = int.from_bytes(buf[:HEADER_SIZE], "big")
            if length > self._limit:
                raise ProtocolError(
                    f"{self._what} of {length} bytes announced, limit is {self._limit}"
                )
        length = int.from_bytes(buf[:HEADER_SIZE], "big")
        need = HEADER_SIZE + length - len(buf)
        buf += view[:need]
        if len(buf) < HEADER_SIZE + length:
            return None
        self.leftover = bytes(view[need:])
        self._done = True
        payload = bytes(buf[HEADER_SIZE:])
        buf.clear()
        return payload


class OfferReader(_FrameReader):
    """The service's side: reads the daemon's offer from a door connection.

    ``feed(data)`` returns the :class:`~ipc_core.peerinfo.PeerInfo` once its
    frame is complete (None before); :attr:`leftover` then holds the bytes
    after it (ordinary messages). ``feed(b"")`` (the end of the stream)
    before that raises PeerClosed; an announced length over
    :data:`~ipc_core.peerinfo.MAX_ENCODED` (checked before any byte of the
    body is kept) or an invalid record raises ProtocolError. At most
    ``MAX_ENCODED + 4`` bytes are ever held.
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(peerinfo.MAX_ENCODED, "peer information")

    def feed(self, data: bytes | bytearray | memoryview) -> PeerInfo | None:
        payload = self._feed(data)
        return None if payload is None else peerinfo.decode(payload)


class VerdictReader(_FrameReader):
    """The daemon's side: reads the service's verdict from the door.

    ``feed(data)`` returns the :class:`Verdict` once its frame is complete
    (None before); :attr:`leftover` then holds the bytes after it (the
    service's first messages, which belong to the relay). ``feed(b"")``
    before that raises PeerClosed; a frame over :data:`MAX_VERDICT` bytes or
    one that is not a version 1 verdict raises ProtocolError.
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(MAX_VERDICT, "verdict")

    def feed(self, data: bytes | bytearray | memoryview) -> Verdict | None:
        payload = self._feed(data)
        return None if payload is None else parse_verdict(payload)


def parse_verdict(payload: bytes) -> Verdict:
    """A verdict's payload as a :class:`Verdict` (ProtocolError if it is not
    version 1's strict form). The reason comes back cleaned."""
    data = peerinfo.load_object(payload, "verdict")
    version = data.get("v")
    if (
        not isinstance(version, list)
        or len(version) != 2
        or not all(type(n) is int and n >= 0 for n in version)
    ):
        raise ProtocolError("verdict without a [major, minor] version")
    if version[0] != VERSION[0]:
        raise ProtocolError(
            f"verdict version {version[0]}.{version[1]}, this library reads {VERSION[0]}.x"
        )
    accepted = data.get("accept")
    if type(accepted) is not bool:
        raise ProtocolError("verdict without a true or false 'accept'")
    reason = data.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ProtocolError("verdict 'reason' is not a string")
    if "reason" in data and reason is None:
        raise ProtocolError("verdict 'reason' is null")
    return Verdict(accepted, None if reason is None else clean_reason(reason))


# -- hand-off (version 1.1) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handoff:
    """What comes with a handed-over socket: the bytes to write to the client
    first once accepted, and the bytes the daemon read past the handshake."""

    reply: bytes
    early: bytes


def handoff_frame(reply: bytes, early: bytes) -> bytes:
    """The frame that follows the offer when the network socket is handed over."""
    if len(reply) > MAX_REPLY:
        raise UsageError(f"hand-off reply of {len(reply)} bytes, limit is {MAX_REPLY}")
    if len(early) > MAX_EARLY:
        raise UsageError(f"hand-off early bytes: {len(early)}, limit is {MAX_EARLY}")
    payload = bytes((_HANDOFF_KIND,)) + len(reply).to_bytes(2, "big") + reply + early
    return header(len(payload)) + payload


class HandoffReader(_FrameReader):
    """The service's side: the hand-off frame behind the offer.

    ``feed(data)`` returns the :class:`Handoff` once the frame is complete;
    :attr:`leftover` then holds what followed it (a daemon sends nothing
    more: anything there is a protocol error for the caller to report).
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(3 + MAX_REPLY + MAX_EARLY, "hand-off frame")

    def feed(self, data: bytes | bytearray | memoryview) -> Handoff | None:
        payload = self._feed(data)
        return None if payload is None else parse_handoff(payload)


def parse_handoff(payload: bytes) -> Handoff:
    """A hand-off frame's payload; ProtocolError if it is not one."""
    if len(payload) < 3 or payload[0] != _HANDOFF_KIND:
        raise ProtocolError("not a hand-off frame")
    n = int.from_bytes(payload[1:3], "big")
    if n > MAX_REPLY or 3 + n > len(payload):
        raise ProtocolError(f"hand-off reply of {n} bytes does not fit")
    early = payload[3 + n :]
    if len(early) > MAX_EARLY:
        raise ProtocolError(f"hand-off early bytes: {len(early)}, limit is {MAX_EARLY}")
    return Handoff(payload[3 : 3 + n], early)
