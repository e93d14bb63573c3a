"""What a daemon says about itself: ``/metrics`` and ``/healthz`` over HTTP
(``--metrics``), and the local control service ``NAME.ctl`` that answers
``status`` with the same counters as JSON (``ipc status``).

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
from typing import TYPE_CHECKING

from ipc_core import Event, EventType

from .deadlines import Deadlines, RequestDeadlines
from .errors import ErrorKind
from .listeners import bound_address, peer_name
from .metrics import HttpResponder

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["MAX_HTTP_CONNECTIONS", "ControlService", "MetricsHttp"]

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
        self.clients: dict[int, HttpResponder] = {}
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
            self.clients[fd] = HttpResponder(daemon.metrics.registry, health=daemon.health)
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
