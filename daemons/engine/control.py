"""What a daemon says about itself: ``/metrics`` and ``/healthz`` over HTTP
(``--metrics``), and the local control service ``NAME.ctl`` that answers
``status`` with the same counters as JSON (``ipc status``).

The HTTP side is h11 (:class:`MetricsExchange`), the parser ipc-httpd uses:
no hand-written request parsing anywhere in the suite.

Why a LibIPC service next to HTTP: the counters stay readable on a host where
no ``--metrics`` port is open, with the run directory's permissions as the
access control. Network peers never reach it: ``*.ctl`` is never reachable
(:data:`daemons.engine.policy.NEVER_REACHABLE`).
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11

from ipc_core import Event, EventType

from .deadlines import Deadlines, RequestDeadlines
from .errors import ErrorKind
from .listeners import bound_address, peer_name
from .metrics import CONTENT_TYPE, MAX_REQUEST_SIZE, Registry

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["MAX_HTTP_CONNECTIONS", "ControlService", "MetricsExchange", "MetricsHttp"]

log = logging.getLogger("ipc.daemon")

_RECV_SIZE = 65536
#: Open /metrics connections at most (a scrape takes one, briefly).
MAX_HTTP_CONNECTIONS = 32


class MetricsHttp:
    """The ``--metrics`` listeners and their HTTP clients: at most
    :data:`MAX_HTTP_CONNECTIONS` at once, each closed after the handshake
    timeout (a deadline that never closes a newer client on the same number)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.ctx = daemon.ctx
        #: Open HTTP clients by descriptor.
        self.clients: dict[int, MetricsExchange] = {}
        self._deadlines: Deadlines[int] = Deadlines(daemon.ctx)

    def serve(self, sock: socket.socket) -> None:
        """Serve /metrics and /healthz on ``sock`` (plain HTTP)."""
        sock.setblocking(False)
        self.daemon.own(self.ctx.add_external(sock), self._on_listener)
        log.info("%s: metrics on http://%s/metrics", self.daemon.name, bound_address(sock))

    def _on_listener(self, event: Event) -> None:
        if event.type is EventType.EXTERNAL:
            self._accept(event.fd)

    def _accept(self, lfd: int) -> None:
        daemon = self.daemon
        lsock = self.ctx.socket_of(lfd)
        for _ in range(16):
            try:
                sock, addr = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                daemon.accept_failed(exc, lfd)
                return
            if len(self.clients) >= MAX_HTTP_CONNECTIONS:
                daemon.metrics.errors.inc(kind=ErrorKind.METRICS_BUSY)
                more = daemon.throttle("metrics").due()
                if more is not None:
                    log.warning(
                        "%s: refusing metrics client %s: %d open already%s",
                        daemon.name,
                        peer_name(addr),
                        MAX_HTTP_CONNECTIONS,
                        more,
                    )
                sock.close()
                continue
            sock.setblocking(False)
            fd = self.ctx.add_external(sock)
            self.clients[fd] = MetricsExchange(daemon.metrics.registry, health=daemon.health)
            daemon.own(fd, self._on_client)
            self._deadlines.start(fd, daemon.handshake_timeout, functools.partial(self._drop, fd))

    def _on_client(self, event: Event) -> None:
        fd = event.fd
        if event.type is EventType.DISCONNECTION:
            self._forget(fd)
            return
        if event.type is not EventType.EXTERNAL:
            return
        try:
            data = self.ctx.socket_of(fd).recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.daemon.refresh_metrics()
        responder = self.clients[fd]
        out = responder.receive_data(data)
        if out:
            self.ctx.send_raw(fd, out)
        if responder.done:
            self._forget(fd)
            self.ctx.close(fd, flush=True)

    def _forget(self, fd: int) -> None:
        self.clients.pop(fd, None)
        self._deadlines.done(fd)

    def _drop(self, fd: int) -> None:
        self.clients.pop(fd, None)
        self.daemon.drop(fd)


_TEXT = "text/plain; charset=utf-8"


