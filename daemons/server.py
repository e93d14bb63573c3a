"""The engine every network-facing daemon shares (ipc-tcpd, ipc-tlsd, ipc-websocketd).

Theory of operation
-------------------
A daemon listens on network sockets. Each accepted peer goes through a
protocol-specific, Sans-I/O :class:`Handshake` (TCPd's service name, TLS then
the name, or a WebSocket upgrade) while the engine does the I/O:

1. accept (over ``--max-connections``: closed at once, logged); the socket
   joins the Context as an EXTERNAL descriptor and a handshake deadline starts;
2. every EXTERNAL event: one ``recv``, ``handshake.receive_data``, its
   ``data_to_send`` written through the Context (queued, never blocking);
3. once the peer names a service: the allow/deny policy, then a connection to
   ``$RUNDIR/SERVICE``; success -> ``handshake.accept()`` gives the layer for
   the switched phase and the LibIPC bytes that arrived early; the Context
   switches the pair and from then on relays without the engine;
4. any failure (bad input, refused or unknown service, deadline) -> the
   handshake's refusal bytes are flushed, the socket closed, the reason logged
   and counted. Nothing else is affected.

The engine also serves ``--metrics`` (Prometheus text and /healthz), the
local control service ``NAME.ctl`` (:meth:`Daemon.serve_control`: the same
counters as JSON, for ``ipc status``), turns SIGTERM/SIGINT into a clean stop,
SIGHUP into ``on_reload``, and speaks the systemd notify protocol (READY,
STOPPING, RELOADING, WATCHDOG).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ipc_core import Context, Event, EventType, IPCError, Layer, PeerClosed, ProtocolError
from ipc_core.rundir import socket_path

from . import systemd
from .common import (
    CommonOptions,
    ServiceAccess,
    bound_address,
    network_refusal,
    open_listener,
    tune_tcp,
)
from .metrics import HttpResponder, Registry

log = logging.getLogger("ipc.daemon")

_RECV_SIZE = 65536


class Handshake(Protocol):
    """The Sans-I/O opening of one network connection.

    ``receive_data(b"")`` means EOF. ``service`` becomes the requested service
    name; ``finished`` means "flush data_to_send() and close" (a refusal, an
    HTTP response). Bad input raises ProtocolError.
    """

    service: str | None
    finished: bool

    def receive_data(self, data: bytes) -> None: ...

    def data_to_send(self) -> bytes: ...

    def accept(self) -> tuple[Layer | None, bytes]: ...

    def reject(self, reason: str, status: int) -> None: ...


HandshakeFactory = Callable[[str], Handshake]

# HTTP-style statuses the engine passes to Handshake.reject.
FORBIDDEN, NOT_FOUND, UNAVAILABLE = 403, 404, 503


@dataclass
class _Pending:
    """A network peer still in its handshake."""

    fd: int
    peer: str
    handshake: Handshake
    started: float
    deadline: Any = None
    settle: Any = None


@dataclass
class DaemonMetrics:
    """The counters every daemon exports."""

    registry: Registry = field(default_factory=Registry)

    def __post_init__(self) -> None:
        r = self.registry
        self.connections_open = r.gauge("ipc_connections_open", "Network connections open now.")
        self.connections_total = r.counter(
            "ipc_connections_total", "Network connections accepted since start."
        )
        self.switched_total = r.counter(
            "ipc_switched_total", "Connections that completed the handshake and were switched."
        )
        self.handshake_failures = r.counter(
            "ipc_handshake_failures_total", "Handshakes that failed, by reason.", ["reason"]
        )
        self.errors = r.counter("ipc_errors_total", "Connections closed on an error.", ["kind"])
        self.messages = r.counter(
            "ipc_messages_total", "LibIPC messages relayed, by direction.", ["direction"]
        )
        self.bytes = r.counter("ipc_bytes_total", "Bytes relayed, by direction.", ["direction"])


class Daemon:
    """A Context plus listeners, handshakes, metrics, signals and systemd."""

    def __init__(
        self,
        name: str,
        ctx: Context,
        access: ServiceAccess,
        *,
        handshake_timeout: float = 5.0,
        max_connections: int = 10000,
        peer_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.ctx = ctx
        self.access = access
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.peer_timeout = peer_timeout  # TCP keepalive / user timeout (tune_tcp)
        raise_fd_limit(2 * max_connections + 64)
        self._accept_error_logged = -1e9
        self._accept_errors_quiet = 0
        self.metrics = DaemonMetrics()
        self.on_reload: Callable[[], None] | None = None
        #: Extra event handlers (e.g. the outbound side): return True if handled.
        self.handlers: list[Callable[[Event], bool]] = []
        #: Called as ``on_switched(fd, handshake, layer)`` once a network peer
        #: is switched (ipc-websocketd tracks its connections for keepalive).
        self.on_switched: Callable[[int, Handshake, Layer | None], None] | None = None
        self._listeners: dict[int, tuple[socket.socket, HandshakeFactory]] = {}
        self._metric_listeners: set[int] = set()
        self._pending: dict[int, _Pending] = {}
        self._http: dict[int, HttpResponder] = {}
        self._network_fds: set[int] = set()
        self._last_stats = {"network": [0, 0], "local": [0, 0]}
        self._stopping = False
        self._watchdog: float | None = None
        self._started = time.monotonic()
        self._control_fd = -1
        self._control_peers: set[int] = set()
        ctx.switch_events = False

    def reachable(self, service: str) -> bool:
        """May a network peer reach ``service``, and does it run here?

        Handshakes use it to end a name early (TCPd without a terminator, the
        426 answer of ipc-websocketd). A refused name answers False like a
        missing one, so a refusal takes the same path and time as "no such
        service" and a peer cannot probe what runs here.
        """
        if network_refusal(self.access, service, self.ctx.rundir) is not None:
            return False
        try:
            return socket_path(service, self.ctx.rundir).exists()
        except IPCError:
            return False

    # ----------------------------------------------------------- listeners

    def listen(self, sock: socket.socket, factory: HandshakeFactory) -> None:
        """Accept network peers on ``sock``; ``factory(peer)`` opens each."""
        sock.setblocking(False)
        fd = self.ctx.add_external(sock)
        self._listeners[fd] = (sock, factory)
        log.info("%s: listening on %s", self.name, bound_address(sock))

    def serve_metrics(self, sock: socket.socket) -> None:
        """Serve /metrics and /healthz on ``sock`` (plain HTTP)."""
        sock.setblocking(False)
        fd = self.ctx.add_external(sock)
        self._metric_listeners.add(fd)
        log.info("%s: metrics on http://%s/metrics", self.name, bound_address(sock))

    def serve_control(self, service: str) -> None:
        """Serve the local LibIPC service ``service`` (e.g. ``tcp.ctl``): the
        message ``status`` is answered with JSON of the counters.

        Why a LibIPC service and not only HTTP: the counters stay readable
        (``ipc status``) on a host where no ``--metrics`` port is open, with
        the run directory's permissions as the access control. Network peers
        never reach it: ``*.ctl`` is protected in :class:`ServiceAccess`.
        """
        self._control_fd = self.ctx.service_init(service, local_only=True)
        self.handlers.insert(0, self._on_control)

    def status(self) -> dict[str, Any]:
        """What the control service answers: who we are and the counters."""
        self.refresh_metrics()
        return {
            "daemon": self.name,
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "metrics": self.metrics.registry.snapshot(),
        }

    def _on_control(self, event: Event) -> bool:
        fd = event.fd
        if event.type == EventType.CONNECTION and event.origin == self._control_fd:
            self._control_peers.add(fd)
            return True
        if fd not in self._control_peers:
            return False
        if event.type == EventType.MESSAGE_RX:
            if (event.message or b"").strip() == b"status":
                answer = json.dumps(self.status(), separators=(",", ":")).encode()
            else:
                answer = b'{"error":"unknown command; try status"}'
            self.ctx.schedule(fd, answer)
        elif event.type == EventType.DISCONNECTION:
            self._control_peers.discard(fd)
        return True

    # ----------------------------------------------------------------- run

    def run(self) -> None:
        """Loop until SIGTERM/SIGINT; then close everything cleanly."""
        ctx = self.ctx
        ctx.handle_signals(
            {
                signal.SIGHUP: lambda _s: self.reload(),
                signal.SIGTERM: lambda _s: self.stop(),
                signal.SIGINT: lambda _s: self.stop(),
            },
            stop_on=(),
        )
        self._watchdog = systemd.watchdog_interval()
        if self._watchdog:
            ctx.call_later(self._watchdog / 2, self._kick_watchdog)
        systemd.ready(f"{self.name} ready")
        try:
            for event in ctx:
                self.serve_event(event)
        finally:
            systemd.stopping()

    def serve_event(self, event: Event) -> None:
        """Handle one event; a bug costs the connection it concerns, never the daemon."""
        try:
            self.handle(event)
        except Exception:
            self._contain(event)

    def _contain(self, event: Event) -> None:
        """Log an unexpected exception and close the descriptor it came from."""
        log.exception(
            "%s: internal error while handling %s on fd %d; closing it",
            self.name,
            event.type.name,
            event.fd,
        )
        self.metrics.errors.inc(kind="internal")
        pending = self._pending.pop(event.fd, None)
        if pending is not None:
            self._cancel(pending)
        if event.fd >= 0 and event.fd not in self._listeners and event.fd in self.ctx:
            self.ctx.close(event.fd, flush=False)
            if event.fd in self._network_fds:
                self._network_fds.discard(event.fd)
                self.metrics.connections_open.dec()

    def stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            log.info("%s: stopping", self.name)
            systemd.stopping()
            self.ctx.stop()

    def reload(self) -> None:
        if self.on_reload is None:
            log.info("%s: SIGHUP: nothing to reload", self.name)
            return
        systemd.reloading()
        try:
            self.on_reload()
        finally:
            systemd.ready()

    def _kick_watchdog(self) -> None:
        systemd.watchdog()
        assert self._watchdog is not None
        self.ctx.call_later(self._watchdog / 2, self._kick_watchdog)

    def handle(self, event: Event) -> None:
        """Dispatch one Context event."""
        fd = event.fd
        if event.type == EventType.EXTERNAL:
            if fd in self._pending:
                self._on_handshake_data(self._pending[fd])
            elif fd in self._listeners:
                self._accept(fd)
            elif fd in self._http:
                self._on_http(fd)
            elif fd in self._metric_listeners:
                self._accept_metrics(fd)
            else:
                self._dispatch_extra(event)
        elif event.type == EventType.DISCONNECTION:
            if fd in self._network_fds:
                self._network_fds.discard(fd)
                self.metrics.connections_open.dec()
                if event.reason:
                    self.metrics.errors.inc(kind=_error_kind(event.reason))
            pending = self._pending.pop(fd, None)
            if pending is not None:
                self._cancel(pending)
                self._count_failure("peer closed", pending, event.reason or "closed")
            self._http.pop(fd, None)
            self._dispatch_extra(event)
        else:
            self._dispatch_extra(event)

    def _dispatch_extra(self, event: Event) -> None:
        for handler in self.handlers:
            if handler(event):
                return

    # -------------------------------------------------------------- accept

    def _accept(self, lfd: int) -> None:
        lsock, factory = self._listeners[lfd]
        for _ in range(64):
            try:
                sock, addr = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._pause_accept(lfd)
                return
            peer = _peer_name(addr)
            if len(self._network_fds) >= self.max_connections:
                log.warning(
                    "%s: refusing %s: %d connections open (--max-connections)",
                    self.name,
                    peer,
                    len(self._network_fds),
                )
                self.metrics.handshake_failures.inc(reason="too many connections")
                sock.close()
                continue
            sock.setblocking(False)
            tune_tcp(sock, self.peer_timeout)
            fd = self.ctx.add_external(sock)
            self._network_fds.add(fd)
            self.metrics.connections_total.inc()
            self.metrics.connections_open.inc()
            try:
                handshake = factory(peer)
            except Exception:
                log.exception("%s: cannot start a handshake for %s", self.name, peer)
                self.ctx.close(fd)
                continue
            pending = _Pending(fd, peer, handshake, time.monotonic())
            pending.deadline = self.ctx.call_later(
                self.handshake_timeout, lambda p=pending: self._timeout(p)
            )
            self._pending[fd] = pending
            log.debug("%s: connection from %s (fd %d)", self.name, peer, fd)

    def _accept_failed(self, exc: OSError) -> None:
        """Log accept errors at most every 10 s: at the descriptor limit the
        listener is retried every 100 ms and would flood the log."""
        self.metrics.errors.inc(kind="accept")
        now = time.monotonic()
        if now - self._accept_error_logged < 10:
            self._accept_errors_quiet += 1
            return
        more = (
            f" ({self._accept_errors_quiet} more since the last report)"
            if self._accept_errors_quiet
            else ""
        )
        log.error("%s: accept failed: %s%s", self.name, exc.strerror or exc, more)
        self._accept_error_logged = now
        self._accept_errors_quiet = 0

    def _pause_accept(self, lfd: int) -> None:
        sock, factory = self._listeners.pop(lfd)
        self.ctx.remove_external(lfd)

        def resume() -> None:
            if not self._stopping:
                fd = self.ctx.add_external(sock)
                self._listeners[fd] = (sock, factory)

        self.ctx.call_later(0.1, resume)

    # ----------------------------------------------------------- handshake

    def _on_handshake_data(self, p: _Pending) -> None:
        sock = self._sock(p.fd)
        try:
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(p, "read error", f"read failed: {exc.strerror or exc}", flush=False)
            return
        try:
            p.handshake.receive_data(data)
        except PeerClosed:
            self._fail(p, "peer closed", "closed the connection during the handshake")
            return
        except ProtocolError as exc:
            self._fail(p, "protocol error", str(exc))
            return
        self._flush(p)
        if p.fd not in self._pending:
            return
        if p.handshake.finished:
            self._finish(p)
            return
        if p.handshake.service is not None:
            self._connect_local(p, p.handshake.service)
            return
        settle_after = getattr(p.handshake, "settle_after", None)
        if settle_after is not None:
            if p.settle is not None:
                p.settle.cancel()
            p.settle = self.ctx.call_later(settle_after, lambda: self._settle(p))

    def _settle(self, p: _Pending) -> None:
        """The peer paused mid-handshake (TCPd name without terminator)."""
        p.settle = None
        if self._pending.get(p.fd) is not p:
            return
        try:
            p.handshake.settle()  # type: ignore[attr-defined]
        except ProtocolError as exc:
            self._fail(p, "protocol error", str(exc))
            return
        if p.handshake.service is not None:
            self._connect_local(p, p.handshake.service)

    def _connect_local(self, p: _Pending, service: str) -> None:
        # A refused name is answered exactly like a name that does not exist
        # (same status, same path through the handshake): a peer learns
        # nothing of what runs here. The log keeps the real reason.
        refusal = network_refusal(self.access, service, self.ctx.rundir)
        if refusal is not None:
            self._reject(p, "refused", refusal, NOT_FOUND)
            return
        try:
            path = socket_path(service, self.ctx.rundir)
        except IPCError as exc:  # e.g. too long for a socket path here
            self._reject(p, "refused", str(exc), NOT_FOUND)
            return
        try:
            local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE/ENFILE: refuse this peer, keep serving
            self._reject(
                p, "service unavailable", f"service {service!r}: {exc.strerror or exc}", UNAVAILABLE
            )
            return
        local.setblocking(False)
        try:
            local.connect(os.fsencode(path))
        except (FileNotFoundError, ConnectionRefusedError):
            local.close()
            self._reject(p, "unknown service", f"no local service {service!r}", NOT_FOUND)
            return
        except (BlockingIOError, OSError) as exc:
            local.close()
            reason = exc.strerror or str(exc)
            if isinstance(exc, BlockingIOError):
                reason = "its backlog is full"
            self._reject(p, "service unavailable", f"service {service!r}: {reason}", UNAVAILABLE)
            return
        try:
            layer, early = p.handshake.accept()
        except IPCError as exc:
            local.close()
            self._fail(p, "protocol error", str(exc))
            return
        except Exception:
            local.close()
            raise
        self._pending.pop(p.fd, None)
        self._cancel(p)
        self._flush(p)  # the success reply goes out before any relayed byte
        ctx = self.ctx
        if p.fd not in ctx:  # the peer vanished while we answered (reset)
            local.close()
            return
        ctx.add_switch(p.fd, local)
        ctx.set_tag(p.fd, "network")
        ctx.set_tag(local.fileno(), "local")
        if layer is not None:
            ctx.set_switch_codec(p.fd, layer)
        if early:
            ctx.feed_switch(p.fd, early)
        self.metrics.switched_total.inc()
        log.info(
            "%s: %s -> %r (%.1f ms)",
            self.name,
            _peer(p),
            service,
            (time.monotonic() - p.started) * 1000,
        )
        if self.on_switched is not None:
            try:
                self.on_switched(p.fd, p.handshake, layer)
            except Exception:
                log.exception("%s: on_switched failed for %s", self.name, _peer(p))

    def _reject(self, p: _Pending, kind: str, reason: str, status: int) -> None:
        with contextlib.suppress(IPCError):
            p.handshake.reject(reason, status)
        self._fail(p, kind, reason)

    def _fail(self, p: _Pending, kind: str, reason: str, flush: bool = True) -> None:
        """Log, count, flush what the handshake wants to say, close."""
        self._count_failure(kind, p, reason)
        self._pending.pop(p.fd, None)
        self._cancel(p)
        if flush:
            self._flush(p)
        self.ctx.close(p.fd, flush=flush)
        if not flush:
            self._network_fds.discard(p.fd)
            self.metrics.connections_open.dec()

    def _finish(self, p: _Pending) -> None:
        self._pending.pop(p.fd, None)
        self._cancel(p)
        self.ctx.close(p.fd, flush=True)

    def _count_failure(self, kind: str, p: _Pending, reason: str) -> None:
        self.metrics.handshake_failures.inc(reason=kind)
        log.warning("%s: %s: %s", self.name, _peer(p), reason)

    def _timeout(self, p: _Pending) -> None:
        if self._pending.get(p.fd) is p:
            p.deadline = None
            self._reject(
                p, "timeout", f"handshake not finished after {self.handshake_timeout} s", 408
            )

    def _cancel(self, p: _Pending) -> None:
        for handle in (p.deadline, p.settle):
            if handle is not None:
                handle.cancel()
        p.deadline = p.settle = None

    def _flush(self, p: _Pending) -> None:
        data = p.handshake.data_to_send()
        if data and p.fd in self.ctx:
            self.ctx.send_raw(p.fd, data)

    def _sock(self, fd: int) -> socket.socket:
        return self.ctx.socket(fd)

    # ------------------------------------------------------------- metrics

    def _accept_metrics(self, lfd: int) -> None:
        lsock = self.ctx.socket(lfd)
        for _ in range(16):
            try:
                sock, _addr = lsock.accept()
            except OSError:
                return
            sock.setblocking(False)
            fd = self.ctx.add_external(sock)
            self._http[fd] = HttpResponder(self.metrics.registry, health=self._health)
            self.ctx.call_later(self.handshake_timeout, lambda fd=fd: self._http_timeout(fd))

    def _on_http(self, fd: int) -> None:
        try:
            data = self.ctx.socket(fd).recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.refresh_metrics()
        responder = self._http[fd]
        out = responder.receive_data(data)
        if out:
            self.ctx.send_raw(fd, out)
        if responder.done:
            self._http.pop(fd, None)
            self.ctx.close(fd, flush=True)

    def _http_timeout(self, fd: int) -> None:
        if self._http.pop(fd, None) is not None:
            self.ctx.close(fd)

    def _health(self) -> str | None:
        return "stopping" if self._stopping else None

    def refresh_metrics(self) -> None:
        """Copy the Context's relay counters into the exported metrics."""
        m = self.metrics
        for tag, direction in (("network", "in"), ("local", "out")):
            now = self.ctx.stats.get(tag, [0, 0])
            last = self._last_stats[tag]
            m.bytes.inc(now[0] - last[0], direction=direction)
            m.messages.inc(now[1] - last[1], direction=direction)
            self._last_stats[tag] = list(now)


