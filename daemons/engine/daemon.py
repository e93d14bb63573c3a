"""The engine every network-facing daemon shares (ipc-tcpd, ipc-tlsd, ipc-websocketd).

Theory of operation
-------------------
A daemon listens on network sockets. Each accepted peer goes through a
protocol-specific, Sans-I/O :class:`Handshake` (TCPd's service name, TLS then
the name, or a WebSocket upgrade) while the engine does the I/O:

1. accept (over ``--max-connections``, or ``--max-connections-per-ip`` from
   one source address: closed at once, counted, logged at most every few
   seconds); the socket joins the Context as an EXTERNAL descriptor and a
   handshake deadline starts;
2. every EXTERNAL event: one ``recv``, ``handshake.receive_data``, its
   ``data_to_send`` written through the Context (queued, never blocking);
3. once the peer names a service: the allow/deny policy, then a connection to
   ``$RUNDIR/SERVICE``; success -> ``handshake.accept()`` gives the layer for
   the switched phase and the LibIPC bytes that arrived early; the Context
   switches the pair and from then on relays without the engine. A service
   whose lock carries the ``peer-info`` or ``handoff`` mark is reached through
   its door instead (:mod:`daemons.engine.doors`): the peer information first,
   the peer's socket itself with it for a hand-off, then the service's
   verdict within the handshake deadline;
4. any failure (bad input, refused or unknown service, deadline) -> the
   handshake's refusal bytes are flushed, the socket closed, the reason logged
   and counted. Nothing else is affected;
5. a switched TCP connection with no byte either way for ``--idle-timeout``
   seconds is closed (a sweep reads the kernel's TCP_INFO: nothing on the
   relay's hot path).

One owner per descriptor: every descriptor the daemon watches has exactly
one owner in a table (``fd -> callable(event)``): a listener, a pending
handshake, a /metrics client, a local service of ours and its clients (the
control service, the outbound side, ipcd's router), a switched connection.
An event goes to the owner of its descriptor (a CONNECTION to the owner of
the service it came in on); a DISCONNECTION first updates the engine's own
counts (open connections, per-source limits, idle watch, error kinds), then
goes to the owner, which is forgotten. Whoever adds a descriptor owns it
(:meth:`Daemon.own`); :meth:`Daemon.drop` closes one and forgets its owner.

Local clients of the daemon's own services (the outbound side, ``NAME.ctl``,
ipcd's ``ipc``) must send their request within the handshake timeout too
(:class:`~daemons.engine.deadlines.RequestDeadlines`); every "must happen by
then" of the engine is a :class:`~daemons.engine.deadlines.Deadlines`.

The engine also serves ``--metrics`` (Prometheus text and /healthz), the
local control service ``NAME.ctl`` (:meth:`Daemon.serve_control`: the same
counters as JSON, for ``ipc status``), turns SIGTERM/SIGINT into a clean stop,
SIGHUP into ``on_reload``, and speaks the systemd notify protocol (READY,
STOPPING, RELOADING, WATCHDOG).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import resource
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipc_core import (
    Context,
    Event,
    EventType,
    IPCError,
    Layer,
    PeerClosed,
    ProtocolError,
    ServiceBusy,
    socket_path,
)
from ipc_core.peerinfo import PeerInfoTooLarge

from . import systemd
from .control import ControlService, MetricsHttp
from .deadlines import Deadlines
from .doors import Doors
from .errors import ErrorKind, Failure, HandshakeRefused, LocalRefused
from .handshake import (
    DescribesPeer,
    Front,
    Handshake,
    HandshakeFactory,
    HandsOver,
    KnowsClient,
    NamesPeer,
    Settles,
    describes_peer,
    hands_over,
    knows_client,
    names_peer,
    settles,
)
from .listeners import bound_address, exposed_addresses, peer_name, raise_fd_limit, tune_tcp
from .log import LogThrottle, plural
from .metrics import DaemonMetrics
from .policy import ServiceAccess, exposure_warning, network_refusal, policy_summary
from .trust import TrustedNetworks

__all__ = ["Daemon", "Owner", "source_key", "tcp_idle_seconds"]

log = logging.getLogger("ipc.daemon")

_RECV_SIZE = 65536
#: accept() errors that mean "out of descriptors or memory": pause, do not spin.
_ACCEPT_PAUSE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

#: What owns a descriptor: called with every event of that descriptor.
Owner = Callable[[Event], None]


@dataclass(eq=False)
class _Pending:
    """A network peer still in its handshake."""

    fd: int
    peer: str
    handshake: Handshake
    started: float
    #: The handshake's optional capabilities, decided once at accept.
    settles: Settles | None = None
    names_peer: NamesPeer | None = None
    describes: DescribesPeer | None = None
    knows_client: KnowsClient | None = None
    hands_over: HandsOver | None = None
    #: Whether the peer sent any byte: one that closes having sent none is a
    #: browser's preconnect or a port check, not worth a warning.
    spoke: bool = False
    #: The real client once the protocol named it (PROXY header, trusted
    #: forwarding header), as a log name.
    client: str | None = None
    #: While a peer-info service decides: the network socket (out of the
    #: Context, so its bytes wait in the kernel) and the door connection.
    parked: socket.socket | None = None
    door: socket.socket | None = None

    @property
    def who(self) -> str:
        """The peer name for log lines: the real client if the protocol named
        it, the handshake's if it knows better, else the socket's."""
        if self.client is not None:
            return f"{self.client} (via {self.peer})"
        return (self.names_peer is not None and self.names_peer.peer) or self.peer


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
        max_connections_per_ip: int = 64,
        idle_timeout: float = 0.0,
    ) -> None:
        self.name = name
        self.ctx = ctx
        self.access = access
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        #: Network connections one source may hold (IPv4 address, IPv6 /64); 0 = no cap.
        self.max_connections_per_ip = max_connections_per_ip
        self.peer_timeout = peer_timeout  # TCP keepalive / user timeout (tune_tcp)
        #: Close a switched TCP connection with no byte either way this long; 0 = off.
        self.idle_timeout = idle_timeout
        raise_fd_limit(2 * max_connections + 64)
        self._throttles: dict[str, LogThrottle] = {}
        self.metrics = DaemonMetrics()
        #: SIGHUP: re-read what can be re-read (certificates, CRLs).
        self.on_reload: Callable[[], object] | None = None
        #: Called once when the daemon stops (SIGTERM/SIGINT), before the loop
        #: ends: ipc-websocketd sends its close frames here.
        self.on_stop: Callable[[], None] | None = None
        #: Called as ``on_switched(fd, handshake, layer)`` once a network peer
        #: is switched (ipc-websocketd tracks its connections for keepalive;
        #: it may take ownership of ``fd`` with :meth:`own`).
        self.on_switched: Callable[[int, Handshake, Layer | None], None] | None = None
        #: Wraps every accepted connection's handshake (``--proxy-protocol``).
        self.front: Front | None = None
        #: Hand a plain LibIPC stream's socket to a service that takes it
        #: (``handoff`` lock mark); False: ``--no-handoff``, always relay.
        self.handoff = True
        #: Services with a door: peer information and hand-offs (doors.py).
        self.doors = Doors(self)
        #: Proxies that speak for their clients (``--proxy-protocol``,
        #: ``--trust-proxy``): not counted by ``--max-connections-per-ip``
        #: themselves; each connection counts under the client its
        #: handshake names (:class:`~daemons.engine.handshake.KnowsClient`).
        self.trusted_proxies: TrustedNetworks | None = None
        self._owners: dict[int, Owner] = {}
        self._listeners: dict[int, tuple[socket.socket, HandshakeFactory]] = {}
        self._pending: dict[int, _Pending] = {}
        self._handshake_deadlines: Deadlines[int] = Deadlines(ctx)
        self._settles: Deadlines[int] = Deadlines(ctx)
        #: ``--metrics`` (HTTP) and the control service ``NAME.ctl``.
        self.metrics_http = MetricsHttp(self)
        self.control: ControlService | None = None
        self._network_fds: set[int] = set()
        self._sources: dict[str, int] = {}  # open network connections per source
        self._source_of: dict[int, str] = {}
        self._idle: dict[int, tuple[Any, str]] = {}  # switched fd -> (socket, peer)
        self._last_stats = {"network": (0, 0), "local": (0, 0)}
        self._stopping = False
        self._watchdog: float | None = None
        self._started = time.monotonic()
        ctx.switch_events = False
        if idle_timeout > 0:
            self._idle_period = min(max(idle_timeout / 4, 0.05), 5.0)
            ctx.call_later(self._idle_period, self._sweep_idle)

    # -------------------------------------------------------------- owners

    def own(self, fd: int, owner: Owner) -> None:
        """Route every event of ``fd`` to ``owner`` (a CONNECTION on a
        service ``fd`` too). Replaces any previous owner: whoever adds a
        descriptor owns it, so a reused number never reaches an old owner."""
        self._owners[fd] = owner

    def disown(self, fd: int) -> None:
        """Forget ``fd``'s owner (the descriptor left the Context without a
        DISCONNECTION event: handed over, paused, closed at once)."""
        self._owners.pop(fd, None)

    def drop(self, fd: int, *, flush: bool = False) -> None:
        """Close ``fd``. Its owner stays until a DISCONNECTION (if the Context
        reports one) or until the number is owned again; a network
        connection is uncounted now, as no event may come to do it."""
        if not flush:
            self._network_closed(fd)
        self.ctx.close(fd, flush=flush)

    def owner_of(self, fd: int) -> Owner | None:
        """The owner of ``fd``, if any (for tests and introspection)."""
        return self._owners.get(fd)

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
        self._add_listener(sock, factory)
        log.info("%s: listening on %s", self.name, bound_address(sock))

    def _add_listener(self, sock: socket.socket, factory: HandshakeFactory) -> None:
        sock.setblocking(False)
        fd = self.ctx.add_external(sock)
        self._listeners[fd] = (sock, factory)
        self.own(fd, self._on_listener)

    @property
    def listening_sockets(self) -> list[socket.socket]:
        """The network listeners (their bound addresses decide, e.g., the
        Host names ipc-websocketd accepts)."""
        return [sock for sock, _factory in self._listeners.values()]

    def log_policy(self) -> None:
        """Say at start who may reach what, and warn when every interface
        (or any non-loopback address) serves every unprotected service:
        ``--listen :9000`` alone is an easy way to publish a host's services."""
        if not self._listeners:
            return
        log.info("%s: %s", self.name, policy_summary(self.access))
        warning = exposure_warning(exposed_addresses(self.listening_sockets), self.access)
        if warning is not None:
            log.warning("%s: %s", self.name, warning)

    def serve_metrics(self, sock: socket.socket) -> None:
        """Serve /metrics and /healthz on ``sock`` (plain HTTP, see
        :class:`~daemons.engine.control.MetricsHttp`)."""
        self.metrics_http.serve(sock)

    def serve_control(self, service: str, *, flag: str = "--service-name") -> None:
        """Serve the local control service ``service`` (e.g. ``tcp.ctl``, see
        :class:`~daemons.engine.control.ControlService`); ``flag`` is what a
        user changes to run a second instance (named when the name is taken)."""
        self.control = ControlService(self, service, flag)

    def service_init(self, service: str, flag: str, marks: tuple[str, ...] = ()) -> int:
        """A local-only service of ours (``ctx.service_init(local_only=True)``);
        "already running" names ``flag``, the way to run another instance.
        The caller owns the descriptor (:meth:`own`)."""
        try:
            return self.ctx.service_init(service, local_only=True, marks=marks)
        except ServiceBusy as exc:
            raise ServiceBusy(f"{exc} (use {flag} to run another)") from None

    def status(self) -> dict[str, Any]:
        """What the control service answers: who we are and the counters."""
        self.refresh_metrics()
        return {
            "daemon": self.name,
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "metrics": self.metrics.registry.snapshot(),
        }

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
        self.metrics.errors.inc(kind=ErrorKind.INTERNAL)
        pending = self._pending.pop(event.fd, None)
        if pending is not None:
            self._cancel(pending)
        if event.fd >= 0 and event.fd not in self._listeners and event.fd in self.ctx:
            self.drop(event.fd)

    def stop(self) -> None:
        """Stop the loop (once): ``on_stop`` first, then the Context."""
        if self._stopping:
            return
        self._stopping = True
        log.info("%s: stopping", self.name)
        systemd.stopping()
        if self.on_stop is not None:
            try:
                self.on_stop()
            except Exception:
                log.exception("%s: on_stop failed", self.name)
        self.ctx.stop()

    def close(self) -> None:
        """Close every descriptor; remove our services' sockets and locks."""
        self._owners.clear()
        self.ctx.close_all()

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
        """Dispatch one Context event to the owner of its descriptor."""
        fd = event.fd
        etype = event.type
        if etype is EventType.DISCONNECTION:
            self._closed(event)
            owner = self._owners.pop(fd, None)
        elif etype is EventType.CONNECTION:
            owner = self._owners.get(event.origin)
        else:
            owner = self._owners.get(fd)
        if owner is not None:
            owner(event)

    def _closed(self, event: Event) -> None:
        """The engine's own bookkeeping for any closed descriptor."""
        self._idle.pop(event.fd, None)
        if self._network_closed(event.fd) and event.reason:
            self.metrics.errors.inc(kind=ErrorKind.of(event.error))

    def relayed(self, event: Event) -> None:
        """The owner of a switched pair's ends: the Context relays without the
        engine, and :meth:`_closed` already did the bookkeeping."""

    # -------------------------------------------------------------- accept

    def _on_listener(self, event: Event) -> None:
        if event.type is EventType.EXTERNAL:
            self._accept(event.fd)

    def _accept(self, lfd: int) -> None:
        lsock, factory = self._listeners[lfd]
        for _ in range(64):
            try:
                sock, addr = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self.accept_failed(exc, lfd)
                return
            peer = peer_name(addr)
            proxies = self.trusted_proxies
            source = None if proxies and proxies.trusts_peer(addr) else source_key(addr)
            refusal = self._over_limit(source)
            if refusal is not None:
                self._refuse(peer, *refusal)
                sock.close()
                continue
            try:
                handshake = factory(peer)
                if self.front is not None:
                    handshake = self.front.wrap(addr, handshake)
            except Exception as exc:  # a bug or a configuration problem: not the peer's
                self._refuse(peer, Failure.INTERNAL, f"cannot start a handshake: {exc}")
                log.debug("%s: handshake factory failed", self.name, exc_info=True)
                self.metrics.errors.inc(kind=ErrorKind.INTERNAL)
                sock.close()
                continue
            self._start_handshake(sock, peer, source, handshake)

    def _start_handshake(
        self, sock: socket.socket, peer: str, source: str | None, handshake: Handshake
    ) -> None:
        sock.setblocking(False)
        tune_tcp(sock, self.peer_timeout)
        fd = self.ctx.add_external(sock)
        self._network_opened(fd, source)
        # Optional capabilities, decided once per connection, not per read.
        p = _Pending(
            fd,
            peer,
            handshake,
            time.monotonic(),
            settles(handshake),
            names_peer(handshake),
            describes_peer(handshake),
            knows_client(handshake),
            hands_over(handshake),
        )
        self._pending[fd] = p
        self.own(fd, self._on_pending)
        self._handshake_deadlines.start(fd, self.handshake_timeout, lambda: self._timeout(p))
        log.debug("%s: connection from %s (fd %d)", self.name, peer, fd)

    def _over_limit(self, source: str | None) -> tuple[Failure, str] | None:
        """``(kind, reason)`` if a new connection from ``source`` is one too many."""
        if len(self._network_fds) >= self.max_connections:
            return (
                Failure.TOO_MANY,
                f"{plural(len(self._network_fds), 'connection')} open (--max-connections)",
            )
        return self._over_source_limit(source)

    def _over_source_limit(self, source: str | None) -> tuple[Failure, str] | None:
        cap = self.max_connections_per_ip
        if source is not None and cap and self._sources.get(source, 0) >= cap:
            return (
                Failure.TOO_MANY_FROM_SOURCE,
                f"{plural(cap, 'connection')} open from {source} (--max-connections-per-ip)",
            )
        return None

    def _refuse(self, peer: str, kind: Failure, reason: str) -> None:
        """Count a connection closed at accept; log it, at most every few seconds
        per kind (one flooding peer must not flood the log too)."""
        self.metrics.handshake_failures.inc(reason=kind)
        more = self.throttle(kind).due()
        if more is not None:
            log.warning("%s: refusing %s: %s%s", self.name, peer, reason, more)

    def throttle(self, kind: str) -> LogThrottle:
        """The log throttle of one recurring condition (one per ``kind``)."""
        throttle = self._throttles.get(kind)
        if throttle is None:
            throttle = self._throttles[kind] = LogThrottle()
        return throttle

    def _network_opened(self, fd: int, source: str | None) -> None:
        self._network_fds.add(fd)
        self.metrics.connections_total.inc()
        self.metrics.connections_open.inc()
        if source is not None:
            self._count_source(fd, source)

    def _count_source(self, fd: int, source: str) -> None:
        self._sources[source] = self._sources.get(source, 0) + 1
        self._source_of[fd] = source

    def _uncount_source(self, fd: int) -> None:
        source = self._source_of.pop(fd, None)
        if source is not None:
            left = self._sources[source] - 1
            if left:
                self._sources[source] = left
            else:
                del self._sources[source]

    def _network_closed(self, fd: int) -> bool:
        """Forget a closed network connection (once); False if it was not one."""
        if fd not in self._network_fds:
            return False
        self._network_fds.discard(fd)
        self.metrics.connections_open.dec()
        self._uncount_source(fd)
        return True

    def accept_failed(self, exc: OSError, lfd: int) -> None:
        """An accept on listener ``lfd`` failed: count it, log it at most every
        few seconds (at the descriptor limit the listener is retried every
        100 ms and would flood the log), and pause the listener when out of
        descriptors or memory."""
        self.metrics.errors.inc(kind=ErrorKind.ACCEPT)
        more = self.throttle(ErrorKind.ACCEPT).due()
        if more is not None:
            hint = ""
            if exc.errno == errno.EMFILE:
                soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                hint = (
                    f" (open-file limit {soft}: raise it, LimitNOFILE= under systemd, "
                    "or lower --max-connections)"
                )
            log.error("%s: accept failed: %s%s%s", self.name, exc.strerror or exc, hint, more)
        if exc.errno in _ACCEPT_PAUSE_ERRNOS:
            self._pause_accept(lfd)

    def _pause_accept(self, lfd: int) -> None:
        """Stop accepting for 100 ms (EMFILE: the backlog stays readable, and
        retrying at once would spin)."""
        owner = self._owners.get(lfd)
        entry = self._listeners.pop(lfd, None)
        sock = entry[0] if entry is not None else self.ctx.socket_of(lfd)
        self.disown(lfd)
        self.ctx.remove_external(lfd)

        def resume() -> None:
            if self._stopping:
                return
            if entry is not None:
                self._add_listener(sock, entry[1])
            elif owner is not None:
                self.own(self.ctx.add_external(sock), owner)

        self.ctx.call_later(0.1, resume)

    # ----------------------------------------------------------- handshake

    def _on_pending(self, event: Event) -> None:
        p = self._pending.get(event.fd)
        if p is None:
            return
        if event.type is EventType.EXTERNAL:
            self._on_handshake_data(p)
        elif event.type is EventType.DISCONNECTION:
            del self._pending[event.fd]
            self._cancel(p)
            self._count_failure(Failure.PEER_CLOSED, p, event.reason or "closed")

    def _on_handshake_data(self, p: _Pending) -> None:
        try:
            data = self.ctx.socket_of(p.fd).recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.ECONNRESET and not p.spoke:
                # A port check (HAProxy's `check`, a load balancer's probe)
                # often resets at once: counted, logged at debug level only.
                reason = "reset the connection without sending anything (a health check?)"
                self._fail(p, Failure.PEER_CLOSED, reason, flush=False)
                return
            self._fail(p, Failure.READ_ERROR, f"read failed: {exc.strerror or exc}", flush=False)
            return
        if data:
            p.spoke = True
        try:
            p.handshake.receive_data(data)
        except PeerClosed:
            if p.spoke:
                reason = "closed the connection during the handshake"
            else:
                reason = "closed the connection without sending anything (a preconnect?)"
            self._fail(p, Failure.PEER_CLOSED, reason)
            return
        except ProtocolError as exc:
            kind = exc.failure if isinstance(exc, HandshakeRefused) else Failure.PROTOCOL_ERROR
            self._fail(p, kind, str(exc))
            return
        self._flush(p)
        if p.fd not in self._pending:
            return
        # Asked until the service is named: a PROXY header names a client
        # first, a trusted forwarding header behind it may name another.
        if p.knows_client is not None and not self._learn_client(p):
            return
        if p.handshake.finished:
            self._finish(p)
            return
        if p.handshake.service is not None:
            self._connect_local(p, p.handshake.service)
            return
        if p.settles is not None:
            settle_after = p.settles.settle_after
            if settle_after is not None:
                self._settles.start(p.fd, settle_after, lambda: self._settle(p))

    def _learn_client(self, p: _Pending) -> bool:
        """The handshake may have named the real client: count the connection
        under it from now on (a proxy's connections are not limited as the
        proxy's). False if that client is over its limit (refused)."""
        assert p.knows_client is not None
        client = p.knows_client.client
        if client is None:
            return True
        ip, port = client
        name = ip if port is None else (f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
        if name == p.client:
            return True
        p.client = name
        source = source_key((ip, port or 0))
        if source is None or self._source_of.get(p.fd) == source:
            return True
        self._uncount_source(p.fd)
        refusal = self._over_source_limit(source)
        if refusal is not None:
            self._reject(p, *refusal, status=503)
            return False
        self._count_source(p.fd, source)
        return True

    def _settle(self, p: _Pending) -> None:
        """The peer paused mid-handshake (TCPd name without terminator)."""
        if self._pending.get(p.fd) is not p or p.settles is None:
            return
        try:
            p.settles.settle()
        except ProtocolError as exc:
            self._fail(p, Failure.PROTOCOL_ERROR, str(exc))
            return
        if p.handshake.service is not None:
            self._connect_local(p, p.handshake.service)

    def _connect_local(self, p: _Pending, service: str) -> None:
        """The peer named ``service``: policy, connection (through the door of
        a service that wants peer information), then the switch."""
        try:
            local, offer, handing = self.doors.open_local(p, service)
        except LocalRefused as exc:
            self._reject(p, exc.failure, exc.reason)
            return
        except PeerInfoTooLarge as exc:
            self._reject(p, Failure.PROTOCOL_ERROR, str(exc), status=431)
            return
        except (IPCError, OSError) as exc:  # a handshake's facts that do not fit the record
            self._reject(p, Failure.INTERNAL, f"cannot describe the peer: {exc}", status=500)
            return
        if offer is not None:
            self.doors.offer(p, service, local, offer, handing)
            return
        self._accept_peer(p, local, service, b"")

    def _accept_peer(
        self, p: _Pending, local: socket.socket, service: str, leftover: bytes
    ) -> None:
        try:
            layer, early = p.handshake.accept()
        except IPCError as exc:
            local.close()
            self._fail(p, Failure.PROTOCOL_ERROR, str(exc))
            return
        except Exception:
            local.close()
            raise
        self._switch(p, local, layer, early, service)
        if leftover and p.fd in self.ctx:
            self.ctx.feed_switch(local.fileno(), leftover)

    def _switch(
        self, p: _Pending, local: socket.socket, layer: Layer | None, early: bytes, service: str
    ) -> None:
        """Hand the pair to the Context, which relays from then on."""
        self._forget_pending(p)
        self._flush(p)  # the success reply goes out before any relayed byte
        ctx = self.ctx
        if p.fd not in ctx:  # the peer vanished while we answered (reset)
            local.close()
            return
        ctx.add_switch(p.fd, local)
        self.own(p.fd, self.relayed)
        self.own(local.fileno(), self.relayed)
        ctx.set_tag(p.fd, "network")
        ctx.set_tag(local.fileno(), "local")
        if layer is not None:
            ctx.set_switch_codec(p.fd, layer)
        if early:
            ctx.feed_switch(p.fd, early)
        self.metrics.switched_total.inc()
        self.watch_idle(p.fd, p.who)
        log.info(
            "%s: %s -> %r (%.1f ms)",
            self.name,
            p.who,
            service,
            (time.monotonic() - p.started) * 1000,
        )
        if self.on_switched is not None:
            try:
                self.on_switched(p.fd, p.handshake, layer)
            except Exception:
                log.exception("%s: on_switched failed for %s", self.name, p.who)

    def _reject(self, p: _Pending, kind: Failure, reason: str, status: int | None = None) -> None:
        with contextlib.suppress(IPCError):
            p.handshake.reject(reason, kind.status if status is None else status)
        self._fail(p, kind, reason)

    def _fail(self, p: _Pending, kind: Failure, reason: str, *, flush: bool = True) -> None:
        """Log, count, flush what the handshake wants to say, close."""
        self._count_failure(kind, p, reason)
        self._forget_pending(p)
        if flush:
            self._flush(p)
        self.drop(p.fd, flush=flush)

    def _finish(self, p: _Pending) -> None:
        self._forget_pending(p)
        # An answer may come in pieces (ipc-websocketd: a static file): the
        # Context asks for the next one each time the last is written, so a
        # peer that reads slowly (or never) holds one piece, not the file.
        data = p.handshake.data_to_send()
        if data and p.fd in self.ctx:
            self.ctx.send_raw(p.fd, data)
        self.ctx.close(p.fd, flush=True, refill=p.handshake.data_to_send)

    def _count_failure(self, kind: Failure, p: _Pending, reason: str) -> None:
        self.metrics.handshake_failures.inc(reason=kind)
        # A peer that said nothing and left (browsers preconnect, health
        # checks probe the port) is counted, and logged at debug level only.
        level = logging.DEBUG if kind is Failure.PEER_CLOSED and not p.spoke else logging.WARNING
        log.log(level, "%s: %s: %s", self.name, p.who, reason)

    def _timeout(self, p: _Pending) -> None:
        if self._pending.get(p.fd) is p:
            waited = p.door is not None
            local = self.doors.unpark(p)
            if local is not None:
                local.close()
            if waited:
                self._reject(
                    p,
                    Failure.TIMEOUT,
                    f"no verdict from the service within the handshake timeout "
                    f"({self.handshake_timeout} s)",
                    503,
                )
                return
            self._reject(
                p,
                Failure.TIMEOUT,
                f"handshake not finished after {self.handshake_timeout} s",
                408,
            )

    def _forget_pending(self, p: _Pending) -> None:
        if self._pending.get(p.fd) is p:
            del self._pending[p.fd]
        self._cancel(p)

    def _cancel(self, p: _Pending) -> None:
        self._handshake_deadlines.done(p.fd)
        self._settles.done(p.fd)

    def _flush(self, p: _Pending) -> None:
        data = p.handshake.data_to_send()
        if data and p.fd in self.ctx:
            self.ctx.send_raw(p.fd, data)

    # ---------------------------------------------------------------- idle

    def watch_idle(self, fd: int, peer: str) -> None:
        """Close switched TCP connection ``fd`` after ``idle_timeout`` seconds
        with no byte either way (inbound ones are watched by the engine; the
        outbound side calls this for its own)."""
        if self.idle_timeout <= 0 or fd not in self.ctx:
            return
        sock = self.ctx.socket_of(fd)
        # A descriptor added as a bare number has a socket-like wrapper, no family.
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            self._idle[fd] = (sock, peer)

    def _sweep_idle(self) -> None:
        """Every T/4 (at most 5 s): O(switched) TCP_INFO reads, no per-message
        cost; a connection closes between T and T + one period of silence."""
        self.ctx.call_later(self._idle_period, self._sweep_idle)
        for fd, (sock, peer) in list(self._idle.items()):
            if fd not in self.ctx or self.ctx.socket_of(fd) is not sock:
                self._idle.pop(fd, None)
                continue
            idle = tcp_idle_seconds(sock)
            if idle is None or idle < self.idle_timeout:
                continue
            del self._idle[fd]
            self.metrics.idle_closed.inc()
            log.info(
                "%s: %s: idle for %.1f s (--idle-timeout %g); closing",
                self.name,
                peer,
                idle,
                self.idle_timeout,
            )
            self.drop(fd)

    def health(self) -> str | None:
        """None while serving, else why not (for /healthz)."""
        return "stopping" if self._stopping else None

    def refresh_metrics(self) -> None:
        """Copy the Context's relay counters into the exported metrics."""
        m = self.metrics
        for tag, direction in (("network", "in"), ("local", "out")):
            counters = self.ctx.stats.get(tag)
            if counters is None:
                continue
            last_bytes, last_messages = self._last_stats[tag]
            m.bytes.inc(counters.bytes - last_bytes, direction=direction)
            m.messages.inc(counters.messages - last_messages, direction=direction)
            self._last_stats[tag] = (counters.bytes, counters.messages)


def source_key(addr: Any) -> str | None:
    """What ``--max-connections-per-ip`` counts by: an IPv4 address (also when
    IPv4-mapped), the /64 of an IPv6 address (one host or site usually owns a
    whole /64), None for Unix peers (not limited)."""
    if not (isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[0], str)):
        return None
    try:
        ip = ipaddress.ip_address(addr[0].partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


# struct tcp_info (linux/tcp.h): tcpi_last_data_sent at byte 44, tcpi_last_data_recv
# at byte 52 (milliseconds since the last data segment each way).
_TCP_INFO_LAST = struct.Struct("=I4xI")
_TCP_INFO_SIZE = 104


def tcp_idle_seconds(sock: socket.socket) -> float | None:
    """Seconds since the last data byte either way on a TCP socket, from the
    kernel (keepalive probes and bare ACKs do not count); None if unknown."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    if len(info) < 56:
        return None
    sent, received = _TCP_INFO_LAST.unpack_from(info, 44)
    return min(sent, received) / 1000
