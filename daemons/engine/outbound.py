"""The outbound side of a protocol daemon: local clients reach remote services.

The daemon is itself a LibIPC service (``tcp``, ``tls``, ...). A local client
(usually the router ipcd) sends one message holding a URI such as
``tcp://[::1]:9000/pong``; the daemon connects, runs the protocol's client
handshake (a Sans-I/O :class:`Connector`), answers ``ok`` and switches the
client's Unix connection with the network connection. On any failure the
client gets a message starting with ``error:`` and the daemon carries on.

Hand-off: a request ``URI`` followed by the line ``handoff``
(``tcp://[::1]:9000/pong\nhandoff``, what ipcd sends) asks for the network
socket itself. When the stream after the handshake is plain LibIPC (TCPd: no
layer) and nothing arrived past the remote's ``ok``, the answer ``ok`` comes
with the connected socket attached (``SCM_RIGHTS``) and the daemon keeps no
copy: the client talks to the remote service with no relay in the path.
Otherwise (TLS, early bytes) the answer is a plain ``ok`` and the relay, as
for any client.

Nothing blocks the loop: host names are resolved in a small thread pool,
connects are non-blocking, and every attempt has a deadline.
"""

from __future__ import annotations

import concurrent.futures
import errno
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from ipc_core import Event, EventType, IPCError, PeerClosed, ProtocolError, encode

from .addresses import Uri, parse_uri
from .daemon import Daemon
from .deadlines import Deadlines, RequestDeadlines
from .handshake import Connector, ConnectorFactory
from .listeners import tune_tcp

log = logging.getLogger("ipc.daemon.outbound")

#: The request line after the URI that asks for the network socket itself.
HANDOFF_OPTION = "handoff"
#: The lock mark of an outbound side that understands it (older ones and the
#: reference's do not: ipcd sends them the bare URI).
HANDS_OVER = "hands-over"

_RECV_SIZE = 65536


@dataclass
class _Attempt:
    client_fd: int
    uri: Uri
    connector: Connector
    started: float
    remote_fd: int = -1
    received: bool = False  # a byte came back: the TCP connection was made
    handoff: bool = False  # the client takes the network socket itself


