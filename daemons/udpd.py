"""ipc-udpd: datagrams to and from local LibIPC services (UDPd).

Inbound: ``--listen :5140=SERVICE``; every remote ``address:port`` that sends
a datagram is a *flow* with its own LibIPC connection to ``$RUNDIR/SERVICE``
(so the service tells its clients apart); one datagram is one message, and
each message the service writes on that connection goes back to that
address as one datagram. A flow silent both ways for ``--flow-timeout``
seconds expires (its connection is closed); flows are limited in total
(``--max-flows``) and per source address (``--max-flows-per-ip``).

Outbound: the daemon is the local service ``udp`` (``--service-name``,
local-only): a client sends ``udp://HOST:PORT``, gets ``ok``, then each
message it writes is one datagram to that address and each datagram from
there one message back.

UDP cannot push back. Queues are bounded (the Context's high-water mark per
flow), and whatever does not fit is dropped: counted in
``ipc_udp_dropped_total{reason=...}`` and logged at most every few seconds
per reason (:class:`~daemons.engine.log.LogThrottle`). The pure parts (the
flow table, limits and expiry; flag and request syntax; datagram sizes) are
Sans-I/O in :mod:`daemons.engine.flows` and :mod:`daemons.codecs.udp`; this
module is the I/O.
"""

from __future__ import annotations

import concurrent.futures
import errno
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ipc_core import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Context,
    Event,
    EventType,
    FrameDecoder,
    MessageTooLarge,
    ProtocolError,
    door,
    door_path,
    service_marks,
)
from ipc_core.peerinfo import PeerInfo

from .codecs.udp import (
    Drop,
    UdpTarget,
    max_payload,
    parse_udp_target,
)
from .engine import systemd
from .engine.daemon import Daemon, source_key
from .engine.deadlines import Deadlines, RequestDeadlines
from .engine.errors import Failure, LocalRefused, StartupError
from .engine.flows import Flow, FlowLimits, FlowTable
from .engine.listeners import (
    ListenAddress,
    bound_address,
    open_listener,
    parse_listen,
    peer_name,
)
from .engine.local import connect_local
from .engine.log import setup_logging
from .engine.metrics import Counter, DaemonMetrics
from .engine.options import (
    LISTEN,
    CommonOptions,
    connect_timeout_option,
    libipc_command,
    logging_options,
    rundir_option,
    seconds,
)
from .engine.policy import network_refusal, service_name_error
from .engine.startup import bind_error, starting
from .engine.trust import parse_ip

__all__ = ["Inbound", "UdpOutbound", "main", "open_udp"]

log = logging.getLogger("ipc.udpd")

#: Larger than any UDP payload: a datagram is never truncated.
_RECV_SIZE = 65536
#: Datagrams read per readiness event (then the loop serves the others).
_BATCH = 64
#: Datagrams held per flow while a peer-info service decides.
_VERDICT_QUEUE = 64
#: The lock mark of a service that asked for peer information (docs/protocol.md).
_PEER_INFO = "peer-info"


@dataclass(frozen=True)
class UdpListen:
    """One ``--listen``: where, and which local service its flows reach."""

    address: ListenAddress
    service: str

    def __str__(self) -> str:
        return f"{self.address}={self.service}"


def parse_udp_listen(spec: str) -> UdpListen:
    """Parse ``ADDRESS=SERVICE`` (ADDRESS: ``:PORT``, ``HOST:PORT`` or
    ``[IPv6]:PORT``); ``ValueError`` names what is wrong."""
    address, sep, service = spec.partition("=")
    if not sep or not service:
        raise ValueError(
            f"expected ADDRESS=SERVICE (as in :5140=syslog), got {spec!r}: "
            "every UDP port serves one local service"
        )
    reason = service_name_error(service)
    if reason:
        raise ValueError(f"bad service in {spec!r}: {reason}")
    if address.startswith("unix:"):
        raise ValueError(f"UDP listens on IP addresses, not Unix sockets: {spec!r}")
    listen = parse_listen(address)
    return UdpListen(listen, service)


#: One read of a service's stream: up to this many bytes of replies.
_LOCAL_RECV_SIZE = 256 * 1024
_pack_header = struct.Struct(">I").pack
#: Upper bound of --max-flows and --max-flows-per-ip.
MAX_FLOWS = 1_000_000


class _LiveCounter(Counter):
    """A counter whose values live in plain integers the hot path bumps
    (a labelled ``inc`` per datagram would cost more than the datagram);
    they are read when the metrics are rendered."""

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str], read: Callable[[], dict[str, int]]
    ) -> None:
        super().__init__(name, help, labelnames)
        self._read = read

    def samples(self) -> list[tuple[dict[str, str], float]]:
        for label, value in self._read().items():
            self._values[(label,)] = float(value)
        return super().samples()


