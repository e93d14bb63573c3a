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

import email.utils
import enum
import functools
import http
import logging
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from websockets.datastructures import Headers
from websockets.exceptions import PayloadTooBig
from websockets.frames import CloseCode, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol

try:  # websockets' C helper; the pure-Python one is a fallback
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - depends on the wheel
    from websockets.utils import apply_mask

from ipc_core.errors import IPCError, MessageTooLarge, PeerClosed, ProtocolError, UsageError
from ipc_core.framing import DEFAULT_MAX_MESSAGE_SIZE, FrameDecoder, check_limit, header

__all__ = ["HandshakeRequest", "Phase", "WebSocketServerLayer", "origin_allowed"]

#: Default cap on the request line plus headers (what most HTTP servers allow).
MAX_REQUEST_SIZE = 8 * 1024
#: Bytes a client may send after its request before we answer it.
MAX_EARLY_DATA = 64 * 1024

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
    ) -> None:
        self.max_message_size = check_limit(max_message_size)
        self.text_replies = text_replies
        self.origins = origins
        self.max_request_size = max_request_size
        self._proto = ServerProtocol(max_size=max_message_size, logger=logger or _log)
        self._decoder = FrameDecoder(max_message_size)
        self._phase = Phase.READING_REQUEST
        self._head = bytearray()  # HTTP head being received
        self._scanned = 0  # how far _head was searched for the blank line
        self._early = b""  # bytes after the head, held until accept()
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
            raise self._error
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
            self._error = exc
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
        payload = apply_mask(data[head + 4 :], data[head : head + 4])
        if first == 0x81 and not _is_utf8(payload):
            return None  # the general path closes with 1007
        self.activity += 1
        return (_IPC_HEADS[length] if length < 126 else header(length)) + payload

    def fast_send(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """``data`` is exactly one whole LibIPC message: return its data
        frame for the network. None (nothing consumed): use send()."""
        if (
            not (self._fast_ok or self._check_fast())
            or self._out
            or self._proto.writes  # a pong or ping queued: it goes first
            or self._decoder.pending
            or self.text_replies
        ):
            return None
        n = len(data) - 4
        if n > self.max_message_size:
            return None  # send() fails the connection (1011), as for any oversize message
        if n < 126:
            head = _WS_BINARY_HEADS[n]
        elif n < 65536:
            head = _HEAD16.pack(0x82, 126, n)
        else:
            head = _HEAD64.pack(0x82, 127, n)
        self.activity += 1
        return head + data[4:]

    def _check_fast(self) -> bool:
        self._fast_ok = ok = (
            self._phase is Phase.OPEN
            and self._error is None
            and self._fragments is None
            and isinstance(getattr(self._proto, "writes", None), list)  # read by fast_send
            and self._at_frame_boundary()
        )
        return ok

    # -- handshake decisions -------------------------------------------------

    def accept(self) -> bytes:
        """Answer 101 and open the connection.

        Returns the LibIPC bytes of messages the client sent ahead of the 101
        (normally b""). Raises ProtocolError, with a 403 / 4xx response
        queued, if the origin is not allowed or the request is not a valid
        WebSocket handshake.
        """
        request = self._deciding()
        assert self._ws_request is not None
        if not origin_allowed(request.origin, self.origins):
            self._answer(403, "Failed to open a WebSocket connection: forbidden origin.\n")
            self._error = ProtocolError(f"websocket: origin not allowed: {request.origin!r}")
            raise self._error
        response = self._proto.accept(self._ws_request)
        self._proto.send_response(response)
        if response.status_code != 101:
            self._phase = Phase.ANSWERED
            exc = self._proto.handshake_exc
            self._error = ProtocolError(f"websocket: handshake failed: {exc}")
            self._error.__cause__ = exc
            raise self._error
        self._phase = Phase.OPEN
        early, self._early = self._early, b""
        return self.receive_data(early) if early else b""

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
    ) -> None:
        """Answer a plain HTTP request (a static file, a redirect), then close."""
        request = self._deciding()
        out = Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Connection", "close"),
                ("Content-Length", str(len(body))),
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

    # -- local side --------------------------------------------------------

    def send(self, data: bytes) -> None:
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
            self._error = exc
            raise
        if self.text_replies:
            for i, payload in enumerate(payloads):
                if not _is_utf8(payload):
                    self._frame_out(payloads[:i], 0x81)  # the valid ones before it
                    self._fast_ok = False
                    proto.fail(CloseCode.INVALID_DATA, "invalid UTF-8")
                    self._error = ProtocolError(
                        "websocket: local service sent a message that is not UTF-8 text"
                    )
                    raise self._error
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
        proto = self._proto
        proto.receive_data(bytes(head[:end]))
        events = proto.events_received()
        if not events or not isinstance(events[0], Request):
            exc = proto.handshake_exc
            self._answer(400, "Invalid HTTP request.\n")
            cause = exc.__cause__ if exc is not None and exc.__cause__ else exc
            err = ProtocolError(f"websocket: invalid HTTP request: {cause}")
            err.__cause__ = exc
            raise err
        self._ws_request = events[0]
        self._request = HandshakeRequest.from_request(events[0])
        self._phase = Phase.DECIDING

    def _receive_frames(self, data: bytes) -> bytes:
        if data and self._fragments is None and self._at_frame_boundary():
            fast, pos = self._fast_frames(data)
            if pos == len(data):
                return fast
            if fast:
                try:
                    rest = self._slow_frames(data[pos:])
                except IPCError:
                    return fast  # the error is stored and raised by the next call
                return fast + rest
            data = data[pos:]
        return self._slow_frames(data)

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

    def _fast_frames(self, data: bytes) -> tuple[bytes, int]:
        """Complete, unfragmented, masked text/binary frames at the start of
        ``data``, as LibIPC frames; stops at anything else (control frames,
        fragments, oversize, bad UTF-8, a partial frame), which websockets'
        parser then handles with all its checks. Returns (frames, bytes used)."""
        out: list[bytes] = []
        pos = 0
        end = len(data)
        limit = self.max_message_size
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
            if length > limit or stop > end:
                break
            payload = apply_mask(data[head + 4 : stop], data[head : head + 4])
            if first == 0x81 and not _is_utf8(payload):
                break
            out.append(header(length))
            out.append(payload)
            pos = stop
        self.activity += len(out) // 2
        return b"".join(out), pos

    def _slow_frames(self, data: bytes) -> bytes:
        proto = self._proto
        self._fast_ok = False
        if data:
            proto.receive_data(data)
        else:
            proto.receive_eof()
        out: list[bytes | bytearray] = []
        err: IPCError | None = None
        for frame in proto.events_received():
            opcode = frame.opcode
            if opcode is _BINARY or opcode is _TEXT:
                if not frame.fin:
                    self._fragments = bytearray(frame.data)
                    self._fragments_text = opcode is _TEXT
                    continue
                message: bytes | bytearray = frame.data
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
                err = PeerClosed(f"websocket: client closed: {proto.close_rcvd}")
                break
            else:  # PING: websockets already queued the pong
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
        if err is None and not data:
            err = PeerClosed("websocket: client closed the connection without a close frame")
        if err is not None:
            self._error = err
            if not out:
                raise err
        if not out:
            return b""
        return b"".join(out)

    def _parser_error(self) -> IPCError | None:
        """Translate the exception that stopped websockets' parser, if any."""
        exc = self._proto.parser_exc
        if exc is None:
            return None
        err: IPCError
        if isinstance(exc, PayloadTooBig):
            err = ProtocolError(f"websocket: message too large: {exc}")
        elif isinstance(exc, EOFError):
            err = PeerClosed("websocket: client closed the connection without a close frame")
        else:
            err = ProtocolError(f"websocket: {exc}")
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
