"""WebSocket server as a Sans-I/O layer: frames in, LibIPC frames up, and back.

Theory of operation
-------------------
ipc-websocketd puts a local LibIPC service behind a WebSocket endpoint, so
that a browser can talk to it. One WebSocket message carries exactly one
LibIPC message, in both directions:

    network side                                        local side (LibIPC)
    receive_data(ws bytes) -> ServerProtocol -> messages -> u32 length + payload
    data_to_send() <- frames <- FrameDecoder <- send(LibIPC stream bytes)

The WebSocket protocol itself (frame parsing, unmasking, ping -> pong, the
close handshake, size limits, close codes) is websockets' Sans-I/O
:class:`~websockets.server.ServerProtocol`; this module adds what a relay
needs around it:

* The opening handshake is split in two so the driver can decide between
  reading the request and answering it (it may first have to find the local
  service named by the path). ``receive_data`` returns b"" until the HTTP
  head is complete (capped at ``max_request_size``, else 431), then
  :attr:`request` is set and the driver calls exactly one of
  :meth:`accept` (101, the layer is open), :meth:`reject` (an HTTP error) or
  :meth:`respond` (a plain HTTP answer, e.g. a static file). Only the HTTP
  head is given to websockets: bytes that follow it are held until
  :meth:`accept`, which returns the LibIPC bytes of anything a (non-compliant)
  client sent ahead of the 101.
* websockets' Sans-I/O layer hands out frames, not messages: fragments are
  reassembled here (bounded by ``max_message_size``, which websockets also
  enforces across fragments: close 1009), and text messages are checked to be
  UTF-8 (close 1007), which websockets leaves to its I/O layers.
* Speed: while websockets' parser sits idle at a frame boundary, complete
  unfragmented data frames are unmasked here without it (``_fast_frames``),
  and the core's relay calls :meth:`fast_receive` / :meth:`fast_send` first
  (one frame in, one LibIPC message out, in one call), falling back to the
  general methods for anything else. Server data frames are built here too.
* Memory: a data frame still arriving is streamed up as it comes (its LibIPC
  length is in the frame header); what must be held (fragmented messages,
  frames websockets reads) costs :data:`HOLD_ALLOWANCE` per connection, then
  a share of a daemon-wide :class:`HoldPool`; control frames a client leaves
  unread are capped by :data:`CONTROL_BUDGET`. A finished layer frees its
  buffers at once (:meth:`release`): no reference cycle waits for the GC.
* Outgoing bytes from websockets (pongs, close frames, HTTP responses) and
  our data frames are queued in one list, in the order they were produced;
  websockets' end-of-stream marker becomes the :attr:`closed` flag.
* Errors: anything bad the client sends becomes a close frame or an HTTP
  error response in :meth:`data_to_send`, then :class:`ProtocolError`; a close
  frame or EOF from the client is :class:`PeerClosed`. When complete messages
  precede the close/error in one chunk, they are returned first and the
  exception is raised by the next call (``receive_data(b"")`` will do).

Driver rules: after every call, write :meth:`data_to_send` out, then if
:attr:`closed` is True, close the connection. When stacking above TLS, only
pass non-empty plaintext up (b"" means EOF here).
"""

from __future__ import annotations

import codecs
import contextlib
import email.utils
import enum
import functools
import http
import logging
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from websockets.datastructures import Headers
from websockets.exceptions import PayloadTooBig
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol

try:  # websockets' C helper; the pure-Python one is a fallback
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - depends on the wheel
    from websockets.utils import apply_mask

from ipc_core import (
    DEFAULT_MAX_MESSAGE_SIZE,
    FrameDecoder,
    IPCError,
    MessageTooLarge,
    PeerClosed,
    ProtocolError,
    UsageError,
    check_limit,
    header,
)

__all__ = ["HandshakeRequest", "HoldPool", "Phase", "WebSocketServerLayer", "origin_allowed"]

#: Default cap on the request line plus headers (what most HTTP servers allow).
MAX_REQUEST_SIZE = 8 * 1024
#: Bytes a client may send after its request before we answer it.
MAX_EARLY_DATA = 64 * 1024
#: Bytes of unfinished messages (a fragmented message being reassembled, a
#: frame websockets is still reading) one connection may hold for free; more
#: comes out of the daemon-wide :class:`HoldPool`. The order of ipc-tcpd's
#: per-connection buffers.
HOLD_ALLOWANCE = 256 * 1024
#: Bytes of our control frames (pongs, close) a client may leave unread: a
#: client that pings faster than it reads the pongs is closed beyond this.
CONTROL_BUDGET = 256 * 1024

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_TEXT, _BINARY, _CONT, _PONG, _CLOSE = (
    Opcode.TEXT,
    Opcode.BINARY,
    Opcode.CONT,
    Opcode.PONG,
    Opcode.CLOSE,
)