def _peer(p: _Pending) -> str:
    """The peer name for log lines: a handshake may know better than the
    socket (ipc-websocketd --trust-proxy: X-Forwarded-For) by setting ``peer``."""
    return getattr(p.handshake, "peer", None) or p.peer


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-file limit towards ``wanted`` (two descriptors per
    relayed connection), within the hard limit; a shell's default soft limit
    of 1024 would cap a daemon at ~500 connections. Returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.info(
            "open-file limit %d allows about %d connections (--max-connections asks for more)",
            soft,
            (soft - 64) // 2,
        )
    return soft


def _peer_name(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr) or "unix-peer"


def _error_kind(reason: str) -> str:
    if "too large" in reason or "limit is" in reason:
        return "oversize"
    if "not reading" in reason:
        return "slow peer"
    if "tls" in reason or "websocket" in reason:
        return "protocol"
    return "io"


def open_listeners(
    daemon: Daemon,
    common: CommonOptions,
    factory: HandshakeFactory,
    default_listen: str,
    *,
    listen: bool = True,
) -> None:
    """Listeners for a daemon: systemd's sockets when socket-activated (one
    named ``metrics`` serves /metrics), else ``--listen`` / ``$ADDRESS`` /
    ``default_listen`` (none with ``listen=False``); plus ``--metrics``."""
    activated = systemd.listen_fds()
    for sock, fdname in activated:
        if fdname == "metrics":
            daemon.serve_metrics(sock)
        else:
            daemon.listen(sock, factory)
    if not activated and listen:
        for address in common.listen_addresses(default_listen):
            daemon.listen(open_listener(address), factory)
    if common.metrics is not None and not any(n == "metrics" for _, n in activated):
        daemon.serve_metrics(open_listener(common.metrics))
