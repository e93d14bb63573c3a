"""Doors: how the engine reaches a service that asked who is calling, or that
takes connections over.

Why a module of its own: the daemon's engine (:mod:`daemons.engine.daemon`)
accepts, handshakes and relays; this is the part between "the peer named a
service" and "the pair is switched" when the service's lock carries a mark.

* ``peer-info``: the client is connected to the service's door
  (``$RUNDIR/NAME.door``, :mod:`ipc_core.door`); the first frame is the
  peer information (the engine's record of the socket, completed by the
  handshake's ``describe``), then the peer is parked out of the Context
  (its bytes wait in the kernel) until the service's verdict: accept -> the
  daemon's switch, with any message the service sent behind its verdict;
  refuse, silence (the handshake deadline) or a broken door -> the peer
  closed with the reason.
* ``handoff``: when the peer's stream is plain LibIPC after its handshake
  (TCPd), the offer goes with the peer's socket itself (``SCM_RIGHTS``) and a
  hand-off frame (the reply ``ok``, the bytes read past the name); on accept
  the daemon closes its copy and forgets the connection (no relay in the
  path), otherwise as above.

A name the policy refuses is answered exactly like a name that does not
exist. :class:`Doors` works on the daemon's pending connections and calls
back into it (rejecting, switching, counting): it is the daemon's part, kept
apart for size, not a separate actor.
"""

from __future__ import annotations

import array
import functools
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from ipc_core import Event, EventType, PeerClosed, ProtocolError, door, door_path, service_marks
from ipc_core.peerinfo import PeerInfo

from .errors import Failure, LocalRefused
from .local import connect_local
from .policy import network_refusal
from .trust import parse_ip

if TYPE_CHECKING:
    from .daemon import Daemon, _Pending

__all__ = ["Doors"]

log = logging.getLogger("ipc.daemon")

_RECV_SIZE = 65536
#: The lock mark of a service that asked for peer information (docs/protocol.md).
_PEER_INFO = "peer-info"
#: The lock mark of a service that takes handed-over network sockets.