_log = logging.getLogger(__name__)

# Headers of small messages, built once: the fast paths index these lists.
_IPC_HEADS = [header(n) for n in range(126)]
_WS_BINARY_HEADS = [bytes((0x82, n)) for n in range(126)]


# -- origin policy -------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    # A wildcard matches host characters only, so "https://*.example.com"
    # cannot be satisfied by an origin smuggling "/" or "@" or a port.
    parts = (
        "[a-z0-9.-]*" if c == "*" else "[a-z0-9-]" if c == "?" else re.escape(c)
        for c in pattern.lower()
    )
    return re.compile("".join(parts))


def origin_allowed(origin: str | None, allowed: Sequence[str] | None) -> bool:
    """Tell whether a browser page from ``origin`` may open a WebSocket.

    ``allowed`` is None (everything is allowed) or a list of exact origins
    (``https://example.com``) and globs (``https://*.example.com``, ``*``).
    The literal ``null`` (sent by file:// pages and sandboxed frames, so it
    names no one) matches only an explicit ``null`` entry, never a glob.
    A request without an Origin header is allowed: the check defends against
    cross-site WebSocket hijacking, and browsers always send the header,
    while a non-browser client can put anything in it anyway.
    """
    if allowed is None or origin is None:
        return True
    if origin == "null":
        return "null" in allowed
    origin = origin.lower().rstrip("/")
    for pattern in allowed:
        if pattern == "*":
            return True
        if "*" in pattern or "?" in pattern:
            if _glob(pattern.rstrip("/")).fullmatch(origin):
                return True
        elif pattern.lower().rstrip("/") == origin:
            return True
    return False


# -- memory budgets and freeing ------------------------------------------------