class UdpMetrics:
    """ipc-udpd's own metrics, next to the engine's."""

    def __init__(self, daemon: Daemon) -> None:
        registry = daemon.metrics.registry
        #: Datagrams received from the network ("in") and sent to it ("out").
        self.datagrams = {"in": 0, "out": 0}
        #: Bytes of those datagrams (the engine's ipc_bytes_total, for ipc status).
        self.payload = {"in": 0, "out": 0}
        self._published = {"in": (0, 0), "out": (0, 0)}
        registry.register(
            _LiveCounter(
                "ipc_udp_datagrams_total",
                "Datagrams relayed, by direction (in: from the network).",
                ["direction"],
                lambda: self.datagrams,
            )
        )
        self.dropped = registry.counter(
            "ipc_udp_dropped_total", "Datagrams or messages dropped, by reason.", ["reason"]
        )
        self.flows_open = registry.gauge("ipc_udp_flows_open", "Inbound flows open now.")
        self.flows_total = registry.counter(
            "ipc_udp_flows_total", "Inbound flows opened since start."
        )
        self.flows_expired = registry.counter(
            "ipc_udp_flows_expired_total", "Inbound flows closed by --flow-timeout."
        )
        self.associations_open = registry.gauge(
            "ipc_udp_associations_open", "Outbound associations (udp:// clients) open now."
        )
        self.outbound_total = registry.counter(
            "ipc_udp_outbound_total", "Outbound requests, by result.", ["result"]
        )

    def publish(self, engine: DaemonMetrics) -> None:
        """Add what was relayed since the last call to the engine's message
        and byte counters (what ``ipc status`` shows for every daemon)."""
        for direction in ("in", "out"):
            messages, size = self.datagrams[direction], self.payload[direction]
            last_messages, last_size = self._published[direction]
            engine.messages.inc(messages - last_messages, direction=direction)
            engine.bytes.inc(size - last_size, direction=direction)
            self._published[direction] = (messages, size)


class UdpDaemon(Daemon):
    """The engine's daemon, whose counters include the datagrams."""

    udp: UdpMetrics | None = None

    def refresh_metrics(self) -> None:
        super().refresh_metrics()
        if self.udp is not None:
            self.udp.publish(self.metrics)


def _dropper(daemon: Daemon, metrics: UdpMetrics) -> Callable[[Drop, str], None]:
    """Count a drop and log it, at most every few seconds per reason."""

    def drop(reason: Drop, detail: str) -> None:
        metrics.dropped.inc(reason=reason)
        more = daemon.throttle(f"udp {reason}").due()
        if more is not None:
            log.warning("%s: dropped (%s): %s%s", daemon.name, reason, detail, more)

    return drop


# --------------------------------------------------------------------------
# Inbound: flows
# --------------------------------------------------------------------------


@dataclass(eq=False)
class _Listener:
    """One UDP socket and the local service its flows reach."""

    sock: socket.socket
    spec: UdpListen
    name: str  # bound address, for logs
    local: tuple[str | None, int | None]  # (IP, port) for peer information


@dataclass(eq=False)
class _FlowState:
    """What a flow holds: its listener, the remote address, its local
    connection (-1 once refused), and while a peer-info service decides, the
    datagrams that wait for its verdict."""

    listener: _Listener
    addr: Any
    peer: str
    limit: int
    fd: int = -1
    #: The service's byte stream -> its messages (one datagram each).
    decoder: FrameDecoder | None = None
    #: Frames for the service gathered during one batch of datagrams, sent
    #: with one write after the batch (None: nothing gathered).
    batch: bytearray | None = None
    reader: door.VerdictReader | None = None
    waiting: list[bytes] | None = None
    refused: str | None = None


_UdpFlow = Flow[tuple[int, Any]]