class Doors:
    """The door path of one daemon (see the module docstring)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.ctx = daemon.ctx

    def open_local(self, p: _Pending, service: str) -> tuple[socket.socket, bytes | None, bool]:
        """A connection to ``service`` for a network peer; when it is the
        service's door (it asked for peer information, or takes hand-offs and
        this peer's stream is plain LibIPC) the offer to send there, made
        before connecting (a peer whose facts do not fit the record costs the
        service nothing); and whether the peer's socket goes with the offer
        (a hand-off: the daemon has already accepted the handshake). A name the policy
        refuses is answered exactly like a name that does not exist (same
        status, same path through the handshake): a peer learns nothing of
        what runs here. The log keeps the real reason."""
        rundir = self.ctx.rundir
        marks = service_marks(service, rundir)
        refusal = network_refusal(self.daemon.access, service, rundir, marks=marks)
        if refusal is not None:
            raise LocalRefused(Failure.REFUSED, refusal)
        hands_over = p.hands_over
        if self.daemon.handoff and hands_over is not None and hands_over.handoff_mark in marks:
            handed = hands_over.handover()
            if handed is not None:
                reply, early = handed
                offer = door.offer_frame(self.describe(p)) + door.handoff_frame(reply, early)
                return self._connect_door(service), offer, True
        if _PEER_INFO not in marks:
            return connect_local(service, rundir), None, False
        offer = door.offer_frame(self.describe(p))
        return self._connect_door(service), offer, False

    def _connect_door(self, service: str) -> socket.socket:
        rundir = self.ctx.rundir
        try:
            return connect_local(door_path(service, rundir).name, rundir)
        except LocalRefused as exc:
            if exc.failure is not Failure.UNKNOWN_SERVICE:
                raise
            why = f"no door for local service {service!r} (it asked for peer information)"
            raise LocalRefused(exc.failure, why) from None

    def offer(
        self, p: _Pending, service: str, local: socket.socket, frame: bytes, handing: bool
    ) -> None:
        """Send the peer information to ``service``'s door (with the peer's
        socket when ``handing`` it over), then wait for its verdict without
        reading the peer (its bytes wait in the kernel)."""
        try:
            if handing:
                rights = array.array("i", [p.fd]).tobytes()
                sent = local.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            else:
                sent = local.send(frame)
        except OSError as exc:
            sent, why = -1, exc.strerror or str(exc)
        else:
            why = "its socket buffer is full"
        if sent != len(frame):  # a fresh Unix socket takes 16 KiB at once, or is broken
            local.close()
            self.daemon._reject(p, Failure.SERVICE_UNAVAILABLE, f"service {service!r}: {why}")
            return
        ctx = self.ctx
        p.parked = ctx.socket_of(p.fd)
        self.daemon.disown(p.fd)
        ctx.remove_external(p.fd)
        p.door = local
        reader = door.VerdictReader()
        dfd = ctx.add_external(local)
        self.daemon.own(dfd, functools.partial(self._on_verdict, p, service, reader, handing))

    def describe(self, p: _Pending) -> PeerInfo:
        """The engine's record of the socket, completed by the handshake."""
        sock = self.ctx.socket_of(p.fd)
        client = _address(sock, "getpeername")
        local = _address(sock, "getsockname")
        info = PeerInfo(
            transport="tcp",
            client_address=client[0],
            client_port=client[1],
            local_address=local[0],
            local_port=local[1],
        )
        return p.describes.describe(info) if p.describes is not None else info

    def _on_verdict(
        self,
        p: _Pending,
        service: str,
        reader: door.VerdictReader,
        handing: bool,
        event: Event,
    ) -> None:
        """The service's verdict on the door. Accept: the switch (with the
        messages behind the verdict), or, for a hand-off, our copy of the
        socket closed (the service writes ``ok``). Anything else: the peer
        is closed with the reason."""
        if event.type is not EventType.EXTERNAL or p.door is None:
            return
        try:
            data = p.door.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            data, error = b"", exc.strerror or str(exc)
        else:
            error = ""
        failure: tuple[Failure, str] | None = None
        try:
            verdict = reader.feed(data)
        except PeerClosed:
            failure = (Failure.SERVICE_UNAVAILABLE, error or "closed its door without a verdict")
        except ProtocolError as exc:
            failure = (Failure.SERVICE_UNAVAILABLE, f"broke the door protocol: {exc}")
        else:
            if verdict is None:
                return
            if not verdict.accepted:
                failure = (Failure.SERVICE_REFUSED, f"refused: {verdict.reason or 'no reason'}")
            elif handing and reader.leftover:
                failure = (Failure.SERVICE_UNAVAILABLE, "sent bytes after a hand-off verdict")
        if failure is None and handing:
            self._handed_over(p, service)
            return
        local = self.unpark(p)
        if failure is None and local is not None:
            self.daemon._accept_peer(p, local, service, reader.leftover)
            return
        if local is not None:
            local.close()
        if failure is not None:
            self.daemon._reject(p, failure[0], f"service {service!r} {failure[1]}")

    def _handed_over(self, p: _Pending, service: str) -> None:
        """The service has the peer's socket: forget ours (without a
        shutdown, which would end the service's connection too)."""
        local, p.door = p.door, None
        sock, p.parked = p.parked, None
        if local is not None:
            self.daemon.disown(local.fileno())
            if local.fileno() in self.ctx:
                self.ctx.remove_external(local.fileno())
            local.close()
        self.daemon._forget_pending(p)
        self.daemon._network_closed(p.fd)
        if sock is not None:
            sock.close()
        self.daemon.metrics.handoffs.inc()
        log.info(
            "%s: %s -> %r handed over (%.1f ms)",
            self.daemon.name,
            p.who,
            service,
            (time.monotonic() - p.started) * 1000,
        )

    def unpark(self, p: _Pending) -> socket.socket | None:
        """Back to the Context with the waiting peer; the door socket, out of
        it (None if either is gone)."""
        local, p.door = p.door, None
        if local is not None:
            self.daemon.disown(local.fileno())
            if local.fileno() in self.ctx:
                self.ctx.remove_external(local.fileno())
        sock, p.parked = p.parked, None
        if sock is not None:
            self.daemon.own(self.ctx.add_external(sock), self.daemon._on_pending)
        return local


def _address(sock: Any, which: str) -> tuple[str | None, int | None]:
    """(IP, port) of one end of a socket, IPv4-mapped as IPv4; (None, None)
    for a Unix socket or a socket that is gone."""
    try:
        addr = getattr(sock, which)()
    except OSError:
        return None, None
    if not (isinstance(addr, tuple) and len(addr) >= 2):
        return None, None
    ip = parse_ip(addr[0])
    return (str(ip), addr[1]) if ip is not None else (None, None)
