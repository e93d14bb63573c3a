"""HTTP request/response as a Sans-I/O layer: one request body is one LibIPC
message, the service's reply is the response body.

Theory of operation
-------------------
ipc-httpd lets any HTTP client reach a local service with ``POST /SERVICE``.
The HTTP/1.1 parsing and framing are h11's (:class:`h11.Connection`, a
Sans-I/O library in the style of websockets'); this module decides what the
requests mean and turns them into LibIPC messages and back:

    network side                                       local side (LibIPC)
    receive_data(HTTP bytes) -> h11 -> POST body  ->  u32 length + body
    data_to_send() <- 200 + body <- FrameDecoder  <-  send(LibIPC bytes)

Why a :class:`~ipc_core.switch.Layer` and not a request loop of the daemon's
own: one HTTP keep-alive connection is one LibIPC connection (a service may
keep per-client state over a session), which is exactly a switched pair. The
engine's handshake path gives the first request everything the other
daemons have (policy, the door of a service that wants peer information,
deadlines, counts), and the Context's relay then carries every later request
with no engine code on the hot path. What a relay cannot do alone, the
driver (:mod:`daemons.httpd`) does when :attr:`HttpConnection.on_ready`
asks: deliver a pipelined request once the previous reply went out, close
a connection that must close, and answer 504 when a reply is late.

The first request is split in two like ipc-websocketd's upgrade:
:class:`HttpHandshake` reads its head, checks it (Host, method, path,
Origin, size) and names the service; the engine connects it and calls
:meth:`HttpHandshake.accept`, which hands over the :class:`HttpConnection`
(any body bytes that came along are the "early" LibIPC bytes).

Rules, for every request of a connection:

* ``POST /SERVICE``: the body (at most ``max_message_size``; a larger
  ``Content-Length`` is answered 413 before any body byte is read, a chunked
  body that grows past it too) becomes one message; the next message from the
  service is the ``200`` answer, ``Content-Type`` from the options.
* ``GET``/``HEAD /SERVICE``: a health check, answered ``200`` once the service
  accepted the connection (the first request of a connection goes through the
  engine's connect; on a connection already open, at once).
* ``OPTIONS``: the CORS preflight (``--cors``), answered here; other methods
  405. A request for another service than the connection's: 421 and close
  (the client retries on a new connection, RFC 9110 15.5.20).
* Requests are answered in order: h11 does not hand out request N+1 before
  answer N is sent, so a pipelining client waits in h11's buffer, bounded by
  ``max_pipelined`` bytes (past it: closed).
* The service closes while a request waits (or before its body is complete):
  502. No reply in time: the driver calls :meth:`HttpConnection.expire` (504;
  408 for a body that did not arrive in time). A message from the service
  while no request waits is dropped (logged).
* A browser's request with an ``Origin`` is served only when ``cors`` allows
  it (:func:`~daemons.codecs.ws.origin_allowed`; the answer then carries
  ``Access-Control-Allow-Origin``); else 403. The ``Host`` must name this
  daemon (:class:`~daemons.codecs.wsrequest.HostPolicy`, the DNS rebinding
  defence of ipc-websocketd), else 421.

Errors: bad input queues an answer (400, 413, 421, 431...) and raises
:class:`~ipc_core.ProtocolError`; the driver writes the answer and closes.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import NoReturn

import h11

from ipc_core import (
    DEFAULT_MAX_MESSAGE_SIZE,
    FrameDecoder,
    Layer,
    PeerClosed,
    ProtocolError,
    header,
)
from ipc_core.peerinfo import PeerInfo

from ..engine.policy import service_name_error
from .ws import origin_allowed
from .wsrequest import HostPolicy, shown, url_path

__all__ = [
    "ALLOWED_METHODS",
    "HttpConnection",
    "HttpHandshake",
    "HttpOptions",
    "Phase",
]

log = logging.getLogger("ipc.httpd")

#: Default cap on a request line plus headers (what most HTTP servers allow).
MAX_HEADER_SIZE = 8 * 1024
#: Default bytes a client may send ahead (pipelined requests) while one waits
#: for its reply, beyond what the waiting request itself needs.
MAX_PIPELINED = 256 * 1024
ALLOWED_METHODS = "POST, GET, HEAD, OPTIONS"
#: How long a browser may cache a preflight's answer.
PREFLIGHT_MAX_AGE = "600"

_TEXT = (b"content-type", b"text/plain; charset=utf-8")
_CLOSE = (b"connection", b"close")
_NOSNIFF = (b"x-content-type-options", b"nosniff")
_ANSWERS = {
    400: b"Bad request.\n",
    403: b"Forbidden.\n",
    404: b"Unknown service.\n",
    405: b"Method not allowed: POST /SERVICE (GET or HEAD: is it up?).\n",
    408: b"Request timeout.\n",
    413: b"Request body too large.\n",
    421: b"Misdirected request.\n",
    431: b"Request header fields too large.\n",
    500: b"Internal error.\n",
    502: b"Bad gateway: the service closed without replying.\n",
    503: b"Service unavailable.\n",
    504: b"Gateway timeout: the service did not reply in time.\n",
}


@dataclass(frozen=True)
class HttpOptions:
    """How every connection of one daemon behaves.

    ``cors``: the origins whose pages may call (``--cors``; exact origins,
    globs, ``null`` or ``*``, as ipc-websocketd's ``--origin``); empty, no
    browser page may (a request with an ``Origin`` gets 403).
    ``secure``: served over TLS (the scheme of the same-origin check).
    """

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    content_type: str = "application/octet-stream"
    cors: tuple[str, ...] = ()
    max_header_size: int = MAX_HEADER_SIZE
    max_pipelined: int = MAX_PIPELINED
    secure: bool = False


class Phase(enum.Enum):
    """Where a connection is: reading its first request's head, waiting for
    the engine to connect the service, relaying, or over."""

    READING = "reading"
    DECIDING = "deciding"
    OPEN = "open"
    DONE = "done"


@dataclass(slots=True)
class _Request:
    """What the rules need of one request (h11's event keeps the rest)."""

    method: bytes
    origin: str | None
    cors: bool  # the answer carries Access-Control-Allow-Origin
    post: bool


class HttpConnection:
    """One HTTP connection, as the :class:`~ipc_core.switch.Layer` of its
    switched pair (see the module docstring)."""

    def __init__(
        self, options: HttpOptions, hosts: HostPolicy | None = None, peer: str = "?"
    ) -> None:
        self.options = options
        self.hosts = hosts
        self.peer = peer
        self.phase = Phase.READING
        #: The service of this connection (named by its first request).
        self.service: str | None = None
        #: The first request (for the peer information).
        self.first: h11.Request | None = None
        #: When the request now with the service was sent to it (monotonic);
        #: None when no request waits. The driver's sweep reads it.
        self.waiting_since: float | None = None
        #: When the head of a POST whose body is still coming arrived
        #: (monotonic); None otherwise. The same sweep bounds it (408).
        self.reading_since: float | None = None
        #: The connection must be closed once its answers are written.
        self.must_close = False
        #: Called (by the layer, from any of its methods) when the driver has
        #: work: a pipelined request's LibIPC bytes (:meth:`take_up`) or a close.
        self.on_ready: Callable[[], None] | None = None
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=options.max_header_size)
        self._out: list[bytes] = []
        self._up: list[bytes] = []
        self._current: _Request | None = None
        self._body = bytearray()
        self._replies = FrameDecoder(options.max_message_size)
        self._host_ok: bytes | None = None  # the last Host header found good
        self._dropped = 0
        self._content_type = options.content_type.encode("latin-1")

    # -- Layer -------------------------------------------------------------

    def receive_data(self, data: bytes) -> bytes:
        """HTTP bytes in; the LibIPC bytes of the requests they complete."""
        if not data:
            self.phase = Phase.DONE
            raise PeerClosed("http: client closed the connection")
        conn = self._h11
        conn.receive_data(data)
        if self.waiting_since is not None or self._up:
            self._check_pipelined()
            return b""
        return self._pump()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """LibIPC bytes from the service: each message answers the waiting request."""
        for payload in self._replies.feed(data):
            self._reply(payload)

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def close(self) -> None:
        """The service side closed (or the pair is going): a request still
        in progress gets 502."""
        if (
            self.phase is Phase.OPEN
            and self._current is not None
            and self._h11.our_state is h11.SEND_RESPONSE
        ):
            self.waiting_since = self.reading_since = None
            self._answer(502, _ANSWERS[502], close=True)
            log.warning(
                "ipc-httpd: %s: service %r closed with a request unanswered (502)",
                self.peer,
                self.service,
            )
        self.phase = Phase.DONE

    # -- the driver's ------------------------------------------------------

    def take_up(self) -> bytes:
        """LibIPC bytes of pipelined requests, for the driver to feed up."""
        up = self._up
        if not up:
            return b""
        data = b"".join(up)
        up.clear()
        return data

    @property
    def has_work(self) -> bool:
        """The driver should call :meth:`take_up` or close."""
        return bool(self._up) or self.must_close

    @property
    def busy_since(self) -> float | None:
        """Since when the current request has been in progress (its body
        arriving, or its reply awaited); None when none is."""
        return self.waiting_since if self.waiting_since is not None else self.reading_since

    def expire(self) -> int | None:
        """The current request took too long: 504 if its reply is late (a
        late reply would otherwise answer the next request), 408 if its body
        is; the connection closes. The status, or None if nothing was late."""
        if self.waiting_since is not None:
            status = 504
        elif self.reading_since is not None:
            status = 408
        else:
            return None
        self.waiting_since = self.reading_since = None
        self._answer(status, _ANSWERS[status], close=True)
        self.must_close = True
        return status

    # -- the handshake's ---------------------------------------------------

    def read_first(self, data: bytes) -> None:
        """The first request's head (handshake phase); sets :attr:`service`
        or answers (then :attr:`must_close`), or raises ProtocolError."""
        if not data:
            raise PeerClosed("http: client closed before its request")
        self._h11.receive_data(data)
        self._pump()

    def open(self) -> bytes:
        """The service is connected: answer a health check, or let the body
        come; the LibIPC bytes of what already came."""
        self.phase = Phase.OPEN
        current = self._current
        if current is not None and not current.post:
            self._answer_ok()
        elif self._h11.they_are_waiting_for_100_continue:
            self._out.append(self._h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        return self._pump()

    def refuse(self, status: int) -> None:
        """The engine's refusal of the first request (404, 403, 503...)."""
        self.phase = Phase.DONE
        if self._h11.our_state is h11.SEND_RESPONSE:
            self._answer(status, _ANSWERS.get(status, b"Refused.\n"), close=True)
        elif self._h11.our_state is h11.IDLE and status == 408:
            self._out.append(_raw_answer(408))

    # -- requests ----------------------------------------------------------

    def _pump(self) -> bytes:
        """Take h11's events while a request may be read; the LibIPC bytes
        of the bodies completed."""
        conn = self._h11
        up = b""
        while self.waiting_since is None and not self.must_close:
            if self.phase is Phase.DECIDING:
                break
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._bad_request(exc)
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            kind = type(event)
            if kind is h11.Data:
                self._take_body(event.data)  # type: ignore[union-attr]
            elif kind is h11.EndOfMessage:
                current = self._current
                if current is not None and current.post:
                    body = self._body
                    up += header(len(body)) + body
                    self._body = bytearray()
                    self.reading_since = None
                    self.waiting_since = time.monotonic()
                else:
                    self._next_cycle()
            elif kind is h11.Request:
                self._on_request(event)  # type: ignore[arg-type]
            elif kind is h11.ConnectionClosed:
                self.phase = Phase.DONE
                raise PeerClosed("http: client closed the connection")
        return up

    def _on_request(self, request: h11.Request) -> None:
        reading = self.phase is Phase.READING
        if reading:
            self.first = request
        self._check_host(request)
        method = request.method
        path = url_path(request.target.decode("latin-1"))
        name = path[1:] if path is not None else ""
        if method == b"OPTIONS":
            self._preflight(request)
            return
        if method not in (b"POST", b"GET", b"HEAD"):
            self._current = _Request(method, None, False, False)
            self._answer(405, _ANSWERS[405], [(b"allow", ALLOWED_METHODS.encode())], close=reading)
            log.debug("ipc-httpd: %s: %s: 405", self.peer, shown(method.decode("latin-1")))
            return
        origin = _header(request, b"origin")
        cors = origin is not None
        if cors and not origin_allowed(origin, self.options.cors or ()):
            self._current = _Request(method, origin, False, False)
            self._fail(403, f"origin {shown(origin)} not allowed (--cors)")
        if reading:
            reason = service_name_error(name) if path is not None else "bad request path"
            if reason:
                self._current = _Request(method, origin, cors, False)
                self._fail(404, f"no service in path {shown(path or '')}: {reason}")
        elif name != self.service:
            self._current = _Request(method, origin, cors, False)
            self._fail(
                421,
                f"a request for {shown(name)} on a connection to {self.service!r} "
                "(one service per connection)",
            )
        post = method == b"POST"
        self._current = _Request(method, origin, cors, post)
        if post:
            self.reading_since = time.monotonic()
            length = _header(request, b"content-length")
            limit = self.options.max_message_size
            if length is not None and length.isdigit() and int(length) > limit:
                self._fail(413, f"body of {length} bytes (--max-message-size {limit})")
        if reading:
            self.service = name
            self.phase = Phase.DECIDING
        elif not post:
            self._answer_ok()
        elif self._h11.they_are_waiting_for_100_continue:
            self._out.append(self._h11.send(h11.InformationalResponse(status_code=100, headers=[])))

    def _take_body(self, data: bytes) -> None:
        current = self._current
        if current is None or not current.post:
            return  # the body of a request already answered (405): dropped
        body = self._body
        body += data
        if len(body) > self.options.max_message_size:
            self._body = bytearray()
            self._fail(
                413, f"chunked body over {self.options.max_message_size} bytes (--max-message-size)"
            )

    def _check_host(self, request: h11.Request) -> None:
        if self.hosts is None:
            return
        value = _raw_header(request, b"host")
        if value is not None and value == self._host_ok:
            return
        if value is None:
            return  # HTTP/1.0 (h11 refuses an HTTP/1.1 request without one): not a browser
        text = value.decode("latin-1")
        if not self.hosts.allows(text):
            self._current = _Request(request.method, None, False, False)
            self._fail(
                421,
                f"Host {shown(text)} is not a name of this daemon (DNS rebinding?); "
                "--host NAME adds one",
            )
        self._host_ok = value

    def _preflight(self, request: h11.Request) -> None:
        """OPTIONS: the CORS preflight of a browser's POST (or a plain OPTIONS)."""
        origin = _header(request, b"origin")
        self._current = _Request(b"OPTIONS", origin, False, False)
        close = self.phase is Phase.READING
        if origin is None:
            self._answer(204, b"", [(b"allow", ALLOWED_METHODS.encode())], close=close)
            return
        if not origin_allowed(origin, self.options.cors or ()):
            self._fail(403, f"preflight from origin {shown(origin)} not allowed (--cors)")
        headers = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", b"POST, GET, HEAD"),
            (b"access-control-max-age", PREFLIGHT_MAX_AGE.encode()),
            (b"vary", b"Origin"),
        ]
        asked = _raw_header(request, b"access-control-request-headers")
        if asked:
            headers.append((b"access-control-allow-headers", asked))
        self._answer(204, b"", headers, close=close, cors=False)

    # -- answers -----------------------------------------------------------

    def _reply(self, payload: bytes) -> None:
        current = self._current
        if self.waiting_since is None or current is None:
            self._dropped += 1
            if self._dropped == 1:
                log.warning(
                    "ipc-httpd: %s: service %r sent a message no request waits for; dropped",
                    self.peer,
                    self.service,
                )
            return
        self.waiting_since = None
        self._answer(200, payload, [(b"content-type", self._content_type)], text=False)
        if self.must_close:
            self._ready()
            return
        up = self._pump_safely()
        if up:
            self._up.append(up)
            self._ready()
        elif self.must_close:
            self._ready()

    def _pump_safely(self) -> bytes:
        """:meth:`_pump` from :meth:`send`, where an exception would be the
        service's fault: a client error there means "answer and close"."""
        try:
            return self._pump()
        except PeerClosed:
            self.must_close = True
        except ProtocolError as exc:
            log.warning("ipc-httpd: %s: %s", self.peer, exc)
            self.must_close = True
        return b""

    def _answer_ok(self) -> None:
        self._answer(200, b"", [(b"content-type", self._content_type)], text=False)

    def _answer(
        self,
        status: int,
        body: bytes,
        headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        close: bool = False,
        text: bool = True,
        cors: bool = True,
    ) -> None:
        """One whole answer to the current request, then the next cycle."""
        conn = self._h11
        if conn.our_state is not h11.SEND_RESPONSE and not (
            conn.our_state is h11.IDLE and conn.their_state is h11.ERROR
        ):
            return  # answered already (or nothing was asked)
        current = self._current
        fields = [*headers, (b"content-length", str(len(body)).encode())]
        if text:
            fields.append(_TEXT)
            fields.append(_NOSNIFF)
        if cors and current is not None and current.cors and current.origin is not None:
            fields.append((b"access-control-allow-origin", current.origin.encode("latin-1")))
            fields.append((b"vary", b"Origin"))
        if close:
            fields.append(_CLOSE)
        out = self._out
        try:
            out.append(
                conn.send(h11.Response(status_code=status, headers=fields, reason=_reason(status)))
            )
            if body and (current is None or current.method != b"HEAD"):
                out.append(conn.send(h11.Data(data=body)))
            out.append(conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as exc:  # a header h11 refuses: our bug, not the peer's
            conn.send_failed()
            self.must_close = True
            raise ProtocolError(f"http: cannot answer: {exc}") from None
        self._current = None if conn.their_state is h11.DONE else current
        self._next_cycle()

    def _next_cycle(self) -> None:
        conn = self._h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            self._current = None
            conn.start_next_cycle()
        elif conn.our_state is h11.MUST_CLOSE or (
            conn.our_state is h11.DONE and conn.their_state is h11.MUST_CLOSE
        ):
            self._current = None
            self.must_close = True

    def _fail(self, status: int, reason: str) -> NoReturn:
        """Answer ``status`` and close; the reason goes to the engine's log."""
        self._answer(status, _ANSWERS[status], close=True)
        self.must_close = True
        raise ProtocolError(f"http: {status}: {reason}")

    def _bad_request(self, exc: h11.RemoteProtocolError) -> NoReturn:
        status = exc.error_status_hint if exc.error_status_hint in _ANSWERS else 400
        self._current = None  # h11 answers a request it could not parse, too
        self._answer(status, _ANSWERS[status], close=True)
        self.must_close = True
        raise ProtocolError(f"http: {status}: bad request: {exc}")

    def _check_pipelined(self) -> None:
        waiting, _closed = self._h11.trailing_data
        if len(waiting) > self.options.max_pipelined + self.options.max_header_size:
            self.must_close = True
            raise ProtocolError(
                f"http: over {self.options.max_pipelined} bytes sent ahead of the answers"
            )

    def _ready(self) -> None:
        if self.on_ready is not None:
            self.on_ready()


class HttpHandshake:
    """The engine's ``Handshake`` over :class:`HttpConnection`: the first
    request's head names the service (see the module docstring), a request
    answered without a service (OPTIONS, 405) sets ``finished``, a bad one
    raises ProtocolError with its answer queued. ``describe`` gives a
    peer-info service the first request's facts."""

    def __init__(self, connection: HttpConnection) -> None:
        self.conn = connection

    @property
    def service(self) -> str | None:
        return self.conn.service

    @property
    def finished(self) -> bool:
        return self.conn.must_close

    def receive_data(self, data: bytes) -> None:
        self.conn.read_first(data)

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()

    def accept(self) -> tuple[Layer | None, bytes]:
        return self.conn, self.conn.open()

    def reject(self, reason: str, status: int) -> None:
        self.conn.refuse(status)

    def describe(self, info: PeerInfo) -> PeerInfo:
        """``DescribesPeer``: transport ``http`` (``https`` under TLS), and the
        first request's method, path (as sent, percent-encoded, like
        ipc-websocketd's), query, Origin, User-Agent, Cookie, Authorization."""
        request = self.conn.first
        if request is None:
            return dataclasses.replace(info, transport="http")
        target = request.target.decode("latin-1").partition("#")[0]
        path, _, query = target.partition("?")
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, errors="replace")
        return dataclasses.replace(
            info,
            transport="http",
            method=_clean(request.method.decode("ascii", "replace")),
            path=_clean(path),
            query=tuple((_clean(k) or "", _clean(v) or "") for k, v in pairs),
            origin=_text(_raw_header(request, b"origin")),
            user_agent=_text(_raw_header(request, b"user-agent")),
            cookie=_text(_raw_header(request, b"cookie")),
            authorization=_text(_raw_header(request, b"authorization")),
        )


def _raw_header(request: h11.Request, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None


def _header(request: h11.Request, name: bytes) -> str | None:
    value = _raw_header(request, name)
    return value.decode("latin-1") if value is not None else None


def _clean(value: str | None) -> str | None:
    """Peer text for a PeerInfo: NUL replaced (the record refuses it)."""
    return value.replace("\x00", "\ufffd") if value else value


def _text(value: bytes | None) -> str | None:
    """Header bytes as the UTF-8 a browser sends, bad bytes replaced."""
    if not value:
        return None
    return _clean(value.decode("utf-8", "replace"))


@functools.lru_cache(maxsize=64)
def _reason(status: int) -> bytes:
    """The reason phrase of ``status`` (h11 sends none unless told)."""
    return HTTPStatus(status).phrase.encode()


def _raw_answer(status: int) -> bytes:
    """An answer h11 cannot send: 408 before any request arrived (h11 only
    answers a request, or one it could not parse). Fixed text, closing."""
    body = _ANSWERS.get(status, b"Bad request.\n")
    phrase = HTTPStatus(status).phrase.encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, phrase, len(body), body)
    )
