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
import ipaddress
import logging
import mimetypes
import os
import socket
import ssl
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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

from .codecs.tlswrap import TLSHandshake, describe_identity
from .codecs.ws import HandshakeRequest, HoldPool, Phase, WebSocketServerLayer, origin_allowed
from .engine import certs
from .engine.daemon import Daemon
from .engine.handshake import Handshake, names_peer
from .engine.log import setup_logging
from .engine.options import CommonOptions, common_options, libipc_command, seconds
from .engine.policy import service_name_error
from .engine.startup import new_daemon, open_listeners, starting
from .engine.tlsconfig import ServerTLS, server_tls_options

__all__ = [
    "HostPolicy",
    "Keepalive",
    "StaticFiles",
    "WebSocketHandshake",
    "WebSocketOptions",
    "build_daemon",
    "main",
    "same_origin",
]

log = logging.getLogger("ipc.websocketd")
#: websockets' own log (every frame at DEBUG, every connection at INFO): only
#: shown with -vv, it would drown the daemon's one line per connection.
frame_log = logging.getLogger("ipc.websocketd.frames")

NAME = "ipc-websocketd"
DEFAULT_LISTEN = "127.0.0.1:8080"
#: The demo page shipped with the package, served when --static is not given.
DEMO_DIR = Path(__file__).resolve().with_name("static")
#: Static files are read inside the loop: keep them small.
MAX_STATIC_FILE = 4 * 1024 * 1024
#: Bodies from this size on are shared between the requests that fetch the
#: same version of a file, and queued as they are rather than copied into
#: each response: 60 clients that never read a 4 MiB file hold it once.
SHARED_BODY = 64 * 1024
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
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
}


# -- static files ----------------------------------------------------------------


def content_type(name: str) -> str:
    """Content-Type by extension (our table first: mimetypes varies by host)."""
    suffix = Path(name).suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