class HoldPool:
    """Bytes of unfinished messages the connections of one daemon may hold
    beyond their :data:`HOLD_ALLOWANCE` each.

    Why a shared pool and not a bigger allowance: a message that arrives in
    one frame is streamed to the local service as it comes (nothing held),
    so only fragmented messages (which browsers never send) and frames
    websockets reads itself are held. A fragmented message has no length up
    front, so it cannot be streamed; the pool lets one connection assemble
    a big one while bounding what many connections can pin together.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` more bytes; False (nothing reserved) if over the limit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


def _untrace(exc: BaseException | None) -> None:
    """Drop the tracebacks of an exception chain: a stored exception whose
    traceback holds the frame of a method of its owner is a reference cycle,
    which keeps the owner and its buffers alive until the cyclic GC runs."""
    seen = 0
    while exc is not None and seen < 8:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
        seen += 1


def _detached(err: IPCError) -> IPCError:
    """A copy of ``err`` to store and raise again later, never itself raised
    from here (raising fills its traceback with our frames: a cycle)."""
    copy = IPCError.__new__(type(err))
    copy.args = err.args
    copy.__dict__.update(err.__dict__)
    copy.__cause__ = err.__cause__
    copy.__suppress_context__ = True
    _untrace(err.__cause__)
    return copy


# -- the handshake request -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """What the driver needs to decide on an HTTP request."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    origin: str | None
    #: False for a plain HTTP request (no ``Upgrade: websocket``), e.g. a
    #: browser fetching the page that will open the WebSocket.
    is_upgrade: bool
    x_forwarded_for: str | None

    def header(self, name: str) -> str | None:
        """First value of a header (case-insensitive), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @classmethod
    def from_request(cls, request: Request) -> HandshakeRequest:
        headers = tuple(request.headers.raw_items())
        first: dict[str, str] = {}
        for k, v in headers:
            first.setdefault(k.lower(), v)
        upgrade = first.get("upgrade", "")
        return cls(
            method=request.method,
            path=request.path,
            headers=headers,
            origin=first.get("origin"),
            is_upgrade=request.method == "GET"
            and any(t.strip().lower() == "websocket" for t in upgrade.split(",")),
            x_forwarded_for=first.get("x-forwarded-for"),
        )


# -- the layer -------------------------------------------------------------------


class Phase(enum.Enum):
    """Where the layer is; after OPEN, websockets' own state takes over.

    READING_REQUEST --head complete--> DECIDING --accept()--> OPEN
    DECIDING --reject()/respond()--> ANSWERED (closed once flushed)
    READING_REQUEST --reject()--> ANSWERED (a deadline: 408)
    any phase --error / close() before accept()--> ANSWERED
    """

    READING_REQUEST = "reading request"
    DECIDING = "deciding"
    OPEN = "open"
    ANSWERED = "answered"


def _printable(value: object) -> str:
    """Text from websockets (which may quote the peer: a request line, a
    close reason) for a log line: control characters escaped as repr() does,
    so a newline, ESC or NUL cannot forge or garble a line."""
    text = str(value)
    return text if text.isprintable() else repr(text)[1:-1]


def _utf8_checker() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")()


def _frame_end(data: bytes, pos: int) -> int | None:
    """Where the frame starting at ``pos`` ends, or None if its header is cut."""
    end = len(data)
    if end - pos < 2:
        return None
    second = data[pos + 1]
    length = second & 0x7F
    head = pos + 2
    if length == 126:
        if end - head < 2:
            return None
        (length,) = _U16.unpack_from(data, head)
        head += 2
    elif length == 127:
        if end - head < 8:
            return None
        (length,) = _U64.unpack_from(data, head)
        head += 8
    if second & 0x80:
        head += 4
    if head > end:
        return None
    return head + length


def _select_subprotocol(wanted: str, offered: Sequence[str]) -> str | None:
    """The subprotocol to answer: ``wanted`` if the client offered it."""
    return wanted if wanted in offered else None


def _is_utf8(data: bytes | bytearray) -> bool:
    if data.isascii():  # C-speed fast path for the common case
        return True
    try:
        str(data, "utf-8")
    except UnicodeDecodeError:
        return False
    return True


class WebSocketServerLayer:
    """The server side of one WebSocket connection carrying LibIPC messages."""

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        text_replies: bool = False,
        origins: list[str] | None = None,
        max_request_size: int = MAX_REQUEST_SIZE,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        pool: HoldPool | None = None,
        hold_allowance: int = HOLD_ALLOWANCE,
        control_budget: int = CONTROL_BUDGET,
    ) -> None:
        self.max_message_size = check_limit(max_message_size)
        self.text_replies = text_replies
        self.origins = origins
        self.max_request_size = max_request_size
        self._proto = ServerProtocol(max_size=max_message_size, logger=logger or _log)
        # -vv (the frame logger at DEBUG): every frame goes through websockets,
        # which logs it; no fast path, no streaming (a debugging mode, not a
        # fast one), and our own outbound frames are logged in its format.
        self._trace = bool(self._proto.debug)
        self._decoder = FrameDecoder(max_message_size)
        self._phase = Phase.READING_REQUEST
        self._head = bytearray()  # HTTP head being received
        self._scanned = 0  # how far _head was searched for the blank line
        self._early = b""  # bytes after the head, held until accept()
        self._request_head = b""  # the request's head, while DECIDING
        self._ws_request: Request | None = None
        self._request: HandshakeRequest | None = None
        self._out: list[bytes] = []  # bytes for the network, in order
        self._eof = False  # websockets asked to end the TCP stream
        self._error: IPCError | None = None  # raised by the next receive_data
        self._fragments: bytearray | None = None  # a fragmented message so far
        self._fragments_text = False
        self.pings_sent = 0
        self.pongs_received = 0
        self._pong_since_ping = True
        #: Data messages relayed either way; a keepalive compares it between
        #: sweeps to find idle connections (cheaper than a clock per message).
        self.activity = 0
        # True once checked that complete frames can bypass websockets: open,
        # no error, no fragment, its parser idle at a frame boundary. Cleared
        # whenever websockets is fed or its state changes; rechecked lazily.
        self._fast_ok = False
        # Memory budgets (see HoldPool, CONTROL_BUDGET). ``backlog`` is set by
        # the driver: bytes it holds unsent for this client (the Context's
        # send queue); without it only what data_to_send() holds counts.
        self.pool = pool
        self.hold_allowance = hold_allowance
        self.control_budget = control_budget
        self.backlog: Callable[[], int] | None = None
        self._borrowed = 0  # bytes taken from the pool
        self._control = 0  # control bytes produced, capped by what is unsent
        # A data frame streamed to the local side as it arrives: payload bytes
        # still to come, its mask, how far into it, a UTF-8 checker for text.
        self._stream_left = 0
        self._stream_mask = b""
        self._stream_at = 0
        self._stream_utf8: codecs.IncrementalDecoder | None = None
        self._stash = b""  # the start of a frame header, at a frame boundary
        self._slow_left = 0  # bytes websockets still needs for the frame it reads
        self._pinged = False  # a ping was answered: check the control budget
        self._released = False

    # -- state -------------------------------------------------------------

    @property
    def request(self) -> HandshakeRequest | None:
        """The client's HTTP request, once its head is complete."""
        return self._request

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def state(self) -> State:
        """websockets' view: CONNECTING, OPEN, CLOSING or CLOSED."""
        return self._proto.state

    @property
    def close_code(self) -> int | None:
        """The close code in the client's close frame, if one arrived."""
        rcvd = self._proto.close_rcvd
        return None if rcvd is None else rcvd.code

    @property
    def closed(self) -> bool:
        """True when the connection is over and data_to_send() is drained."""
        self._pull()
        if self._out:
            return False
        return (
            self._eof
            or self._error is not None
            or self._phase is Phase.ANSWERED
            or self._proto.state is State.CLOSED
        )

    def pong_received_since_last_ping(self) -> bool:
        """Keepalive: did any pong arrive since our last ping()?"""
        return self._pong_since_ping

    # -- network side ------------------------------------------------------

    def receive_data(self, data: bytes) -> bytes:
        """Feed bytes from the client (b"" = EOF); return LibIPC frames for it."""
        if self._error is not None:
            raise _detached(self._error)
        try:
            if self._phase is Phase.OPEN:
                return self._receive_frames(data)
            if not data:
                raise PeerClosed("websocket: client closed the connection")
            if self._phase is Phase.READING_REQUEST:
                self._receive_head(data)
            elif self._phase is Phase.DECIDING:
                self._early += data
                if len(self._early) > MAX_EARLY_DATA:
                    self._answer(400, "Data sent before the handshake response.\n")
                    raise ProtocolError("websocket: client sent data before the handshake")
            return b""  # ANSWERED: whatever the client says no longer matters
        except IPCError as exc:
            self._failed(exc)
            raise

    def data_to_send(self) -> bytes:
        """Bytes for the client now: responses, frames, pongs, close frames."""
        self._pull()
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    # -- fast paths (optional Layer hooks, see ipc_core.switch.Layer) ---------

    def fast_receive(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """``data`` is exactly one complete, masked, unfragmented data frame:
        return its LibIPC frame. None (nothing consumed): use receive_data.

        This is the common case of an interactive client, handled without
        websockets' general parser (which never sees these bytes, and is
        only bypassed while it sits idle at a frame boundary).
        """
        payload = self.fast_payload(data)
        if payload is None:
            return None
        n = len(payload)
        return (_IPC_HEADS[n] if n < 126 else header(n)) + payload

    def fast_payload(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """:meth:`fast_receive` without the LibIPC header: the message itself
        (for a relay whose other side is not LibIPC: ``ipc exec``'s pipes)."""
        if not self._fast_ok and not self._check_fast():
            return None
        end = len(data)
        if end < 6:
            return None
        first = data[0]
        second = data[1]
        if (first != 0x82 and first != 0x81) or second < 0x80:
            return None
        length = second & 0x7F
        if length < 126:
            head = 2
        elif length == 126:
            (length,) = _U16.unpack_from(data, 2)
            head = 4
        else:
            return None  # 64-bit lengths: bulk, where a call more does not matter
        if head + 4 + length != end or length > self.max_message_size:
            return None
        payload = apply_mask(data[head + 4 :], data[head : head + 4])  # type: ignore[arg-type]
        if first == 0x81 and not _is_utf8(payload):
            return None  # the general path closes with 1007
        self.activity += 1
        return payload

    def fast_send(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """``data`` is exactly one whole LibIPC message: return its data
        frame for the network. None (nothing consumed): use send()."""
        return self.fast_send_payload(data[4:])

    def fast_send_payload(self, payload: bytes | bytearray | memoryview) -> bytes | None:
        """:meth:`fast_send` for a message without its LibIPC header (a relay
        whose other side is not LibIPC: ``ipc exec``'s pipes)."""
        if (
            not (self._fast_ok or self._check_fast())
            or self._out
            or self._proto.writes  # a pong or ping queued: it goes first
            or self._decoder.pending
            or self.text_replies
        ):
            return None
        n = len(payload)
        if n > self.max_message_size:
            return None  # send() fails the connection (1011), as for any oversize message
        if n < 126:
            head = _WS_BINARY_HEADS[n]
        elif n < 65536:
            head = _HEAD16.pack(0x82, 126, n)
        else:
            head = _HEAD64.pack(0x82, 127, n)
        self.activity += 1
        return head + payload

    def _check_fast(self) -> bool:
        self._fast_ok = ok = (
            not self._trace
            and self._phase is Phase.OPEN
            and self._error is None
            and self._fragments is None
            and not (self._stream_left or self._stash or self._slow_left)
            and isinstance(getattr(self._proto, "writes", None), list)  # read by fast_send
            and self._at_frame_boundary()
        )
        return ok

    # -- handshake decisions -------------------------------------------------

    def accept(self, subprotocol: str | None = None) -> bytes:
        """Answer 101 and open the connection.

        ``subprotocol``: the ``Sec-WebSocket-Protocol`` to select, if the
        client offered it (a browser that offered subprotocols fails the
        connection unless one is selected); None selects none.

        Returns the LibIPC bytes of messages the client sent ahead of the 101
        (normally b""). Raises ProtocolError, with a 403 / 4xx response
        queued, if the origin is not allowed or the request is not a valid
        WebSocket handshake.
        """
        request = self._deciding()
        assert self._ws_request is not None
        self._request_head = b""
        if not origin_allowed(request.origin, self.origins):
            self._answer(403, "Failed to open a WebSocket connection: forbidden origin.\n")
            raise self._failed(ProtocolError(f"websocket: origin not allowed: {request.origin!r}"))
        if subprotocol is not None:
            # websockets calls select_subprotocol(offered); an instance
            # attribute shadows its method (a partial: no cycle to the protocol).
            self._proto.select_subprotocol = functools.partial(  # type: ignore[method-assign,assignment]
                _select_subprotocol, subprotocol
            )
        response = self._proto.accept(self._ws_request)
        self._proto.send_response(response)
        if response.status_code != 101:
            self._phase = Phase.ANSWERED
            exc = self._proto.handshake_exc
            err = ProtocolError(f"websocket: handshake failed: {_printable(exc)}")
            err.__cause__ = exc
            try:
                raise self._failed(err)
            finally:
                del err  # a raised exception held by its own frame is a cycle
        self._phase = Phase.OPEN
        early, self._early = self._early, b""
        return self.receive_data(early) if early else b""

    def handover(self) -> bytes | None:
        """For a hand-off to a service that speaks WebSocket itself: every
        byte the client sent, its request head first, for the taker to parse
        as if it had read them. The layer stays undecided: if the service
        refuses, ``reject`` still answers (403); if it accepts, the driver
        drops the layer unanswered. None unless the request is complete and
        undecided."""
        if self._phase is not Phase.DECIDING or self._error is not None:
            return None
        return self._request_head + self._early

    def reject(self, status: int, body: str) -> None:
        """Refuse the request with an HTTP error (403, 404, ...), then close.

        Also allowed while the request head is still arriving: a driver whose
        deadline expires answers 408 to a client stalled in its request.
        """
        if self._phase is not Phase.READING_REQUEST:
            self._deciding()
        self._answer(status, body)

    def respond(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        content_length: int | None = None,
    ) -> None:
        """Answer a plain HTTP request (a static file, a redirect), then close.

        With ``content_length``, only the head is queued here and the driver
        sends that many body bytes itself (a large file, shared between
        requests rather than copied into each answer).
        """
        request = self._deciding()
        length = len(body) if content_length is None else content_length
        out = Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Connection", "close"),
                ("Content-Length", str(length)),
            ]
        )
        for name, value in headers:
            if name.lower() in ("content-length", "connection"):
                continue
            out[name] = value
        if request.method == "HEAD":
            body = b""
        phrase = http.HTTPStatus(status).phrase
        self._proto.send_response(Response(status, phrase, out, body))
        self._phase = Phase.ANSWERED
        self.release()

    # -- local side --------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Carry LibIPC stream bytes (any chunking) as one WS message each.

        Data arriving once the connection is closing is dropped: in a relay
        the local side routinely races the client's close.
        """
        if self._phase is not Phase.OPEN:
            if self._phase is Phase.ANSWERED:
                return
            raise UsageError("send() before accept()")
        proto = self._proto
        if proto.state is not State.OPEN or self._error is not None:
            return
        try:
            payloads = self._decoder.feed(data)
        except MessageTooLarge as exc:
            self._fast_ok = False
            proto.fail(CloseCode.INTERNAL_ERROR, "message too large")
            self._failed(exc)
            raise
        if self.text_replies:
            for i, payload in enumerate(payloads):
                if not _is_utf8(payload):
                    self._frame_out(payloads[:i], 0x81)  # the valid ones before it
                    self._fast_ok = False
                    proto.fail(CloseCode.INVALID_DATA, "invalid UTF-8")
                    raise self._failed(
                        ProtocolError(
                            "websocket: local service sent a message that is not UTF-8 text"
                        )
                    )
            self._frame_out(payloads, 0x81)
        else:
            self._frame_out(payloads, 0x82)

    def _frame_out(self, payloads: list[bytes], first_byte: int) -> None:
        """Serialise unmasked server data frames (FIN + opcode) ourselves:
        websockets keeps no state for them, and building the 2-10 byte header
        here is several times cheaper than its general frame serialiser."""
        self._pull()  # whatever websockets queued (a pong) goes out first
        self.activity += len(payloads)
        out = self._out
        if self._trace:
            opcode = Opcode.TEXT if first_byte == 0x81 else Opcode.BINARY
            for payload in payloads:
                self._proto.logger.debug("> %s", Frame(opcode, payload))
        for payload in payloads:
            n = len(payload)
            if n < 126:
                out.append(bytes((first_byte, n)))
            elif n < 65536:
                out.append(_HEAD16.pack(first_byte, 126, n))
            else:
                out.append(_HEAD64.pack(first_byte, 127, n))
            out.append(payload)

    def ping(self, data: bytes = b"") -> None:
        """Send a keepalive ping; see pong_received_since_last_ping()."""
        if self._phase is Phase.OPEN and self._proto.state is State.OPEN:
            self._proto.send_ping(data)
            self.pings_sent += 1
            self._pong_since_ping = False

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the close handshake (or just finish, before accept())."""
        self._fast_ok = False
        if self._phase is not Phase.OPEN:
            self._phase = Phase.ANSWERED
        elif self._proto.state is State.OPEN:
            self._proto.send_close(code, reason)

    # -- internals ---------------------------------------------------------

    def _deciding(self) -> HandshakeRequest:
        if self._phase is not Phase.DECIDING or self._request is None:
            raise UsageError(f"no request waiting for an answer (phase: {self._phase.value})")
        return self._request

    def _answer(self, status: int, body: str) -> None:
        """Queue an HTTP error response; the connection ends once it is sent."""
        if self._proto.state is State.CONNECTING and not self._proto.eof_sent:
            self._proto.send_response(self._proto.reject(status, body))
        else:  # websockets already gave up on this request: answer ourselves
            self._pull()
            self._out.append(self._proto.reject(status, body).serialize())
        self._phase = Phase.ANSWERED
        self.release()

    def _receive_head(self, data: bytes) -> None:
        head = self._head
        head += data
        end = head.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            if len(head) <= self.max_request_size:
                self._scanned = len(head)
                return  # wait for the rest of the head
            end = len(head)  # no end in sight: too large already
        end += 4
        if end > self.max_request_size:
            self._answer(431, "Request header fields too large.\n")
            raise ProtocolError(f"websocket: HTTP request head over {self.max_request_size} bytes")
        self._early = bytes(head[end:])
        self._head = bytearray()
        self._request_head = bytes(head[:end])  # for handover(), until the decision
        proto = self._proto
        proto.receive_data(bytes(head[:end]))
        events = proto.events_received()
        if not events or not isinstance(events[0], Request):
            exc = proto.handshake_exc
            self._answer(400, "Invalid HTTP request.\n")
            cause = exc.__cause__ if exc is not None and exc.__cause__ else exc
            err = ProtocolError(f"websocket: invalid HTTP request: {_printable(cause)}")
            err.__cause__ = exc
            try:
                raise err
            finally:
                del err  # a raised exception held by its own frame is a cycle
        self._ws_request = events[0]
        self._request = HandshakeRequest.from_request(events[0])
        self._phase = Phase.DECIDING

    def _receive_frames(self, data: bytes) -> bytes:
        """Frames at a boundary are parsed here: whole data frames are
        unmasked at once, a data frame that is still arriving is streamed to
        the local side as it comes (nothing held, as ipc-tcpd holds nothing),
        anything else (control frames, fragments, errors) is given to
        websockets exactly one frame at a time, so that it never buffers a
        data frame behind a control frame."""
        if not data:
            if self._stream_left or self._stash:
                raise PeerClosed("websocket: client closed the connection in the middle of a frame")
            return self._slow_frames(data)
        if self._stash:
            data = self._stash + data
            self._stash = b""
        out: list[bytes] = []
        pos = 0
        end = len(data)
        try:
            while pos < end and self._error is None:
                if self._stream_left:
                    pos = self._stream_on(data, pos, out)
                    continue
                if self._slow_left:  # websockets is inside a frame we gave it
                    stop = min(end, pos + self._slow_left)
                    self._slow_left -= stop - pos
                else:
                    if not self._trace and self._fragments is None and self._at_frame_boundary():
                        pos = self._fast_frames(data, pos, out)
                        if pos == end or self._stream_left:
                            continue
                        frame_end = _frame_end(data, pos)
                        if frame_end is None:  # a header cut by the read
                            self._stash = bytes(data[pos:])
                            self._fast_ok = False
                            break
                    else:
                        frame_end = _frame_end(data, pos)
                        if frame_end is None:
                            frame_end = end  # websockets waits for the rest
                    stop = min(end, frame_end)
                    self._slow_left = frame_end - stop
                slow = self._slow_frames(data[pos:stop])
                if slow:
                    out.append(slow)
                pos = stop
        except IPCError:
            if not out:
                raise
            # the error is stored and raised by the next call
        if self._pinged and self._error is None:
            self._pinged = False
            err = self._control_error()
            if err is not None:
                self._failed(err)
                if not out:
                    try:
                        raise err
                    finally:
                        del err  # a raised exception held by its own frame is a cycle
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def _stream_on(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """Unmask the next bytes of the streamed data frame; return the new pos."""
        n = min(self._stream_left, len(data) - pos)
        mask = self._stream_mask
        k = self._stream_at & 3
        if k:
            mask = mask[k:] + mask[:k]
        chunk = apply_mask(data[pos : pos + n], mask)
        self._stream_at += n
        self._stream_left -= n
        utf8 = self._stream_utf8
        if utf8 is not None:
            try:
                utf8.decode(chunk, final=not self._stream_left)
            except UnicodeDecodeError:
                self._stream_left = 0
                self._proto.fail(CloseCode.INVALID_DATA, "invalid UTF-8")
                raise self._failed(
                    ProtocolError("websocket: text message is not valid UTF-8")
                ) from None
        out.append(chunk)
        if not self._stream_left:
            self._stream_utf8 = None
            self.activity += 1
        return pos + n

    def _at_frame_boundary(self) -> bool:
        """True when websockets' parser holds nothing and waits for a new frame
        (suspended in its reader's at_eof()); then complete frames can be
        parsed here without desynchronising it. Any doubt: False."""
        proto = self._proto
        if proto.state is not State.OPEN or proto.reader.buffer:
            return False
        gen = proto.parser
        for _ in range(4):  # ServerProtocol.parse -> Protocol.parse -> at_eof
            inner = getattr(gen, "gi_yieldfrom", None)
            if inner is None:
                break
            gen = inner
        code = getattr(gen, "gi_code", None)
        return code is not None and code.co_name == "at_eof"

    def _fast_frames(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """Unfragmented, masked text/binary frames from ``pos``: complete ones
        become LibIPC frames in ``out``; an incomplete one starts streaming.
        Stops at anything else (control frames, fragments, oversize, bad
        UTF-8, a cut header), which websockets' parser then handles with all
        its checks. Returns how far it got."""
        end = len(data)
        limit = self.max_message_size
        count = 0
        while end - pos >= 6:
            first = data[pos]
            second = data[pos + 1]
            if (first != 0x82 and first != 0x81) or not second & 0x80:
                break
            length = second & 0x7F
            head = pos + 2
            if length == 126:
                if end - head < 2:
                    break
                (length,) = _U16.unpack_from(data, head)
                head += 2
            elif length == 127:
                if end - head < 8:
                    break
                (length,) = _U64.unpack_from(data, head)
                head += 8
            stop = head + 4 + length
            if length > limit or head + 4 > end:
                break
            if stop > end:  # still arriving: stream it
                out.append(header(length))
                self._stream_left = length
                self._stream_mask = bytes(data[head : head + 4])
                self._stream_at = 0
                self._stream_utf8 = _utf8_checker() if first == 0x81 else None
                self._fast_ok = False
                pos = head + 4
                break
            payload = apply_mask(data[head + 4 : stop], data[head : head + 4])
            if first == 0x81 and not _is_utf8(payload):
                break
            out.append(header(length))
            out.append(payload)
            count += 1
            pos = stop
        self.activity += count
        return pos

    def _slow_frames(self, data: bytes) -> bytes:
        proto = self._proto
        self._fast_ok = False
        if data:
            proto.receive_data(data)
        else:
            proto.receive_eof()
        out: list[bytes | bytearray] = []
        err: IPCError | None = None
        pinged = False
        # After the upgrade, a server protocol only ever yields frames.
        for frame in cast("list[Frame]", proto.events_received()):
            opcode = frame.opcode
            if opcode is _BINARY or opcode is _TEXT:
                if not frame.fin:
                    self._fragments = bytearray(frame.data)
                    self._fragments_text = opcode is _TEXT
                    continue
                # websockets types data as any bytes-like; a parsed frame holds bytes.
                message: bytes | bytearray = frame.data  # type: ignore[assignment]
                is_text = opcode is _TEXT
            elif opcode is _CONT:
                assert self._fragments is not None  # websockets checks the order
                self._fragments += frame.data
                if not frame.fin:
                    continue
                message, self._fragments = self._fragments, None
                is_text = self._fragments_text
            elif opcode is _PONG:
                self.pongs_received += 1
                self._pong_since_ping = True
                continue
            elif opcode is _CLOSE:
                err = PeerClosed(f"websocket: client closed: {_printable(proto.close_rcvd)}")
                break
            else:  # PING: websockets already queued the pong
                pinged = True
                continue
            if is_text and not _is_utf8(message):
                proto.fail(CloseCode.INVALID_DATA, "invalid UTF-8")
                err = ProtocolError("websocket: text message is not valid UTF-8")
                break
            out.append(header(len(message)))
            out.append(message)
        self.activity += len(out) // 2
        if err is None:
            err = self._parser_error()
        if pinged:
            self._pinged = True  # checked once per receive_data (see _control_error)
        if err is None:
            err = self._hold_error()
        if err is None and not data:
            err = PeerClosed("websocket: client closed the connection without a close frame")
        if err is not None:
            self._failed(err)
            if not out:
                try:
                    raise err
                finally:
                    del err  # a raised exception held by its own frame is a cycle
        if not out:
            return b""
        return b"".join(out)

    def _control_error(self) -> IPCError | None:
        """A client that pings faster than it reads our pongs would make us
        queue pongs without end: past :attr:`control_budget` bytes of control
        frames still unsent, it is cut (its reads are what would drain them).

        Unsent control bytes are estimated from above: those produced since
        the queue towards the client was last seen no larger, i.e. at most
        what is unsent in total (our queue plus the driver's ``backlog``).
        """
        self._pull()
        unsent = sum(map(len, self._out))
        if self.backlog is not None:
            unsent += self.backlog()
        if self._control > unsent:
            self._control = unsent
        if self._control <= self.control_budget:
            return None
        held = self._control
        self._out.clear()  # nobody reads them; the connection is cut
        self._eof = True
        return ProtocolError(
            f"websocket: client sends pings faster than it reads the pongs: {held} bytes of"
            f" control frames unread (budget {self.control_budget})"
        )

    def _hold_error(self) -> IPCError | None:
        """Charge what websockets and our reassembly hold for unfinished
        messages: :attr:`hold_allowance` bytes free, more from the pool."""
        held = len(self._proto.reader.buffer)
        if self._fragments is not None:
            held += len(self._fragments)
        extra = held - self.hold_allowance
        borrowed = self._borrowed
        pool = self.pool
        if extra <= borrowed or pool is None:
            if pool is not None and borrowed:
                pool.give(borrowed - max(extra, 0))
                self._borrowed = max(extra, 0)
            return None
        if pool.take(extra - borrowed):
            self._borrowed = extra
            return None
        if extra > pool.limit:
            code, why = CloseCode.MESSAGE_TOO_BIG, "over the daemon's limit for fragmented messages"
        else:
            code, why = CloseCode.TRY_AGAIN_LATER, "the daemon holds too many unfinished messages"
        self._proto.fail(code, why)
        return ProtocolError(
            f"websocket: unfinished message of {held} bytes: {why}"
            f" ({self.hold_allowance} per connection + a pool of {pool.limit}, {pool.used} in use;"
            f" close {int(code)})"
        )

    def _parser_error(self) -> IPCError | None:
        """Translate the exception that stopped websockets' parser, if any."""
        exc = self._proto.parser_exc
        if exc is None:
            return None
        err: IPCError
        if isinstance(exc, PayloadTooBig):
            err = ProtocolError(f"websocket: message too large: {_printable(exc)}")
        elif isinstance(exc, EOFError):
            err = PeerClosed("websocket: client closed the connection without a close frame")
        else:
            err = ProtocolError(f"websocket: {_printable(exc)}")
        err.__cause__ = exc
        return err

    def _pull(self) -> None:
        """Move websockets' pending writes to our queue, keeping the order."""
        writes = self._proto.data_to_send()
        if writes:
            for chunk in writes:
                if chunk is SEND_EOF or not chunk:
                    self._eof = True
                else:
                    self._out.append(chunk)
                    self._control += len(chunk)

    def _failed(self, err: IPCError) -> IPCError:
        """Store ``err`` for the next calls (as a detached copy: see _detached),
        free what the connection holds, and return ``err`` to be raised."""
        self._error = _detached(err)
        self._fast_ok = False
        self.release()
        return err

    def release(self) -> None:
        """Free at once what a finished connection holds: websockets' parser
        (a generator whose frame refers back to its protocol object: a cycle
        only the cyclic GC would break), its buffers, our partial messages,
        and our share of the pool. Idempotent; further receive_data() calls
        raise. Called on errors, on HTTP answers, by the driver when the
        connection is gone, and when the layer is deleted."""
        if self._released:
            return
        self._released = True
        self._pull()  # what is queued (a close frame, a response) still goes out
        proto = self._proto
        _untrace(proto.parser_exc)
        _untrace(proto.handshake_exc)
        parser = getattr(proto, "parser", None)
        if parser is not None:
            parser.close()
        proto.reader.buffer.clear()
        self._fragments = None
        self._decoder = FrameDecoder(self.max_message_size)  # a partial reply
        self._head = bytearray()
        self._early = self._request_head = b""
        self._stash = b""
        self._stream_left = self._slow_left = 0
        self._stream_utf8 = None
        if self.pool is not None and self._borrowed:
            self.pool.give(self._borrowed)
        self._borrowed = 0
        if self._error is None and self._phase is not Phase.ANSWERED:
            self._error = PeerClosed("websocket: connection released")
        self._fast_ok = False

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