class MetricsExchange:
    """One HTTP/1.x exchange on h11, without I/O: bytes in, one response
    out, then close.

    ``receive_data(chunk)`` returns the bytes to send: ``b""`` while the
    request head is incomplete, else the whole response; ``receive_data(b"")``
    means the peer hit EOF. Once :attr:`done` is True, send what was returned
    and close the connection (``Connection: close``: one exchange per
    connection, a request body is not read). Routes: ``GET|HEAD /metrics``
    (the registry), ``/healthz`` (``ok``, or 503 with the reason ``health()``
    returns); other paths 404, other methods 405. What h11 refuses to parse
    gets its status hint (400, or 431 for a head over ``max_request``
    bytes), and so does a request cut short by EOF.
    """

    def __init__(
        self,
        registry: Registry,
        health: Callable[[], str | None] | None = None,
        max_request: int = MAX_REQUEST_SIZE,
    ) -> None:
        self.registry = registry
        self.health = health
        self.done = False
        self.status: int | None = None
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_request)
        self._head_only = False

    def receive_data(self, data: bytes) -> bytes:
        if self.done:
            return b""
        conn = self._h11
        conn.receive_data(data)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
            if not data and conn.trailing_data[0].strip() == b"":
                self.done = True  # EOF before any byte of a request: nothing to answer
                return b""
            return self._respond(
                status, "request too large\n" if status == 431 else "bad request\n"
            )
        if event is h11.NEED_DATA:
            return b""
        if not isinstance(event, h11.Request):  # ConnectionClosed: EOF before a request
            self.done = True
            return b""
        return self._route(event)

    def _route(self, request: h11.Request) -> bytes:
        method, target = request.method, request.target.split(b"?", 1)[0]
        self._head_only = method == b"HEAD"
        if target == b"/metrics":
            handler: Callable[[], tuple[int, str, str]] = self._metrics
        elif target == b"/healthz":
            handler = self._healthz
        else:
            return self._respond(404, "not found\n")
        if method not in (b"GET", b"HEAD"):
            self._head_only = False
            return self._respond(405, "method not allowed\n", extra=[("Allow", "GET, HEAD")])
        status, body, ctype = handler()
        return self._respond(status, body, ctype)

    def _metrics(self) -> tuple[int, str, str]:
        return 200, self.registry.render(), CONTENT_TYPE

    def _healthz(self) -> tuple[int, str, str]:
        problem = self.health() if self.health else None
        if problem:
            return 503, problem.rstrip("\n") + "\n", _TEXT
        return 200, "ok\n", _TEXT

    def _respond(
        self,
        status: int,
        body: str,
        ctype: str = _TEXT,
        *,
        extra: list[tuple[str, str]] | None = None,
    ) -> bytes:
        self.done = True
        self.status = status
        payload = body.encode()
        headers = [
            ("Content-Type", ctype),
            ("Content-Length", str(len(payload))),
            *(extra or []),
            ("Connection", "close"),
        ]
        conn = self._h11
        reason = HTTPStatus(status).phrase.encode()
        events: list[h11.Event] = [
            h11.Response(status_code=status, headers=headers, reason=reason),
            h11.EndOfMessage(),
        ]
        if payload and not self._head_only:
            events.insert(1, h11.Data(data=payload))
        try:
            return b"".join(conn.send(event) or b"" for event in events)
        except h11.LocalProtocolError:  # nothing h11 can still send: just close
            return b""


class ControlService:
    """The local service ``NAME.ctl``: the message ``status`` is answered
    with :meth:`Daemon.status` as JSON; a client silent for the handshake
    timeout is closed (each request re-arms its deadline)."""

    def __init__(self, daemon: Daemon, service: str, flag: str) -> None:
        self.daemon = daemon
        self.service = service
        self._wait = RequestDeadlines(daemon, service)
        daemon.own(daemon.service_init(service, flag), self._on_service)

    def _on_service(self, event: Event) -> None:
        if event.type is EventType.CONNECTION:
            self.daemon.own(event.fd, self._on_client)
            self._wait.start(event.fd)

    def _on_client(self, event: Event) -> None:
        fd = event.fd
        if event.type is EventType.MESSAGE_RX:
            self._wait.start(fd)  # each request re-arms the deadline: silence closes
            if (event.message or b"").strip() == b"status":
                answer = json.dumps(self.daemon.status(), separators=(",", ":")).encode()
            else:
                answer = b'{"error":"unknown command; try status"}'
            self.daemon.ctx.schedule(fd, answer)
        elif event.type is EventType.DISCONNECTION:
            self._wait.done(fd)