class StaticFiles:
    """Files under one directory, for plain HTTP GETs on the WebSocket port.

    Safe against path traversal: the URL path is percent-decoded, then any
    segment starting with ``.`` (``..``, ``.``, dotfiles) is refused and the
    resolved file (symlinks followed) must still be inside the root. A
    directory means its ``index.html``. Files are read on each request (edits
    show at once) and inside the loop, hence :data:`MAX_STATIC_FILE`.

    Memory: a body of :data:`SHARED_BODY` bytes or more is one object for
    every request of the same version of the file (device, inode, size,
    mtime) while any of them is still being sent, so clients that never read
    cost a reference each, not a copy each.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"{root}: not a directory")
        self._shared: weakref.WeakValueDictionary[tuple[int, ...], _Body] = (
            weakref.WeakValueDictionary()
        )

    def find(self, url_path: str) -> tuple[bytes | bytearray, str] | None:
        """The body and Content-Type for a decoded URL path, or None (404)."""
        parts = [p for p in url_path.split("/") if p]
        if any(p.startswith(".") or "\\" in p or "\0" in p for p in parts):
            return None
        target = self.root.joinpath(*parts)
        try:
            if target.is_dir():
                target = target / "index.html"
            real = target.resolve(strict=True)
            if not real.is_relative_to(self.root) or not real.is_file():
                return None
            st = real.stat()
            if st.st_size > MAX_STATIC_FILE:
                log.warning("%s: not serving %s: over %d bytes", NAME, real, MAX_STATIC_FILE)
                return None
            return self._body(real, st), content_type(real.name)
        except (OSError, RuntimeError, ValueError):
            return None

    def _body(self, real: Path, st: os.stat_result) -> bytes | bytearray:
        if st.st_size < SHARED_BODY:
            return real.read_bytes()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        body = self._shared.get(key)
        if body is None:
            body = _Body(real.read_bytes())
            if len(body) == st.st_size:  # not changed while we read it
                self._shared[key] = body
        return body


class _Body(bytearray):
    """A file body that requests share (a weak reference can point at it)."""

    __slots__ = ("__weakref__",)


# -- origin and proxy headers ------------------------------------------------------


def same_origin(origin: str, host: str | None, scheme: str = "http") -> bool:
    """True if a page from ``origin`` was served by the host it now connects to.

    An origin is scheme, host and port: the origin's scheme must be the one
    the page used to reach us (``http`` for ws://, ``https`` for wss:// or
    behind a TLS proxy), and its ``host[:port]`` the request's Host header,
    the scheme's default port being implied. ``null`` (file:// pages,
    sandboxed frames) is never the same origin. Without the scheme, an
    http:// page on port 443 would count as the https:// site's own.
    """
    if not host or origin == "null":
        return False
    try:
        parts = urllib.parse.urlsplit(origin)
    except ValueError:  # "http://[zz": whatever it is, it is not us
        return False
    if parts.scheme != scheme or scheme not in ("http", "https") or not parts.netloc:
        return False
    default = ":80" if parts.scheme == "http" else ":443"

    def norm(netloc: str) -> str:
        netloc = netloc.strip().lower()
        return netloc[: -len(default)] if netloc.endswith(default) else netloc

    return norm(parts.netloc) == norm(host)


def shown(value: str | None, limit: int = 200) -> str:
    """A peer's text (path, Host, Origin) for a log line: quoted and escaped
    like repr() (no newline, ESC or NUL gets through to forge or garble a
    line), and cut at ``limit`` characters."""
    if value is None:
        return "(none)"
    cut = value[:limit]
    return repr(cut) + ("..." if len(value) > limit else "")


# -- Host check (DNS rebinding) ------------------------------------------------------


_LOCALHOST = "localhost"


def split_host(value: str) -> tuple[str, int | None] | None:
    """``name[:port]`` of a Host header, normalised (lower case, no final dot,
    IPv6 in brackets and compressed), or None if it is not a host."""
    value = value.strip().lower()
    port_text = ""
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        try:
            name = f"[{ipaddress.IPv6Address(name).compressed}]"
        except ValueError:
            return None
        port_text = rest[1:] if rest else ""
        if rest and not port_text:
            return None
    else:
        name, sep, port_text = value.partition(":")
        if sep and not port_text:
            return None
        name = name[:-1] if name.endswith(".") else name
        if not name or not all(c.isalnum() or c in "-._" for c in name) or not name.isascii():
            return None
    if not port_text:
        return name, None
    if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        return None
    return name, int(port_text)


def _is_loopback(name: str) -> bool:
    if name == _LOCALHOST or name.endswith("." + _LOCALHOST):
        return True  # RFC 6761: browsers resolve these to loopback themselves
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """Which ``Host`` headers name this daemon: the defence against DNS rebinding.

    A page on ``evil.example`` whose name the attacker re-points at 127.0.0.1
    is, for the browser, still the origin ``http://evil.example:8080``: its
    requests carry ``Host: evil.example:8080`` and a matching ``Origin``, so
    a same-origin check alone lets it in, and through us every local
    service. The one thing such a request cannot fake is the Host, so only
    names of this daemon are answered: loopback addresses and ``localhost``
    forms, the addresses it listens on, this machine's host name and FQDN,
    and the names given with ``--host`` (a public name, the name a reverse
    proxy passes on). Loopback names take any port (a tunnel or a port
    forward changes it, and a rebinding page cannot send one); the other
    built-in names must come with a port we listen on (or none, when we
    listen on the scheme's default port); ``--host NAME`` is
    also accepted without a port, ``--host NAME:PORT`` with exactly that port.
    """

    def __init__(
        self,
        names: Iterable[str] = (),
        ports: Iterable[int] = (),
        *,
        extra: Iterable[str] = (),
        default_port: bool = False,
    ) -> None:
        self.names = {n[0] for n in (split_host(x) for x in names) if n is not None}
        self.ports = set(ports)
        self.default_port = default_port
        self.bare: set[str] = set()  # --host NAME: no port, or a listening port
        self.exact: set[tuple[str, int | None]] = set()  # --host NAME:PORT
        for value in extra:
            parsed = split_host(value)
            if parsed is None:
                raise ValueError(f"--host {value!r}: not a host name or address[:port]")
            name, port = parsed
            if port is None:
                self.bare.add(name)
            else:
                self.exact.add((name, port))
                if port in (80, 443):
                    self.exact.add((name, None))

    @classmethod
    def for_sockets(
        cls, sockets: Iterable[socket.socket], extra: Iterable[str] = (), *, secure: bool = False
    ) -> HostPolicy:
        """The policy of a daemon listening on ``sockets``. A wildcard
        address (0.0.0.0, ::) cannot know the names it is reached by: then
        only the built-in names and ``--host`` ones."""
        names = [socket.gethostname(), socket.getfqdn()]
        ports = []
        for sock in sockets:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address, port = sock.getsockname()[:2]
            ports.append(port)
            ip = ipaddress.ip_address(address.partition("%")[0])
            if not ip.is_unspecified:
                names.append(f"[{ip.compressed}]" if ip.version == 6 else ip.compressed)
        default = 443 if secure else 80
        return cls([n for n in names if n], ports, extra=extra, default_port=default in ports)

    def allows(self, value: str) -> bool:
        """Does the Host header ``value`` name this daemon?"""
        parsed = split_host(value)
        if parsed is None:
            return False
        name, port = parsed
        if parsed in self.exact:
            return True
        if _is_loopback(name):
            # Any port: a rebinding page cannot send a loopback Host (its
            # Host is its own name), and an SSH tunnel or a port forward
            # (ssh -L 18080:127.0.0.1:8080) changes the port the browser sees.
            return True
        if port is None:
            return name in self.bare or (self.default_port and name in self.names)
        if port not in self.ports:
            return False
        return name in self.bare or name in self.names


def forwarded_client(request: HandshakeRequest) -> str | None:
    """The client address a reverse proxy put in X-Forwarded-For, or None.

    The *last* entry is taken: it is the one our proxy appended (the address
    it saw); the entries before it came from the client and prove nothing.
    Anything that is not an IP address (optionally with a port) is ignored,
    so the header cannot inject text into log lines.
    """
    values = [v for k, v in request.headers if k.lower() == "x-forwarded-for"]
    entries = [e.strip() for v in values for e in v.split(",") if e.strip()]
    if not entries:
        return None
    entry = entries[-1]
    host = entry
    if entry.startswith("["):  # [v6]:port
        host = entry[1:].partition("]")[0]
    elif entry.count(":") == 1:  # v4:port
        host = entry.partition(":")[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return entry


def _url_path(raw: str) -> str | None:
    """The percent-decoded path of a request target, or None if unusable."""
    path = raw.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        return None
    try:
        return urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None


# -- the handshake -----------------------------------------------------------------


@dataclass(frozen=True)
class WebSocketOptions:
    """How every connection of one daemon behaves.

    ``origins`` None means same-origin only (pages this daemon served, and
    non-browser clients, which send no Origin); otherwise an allow-list for
    :func:`~daemons.codecs.ws.origin_allowed` (``*`` allows all).
    """

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    text_replies: bool = False
    origins: tuple[str, ...] | None = None
    trust_proxy: bool = False
    static: StaticFiles | None = None
    #: ``--host`` names (see :class:`HostPolicy`).
    hosts: tuple[str, ...] = ()


class WebSocketHandshake:
    """The engine's ``Handshake`` over :class:`WebSocketServerLayer`.

    ``service`` is set once the request head is a WebSocket upgrade with an
    acceptable Origin and a valid service name in its path; a plain HTTP
    request is answered at once and ``finished`` set. A bad origin or path
    queues the HTTP error and raises ProtocolError, so the engine logs and
    counts it, flushes the answer and closes. ``peer`` is what the engine
    logs: with ``trust_proxy``, the X-Forwarded-For client.
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
        self.peer = peer
        self.service: str | None = None
        self.finished = False
        self.options = options
        self._transport_peer = peer
        self._known = service_known
        #: None: every Host is accepted (a unit test, a caller of its own).
        self.hosts = hosts
        self.secure = secure
        # True when the driver calls data_to_send() until it returns b"" (the
        # engine's _finish does, as the socket drains), so a shared body can
        # follow the head in pieces; under TLS each piece is encrypted as it goes.
        self._pieces = pieces
        self._body: memoryview | None = None
        self.ws = WebSocketServerLayer(
            max_message_size=options.max_message_size,
            text_replies=options.text_replies,
            logger=frame_log,
            pool=pool,
        )

    def receive_data(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)  # an error queues its HTTP answer and raises
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
            early = self.ws.accept()
        except PeerClosed as exc:  # a close frame right behind the request
            raise ProtocolError(f"websocket: client closed before the 101: {exc}") from exc
        return self.ws, early

    def reject(self, reason: str, status: int) -> None:
        """403 policy, 404 unknown service, 503 unavailable, 408 deadline."""
        self.finished = True
        if self.ws.phase in (Phase.READING_REQUEST, Phase.DECIDING):
            body = _REFUSALS.get(status, "Refused.\n")
            self.ws.reject(status, body)

    # -- decisions ---------------------------------------------------------

    def _decide(self, request: HandshakeRequest) -> None:
        if self.options.trust_proxy:
            client = forwarded_client(request)
            if client is not None:
                self.peer = f"{client} (via {self._transport_peer})"
        self._check_host(request)
        path = _url_path(request.path)
        if not request.is_upgrade:
            self._answer_http(request, path)
            return
        if not self._origin_ok(request):
            self.ws.reject(403, "Forbidden: this page's origin may not open WebSockets here.\n")
            rule = "--origin" if self.options.origins is not None else "same origin only"
            raise ProtocolError(f"websocket: origin {shown(request.origin)} not allowed ({rule})")
        name = path[1:] if path is not None else ""
        reason = service_name_error(name) if path is not None else "bad request path"
        if reason:
            self.ws.reject(404, _REFUSALS[404])
            raise ProtocolError(f"websocket: no service in path {shown(request.path)}: {reason}")
        self.service = name

    def _check_host(self, request: HandshakeRequest) -> None:
        """Exactly one Host, naming this daemon (see :class:`HostPolicy`);
        behind a trusted proxy, X-Forwarded-Host too. Before anything else:
        a rebound name gets neither a WebSocket nor a static file."""
        hosts = [v for k, v in request.headers if k.lower() == "host"]
        if len(hosts) != 1:
            self.finished = True
            self.ws.reject(400, "Bad request: exactly one Host header is required.\n")
            raise ProtocolError(f"websocket: {len(hosts)} Host headers (exactly one is required)")
        if self.hosts is None:
            return
        names = [("Host", hosts[0])]
        if self.options.trust_proxy:
            forwarded = request.header("x-forwarded-host")
            if forwarded is not None:
                names.append(("X-Forwarded-Host", forwarded.split(",")[0]))
        for header, value in names:
            if not self.hosts.allows(value):
                self.finished = True
                self.ws.reject(421, _REFUSALS[421])
                raise ProtocolError(
                    f"websocket: {header} {shown(value)} is not a name of this daemon"
                    f" (DNS rebinding?); --host NAME adds one; request {request.method}"
                    f" {shown(request.path)}"
                )

    def _origin_ok(self, request: HandshakeRequest) -> bool:
        if self.options.origins is not None:
            return origin_allowed(request.origin, self.options.origins)
        if request.origin is None:
            return True  # not a browser
        host = None
        scheme = "https" if self.secure else "http"
        if self.options.trust_proxy:
            forwarded = request.header("x-forwarded-host")
            host = forwarded.split(",")[0] if forwarded else None
            proto = (request.header("x-forwarded-proto") or "").split(",")[0].strip().lower()
            scheme = proto if proto in ("http", "https") else scheme
        return same_origin(request.origin, host or request.header("host"), scheme)

    def _answer_http(self, request: HandshakeRequest, path: str | None) -> None:
        """A plain HTTP request: a static file, 426 on a service path, or 404."""
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
            if self._pieces and isinstance(body, _Body):
                # The head now, the shared body as a buffer of its own next.
                ws.respond(200, headers, b"", content_length=len(body))
                if request.method != "HEAD":
                    self._body = memoryview(body)
            else:
                ws.respond(200, headers, bytes(body))
        elif not service_name_error(name) and self._known(name):
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
            shown(request.path),
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
    ``peer`` (``--trust-proxy``'s client). One class for every connection,
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
) -> Daemon:
    """Context, engine, listeners (systemd sockets first), metrics, keepalive.

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
    if tls is not None:
        daemon.on_reload = tls.reload
    daemon.serve_control(f"{control_name}.ctl", flag="--control-name")  # fails first
    open_listeners(daemon, common, factory, DEFAULT_LISTEN)
    # The accepted Host names depend on the bound sockets (port 0, systemd's).
    hosts = HostPolicy.for_sockets(daemon.listening_sockets, options.hosts, secure=tls is not None)
    return daemon


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
    is_flag=True,
    help="Behind a reverse proxy: log the client address from X-Forwarded-For "
    "(and check same-origin against X-Forwarded-Host and X-Forwarded-Proto).",
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
@server_tls_options(purpose="serves wss://")
@click.option(
    "--control-name",
    default="ws",
    metavar="NAME",
    help="Counters are served on the local service NAME.ctl (ipc status NAME); "
    "give each instance sharing a run directory its own.",
)
def main(
    common: CommonOptions,
    origins: tuple[str, ...],
    text_replies: bool,
    static_dir: Path | None,
    no_static: bool,
    ping_interval: float,
    idle_timeout: float,
    trust_proxy: bool,
    hold_pool: int,
    hosts: tuple[str, ...],
    server_tls: ServerTLS,
    control_name: str,
) -> None:
    """Let browsers reach local LibIPC services: ws://HOST:PORT/SERVICE.

    Each WebSocket message is one LibIPC message to $RUNDIR/SERVICE and each
    reply one WebSocket message back. Plain HTTP on the same port serves the
    demo page (or --static DIR). -vv logs every frame.
    """
    if (server_tls.cert is None) != (server_tls.key is None):
        raise click.UsageError("--cert and --key go together")
    server_tls.check()
    if server_tls.cert is None and server_tls.given:
        raise click.UsageError(
            "--client-ca, --allow-client, --min-tls, --ciphers and --crl need --cert/--key (wss)"
        )
    for origin in origins:
        if origin not in ("*", "null") and "://" not in origin:
            raise click.BadParameter(
                f"{origin!r}: an origin is SCHEME://HOST[:PORT] (as in https://app.example.com),"
                " null or *",
                param_hint="--origin",
            )
    for host in hosts:
        if split_host(host) is None:
            raise click.BadParameter(
                f"{host!r}: a host is NAME or NAME:PORT (as in chat.example.com, [::1]:8080)",
                param_hint="--host",
            )
    if static_dir is not None and no_static:
        raise click.UsageError("--static and --no-static contradict each other")
    setup_logging(common.verbosity, common.log_format)
    frame_log.setLevel(logging.DEBUG if common.verbosity >= 2 else logging.WARNING)
    with starting():
        static = None if no_static else StaticFiles(static_dir or DEMO_DIR)
        tls = None if server_tls.cert is None else ServerCertificates(server_tls)
        options = WebSocketOptions(
            max_message_size=common.max_message_size,
            text_replies=text_replies,
            origins=origins or None,
            trust_proxy=trust_proxy,
            static=static,
            hosts=hosts,
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
        )
    log.info(
        "%s: %s, replies as %s, origins: %s, static files: %s",
        NAME,
        "wss (TLS)" if tls else "ws",
        "text" if text_replies else "binary",
        ", ".join(origins) if origins else "same origin only",
        static.root if static else "none",
    )
    try:
        daemon.run()
    finally:
        daemon.ctx.close_all()


if __name__ == "__main__":
    main()