class Inbound:
    """The UDP listeners and their flows.

    Each flow's connection to the service is an EXTERNAL descriptor of the
    Context, framed and unframed here: the datagrams of one readiness event
    go to a flow's service in one write, and one read of the service's
    stream gives every reply it holds, sent in a tight loop. (As LibIPC
    peers of the Context, each datagram cost a write and each reply an
    event: under overload the relay was five times slower.)"""

    def __init__(self, daemon: Daemon, metrics: UdpMetrics, limits: FlowLimits) -> None:
        self.daemon = daemon
        self.ctx = daemon.ctx
        self.metrics = metrics
        self.flows: FlowTable[tuple[int, Any]] = FlowTable(limits)
        self.listeners: dict[int, _Listener] = {}
        self._drop = _dropper(daemon, metrics)
        self._verdicts: Deadlines[_UdpFlow] = Deadlines(daemon.ctx)
        #: Flows that gathered datagrams in the current batch.
        self._gathered: list[_FlowState] = []
        metrics.flows_open.set_function(lambda: len(self.flows))
        # The engine's connection counters count flows (ipc status: OPEN, TOTAL).
        daemon.metrics.connections_open.set_function(lambda: len(self.flows))
        if limits.timeout > 0:
            self._period = min(max(limits.timeout / 4, 0.05), 5.0)
            self.ctx.call_later(self._period, self._sweep)

    def listen(self, sock: socket.socket, spec: UdpListen) -> None:
        """Serve ``spec.service`` on UDP socket ``sock``."""
        sock.setblocking(False)
        name = bound_address(sock)
        local = _ip_port(sock.getsockname())
        lst = _Listener(sock, spec, name, local)
        fd = self.ctx.add_external(sock)
        self.listeners[fd] = lst
        self.daemon.own(fd, lambda event: self._on_listener(fd, lst, event))
        log.info("%s: listening on %s/udp for %r", self.daemon.name, name, spec.service)

    @property
    def sockets(self) -> list[socket.socket]:
        return [lst.sock for lst in self.listeners.values()]

    # ------------------------------------------------------------ datagrams

    def _on_listener(self, fd: int, lst: _Listener, event: Event) -> None:
        if event.type is not EventType.EXTERNAL:
            return
        sock = lst.sock
        flows = self.flows
        counts, payload = self.metrics.datagrams, self.metrics.payload
        now = time.monotonic()
        try:
            for _ in range(_BATCH):
                try:
                    data, addr = sock.recvfrom(_RECV_SIZE)
                except BlockingIOError:
                    return
                except OSError as exc:  # an ICMP error queued on the socket: not fatal
                    log.debug("%s: %s: %s", self.daemon.name, lst.name, exc.strerror or exc)
                    continue
                counts["in"] += 1
                payload["in"] += len(data)
                key = (fd, addr)
                flow = flows.get(key)
                try:
                    if flow is None:
                        flow = self._open(fd, lst, addr, key, now)
                        if flow is None:
                            continue
                    flows.touch(flow, now)
                    self._to_service(flow.state, data)
                except Exception:  # a bug costs one datagram, never the port
                    log.exception(
                        "%s: internal error on a datagram from %s", self.daemon.name, addr
                    )
        finally:
            self._flush()

    def _to_service(self, st: _FlowState, data: bytes) -> None:
        """Gather one datagram for the flow's service (sent by :meth:`_flush`),
        or drop it with its reason."""
        size = len(data)
        ctx = self.ctx
        batch = st.batch
        if (  # the hot path: a busy flow, gathering already
            batch is not None
            and size <= ctx.max_message_size
            and ctx.pending_bytes(st.fd) + len(batch) < ctx.queue_high_water
        ):
            batch += _pack_header(size)
            batch += data
            return
        if size > ctx.max_message_size:
            self._drop(
                Drop.OVERSIZE,
                f"{size}-byte datagram from {st.peer} (--max-message-size {ctx.max_message_size})",
            )
        elif st.refused is not None:
            self._drop(Drop.SERVICE_REFUSED, f"{st.peer}: {st.refused}")
        elif st.waiting is not None:
            if len(st.waiting) >= _VERDICT_QUEUE:
                self._drop(Drop.QUEUE_FULL, f"{st.peer}: the service has not decided yet")
            else:
                st.waiting.append(data)
        elif ctx.pending_bytes(st.fd) + len(batch or b"") >= ctx.queue_high_water:
            self._drop(
                Drop.QUEUE_FULL,
                f"{st.peer} -> {st.listener.spec.service!r}: the service does not read "
                f"({ctx.pending_bytes(st.fd)} bytes queued)",
            )
        else:
            if batch is None:
                batch = st.batch = bytearray()
                self._gathered.append(st)
            batch += _pack_header(size)
            batch += data

    def _flush(self) -> None:
        """Write what each flow gathered (queued by the Context if the service
        is slow; bounded by the high-water check above)."""
        gathered, self._gathered = self._gathered, []
        ctx = self.ctx
        for st in gathered:
            batch, st.batch = st.batch, None
            if batch and st.fd >= 0 and st.fd in ctx:
                ctx.send_raw(st.fd, bytes(batch))

    # ---------------------------------------------------------------- flows

    def _open(
        self, fd: int, lst: _Listener, addr: Any, key: tuple[int, Any], now: float
    ) -> _UdpFlow | None:
        """A first datagram from ``addr``: limits, policy, a connection to
        the service (through its door if it wants peer information)."""
        peer = peer_name(addr)
        source = source_key(addr)
        refusal = self.flows.refusal(source)
        if refusal is not None:
            kind = (
                Drop.TOO_MANY_FLOWS if refusal[0] == "too many flows" else Drop.TOO_MANY_FROM_SOURCE
            )
            self._drop(kind, f"new flow from {peer}: {refusal[1]}")
            return None
        service = lst.spec.service
        rundir = self.ctx.rundir
        marks = service_marks(service, rundir)
        why = network_refusal(self.daemon.access, service, rundir, marks=marks)
        if why is not None:
            self._drop(Drop.REFUSED, f"{peer}: {why}")
            return None
        wants_info = _PEER_INFO in marks
        try:
            name = door_path(service, rundir).name if wants_info else service
            local = connect_local(name, rundir)
        except LocalRefused as exc:
            reason = Drop.REFUSED if exc.failure is Failure.REFUSED else Drop.NO_SERVICE
            self._drop(reason, f"{peer}: {exc.reason}")
            return None
        st = _FlowState(lst, addr, peer, max_payload(addr))
        if wants_info and not self._offer(st, local):
            local.close()
            return None
        local.setblocking(False)
        st.fd = self.ctx.add_external(local)
        st.decoder = FrameDecoder(self.ctx.max_message_size)
        flow = self.flows.open(key, source, now, st)
        self.metrics.flows_total.inc()
        self.daemon.metrics.connections_total.inc()
        self.daemon.own(st.fd, lambda event: self._on_local(flow, event))
        if wants_info:
            st.reader, st.waiting = door.VerdictReader(), []
            self._verdicts.start(
                flow, self.daemon.handshake_timeout, lambda: self._no_verdict(flow)
            )
        log.debug("%s: %s -> %r: new flow (fd %d)", self.daemon.name, peer, service, st.fd)
        return flow

    def _offer(self, st: _FlowState, local: socket.socket) -> bool:
        """Send the peer information to the service's door (a fresh Unix
        socket takes the frame at once, or the service is not reading)."""
        client = _ip_port(st.addr)
        info = PeerInfo(
            transport="udp",
            client_address=client[0],
            client_port=client[1],
            local_address=st.listener.local[0],
            local_port=st.listener.local[1],
        )
        frame = door.offer_frame(info)
        try:
            sent = local.send(frame)
        except OSError as exc:
            sent, why = -1, exc.strerror or str(exc)
        else:
            why = "its socket buffer is full"
        if sent != len(frame):
            self._drop(Drop.NO_SERVICE, f"{st.peer}: service {st.listener.spec.service!r}: {why}")
            return False
        return True

    def _on_local(self, flow: _UdpFlow, event: Event) -> None:
        """The service's side of a flow: its verdict (a door), then its
        messages, each sent back to the flow's address as one datagram."""
        st: _FlowState = flow.state
        if event.type is EventType.DISCONNECTION:
            if event.fd == st.fd:
                self._closed(flow, event.reason or "closed")
            return
        if event.type is not EventType.EXTERNAL or event.fd != st.fd:
            return
        try:
            data = self.ctx.socket_of(st.fd).recv(_LOCAL_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            data, why = b"", exc.strerror or str(exc)
        else:
            why = "closed"
        if not data:
            self._closed(flow, why)
            return
        if st.reader is not None:
            data = self._verdict(flow, data)
            if not data:
                return
        assert st.decoder is not None
        try:
            messages = st.decoder.feed(data)
        except MessageTooLarge as exc:
            self._closed(flow, f"broke the protocol: {exc}", warn=True)
            return
        self.flows.touch(flow, time.monotonic())
        for message in messages:
            self._to_network(st, message)

    def _closed(self, flow: _UdpFlow, why: str, *, warn: bool = False) -> None:
        """The service closed the flow's connection (or broke it): forget the
        flow; the next datagram from that address opens a new one."""
        st: _FlowState = flow.state
        if not self.flows.remove(flow):
            return
        self._verdicts.done(flow)
        if st.fd >= 0:
            self.daemon.drop(st.fd)
        if st.waiting:
            self._drop(
                Drop.NO_SERVICE,
                f"{st.peer}: service {st.listener.spec.service!r} closed its door "
                f"without a verdict ({len(st.waiting)} datagrams)",
            )
        level = logging.WARNING if warn else logging.DEBUG
        log.log(level, "%s: %s: the service closed the flow (%s)", self.daemon.name, st.peer, why)

    def _to_network(self, st: _FlowState, data: bytes) -> None:
        size = len(data)
        if size > st.limit:
            self._drop(
                Drop.TOO_LARGE_FOR_UDP,
                f"{st.listener.spec.service!r} -> {st.peer}: a {size}-byte message is over "
                f"the largest UDP datagram ({st.limit} bytes)",
            )
            return
        try:
            st.listener.sock.sendto(data, st.addr)
        except BlockingIOError:
            self._drop(Drop.SEND_FAILED, f"to {st.peer}: the socket's send buffer is full")
            return
        except OSError as exc:
            kind = Drop.TOO_LARGE_FOR_UDP if exc.errno == errno.EMSGSIZE else Drop.SEND_FAILED
            self._drop(kind, f"to {st.peer}: {exc.strerror or exc}")
            return
        self.metrics.datagrams["out"] += 1
        self.metrics.payload["out"] += size

    # ------------------------------------------------------ peer information

    def _verdict(self, flow: _UdpFlow, data: bytes) -> bytes:
        """Feed the door's bytes to the verdict reader; once the verdict is
        in, return what the service sent behind it (its first messages)."""
        st: _FlowState = flow.state
        assert st.reader is not None
        service = st.listener.spec.service
        try:
            verdict = st.reader.feed(data)
        except ProtocolError as exc:
            self.flows.remove(flow)  # a broken door: the next datagram retries
            self._verdicts.done(flow)
            self.daemon.drop(st.fd)
            self._drop(
                Drop.NO_SERVICE, f"{st.peer}: service {service!r} broke the door protocol: {exc}"
            )
            return b""
        if verdict is None:
            return b""
        self._verdicts.done(flow)
        reader = st.reader
        waiting, st.reader, st.waiting = st.waiting or [], None, None
        if verdict.accepted:
            log.debug("%s: %s -> %r: accepted", self.daemon.name, st.peer, service)
            for datagram in waiting:
                self._to_service(st, datagram)
            self._flush()
            return reader.leftover
        # Refused: remembered until the flow is silent for --flow-timeout, so
        # that a sender is not offered to the service once per datagram.
        st.refused = f"service {service!r} refused: {verdict.reason or 'no reason'}"
        log.warning("%s: %s: %s", self.daemon.name, st.peer, st.refused)
        self.daemon.drop(st.fd)
        st.fd = -1
        for _ in waiting:
            self._drop(Drop.SERVICE_REFUSED, f"{st.peer}: {st.refused}")
        return b""

    def _no_verdict(self, flow: _UdpFlow) -> None:
        st: _FlowState = flow.state
        if not self.flows.remove(flow):
            return
        count = len(st.waiting or [])
        st.reader, st.waiting = None, None
        self.daemon.drop(st.fd)
        self._drop(
            Drop.NO_SERVICE,
            f"{st.peer}: no verdict from service {st.listener.spec.service!r} within "
            f"{self.daemon.handshake_timeout} s ({count} datagrams)",
        )

    # --------------------------------------------------------------- expiry

    def _sweep(self) -> None:
        """Every timeout/4 (at most 5 s): close the flows silent for
        --flow-timeout (a flow ends between T and T + one period)."""
        self.ctx.call_later(self._period, self._sweep)
        for flow in self.flows.expired(time.monotonic()):
            st: _FlowState = flow.state
            self._verdicts.done(flow)
            self.metrics.flows_expired.inc()
            if st.fd >= 0 and st.fd in self.ctx:
                self.ctx.close(st.fd, flush=True)
            log.debug(
                "%s: %s: flow idle for %g s (--flow-timeout); closed",
                self.daemon.name,
                st.peer,
                self.flows.limits.timeout,
            )


def _ip_port(addr: Any) -> tuple[str | None, int | None]:
    """(IP, port) of a socket address, IPv4-mapped as IPv4."""
    if not (isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[0], str)):
        return None, None
    ip = parse_ip(addr[0])
    return (str(ip), int(addr[1])) if ip is not None else (None, None)