class Outbound:
    """Serves one local service name and dials out for its clients."""

    def __init__(
        self,
        daemon: Daemon,
        service_name: str,
        connectors: dict[str, ConnectorFactory],
        connect_timeout: float = 5.0,
    ) -> None:
        self.daemon = daemon
        self.ctx = daemon.ctx
        self.service_name = service_name
        self.connectors = connectors
        self.connect_timeout = connect_timeout
        # The mark tells ipcd it may ask for the network socket itself.
        self.service_fd = daemon.service_init(service_name, "--service-name", (HANDS_OVER,))
        # Local clients that have not asked yet: closed after the handshake timeout.
        self._clients = RequestDeadlines(daemon, service_name)
        self._by_client: dict[int, _Attempt] = {}
        self._by_remote: dict[int, _Attempt] = {}
        self._deadlines: Deadlines[int] = Deadlines(self.ctx)  # by client fd
        self._resolver = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="resolve")
        registry = daemon.metrics.registry
        self.outbound_total = registry.counter(
            "ipc_outbound_total", "Outbound connection attempts, by result.", ["result"]
        )
        daemon.own(self.service_fd, self._on_service)
        log.info("%s: outbound service %r ready", daemon.name, service_name)

    def _on_service(self, event: Event) -> None:
        """A local client connected: it owes us a URI."""
        if event.type is EventType.CONNECTION:
            self.daemon.own(event.fd, self._on_client)
            self._clients.start(event.fd)

    def _on_client(self, event: Event) -> None:
        fd = event.fd
        if event.type is EventType.MESSAGE_RX:
            assert event.message is not None
            if self._clients.done(fd):
                self._request(fd, event.message)
            elif fd in self._by_client:
                self._fail(self._by_client[fd], "client sent a message before 'ok'")
        elif event.type is EventType.DISCONNECTION:
            self._clients.done(fd)
            attempt = self._by_client.get(fd)
            if attempt is not None:
                log.info("%s: client left before %s answered", self.daemon.name, attempt.uri)
                self._drop(attempt)

    def _on_remote_event(self, event: Event) -> None:
        attempt = self._by_remote.get(event.fd)
        if attempt is None:
            return
        if event.type is EventType.EXTERNAL:
            self._on_remote(attempt)
        elif event.type is EventType.DISCONNECTION:
            attempt.remote_fd = -1
            self._by_remote.pop(event.fd, None)
            self._fail(attempt, _lost_reason(attempt, event.reason))

    # ------------------------------------------------------------- request

    def _request(self, client_fd: int, payload: bytes) -> None:
        try:
            text, _, option = payload.decode().partition("\n")
            if option not in ("", HANDOFF_OPTION):
                raise ValueError(f"unknown request option {option[:40]!r}")
            uri = parse_uri(text)
        except (UnicodeDecodeError, ValueError) as exc:
            self._answer_error(client_fd, f"bad URI: {exc}")
            return
        factory = self.connectors.get(uri.scheme)
        if factory is None:
            schemes = ", ".join(sorted(self.connectors))
            self._answer_error(client_fd, f"scheme {uri.scheme!r} not served here (only {schemes})")
            return
        attempt = _Attempt(
            client_fd, uri, factory(uri), time.monotonic(), handoff=option == HANDOFF_OPTION
        )
        self._by_client[client_fd] = attempt
        self._deadlines.start(
            client_fd,
            self.connect_timeout,
            lambda: self._fail(attempt, f"no answer within {self.connect_timeout} s"),
        )
        if _is_ip(uri.host):
            self._dial(attempt, [(_family(uri.host), (uri.host, uri.port))])
            return
        future = self._resolver.submit(_resolve, uri.host, uri.port)
        future.add_done_callback(
            lambda f: self.ctx.call_soon_threadsafe(lambda: self._resolved(attempt, f))
        )

    def _resolved(self, attempt: _Attempt, future: concurrent.futures.Future[Any]) -> None:
        if self._by_client.get(attempt.client_fd) is not attempt:
            return
        try:
            addresses = future.result()
        except OSError as exc:
            self._fail(attempt, f"cannot resolve {attempt.uri.host!r}: {exc}")
            return
        self._dial(attempt, addresses)

    def _dial(self, attempt: _Attempt, addresses: list[tuple[int, Any]]) -> None:
        family, sockaddr = addresses[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        tune_tcp(sock, self.daemon.peer_timeout)
        err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._fail(attempt, f"connect to {_where(attempt.uri)}: {os.strerror(err)}")
            return
        attempt.remote_fd = self.ctx.add_external(sock)
        self._by_remote[attempt.remote_fd] = attempt
        self.daemon.own(attempt.remote_fd, self._on_remote_event)
        self._send(attempt)  # queued until the connection is established

    def _send(self, attempt: _Attempt) -> None:
        data = attempt.connector.data_to_send()
        if data and attempt.remote_fd in self.ctx:
            self.ctx.send_raw(attempt.remote_fd, data)

    def _on_remote(self, attempt: _Attempt) -> None:
        try:
            data = self.ctx.socket_of(attempt.remote_fd).recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(attempt, f"{_where(attempt.uri)}: {exc.strerror or exc}")
            return
        attempt.received = True
        try:
            attempt.connector.receive_data(data)
        except (ProtocolError, PeerClosed) as exc:
            self._send(attempt)
            self._fail(attempt, str(exc))
            return
        self._send(attempt)
        if attempt.connector.done:
            self._succeed(attempt)

    def _succeed(self, attempt: _Attempt) -> None:
        layer, early = attempt.connector.result()
        self._forget(attempt)
        ctx = self.ctx
        if attempt.handoff and layer is None and not early and self._hand_over(attempt):
            return
        if (
            attempt.client_fd not in ctx
            or not ctx.write(attempt.client_fd, b"ok")
            or attempt.remote_fd not in ctx
        ):
            # One side vanished at the last moment: close the other, nothing to switch.
            for fd in (attempt.client_fd, attempt.remote_fd):
                self.daemon.drop(fd)
            return
        ctx.add_switch(attempt.remote_fd, attempt.client_fd)
        for fd in (attempt.remote_fd, attempt.client_fd):
            self.daemon.own(fd, self.daemon.relayed)
        ctx.set_tag(attempt.remote_fd, "network")
        ctx.set_tag(attempt.client_fd, "local")
        if layer is not None:
            ctx.set_switch_codec(attempt.remote_fd, layer)
        if early:
            ctx.feed_switch(attempt.remote_fd, early)
        self.outbound_total.inc(result="ok")
        self.daemon.watch_idle(attempt.remote_fd, str(attempt.uri))
        log.info(
            "%s: connected to %s (%.1f ms)",
            self.daemon.name,
            attempt.uri,
            (time.monotonic() - attempt.started) * 1000,
        )

    def _hand_over(self, attempt: _Attempt) -> bool:
        """Pass the connected, handshaken network socket to the client with
        ``ok``; keep no copy. False (nothing done) if it cannot go now."""
        ctx = self.ctx
        if attempt.client_fd not in ctx or attempt.remote_fd not in ctx:
            return False
        sock = ctx.socket_of(attempt.remote_fd)
        try:
            ctx.send_fd(attempt.client_fd, encode(b"ok"), sock.fileno())
        except (OSError, IPCError) as exc:
            log.debug("%s: cannot hand %s over: %s", self.daemon.name, attempt.uri, exc)
            return False
        self.daemon.disown(attempt.remote_fd)
        ctx.remove_external(attempt.remote_fd)  # out of the loop, no shutdown
        sock.close()  # the client's copy is the connection now
        ctx.close(attempt.client_fd, flush=True)
        self.outbound_total.inc(result="handed over")
        log.info(
            "%s: connected to %s, handed over (%.1f ms)",
            self.daemon.name,
            attempt.uri,
            (time.monotonic() - attempt.started) * 1000,
        )
        return True

    # ------------------------------------------------------------- failure

    def _fail(self, attempt: _Attempt, reason: str) -> None:
        if self._by_client.get(attempt.client_fd) is not attempt:
            return
        log.warning("%s: cannot reach %s: %s", self.daemon.name, attempt.uri, reason)
        self.outbound_total.inc(result="error")
        self._drop(attempt)
        self._answer_error(attempt.client_fd, f"cannot reach {attempt.uri}: {reason}")

    def _drop(self, attempt: _Attempt) -> None:
        self._forget(attempt)
        if attempt.remote_fd >= 0:
            self.daemon.drop(attempt.remote_fd)

    def _forget(self, attempt: _Attempt) -> None:
        self._by_client.pop(attempt.client_fd, None)
        self._by_remote.pop(attempt.remote_fd, None)
        self._deadlines.done(attempt.client_fd)

    def _answer_error(self, client_fd: int, reason: str) -> None:
        if client_fd in self.ctx:
            self.ctx.write(client_fd, f"error: {reason}".encode())
            self.ctx.close(client_fd, flush=True)

    def close(self) -> None:
        self._resolver.shutdown(wait=False, cancel_futures=True)


#: What a failed non-blocking connect reports, through the first write or
#: read on the socket (the Context's "write failed: ..." reason).
_CONNECT_ERRORS = frozenset(
    os.strerror(code)
    for code in (
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EADDRNOTAVAIL,
    )
)


def _where(uri: Uri) -> str:
    """``HOST:PORT`` of a URI, IPv6 in brackets."""
    host = f"[{uri.host}]" if ":" in uri.host else uri.host
    return f"{host}:{uri.port}"


def _lost_reason(attempt: _Attempt, reason: str | None) -> str:
    """Why the remote side of an attempt closed, in the user's terms: a
    connect that failed is "connect to HOST:PORT: Connection refused", not
    the "write failed" of the queued handshake that revealed it."""
    if not reason:
        return "connection closed"
    _, sep, cause = reason.partition("failed: ")
    if sep and not attempt.received and cause in _CONNECT_ERRORS:
        return f"connect to {_where(attempt.uri)}: {cause}"
    return reason


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _resolve(host: str, port: int) -> list[tuple[int, Any]]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"no address for {host!r}")
    return [(info[0], info[4]) for info in infos]
