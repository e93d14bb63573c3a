"""ipc-websocketd: local LibIPC services for browsers, over WebSocket.

A browser opens ``ws://HOST:PORT/SERVICE`` (``wss://`` with ``--cert``) and
talks to the local service ``$RUNDIR/SERVICE``: one WebSocket message is one
LibIPC message (the payload, without the 4-byte length), in both directions.

Theory of operation
-------------------
Everything runs in the one :class:`~ipc_core.Context` loop of the shared
daemon engine (:mod:`daemons.engine.daemon`); there is no asyncio and no thread:

    browser --bytes--> [TLSLayer] --> WebSocketServerLayer --LibIPC--> $RUNDIR/SERVICE
            <--------- [TLSLayer] <-- (ServerProtocol)     <---------

* Handshake: :class:`WebSocketHandshake` adapts the split handshake of
  :class:`~daemons.codecs.ws.WebSocketServerLayer` to the engine's ``Handshake``
  protocol. Once the HTTP head is complete it decides: a WebSocket upgrade
  with an acceptable ``Origin`` names a service (the engine then applies the
  allow/deny policy and connects, or makes us answer 403/404/503); a plain
  HTTP request is answered here (a static file, 426 on a service path, 404)
  and the connection closes. A stalled client gets 408 at the engine's
  deadline. With ``--cert`` TLS is wrapped around this handshake
  (:class:`~daemons.codecs.tlswrap.TLSHandshake`).
* Switched phase: the layer is the Context's switch codec, so the Context
  does every read and write, with its bounded queues and back-pressure (a
  browser that reads slowly stops the daemon from reading the service).
* Keepalive: the engine's ``on_switched`` hook and DISCONNECTION events keep
  :class:`Keepalive`'s table of open connections; timers sweep it to ping,
  to close peers whose pong never came, and to close idle connections.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click
from websockets.frames import CloseCode

from ipc_core import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Context,
    Event,
    EventType,
    IPCError,
    Layer,
    PeerClosed,
    ProtocolError,
    StackedLayer,
)
from ipc_core.peerinfo import PeerInfo

from .codecs.forwarded import ClientAddress, ForwardedHeader
from .codecs.proxied import ProxiedHandshake, ProxyFront, use_proxy_protocol
from .codecs.proxy import ProxyGate
from .codecs.tlswrap import TLSHandshake, describe_identity
from .codecs.ws import HandshakeRequest, HoldPool, Phase, WebSocketServerLayer, origin_allowed
from .codecs.wsrequest import (
    Forwarding,
    HostPolicy,
    TokenScrubber,
    client_label,
    describe_request,
    limit_client,
    peer_address,
    same_origin,
    scrub_tokens,
    shown,
    split_host,
    url_path,
)
from .engine import certs
from .engine.daemon import Daemon
from .engine.errors import Failure, HandshakeRefused
from .engine.handshake import Handshake, names_peer
from .engine.listeners import peer_name
from .engine.log import setup_logging
from .engine.options import (
    CommonOptions,
    check_origins,
    common_options,
    libipc_command,
    proxy_protocol_option,
    seconds,
)
from .engine.policy import service_name_error
from .engine.startup import new_daemon, open_listeners, starting
from .engine.staticfiles import SharedBody, StaticFiles
from .engine.tlsconfig import ServerTLS, server_tls_options
from .engine.tokens import PresentedToken, find_token
from .engine.trust import UNIX, BadNetwork, TrustedNetworks
from .engine.webauth import TokenSetupError, TokenSource

__all__ = [
    "HostPolicy",
    "Keepalive",
    "StaticFiles",
    "WebSocketHandshake",
    "WebSocketOptions",
    "build_daemon",
    "main",
    "same_origin",
    "shown",
    "split_host",
]

log = logging.getLogger("ipc.websocketd")
#: websockets' own log (every frame at DEBUG, every connection at INFO): only
#: shown with -vv, it would drown the daemon's one line per connection.
frame_log = logging.getLogger("ipc.websocketd.frames")
#: websockets quotes the request line, the headers and the 101 at -vv: no token.
frame_log.addFilter(TokenScrubber())

NAME = "ipc-websocketd"
DEFAULT_LISTEN = "127.0.0.1:8080"
#: The demo page shipped with the package, served when --static is not given.
DEMO_DIR = Path(__file__).resolve().with_name("static")
#: Default --hold-pool: bytes of unfinished (fragmented) messages all the
#: connections may hold together beyond their 256 KiB each. Browsers never
#: fragment, and a message in one frame is streamed, not held; so this only
#: caps what fragmenting clients can pin (10 of them: under 10 MiB of RSS).
DEFAULT_HOLD_POOL = 2 * 1024 * 1024
#: A static file's body goes out this much at a time (see data_to_send): one
#: TLS record, so a client that never reads holds one record of ciphertext.
STREAM_PIECE = 16 * 1024
#: Seconds a peer has to answer our close frame before the socket is cut.
CLOSE_TIMEOUT = 5.0

_TEXT_PLAIN = ("Content-Type", "text/plain; charset=utf-8")
_REFUSALS = {
    403: "Forbidden.\n",
    404: "Unknown service.\n",
    408: "Request timeout: the HTTP request did not arrive in time.\n",
    421: "Misdirected request: this server does not answer to that host name.\n",
    503: "Service unavailable.\n",
}


# -- the handshake -----------------------------------------------------------------

#: --trust-proxy given as True (a unit test, an embedding caller): any peer.
_ANYONE = TrustedNetworks.parse(["0.0.0.0/0", "::/0", UNIX])


@dataclass(frozen=True)
class WebSocketOptions:
    """How every connection of one daemon behaves.

    ``origins`` None means same-origin only (pages this daemon served, and
    non-browser clients, which send no Origin); otherwise an allow-list for
    :func:`~daemons.codecs.ws.origin_allowed` (``*`` allows all).

    ``trust_proxy``: the peers whose forwarding headers are believed
    (``--trust-proxy CIDR``): a :class:`~daemons.codecs.wsrequest.Forwarding`
    (networks and header kind), bare :class:`TrustedNetworks`
    (``X-Forwarded-For``), None or False (nobody); True trusts any peer, for
    tests only (the command line always names the networks).
    ``tokens``: ``--token-file`` / ``--token-secret``; None, no token needed.
    """

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    text_replies: bool = False
    origins: tuple[str, ...] | None = None
    trust_proxy: Forwarding | TrustedNetworks | bool | None = None
    static: StaticFiles | None = None
    #: ``--host`` names (see :class:`HostPolicy`).
    hosts: tuple[str, ...] = ()
    tokens: TokenSource | None = None
    #: ``trust_proxy`` as one type (derived).
    forwarding: Forwarding | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        trust = self.trust_proxy
        if trust is True:
            trust = Forwarding(_ANYONE)
        elif isinstance(trust, TrustedNetworks):
            trust = Forwarding(trust) if trust else None
        elif not isinstance(trust, Forwarding):
            trust = None
        object.__setattr__(self, "forwarding", trust)


_UNAUTHORIZED = (
    "Unauthorized: a valid token is needed"
    " (query token=, cookie ipc_token or subprotocol ipc.token.TOKEN).\n"
)
_WRONG_SERVICE = "Forbidden: this token is not for this service.\n"


class WebSocketHandshake:
    """The engine's ``Handshake`` over :class:`WebSocketServerLayer`.

    ``service`` is set once the request head is a WebSocket upgrade with an
    acceptable Origin, a valid service name in its path and, with tokens
    configured, a token for that service; a plain HTTP request is answered at
    once and ``finished`` set. A bad origin, path or token queues the HTTP
    error (403, 404, 401) and raises ProtocolError, so the engine logs and
    counts it, flushes the answer and closes.

    Who calls: ``peer`` is the socket's peer, or ``CLIENT (via PEER)`` when
    a trusted proxy (``--trust-proxy CIDR``) named the client in a forwarding
    header; ``client`` (the engine's ``KnowsClient``) is that client, for its
    log names and ``--max-connections-per-ip``; ``describe`` (``DescribesPeer``)
    gives a peer-info service the request's facts (see
    :func:`~daemons.codecs.wsrequest.describe_request`).
    """

    def __init__(
        self,
        peer: str,
        options: WebSocketOptions,
        service_known: Callable[[str], bool] = lambda _name: False,
        *,
        hosts: HostPolicy | None = None,
        secure: bool = False,
        pool: HoldPool | None = None,
        pieces: bool = False,
    ) -> None:
        self.service: str | None = None
        self.finished = False
        self.options = options
        self._transport_peer = peer
        #: The socket's peer as an address, for the trusted-proxy check.
        self.transport_address: Any = peer_address(peer)
        #: The PROXY protocol wrapper around this handshake (``--proxy-protocol``),
        #: whose header names who sent the HTTP request; weak: no cycle.
        self.proxied: weakref.ref[ProxiedHandshake] | None = None
        self._known = service_known
        #: None: every Host is accepted (a unit test, a caller of its own).
        self.hosts = hosts
        self.secure = secure
        # True when the driver calls data_to_send() until it returns b"" (the
        # engine's _finish does, as the socket drains), so a shared body can
        # follow the head in pieces; under TLS each piece is encrypted as it goes.
        self._pieces = pieces
        self._body: memoryview | None = None
        #: The client a trusted proxy named (None: not decided, or nobody trusted).
        self._client: ClientAddress | None = None
        #: The request with its token taken out (once the head is complete).
        self._presented: PresentedToken | None = None
        #: The name of the token that let the client in.
        self.token_name: str | None = None
        #: The subprotocol the 101 selects (the token entry, when the token came so).
        self.subprotocol: str | None = None
        self.ws = WebSocketServerLayer(
            max_message_size=options.max_message_size,
            text_replies=options.text_replies,
            logger=frame_log,
            pool=pool,
        )

    # -- what the engine reads ---------------------------------------------

    @property
    def peer(self) -> str:
        """Who is calling, for log lines: ``CLIENT (via PEER)`` once a trusted
        proxy (forwarding header) or a PROXY header named the client, else
        the socket's peer."""
        if self._client is not None:
            return f"{client_label(self._client)} (via {self._transport_peer})"
        sender = self._sender()
        if sender is not self.transport_address:
            return f"{peer_name(sender)} (via {self._transport_peer})"
        return self._transport_peer

    @property
    def client(self) -> tuple[str, int | None] | None:
        """The real client (``KnowsClient``): what a trusted proxy said, else None."""
        return limit_client(self._client)

    def describe(self, info: PeerInfo) -> PeerInfo:
        """``DescribesPeer``: the engine's record plus the request's facts."""
        request = self.ws.request
        if request is None or self._presented is None:
            return replace(info, transport="ws")
        return describe_request(
            info,
            request,
            self._presented,
            subprotocol=self.subprotocol,
            token_name=self.token_name,
            client=self._client,
        )

    # -- bytes -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        ws = self.ws
        try:
            ws.receive_data(data)  # an error queues its HTTP answer and raises
        except ProtocolError as exc:
            # websockets may quote the request line (a bad protocol version):
            # the engine logs this text, and it must never carry a token.
            exc.args = (scrub_tokens(str(exc)),)
            raise
        if self.service is None and not self.finished and ws.phase is Phase.DECIDING:
            assert ws.request is not None
            self._decide(ws.request)

    def data_to_send(self) -> bytes:
        """The HTTP answer, then a static file's body one piece per call
        (:data:`STREAM_PIECE`): the engine asks for the next piece when the
        last one is written, so a client that reads slowly holds one piece."""
        out = self.ws.data_to_send()
        if out or self._body is None:
            return out
        piece = self._body[:STREAM_PIECE]
        self._body = self._body[STREAM_PIECE:] or None
        return piece  # type: ignore[return-value]  # a buffer; the Context takes any

    def accept(self) -> tuple[Layer | None, bytes]:
        """101 Switching Protocols; the layer, and messages sent ahead of it."""
        try:
            early = self.ws.accept(self.subprotocol)
        except PeerClosed as exc:  # a close frame right behind the request
            raise ProtocolError(f"websocket: client closed before the 101: {exc}") from exc
        return self.ws, early

    #: The lock mark of a service that takes WebSocket hand-offs (``HandsOver``).
    handoff_mark = "handoff-websocket"

    def handover(self) -> tuple[bytes, bytes] | None:
        """``HandsOver``: the undecided handshake to a service that speaks
        WebSocket itself (``ipc exec``): no reply from here, and every byte
        the client sent, its request first (the service answers the 101 with
        the subprotocol the peer information names). Never under TLS (the
        TLS wrapper has no hand-off), never once a static file is answered,
        never with --text or a --max-message-size below the default (the
        operator's settings would not hold in the service)."""
        options = self.options
        if (
            self._body is not None
            or self.finished
            or options.text_replies  # --text: a setting the service would not know
            or options.max_message_size < DEFAULT_MAX_MESSAGE_SIZE  # nor a lower limit
        ):
            return None
        early = self.ws.handover()
        return None if early is None else (b"", early)

    def reject(self, reason: str, status: int) -> None:
        """403 policy, 404 unknown service, 503 unavailable, 408 deadline."""
        self.finished = True
        if self.ws.phase in (Phase.READING_REQUEST, Phase.DECIDING):
            body = _REFUSALS.get(status, "Refused.\n")
            self.ws.reject(status, body)

    # -- decisions ---------------------------------------------------------

    def _decide(self, request: HandshakeRequest) -> None:
        # The token out of everything that may be logged or handed on, first.
        self._presented = presented = find_token(request.path, request.headers)
        target = presented.target
        forwarding = self.options.forwarding
        if forwarding is not None:
            self._learn_client(forwarding, request)
        self._check_host(request, target)
        path = url_path(request.path)
        if not request.is_upgrade:
            self._answer_http(request, path, target)
            return
        if not self._origin_ok(request):
            self.ws.reject(403, "Forbidden: this page's origin may not open WebSockets here.\n")
            rule = "--origin" if self.options.origins is not None else "same origin only"
            raise ProtocolError(f"websocket: origin {shown(request.origin)} not allowed ({rule})")
        name = path[1:] if path is not None else ""
        reason = service_name_error(name) if path is not None else "bad request path"
        if reason:
            self.ws.reject(404, _REFUSALS[404])
            raise ProtocolError(f"websocket: no service in path {shown(target)}: {reason}")
        if self.options.tokens is not None:
            self._check_token(self.options.tokens, presented, name)
        if presented.where == "subprotocol":
            # A browser that offered subprotocols fails unless one is selected.
            self.subprotocol = presented.echo
        self.service = name

    def _sender(self) -> Any:
        """Who sent the HTTP request: the source a PROXY header named (an
        HTTP proxy behind a TCP load balancer), else the socket's peer.
        Forwarding headers are judged by it, not by the load balancer."""
        proxied = self.proxied() if self.proxied is not None else None
        header = proxied.header if proxied is not None else None
        if header is not None and header.source is not None and header.family != "unix":
            return header.source.address, header.source.port
        return self.transport_address

    def _learn_client(self, forwarding: Forwarding, request: HandshakeRequest) -> None:
        """Who the client is, if a trusted proxy says so (rightmost untrusted)."""
        client = forwarding.client(self._sender(), request)
        if client.problem is not None:
            log.debug("%s: %s: forwarding header: %s", NAME, self.peer, client.problem)
        if client.source != "transport":
            self._client = client

    def _check_token(self, tokens: TokenSource, presented: PresentedToken, service: str) -> None:
        """401 without a good token, 403 with one for other services: before
        the service is looked up, so a client without a token learns nothing
        of what runs here."""
        result = tokens.check(presented, service)
        if result.ok:
            self.token_name = result.name
            log.debug("%s: %s: token of %r for %r", NAME, self.peer, result.name, service)
            return
        status = result.http_status or 401
        self.ws.reject(status, _WRONG_SERVICE if status == 403 else _UNAUTHORIZED)
        where = f" (token in the {presented.where})" if presented.where else ""
        raise HandshakeRefused(
            Failure.UNAUTHORIZED,
            f"websocket: {status} for service {service!r}: {result.status.value}: "
            f"{result.reason}{where}",
        )

    def _check_host(self, request: HandshakeRequest, target: str) -> None:
        """Exactly one Host, naming this daemon (see :class:`HostPolicy`);
        behind a trusted proxy, the host it forwards too. Before anything else:
        a rebound name gets neither a WebSocket nor a static file."""
        hosts = [v for k, v in request.headers if k.lower() == "host"]
        if len(hosts) != 1:
            self.finished = True
            self.ws.reject(400, "Bad request: exactly one Host header is required.\n")
            raise ProtocolError(f"websocket: {len(hosts)} Host headers (exactly one is required)")
        if self.hosts is None:
            return
        names = [("Host", hosts[0])]
        forwarded_host, _scheme = self._forwarded_host_and_scheme(request)
        if forwarded_host is not None:
            names.append(("forwarded host", forwarded_host))
        for header, value in names:
            if not self.hosts.allows(value):
                self.finished = True
                self.ws.reject(421, _REFUSALS[421])
                raise ProtocolError(
                    f"websocket: {header} {shown(value)} is not a name of this daemon"
                    f" (DNS rebinding?); --host NAME adds one; request {request.method}"
                    f" {shown(target)}"
                )

    def _forwarded_host_and_scheme(
        self, request: HandshakeRequest
    ) -> tuple[str | None, str | None]:
        forwarding = self.options.forwarding
        if forwarding is None:
            return None, None
        sender = self._sender()
        client = self._client or forwarding.client(sender, request)
        return forwarding.host_and_scheme(sender, request, client)

    def _origin_ok(self, request: HandshakeRequest) -> bool:
        if self.options.origins is not None:
            return origin_allowed(request.origin, self.options.origins)
        if request.origin is None:
            return True  # not a browser
        scheme = "https" if self.secure else "http"
        host, proto = self._forwarded_host_and_scheme(request)
        scheme = proto if proto in ("http", "https") else scheme
        return same_origin(request.origin, host or request.header("host"), scheme)

    def _answer_http(self, request: HandshakeRequest, path: str | None, target: str) -> None:
        """A plain HTTP request: a static file, 426 on a service path, or 404.
        Static files are public (the page must load to ask for a token);
        with tokens, a service path is a 404 like any other, so a client
        without a token cannot probe which services run."""
        self.finished = True
        ws = self.ws
        static = self.options.static
        found = static.find(path) if static is not None and path is not None else None
        name = path[1:] if path is not None else ""
        if request.method not in ("GET", "HEAD"):
            status = 405
            ws.respond(405, [("Allow", "GET, HEAD"), _TEXT_PLAIN], b"Method not allowed.\n")
        elif found is not None:
            status = 200
            body, ctype = found
            headers = [
                ("Content-Type", ctype),
                ("Cache-Control", "no-cache"),
                ("X-Content-Type-Options", "nosniff"),
            ]
            if self._pieces and isinstance(body, SharedBody):
                # The head now, the shared body as a buffer of its own next.
                ws.respond(200, headers, b"", content_length=len(body))
                if request.method != "HEAD":
                    self._body = memoryview(body)
            else:
                ws.respond(200, headers, bytes(body))
        elif self.options.tokens is None and not service_name_error(name) and self._known(name):
            status = 426
            ws.respond(
                426,
                [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"), _TEXT_PLAIN],
                f"{name} is a WebSocket endpoint: open it with new WebSocket(url).\n".encode(),
            )
        else:
            status = 404
            ws.respond(404, [_TEXT_PLAIN], b"Not found.\n")
        level = logging.INFO if status == 426 else logging.DEBUG
        log.log(
            level,
            "%s: %s: HTTP %s %s -> %d",
            NAME,
            self.peer,
            request.method,
            shown(target),
            status,
        )


# -- keepalive -------------------------------------------------------------------


def _pending_bytes(ctx: Context, fd: int) -> int:
    try:
        return ctx.pending_bytes(fd)
    except IPCError:
        return 0


@dataclass
class _Open:
    layer: WebSocketServerLayer
    peer: str
    since: float  # when the idle sweep last saw layer.activity change
    seen: int = 0  # layer.activity at that sweep
    closing_since: float | None = None


class Keepalive:
    """Pings and idle timeouts for the switched WebSocket connections.

    Every ``ping_interval`` seconds each connection whose previous ping got
    a pong is pinged again; one that did not answer is closed (1011), so a
    dead peer goes within two intervals. With ``idle_timeout``, a connection
    with no data message either way for that long gets a close frame (1001
    "idle timeout") and, if it does not answer within :data:`CLOSE_TIMEOUT`,
    a cut socket. The sweeps are O(connections) once per interval, which is
    cheaper than a timer per connection re-armed on every message: the idle
    sweep (every T/4, at most 5 s) compares each layer's message counter with
    the previous sweep, so the close comes between T and T + one sweep period
    after the last message.
    """

    def __init__(self, daemon: Daemon, *, ping_interval: float, idle_timeout: float) -> None:
        self.daemon = daemon
        self.ctx = ctx = daemon.ctx
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.conns: dict[int, _Open] = {}
        self._idle_period = min(max(idle_timeout / 4, 0.05), 5.0)
        if ping_interval > 0:
            ctx.call_later(ping_interval, self._ping_all)
        if idle_timeout > 0:
            ctx.call_later(self._idle_period, self._check_idle)

    def switched(self, fd: int, handshake: Handshake, layer: Layer | None) -> None:
        """The engine's ``on_switched`` hook: start watching ``fd``, and own
        it (its DISCONNECTION releases the layer's buffers at once)."""
        ws = layer.upper if isinstance(layer, StackedLayer) else layer
        if isinstance(ws, WebSocketServerLayer) and fd in self.ctx:
            named = names_peer(handshake)
            peer = (named is not None and named.peer) or f"fd {fd}"
            self.conns[fd] = _Open(ws, peer, time.monotonic(), ws.activity)
            # What the Context still holds for this client counts against the
            # layer's control-frame budget (a ping flood from a non-reader).
            ws.backlog = functools.partial(_pending_bytes, self.ctx, fd)
            self.daemon.own(fd, self.on_event)

    def on_event(self, event: Event) -> None:
        """The owner of a watched connection: forget it when it closes."""
        if event.type is EventType.DISCONNECTION:
            conn = self.conns.pop(event.fd, None)
            if conn is not None:
                conn.layer.release()  # its buffers and pool share, now
                conn.layer.data_to_send()  # and what it had for a client now gone

    def _ping_all(self) -> None:
        self.ctx.call_later(self.ping_interval, self._ping_all)
        for fd, conn in list(self.conns.items()):
            if fd not in self.ctx:
                self.conns.pop(fd, None)
            elif conn.closing_since is not None:
                continue
            elif not conn.layer.pong_received_since_last_ping():
                log.warning(
                    "%s: %s: no pong within %g s; closing", NAME, conn.peer, self.ping_interval
                )
                conn.layer.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                self._flush(fd)
                self._cut(fd)
            else:
                conn.layer.ping()
                self._flush(fd)

    def _check_idle(self) -> None:
        self.ctx.call_later(self._idle_period, self._check_idle)
        now = time.monotonic()
        for fd, conn in list(self.conns.items()):
            if fd not in self.ctx:
                self.conns.pop(fd, None)
            elif conn.closing_since is not None:
                if now - conn.closing_since >= CLOSE_TIMEOUT:
                    log.info("%s: %s: no answer to our close frame; cutting", NAME, conn.peer)
                    self._cut(fd)
            elif conn.layer.activity != conn.seen:
                conn.seen = conn.layer.activity
                conn.since = now
            elif now - conn.since >= self.idle_timeout:
                log.info("%s: %s: idle for %g s; closing", NAME, conn.peer, self.idle_timeout)
                conn.layer.close(CloseCode.GOING_AWAY, "idle timeout")
                conn.closing_since = now
                self._flush(fd)

    def goodbye(self) -> None:
        """On shutdown: a close frame (1001) to every client, written now if
        the socket takes it, so browsers learn why rather than see a reset."""
        for fd, conn in list(self.conns.items()):
            if fd in self.ctx:
                conn.layer.close(CloseCode.GOING_AWAY, "server shutting down")
                self._flush(fd)

    def _flush(self, fd: int) -> None:
        with contextlib.suppress(IPCError):
            self.ctx.flush_switch(fd)

    def _cut(self, fd: int) -> None:
        self.conns.pop(fd, None)
        self.daemon.drop(fd)


# -- TLS ---------------------------------------------------------------------------


class ServerCertificates:
    """The wss server's TLS flags (:class:`ServerTLS`): the files (the CRL
    too) are re-read on SIGHUP, the old context kept on error."""

    def __init__(self, server: ServerTLS) -> None:
        self.server = server
        self.client_ca = server.client_ca
        self.context = self._load()

    def _load(self) -> ssl.SSLContext:
        return self.server.context()

    def reload(self) -> None:
        try:
            self.context = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("%s: reload failed, keeping the previous certificate: %s", NAME, exc)
            return
        log.info("%s: reloaded the certificate for new connections", NAME)


class _WssHandshake(TLSHandshake):
    """TLS below the WebSocket handshake, showing the WebSocket side's
    ``peer`` (``--trust-proxy``'s client; ``client`` and ``describe`` come
    through TLSHandshake, which asks the inner handshake). One class for every connection,
    and nothing that points back at the instance: a class made per
    connection, or a bound method kept in it, is a cycle the GC has to find."""

    def __init__(
        self,
        context: ssl.SSLContext,
        inner: WebSocketHandshake,
        allow_client: Sequence[str],
        mtls: bool,
    ) -> None:
        on_identity = functools.partial(_log_wss_identity, inner) if mtls else _ignore_identity
        super().__init__(context, inner, allow_client=allow_client, on_identity=on_identity)
        self._ws = inner

    @property
    def peer(self) -> str:
        return self._ws.peer


class _ProxiedWebSocket(ProxiedHandshake):
    """The PROXY protocol gate before a WebSocket handshake (``--proxy-protocol``).

    Two differences from :class:`ProxiedHandshake`, both because the HTTP
    request, not the PROXY header, has the last word on who the client is:
    the WebSocket side learns where the header is (a weak reference: no
    cycle), so that forwarding headers are judged by the address the PROXY
    header names (an HTTP proxy behind a TCP balancer), never by the
    balancer's own; and ``client`` stays None until the request is decided
    (the engine learns the client once), while ``peer`` names the header's
    client for the log lines of a refusal before that."""

    def __init__(
        self, gate: ProxyGate, inner: Handshake, addr: Any, ws: WebSocketHandshake
    ) -> None:
        super().__init__(gate, inner, addr)
        self._ws = ws
        ws.proxied = weakref.ref(self)

    @property
    def client(self) -> tuple[str, int | None] | None:
        ws = self._ws
        if ws.service is None and not ws.finished:
            return None
        return super().client

    @property
    def peer(self) -> str:
        return self._ws.peer


class _WebSocketProxyFront:
    """``--proxy-protocol`` for ipc-websocketd: :class:`ProxyFront`'s policy,
    every handshake behind a :class:`_ProxiedWebSocket`."""

    def __init__(self, front: ProxyFront) -> None:
        self.front = front

    def wrap(self, addr: Any, handshake: Handshake) -> Handshake:
        ws = handshake._ws if isinstance(handshake, _WssHandshake) else handshake
        if not isinstance(ws, WebSocketHandshake):  # pragma: no cover - our factory's
            return self.front.wrap(addr, handshake)
        return _ProxiedWebSocket(self.front.policy.gate(addr), handshake, addr, ws)


def _log_wss_identity(handshake: WebSocketHandshake, ident: certs.CertIdentity | None) -> None:
    log.info("%s: %s: client %s", NAME, handshake.peer, describe_identity(ident))


def _ignore_identity(_ident: certs.CertIdentity | None) -> None:
    """Without mTLS there is no identity to log (and no line per connection)."""


def _secure(
    handshake: WebSocketHandshake, context: ssl.SSLContext, allow_client: Sequence[str], mtls: bool
) -> Handshake:
    """TLS below the WebSocket handshake (tlswrap), keeping ``peer`` visible."""
    return _WssHandshake(context, handshake, allow_client, mtls)


# -- assembly ----------------------------------------------------------------------


def build_daemon(
    common: CommonOptions,
    options: WebSocketOptions,
    *,
    ping_interval: float = 20.0,
    idle_timeout: float = 0.0,
    tls: ServerCertificates | None = None,
    allow_client: Sequence[str] = (),
    control_name: str = "ws",
    hold_pool: int = DEFAULT_HOLD_POOL,
    proxy_protocol: TrustedNetworks | None = None,
) -> Daemon:
    """Context, engine, listeners (systemd sockets first), metrics, keepalive;
    the PROXY protocol gate with ``proxy_protocol`` sources.

    Like :func:`daemons.tcpd.start_daemon` without the outbound side: a
    browser gateway only accepts.
    """
    daemon = new_daemon(NAME, common)
    mtls = tls is not None and tls.client_ca is not None
    pool = HoldPool(hold_pool)
    hosts = HostPolicy(extra=options.hosts)  # replaced once the listeners are open

    def factory(peer: str) -> Handshake:
        handshake = WebSocketHandshake(
            peer,
            options,
            daemon.reachable,
            hosts=hosts,
            secure=tls is not None,
            pool=pool,
            pieces=True,
        )
        if tls is None:
            return handshake
        return _secure(handshake, tls.context, allow_client, mtls)

    keepalive = Keepalive(daemon, ping_interval=ping_interval, idle_timeout=idle_timeout)
    daemon.on_switched = keepalive.switched
    daemon.on_stop = keepalive.goodbye
    if options.forwarding is not None:
        daemon.trusted_proxies = options.forwarding.trusted
    front = use_proxy_protocol(daemon, proxy_protocol or TrustedNetworks())
    if front is not None:
        daemon.front = _WebSocketProxyFront(front)
    reloads = [part.reload for part in (tls, options.tokens) if part is not None]
    if reloads:
        daemon.on_reload = functools.partial(_reload_all, reloads)
    daemon.serve_control(f"{control_name}.ctl", flag="--control-name")  # fails first
    open_listeners(daemon, common, factory, DEFAULT_LISTEN)
    # The accepted Host names depend on the bound sockets (port 0, systemd's).
    hosts = HostPolicy.for_sockets(daemon.listening_sockets, options.hosts, secure=tls is not None)
    return daemon


def _reload_all(parts: Sequence[Callable[[], None]]) -> None:
    """SIGHUP: every part re-reads its files (each keeps its old state on error)."""
    for reload in parts:
        reload()


@libipc_command(
    prog=NAME,
    env_prefix="IPC_WEBSOCKETD",
    examples=[
        (
            "ipc-websocketd",
            f"the demo page at http://{DEFAULT_LISTEN}/,\n"
            f"the service pong at ws://{DEFAULT_LISTEN}/pong",
        ),
        (
            "ipc-websocketd --static ./site --origin https://app.example.com --allow chat",
            "your pages; only that origin's pages, only the service chat",
        ),
        (
            "ipc-websocketd --listen :8443 --cert s.pem --key s.key --host chat.example.com",
            "wss:// on every interface, reached as chat.example.com",
        ),
        ("ipc-websocketd -vv", "log every WebSocket frame (slower: no fast path)"),
    ],
)
@common_options(default_listen=DEFAULT_LISTEN)
@click.option(
    "--origin",
    "origins",
    multiple=True,
    metavar="ORIGIN",
    envvar="IPC_WEBSOCKETD_ORIGIN",
    help="Browser origins that may connect: https://app.example.com, "
    "https://*.example.com, null (file:// pages) or * (any). Repeatable. "
    "Default: same origin only (pages served by this daemon).",
)
@click.option(
    "--text/--binary",
    "text_replies",
    default=False,
    envvar="IPC_WEBSOCKETD_TEXT",
    help="Send replies as text messages (the service must send UTF-8; else "
    "close 1007) or binary messages. Client messages may be either.",
)
@click.option(
    "--static",
    "static_dir",
    default=None,
    metavar="DIR",
    envvar="IPC_WEBSOCKETD_STATIC",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Serve the files of DIR over plain HTTP on the same port. Default: the bundled demo page.",
)
@click.option("--no-static", is_flag=True, help="Serve no files at all (404).")
@click.option(
    "--ping-interval",
    type=seconds(0),
    default=20.0,
    metavar="SECONDS",
    help="Ping every connection this often; close one that did not answer the "
    "previous ping. 0 = off.",
)
@click.option(
    "--idle-timeout",
    type=seconds(0),
    default=0.0,
    metavar="SECONDS",
    help="Close connections with no message either way for this long. 0 = off.",
)
@click.option(
    "--trust-proxy",
    "trust_proxy",
    multiple=True,
    metavar="CIDR",
    help="A reverse proxy's address or network (10.0.0.0/8, 127.0.0.1, unix): "
    "only from these peers are forwarding headers believed, for the client "
    "address (rightmost untrusted hop), the per-IP limit, the Host and the "
    "same-origin check (X-Forwarded-Host, X-Forwarded-Proto). Repeatable.",
)
@click.option(
    "--forwarded-header",
    type=click.Choice([h.value for h in ForwardedHeader]),
    default=None,
    help="The header the trusted proxies write (the other one is ignored). "
    "[default: x-forwarded-for]",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Every WebSocket needs a token from FILE (lines TOKEN NAME "
    "SERVICE[,SERVICE...]; re-read on SIGHUP), in the query (?token=), the "
    "cookie ipc_token or the subprotocol ipc.token.TOKEN: else 401, or 403 "
    "for another service. Static files stay public.",
)
@click.option(
    "--token-secret",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Accept signed tokens (ipc token new) made with the secret in FILE "
    "(32 bytes or more, not readable by others; re-read on SIGHUP). "
    "With --token-file, either kind is accepted.",
)
@click.option(
    "--hold-pool",
    type=click.IntRange(min=0, max=1 << 32),
    default=DEFAULT_HOLD_POOL,
    metavar="BYTES",
    help="Bytes of unfinished fragmented messages all clients together may hold "
    "beyond 256 KiB each (a message in one frame is streamed, never held). A "
    "client over it is closed (1013, or 1009 if its message can never fit).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME[:PORT]",
    envvar="IPC_WEBSOCKETD_HOST",
    help="A name browsers use to reach this daemon (a public name, the name a "
    "reverse proxy passes on). Requests whose Host is not one of the daemon's "
    "names (loopback, localhost, listen addresses, this machine's name) get 421: "
    "the defence against DNS rebinding. Repeatable.",
)
@proxy_protocol_option
@server_tls_options(purpose="serves wss://")
@click.option(
    "--control-name",
    default="ws",
    metavar="NAME",
    help="Counters are served on the local service NAME.ctl (ipc status NAME); "
    "give each instance sharing a run directory its own.",
)
@click.option(
    "--no-handoff",
    is_flag=True,
    help="Always relay, even to services that take WebSocket connections over "
    "(by default ipc exec gets the connection itself, before the 101, and this "
    "daemon leaves the path).",
)
def main(
    common: CommonOptions,
    origins: tuple[str, ...],
    text_replies: bool,
    static_dir: Path | None,
    no_static: bool,
    ping_interval: float,
    idle_timeout: float,
    trust_proxy: tuple[str, ...],
    forwarded_header: str | None,
    token_file: Path | None,
    token_secret: Path | None,
    hold_pool: int,
    hosts: tuple[str, ...],
    proxy_protocol: TrustedNetworks,
    server_tls: ServerTLS,
    control_name: str,
    no_handoff: bool,
) -> None:
    """Let browsers reach local LibIPC services: ws://HOST:PORT/SERVICE.

    Each WebSocket message is one LibIPC message to $RUNDIR/SERVICE and each
    reply one WebSocket message back. Plain HTTP on the same port serves the
    demo page (or --static DIR). -vv logs every frame.
    """
    server_tls.check_optional("wss")
    check_origins(origins, "--origin")
    for host in hosts:
        if split_host(host) is None:
            raise click.BadParameter(
                f"{host!r}: a host is NAME or NAME:PORT (as in chat.example.com, [::1]:8080)",
                param_hint="--host",
            )
    if static_dir is not None and no_static:
        raise click.UsageError("--static and --no-static contradict each other")
    forwarding = _forwarding(trust_proxy, forwarded_header)
    tokens = _tokens(token_file, token_secret)
    setup_logging(common.verbosity, common.log_format)
    frame_log.setLevel(logging.DEBUG if common.verbosity >= 2 else logging.WARNING)
    with starting():
        static = None if no_static else StaticFiles(static_dir or DEMO_DIR, name=NAME)
        tls = None if server_tls.cert is None else ServerCertificates(server_tls)
        options = WebSocketOptions(
            max_message_size=common.max_message_size,
            text_replies=text_replies,
            origins=origins or None,
            trust_proxy=forwarding,
            static=static,
            hosts=hosts,
            tokens=tokens,
        )
        daemon = build_daemon(
            common,
            options,
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
            tls=tls,
            allow_client=server_tls.allow_client,
            control_name=control_name,
            hold_pool=hold_pool,
            proxy_protocol=proxy_protocol,
        )
        daemon.handoff = not no_handoff
    log.info(
        "%s: %s, replies as %s, origins: %s, static files: %s, tokens: %s, trusted proxies: %s",
        NAME,
        "wss (TLS)" if tls else "ws",
        "text" if text_replies else "binary",
        ", ".join(origins) if origins else "same origin only",
        static.root if static else "none",
        tokens.summary() if tokens else "none needed",
        forwarding.summary() if forwarding else "none",
    )
    try:
        daemon.run()
    finally:
        daemon.ctx.close_all()


def _forwarding(trust_proxy: Sequence[str], header: str | None) -> Forwarding | None:
    """``--trust-proxy CIDR...`` and ``--forwarded-header``, checked (exit 2)."""
    if header is not None and not trust_proxy:
        raise click.UsageError("--forwarded-header needs --trust-proxy CIDR (whose header?)")
    if not trust_proxy:
        return None
    try:
        trusted = TrustedNetworks.parse(trust_proxy, flag="--trust-proxy")
    except BadNetwork as exc:
        raise click.BadParameter(str(exc), param_hint="'--trust-proxy'") from None
    return Forwarding(trusted, ForwardedHeader(header or ForwardedHeader.X_FORWARDED_FOR.value))


def _tokens(token_file: Path | None, token_secret: Path | None) -> TokenSource | None:
    """``--token-file`` / ``--token-secret`` loaded; a bad file exits 2 naming it."""
    if token_file is None and token_secret is None:
        return None
    try:
        return TokenSource.open(token_file, token_secret, name=NAME)
    except TokenSetupError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{exc.flag}'") from None


if __name__ == "__main__":
    main()