# --------------------------------------------------------------------------
# Outbound: the local service "udp"
# --------------------------------------------------------------------------


@dataclass(eq=False)
class _Association:
    """A local client and the UDP socket it sends through."""

    client_fd: int
    target: UdpTarget
    remote_fd: int = -1
    limit: int = 0


class UdpOutbound:
    """The local service ``udp``: a client asks for ``udp://HOST:PORT`` and
    then exchanges datagrams with it, one per message."""

    def __init__(
        self,
        daemon: Daemon,
        metrics: UdpMetrics,
        service_name: str,
        max_associations: int,
        resolve_timeout: float,
    ) -> None:
        self.daemon = daemon
        self.ctx = daemon.ctx
        self.metrics = metrics
        self.service_name = service_name
        self.max_associations = max_associations
        self.resolve_timeout = resolve_timeout
        self._drop = _dropper(daemon, metrics)
        self.service_fd = daemon.service_init(service_name, "--service-name")
        self._clients = RequestDeadlines(daemon, service_name)
        self._by_client: dict[int, _Association] = {}
        self._resolving: Deadlines[int] = Deadlines(daemon.ctx)
        self._resolver = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="resolve")
        metrics.associations_open.set_function(
            lambda: sum(1 for a in self._by_client.values() if a.remote_fd >= 0)
        )
        daemon.own(self.service_fd, self._on_service)
        log.info("%s: outbound service %r ready", daemon.name, service_name)

    def _on_service(self, event: Event) -> None:
        if event.type is EventType.CONNECTION:
            self.daemon.own(event.fd, self._on_client)
            self._clients.start(event.fd)

    def _on_client(self, event: Event) -> None:
        fd = event.fd
        if event.type is EventType.MESSAGE_RX:
            assert event.message is not None
            if self._clients.done(fd):
                self._request(fd, event.message)
                return
            assoc = self._by_client.get(fd)
            if assoc is None:
                return
            if assoc.remote_fd < 0:
                self._fail(assoc, "the client sent a message before 'ok'")
                return
            self._send(assoc, event.message)
        elif event.type is EventType.DISCONNECTION:
            self._clients.done(fd)
            self._resolving.done(fd)
            assoc = self._by_client.pop(fd, None)
            if assoc is not None and assoc.remote_fd >= 0:
                self.daemon.drop(assoc.remote_fd)
                log.debug("%s: %s: the local client left", self.daemon.name, assoc.target)

    def _request(self, client_fd: int, payload: bytes) -> None:
        try:
            target = parse_udp_target(payload.decode())
        except (UnicodeDecodeError, ValueError) as exc:
            self._answer_error(client_fd, f"bad request: {exc}")
            return
        if len(self._by_client) >= self.max_associations:
            self._answer_error(
                client_fd,
                f"{len(self._by_client)} associations open (--max-flows {self.max_associations})",
            )
            return
        assoc = _Association(client_fd, target)
        self._by_client[client_fd] = assoc
        if _is_ip(target.host):
            family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
            self._start(assoc, family, (target.host, target.port))
            return
        self._resolving.start(
            client_fd,
            self.resolve_timeout,
            lambda: self._fail(assoc, f"cannot resolve {target.host!r} in time"),
        )
        future = self._resolver.submit(_resolve, target.host, target.port)
        future.add_done_callback(
            lambda f: self.ctx.call_soon_threadsafe(lambda: self._resolved(assoc, f))
        )

    def _resolved(self, assoc: _Association, future: concurrent.futures.Future[Any]) -> None:
        if self._by_client.get(assoc.client_fd) is not assoc or not self._resolving.done(
            assoc.client_fd
        ):
            return
        try:
            family, sockaddr = future.result()
        except OSError as exc:
            self._fail(assoc, f"cannot resolve {assoc.target.host!r}: {exc}")
            return
        self._start(assoc, family, sockaddr)

    def _start(self, assoc: _Association, family: int, sockaddr: Any) -> None:
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            self._fail(assoc, exc.strerror or str(exc))
            return
        try:
            sock.setblocking(False)
            sock.connect(sockaddr)  # UDP: no packet, just the only peer we hear
        except OSError as exc:
            sock.close()
            self._fail(assoc, f"{assoc.target}: {exc.strerror or exc}")
            return
        assoc.limit = max_payload(sock.getpeername())
        if assoc.client_fd not in self.ctx or not self.ctx.write(assoc.client_fd, b"ok"):
            sock.close()
            self._by_client.pop(assoc.client_fd, None)
            return
        assoc.remote_fd = self.ctx.add_external(sock)
        self.daemon.own(assoc.remote_fd, lambda event: self._on_remote(assoc, event))
        self.metrics.outbound_total.inc(result="ok")
        log.info("%s: a local client sends to %s", self.daemon.name, assoc.target)

    def _send(self, assoc: _Association, data: bytes) -> None:
        size = len(data)
        if size > assoc.limit:
            self._drop(
                Drop.TOO_LARGE_FOR_UDP,
                f"to {assoc.target}: a {size}-byte message is over the largest UDP "
                f"datagram ({assoc.limit} bytes)",
            )
            return
        sock = self.ctx.socket_of(assoc.remote_fd)
        for attempt in (1, 2):
            try:
                sock.send(data)
            except BlockingIOError:
                self._drop(Drop.SEND_FAILED, f"to {assoc.target}: the send buffer is full")
            except ConnectionRefusedError:
                # An earlier datagram was answered "port unreachable"; the
                # error is reported (and cleared) here: send this one again.
                if attempt == 1:
                    continue
                self._drop(Drop.UNREACHABLE, f"{assoc.target}: port unreachable")
            except OSError as exc:
                self._drop(Drop.SEND_FAILED, f"to {assoc.target}: {exc.strerror or exc}")
            else:
                self.metrics.datagrams["out"] += 1
                self.metrics.payload["out"] += size
            return

    def _on_remote(self, assoc: _Association, event: Event) -> None:
        if (
            event.type is not EventType.EXTERNAL
            or self._by_client.get(assoc.client_fd) is not assoc
        ):
            return
        ctx = self.ctx
        sock = ctx.socket_of(assoc.remote_fd)
        counts, payload = self.metrics.datagrams, self.metrics.payload
        for _ in range(_BATCH):
            try:
                data = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self._drop(Drop.UNREACHABLE, f"{assoc.target}: port unreachable")
                continue
            except OSError as exc:
                log.debug("%s: %s: %s", self.daemon.name, assoc.target, exc.strerror or exc)
                continue
            counts["in"] += 1
            payload["in"] += len(data)
            size = len(data)
            if size > ctx.max_message_size:
                self._drop(
                    Drop.OVERSIZE,
                    f"{size}-byte datagram from {assoc.target} "
                    f"(--max-message-size {ctx.max_message_size})",
                )
            elif ctx.pending_bytes(assoc.client_fd) >= ctx.queue_high_water:
                self._drop(Drop.QUEUE_FULL, f"from {assoc.target}: the local client does not read")
            elif not ctx.write(assoc.client_fd, data):
                return

    def _fail(self, assoc: _Association, reason: str) -> None:
        if self._by_client.pop(assoc.client_fd, None) is not assoc:
            return
        self._resolving.done(assoc.client_fd)
        if assoc.remote_fd >= 0:
            self.daemon.drop(assoc.remote_fd)
        log.warning("%s: cannot send to %s: %s", self.daemon.name, assoc.target, reason)
        self._answer_error(assoc.client_fd, f"cannot reach {assoc.target}: {reason}")

    def _answer_error(self, client_fd: int, reason: str) -> None:
        self.metrics.outbound_total.inc(result="error")
        if client_fd in self.ctx:
            self.ctx.write(client_fd, f"error: {reason}".encode())
            self.ctx.close(client_fd, flush=True)

    def close(self) -> None:
        self._resolver.shutdown(wait=False, cancel_futures=True)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int) -> tuple[int, Any]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"no address for {host!r}")
    return infos[0][0], infos[0][4]


# --------------------------------------------------------------------------
# Sockets
# --------------------------------------------------------------------------


def open_udp(spec: UdpListen) -> socket.socket:
    """A bound, non-blocking UDP socket for ``spec.address``: ``:PORT`` is
    every interface, IPv4 and IPv6 (one dual-stack socket). No SO_REUSEADDR:
    on UDP it would let a second daemon bind the same port and steal half
    the datagrams; a port in use must fail."""
    addr = spec.address
    if addr.host is None:
        try:
            return _bind_udp(socket.AF_INET6, ("::", addr.port), v6only=False)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise
            return _bind_udp(socket.AF_INET, ("0.0.0.0", addr.port))
    infos = socket.getaddrinfo(
        addr.host, addr.port, addr.family, socket.SOCK_DGRAM, 0, socket.AI_PASSIVE
    )
    family, _type, _proto, _name, sockaddr = infos[0]
    return _bind_udp(family, sockaddr)


def _bind_udp(family: int, sockaddr: Any, v6only: bool = True) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _serve_sockets(
    daemon: Daemon, inbound: Inbound, specs: Sequence[UdpListen], metrics: ListenAddress | None
) -> None:
    """systemd's sockets first (a datagram socket serves the ``--listen``
    naming its port; one named ``metrics`` serves /metrics), then the
    ``--listen`` entries no inherited socket covers, then ``--metrics``."""
    unused = list(specs)
    activated = systemd.listen_fds()
    for sock, fdname in activated:
        if fdname == "metrics":
            daemon.serve_metrics(sock)
            continue
        if sock.type != socket.SOCK_DGRAM:
            raise StartupError(
                f"systemd passed a stream socket ({bound_address(sock)}): ipc-udpd takes "
                "datagram sockets (ListenDatagram=), and one named 'metrics' for --metrics"
            )
        port = sock.getsockname()[1]
        spec = next((s for s in unused if s.address.port == port), None)
        if spec is None:
            raise StartupError(
                f"systemd passed a UDP socket on {bound_address(sock)} but no --listen "
                f"names its service (set IPC_UDPD_LISTEN=':{port}=SERVICE')"
            )
        unused.remove(spec)
        inbound.listen(sock, spec)
    for spec in unused:
        try:
            sock = open_udp(spec)
        except OSError as exc:
            raise bind_error("--listen", spec, exc) from None
        inbound.listen(sock, spec)
    if metrics is not None and not any(n == "metrics" for _, n in activated):
        try:
            daemon.serve_metrics(open_listener(metrics))
        except OSError as exc:
            raise bind_error("--metrics", metrics, exc) from None


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


class UdpListenParamType(click.ParamType):
    """click type of ``--listen ADDRESS=SERVICE``."""

    name = "ADDRESS=SERVICE"

    def convert(self, value: Any, param: Any, ctx: Any) -> UdpListen:
        if isinstance(value, UdpListen):
            return value
        try:
            return parse_udp_listen(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@libipc_command(
    prog="ipc-udpd",
    env_prefix="IPC_UDPD",
    examples=[
        ("ipc-udpd --listen 127.0.0.1:5140=pong", "datagrams to port 5140 reach the service pong"),
        (
            "ipc-udpd --listen :5140=syslog --listen :5141=metrics-in --allow syslog "
            "--allow metrics-in",
            "every interface, two ports, two services",
        ),
        ("echo hello | socat - UDP:127.0.0.1:5140", "a datagram in, the service's reply out"),
        (
            "ipc-udpd --listen :5140=game --flow-timeout 30 --max-flows-per-ip 4",
            "short-lived flows, at most 4 per client address",
        ),
        (
            "ipc-udpd",
            "no --listen: only the local service udp (clients send it udp://HOST:PORT)",
        ),
    ],
    notes=[
        "UDP cannot push back: a datagram the service is too slow for is "
        "dropped and counted (ipc_udp_dropped_total). Plain UDP carries no "
        "encryption and its source addresses can be forged: keep it on "
        "loopback or a trusted network.",
    ],
)
@click.option(
    "--listen",
    "-l",
    type=UdpListenParamType(),
    multiple=True,
    metavar="ADDRESS=SERVICE",
    help="UDP address (:PORT for every interface, IPv4 and IPv6; HOST:PORT; "
    "[IPv6]:PORT) and the local service its datagrams reach. Repeatable. "
    "Default: none (only the outbound service). With socket activation, a "
    "systemd datagram socket serves the --listen with its port.",
)
@click.option(
    "--allow",
    multiple=True,
    metavar="GLOB",
    help="Local services remote peers may reach. Repeatable. "
    "Default: all but the protected ones (the daemons' own services).",
)
@click.option(
    "--deny",
    multiple=True,
    metavar="GLOB",
    help="Local services remote peers may never reach (wins over --allow). Repeatable.",
)
@rundir_option
@logging_options
@click.option(
    "--handshake-timeout",
    type=seconds(0, min_open=True),
    default=5.0,
    metavar="SECONDS",
    help="Local clients (of udp and udp.ctl) must send their request by then; "
    "a service that wants peer information must give its verdict by then.",
)
@click.option(
    "--max-message-size",
    type=click.IntRange(min=0, max=0xFFFFFFFF),
    default=DEFAULT_MAX_MESSAGE_SIZE,
    metavar="BYTES",
    help="Drop datagrams longer than this (counted as oversize).",
)
@click.option(
    "--metrics",
    type=LISTEN,
    default=None,
    metavar="ADDRESS",
    help="Serve Prometheus /metrics and /healthz on this address. Default: off.",
)
@click.option(
    "--service-name",
    envvar=["IPC_UDPD_SERVICE_NAME", "IPC_SERVICE_NAME"],
    default="udp",
    metavar="NAME",
    help="Local service name of the outbound side (clients send it udp:// URIs).",
)
@click.option(
    "--flow-timeout",
    type=seconds(0),
    default=60.0,
    metavar="SECONDS",
    help="Close a flow (a remote address:port and its connection to the service) "
    "after this long with no datagram either way. 0 = never.",
)
@click.option(
    "--max-flows",
    type=click.IntRange(min=1, max=MAX_FLOWS),
    default=10000,
    metavar="N",
    help="Drop datagrams that would open a flow beyond N open ones (and refuse "
    "outbound clients beyond N).",
)
@click.option(
    "--max-flows-per-ip",
    type=click.IntRange(min=0, max=MAX_FLOWS),
    default=64,
    metavar="N",
    help="Drop datagrams that would open more than N flows from one source "
    "address (an IPv6 /64). 0 = no limit.",
)
@connect_timeout_option("host name resolution")
def main(
    listen: tuple[UdpListen, ...],
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    rundir: Path | None,
    log_format: str,
    verbose: int,
    quiet: int,
    handshake_timeout: float,
    max_message_size: int,
    metrics: ListenAddress | None,
    service_name: str,
    flow_timeout: float,
    max_flows: int,
    max_flows_per_ip: int,
    connect_timeout: float,
) -> None:
    """Put local LibIPC services on UDP, and send datagrams for local clients (UDPd).

    Inbound: each remote address:port sending to --listen ADDRESS=SERVICE is a
    flow with its own LibIPC connection to $RUNDIR/SERVICE; one datagram is
    one message, and the service's messages go back as datagrams. Outbound:
    the local service "udp" takes a message udp://HOST:PORT, answers "ok",
    then relays messages and datagrams with that address.
    """
    common = CommonOptions(
        listen=(),
        allow=allow,
        deny=deny,
        rundir=rundir,
        log_format=log_format,
        verbose=verbose,
        quiet=quiet,
        handshake_timeout=handshake_timeout,
        max_connections=max_flows,
        max_message_size=max_message_size,
        metrics=metrics,
        max_connections_per_ip=0,
    )
    limits = FlowLimits(max_flows, max_flows_per_ip, flow_timeout)
    with starting():
        daemon, outbound = start_udpd(common, listen, service_name, limits, connect_timeout)
    try:
        daemon.run()
    finally:
        outbound.close()
        daemon.ctx.close_all()


def start_udpd(
    common: CommonOptions,
    specs: Sequence[UdpListen],
    service_name: str,
    limits: FlowLimits,
    resolve_timeout: float = 5.0,
) -> tuple[Daemon, UdpOutbound]:
    """Build the daemon: the outbound service and ``NAME.ctl`` first (a
    double start fails before any port is opened), then the UDP sockets
    (systemd's first) and ``--metrics``. On failure nothing is left behind."""
    setup_logging(common.verbosity, common.log_format)
    ctx = Context(rundir_path=common.rundir, max_message_size=common.max_message_size)
    daemon = UdpDaemon(
        "ipc-udpd",
        ctx,
        common.access(service_name),
        handshake_timeout=common.handshake_timeout,
        max_connections=common.max_connections,
    )
    for spec in specs:
        reason = daemon.access.check(spec.service)
        if reason is not None:
            daemon.close()
            raise StartupError(f"--listen {spec}: {reason}")
    try:
        udp_metrics = daemon.udp = UdpMetrics(daemon)
        outbound = UdpOutbound(daemon, udp_metrics, service_name, limits.max_flows, resolve_timeout)
        daemon.serve_control(f"{service_name}.ctl")
        inbound = Inbound(daemon, udp_metrics, limits)
        _serve_sockets(daemon, inbound, specs, common.metrics)
    except BaseException:
        daemon.close()
        raise
    return daemon, outbound


if __name__ == "__main__":
    main()
