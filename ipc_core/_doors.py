"""The doors of peer-information and hand-off services: the service's side.

Why a module of its own: a service started with ``peer_info=True`` or
``handoff=True`` has a second listener, its door (:mod:`ipc_core.door` says
why and the wire protocol). A connection accepted there is a PEER whose
reader is :meth:`Doors._read_offer` until the offer is read: ``recvmsg`` with
``SCM_CREDENTIALS``, every read from a trusted uid, within the offer deadline
(kept in ``conn.linger``, so a close cancels it). Then either the connection
becomes an ordinary peer (``Context._read_peer``, a FrameDecoder fed with
what followed the offer), or, when the daemon passed its network socket with
the offer (a hand-off), that socket is adopted as the peer and the door
waits for the verdict. A CONNECTION event carries the PeerInfo, and the
connection waits in ``Context._offered`` for its verdict: ``refuse`` sends a
refusal, otherwise the accept goes out at the next ``wait_event`` after that
event was returned, or before the first write to the connection.

:class:`Doors` is the Context's part, kept apart for size: it works on the
Context's connection table and event queue directly.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import door as _door
from ._connections import PEER, Conn, bad_input
from .errors import PeerClosed, ProtocolError, UsageError
from .events import Event, EventType, message_rx
from .framing import FrameDecoder
from .peerinfo import PeerInfo

if TYPE_CHECKING:
    from .context import Context

log = logging.getLogger("ipc_core")

_EPOLLIN = select.EPOLLIN
_ACCEPT_BATCH = 64
_CONNECTION = EventType.CONNECTION

_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid
_CRED_SPACE = socket.CMSG_SPACE(_UCRED.size)
#: Credentials and one passed descriptor (a hand-off); room for a few more,
#: so that a sender passing several is refused, not silently truncated.
_HANDOFF_SPACE = _CRED_SPACE + socket.CMSG_SPACE(4 * 4)
_ACCEPT_FRAME = _door.accept_frame()


@dataclass(frozen=True, slots=True)
class Door:
    """A peer-information service's door: whom it believes, for which listener."""

    name: str
    origin: int  # the service's normal listening descriptor
    trusted: frozenset[int]
    #: Takes handed-over network sockets whose stream is LibIPC (ipc-tcpd).
    handoff: bool = False
    #: Takes handed-over WebSocket connections, before the daemon answered
    #: their handshake (ipc-websocketd): held for :meth:`Doors.take`.
    websocket: bool = False

    @property
    def takes_sockets(self) -> bool:
        """One SCM_RIGHTS descriptor per offer is kept, not refused."""
        return self.handoff or self.websocket


@dataclass(eq=False, slots=True)
class HandedOver:
    """A WebSocket connection a daemon handed over, as
    :meth:`~ipc_core.Context.take_handoff` gives it: the client's socket
    (non-blocking, nothing written to it yet), ``early``, every byte the
    daemon read from the client (its HTTP request head first, then whatever
    followed), which the taker parses before the socket's, and ``peer``."""

    sock: socket.socket
    early: bytes
    peer: PeerInfo


@dataclass(eq=False, slots=True)
class _Held:
    """A WebSocket hand-off waiting to be taken: outside the loop (nothing
    reads its socket), its door waiting for the verdict."""

    taken: HandedOver
    door: Conn
    event: Event


@dataclass(eq=False, slots=True)
class _Handover:
    """A handed-over socket waiting for the application's verdict: the door
    connection to answer on, and what to write to the client on accept."""

    door: Conn
    reply: bytes


class _Offer:
    """The reading state of one door connection: the offer, then (when a
    socket came with it) the hand-off frame."""

    __slots__ = ("fds", "handoff", "info", "reader")

    def __init__(self) -> None:
        self.reader = _door.OfferReader()
        self.info: PeerInfo | None = None
        self.handoff: _door.HandoffReader | None = None
        self.fds: list[int] = []

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class Doors:
    """The doors of one Context (see the module docstring)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        #: The Context's own table of connections awaiting a verdict (its
        #: hot paths test it), shared.
        self.offered = ctx._offered
        #: Handed-over sockets among them: fd -> their door and reply.
        self.handovers: dict[int, _Handover] = {}
        #: WebSocket hand-offs waiting for take_handoff: fd -> what it gives.
        self.held: dict[int, _Held] = {}

    def accept(self, door: Door, conn: Conn) -> None:
        """Accept on a door: the new connection reads its offer first."""
        lsock = conn.sock
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if _accept_log_due():
                        log.error("cannot accept on %s: %s; pausing 100 ms", conn.fd, exc.strerror)
                    self.ctx._pause_listener(conn)
                return
            try:
                sock.setblocking(False)
                # Inherited from the listening door already (so no byte written
                # before the accept lacks credentials); said again to be explicit.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            except OSError as exc:
                log.warning("door of service %r: %s; closing a connection", door.name, exc)
                sock.close()
                continue
            peer = Conn(PEER, sock)
            peer.origin = door.origin
            peer.reader = functools.partial(self._read_offer, door, _Offer())
            self.ctx._table.add(peer, _EPOLLIN)
            peer.linger = self.ctx._timers.call_later(
                self.ctx._offer_seconds, functools.partial(self._offer_late, door, peer)
            )

    def _read_offer(self, door: Door, state: _Offer, conn: Conn) -> None:
        """Read a door connection until its offer (and, with a handed-over
        socket, the hand-off frame) is complete (see Doors)."""
        space = _HANDOFF_SPACE if door.takes_sockets else _CRED_SPACE
        try:
            # MSG_CMSG_CLOEXEC: a passed socket must never leak into a child
            # (ipc exec's programs would hold every other client's connection).
            n, ancdata, flags, _addr = conn.sock.recvmsg_into(
                [self.ctx._view], space, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop_door(door, conn, f"read failed: {exc.strerror or exc}", state)
            return
        if n:
            problem = _credentials_problem(
                ancdata, flags, door.trusted, state.fds if door.takes_sockets else None
            )
            if problem is not None:
                self._drop_door(door, conn, problem, state)
                return
        data: bytes | memoryview = self.ctx._view[:n]
        try:
            if state.info is None:
                state.info = state.reader.feed(data)
                if state.info is None:
                    return
                data = state.reader.leftover
                if not state.fds:
                    self._offer_read(door, conn, state.info, data)
                    return
                state.handoff = _door.HandoffReader()
                if not data:
                    return
            assert state.handoff is not None
            handoff = state.handoff.feed(data)
        except PeerClosed:
            self._drop_door(door, conn, "closed before sending its peer information", state)
            return
        except ProtocolError as exc:
            self._drop_door(door, conn, f"bad peer information: {exc}", state)
            return
        if handoff is None:
            return
        if state.handoff.leftover:
            self._drop_door(door, conn, "bytes after the hand-off frame", state)
            return
        self._handed_over(door, conn, state, handoff)

    def _offer_read(self, door: Door, conn: Conn, info: PeerInfo, leftover: bytes) -> None:
        """A relayed client's offer is read: the door connection becomes an
        ordinary peer, announced with its peer information."""
        if not self._door_opened(door, conn):
            return
        fd = conn.fd
        conn.peer = info
        conn.decoder = FrameDecoder(self.ctx.max_message_size)
        conn.reader = self.ctx._read_peer
        event = Event(_CONNECTION, fd, origin=door.origin, peer=info)
        self.ctx._events.append(event)
        self.offered[fd] = (conn, event)
        if leftover:
            self._feed_early(conn, leftover)

    def _door_opened(self, door: Door, conn: Conn, state: _Offer | None = None) -> bool:
        """The offer is in: no deadline, no more credentials to read."""
        if conn.linger is not None:
            conn.linger.cancel()
            conn.linger = None
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
        except OSError as exc:
            self._drop_door(door, conn, f"cannot set up the connection: {exc.strerror}", state)
            return False
        return True

    def _feed_early(self, conn: Conn, data: bytes) -> None:
        """Messages that came with a new peer, queued behind its CONNECTION."""
        assert conn.decoder is not None
        try:
            messages = conn.decoder.feed(data)
        except ProtocolError as exc:
            log.warning("%s; closing it", bad_input(conn, exc))
            self.offered.pop(conn.fd, None)
            self.drop_handover(conn.fd)
            self.ctx._table.close_conn(conn, str(exc), error=type(exc))
            return
        for message in messages:
            self.ctx._events.append(message_rx(conn.fd, message))

    def _handed_over(self, door: Door, conn: Conn, state: _Offer, handoff: _door.Handoff) -> None:
        """A daemon handed its network socket over: adopt it as a peer (the
        door connection waits for the verdict, then closes)."""
        info = state.info
        assert info is not None
        if len(state.fds) != 1:
            self._drop_door(door, conn, f"{len(state.fds)} descriptors with one hand-off", state)
            return
        try:
            sock = socket.socket(fileno=state.fds[0])
        except OSError as exc:
            self._drop_door(door, conn, f"the handed-over descriptor: {exc.strerror}", state)
            return
        state.fds.clear()
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            self._drop_door(door, conn, "the handed-over descriptor is not a stream socket")
            return
        websocket = info.transport == "ws"
        if not (door.websocket if websocket else door.handoff):
            sock.close()
            kind = "a WebSocket" if websocket else f"a {info.transport!r}"
            self._drop_door(door, conn, f"{kind} connection handed over; this service takes none")
            return
        if not self._door_opened(door, conn):
            sock.close()
            return
        sock.setblocking(False)
        if websocket:
            self._hold(door, conn, HandedOver(sock, handoff.early, info))
            return
        peer = Conn(PEER, sock)
        peer.origin = door.origin
        peer.peer = info
        peer.decoder = FrameDecoder(self.ctx.max_message_size)
        peer.reader = self.ctx._read_peer
        self.ctx._table.add(peer, _EPOLLIN)
        conn.reader = self._read_spent_door
        event = Event(_CONNECTION, peer.fd, origin=door.origin, peer=info)
        self.ctx._events.append(event)
        self.offered[peer.fd] = (peer, event)
        self.handovers[peer.fd] = _Handover(conn, handoff.reply)
        if handoff.early:
            self._feed_early(peer, handoff.early)

    def _hold(self, door: Door, conn: Conn, taken: HandedOver) -> None:
        """A WebSocket hand-off: announced, then held for ``take`` (the
        application parses the handshake itself; the Context never reads
        a WebSocket stream)."""
        fd = taken.sock.fileno()
        conn.reader = functools.partial(self._read_held_door, fd)
        event = Event(_CONNECTION, fd, origin=door.origin, peer=taken.peer)
        self.held[fd] = _Held(taken, conn, event)
        self.ctx._events.append(event)

    def take(self, fd: int) -> HandedOver | None:
        """Accept held hand-off ``fd`` (the verdict to the daemon, whose copy
        then closes) and give it to the caller, who owns its socket; None
        when ``fd`` is no hand-off waiting."""
        held = self.held.pop(fd, None) if self.held else None
        if held is None:
            return None
        if self._withdrawn(held.door):  # the daemon gave up and answered the client itself
            self._drop_withdrawn(fd, held)
            return None
        self._answer_door(held.door, _ACCEPT_FRAME)
        return held.taken

    def drop_held(self, fd: int, reason: str) -> bool:
        """Refuse held hand-off ``fd`` with ``reason``; False if none."""
        held = self.held.pop(fd, None) if self.held else None
        if held is None:
            return False
        self._answer_door(held.door, _door.refuse_frame(reason))
        held.taken.sock.close()
        return True

    def untaken(self) -> None:
        """Hand-offs whose CONNECTION event the application was given but did
        not take: refused (a service that asked for WebSocket hand-offs and
        then ignores one would leave the client waiting forever)."""
        queued = {id(ev) for ev in self.ctx._events if ev.peer is not None}
        for fd, held in list(self.held.items()):
            if id(held.event) not in queued:
                log.warning("descriptor %d: WebSocket hand-off not taken; refusing it", fd)
                self.drop_held(fd, "the service did not take the connection")

    def _read_held_door(self, fd: int, conn: Conn) -> None:
        """The door of a hand-off still held says something (EOF: the daemon
        gave up, e.g. at its deadline, and answered the client itself): the
        held socket goes too, and its CONNECTION event if still queued."""
        data = _door_says(conn)
        if data is None:
            return
        held = self.held.get(fd)
        if held is not None and held.door is conn:
            del self.held[fd]
            self._drop_withdrawn(fd, held)  # the door closed with it
            return
        self.ctx._table.close_conn(
            conn, None if not data else "bytes after a hand-off", report=False
        )

    def _withdrawn(self, door: Conn) -> bool:
        """Has the daemon closed (or broken) a held hand-off's door? Checked
        at ``take``: its EOF may not have been read yet."""
        if self.ctx._conns.get(door.fd) is not door:
            return True
        try:
            door.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True  # EOF (it gave up), or a byte it must not send

    def _drop_withdrawn(self, fd: int, held: _Held) -> None:
        with contextlib.suppress(ValueError):
            self.ctx._events.remove(held.event)  # not yet seen: never will be
        held.taken.sock.close()
        self.ctx._table.close_conn(held.door, None, report=False)
        log.warning("descriptor %d: the daemon withdrew its WebSocket hand-off", fd)

    def close_held(self) -> None:
        for held in self.held.values():
            held.taken.sock.close()
        self.held.clear()

    def _read_spent_door(self, conn: Conn) -> None:
        """A door whose socket was handed over says nothing more: close it on
        EOF (the daemon gave up) or on any byte."""
        data = _door_says(conn)
        if data is None:
            return
        self.ctx._table.close_conn(
            conn, None if not data else "bytes after a hand-off", report=False
        )

    def _answer_door(self, door: Conn, frame: bytes) -> None:
        """The verdict on a hand-off's door, then the door closed: at once if
        the frame went out (it nearly always does: a fresh socket), else when
        the daemon, having read it, closes its end (``_read_spent_door``)."""
        if self.ctx._conns.get(door.fd) is not door:
            return
        self.ctx._table.send(door, frame)
        if not door.out:
            self.ctx._table.close_conn(door, None, report=False)

    def drop_handover(self, fd: int) -> _Handover | None:
        handover = self.handovers.pop(fd, None) if self.handovers else None
        if handover is not None and self.ctx._conns.get(handover.door.fd) is handover.door:
            self.ctx._table.close_conn(handover.door, None, report=False)
        return handover

    def _offer_late(self, door: Door, conn: Conn) -> None:
        if self.ctx._conns.get(conn.fd) is conn and conn.decoder is None:
            conn.linger = None
            self._drop_door(door, conn, f"no peer information within {self.ctx._offer_seconds:g} s")

    def _drop_door(self, door: Door, conn: Conn, reason: str, state: _Offer | None = None) -> None:
        """A door connection that is not believed: a warning, a close, no event
        (and any descriptor it passed closed)."""
        if state is not None:
            state.close_fds()
        log.warning("door of service %r, descriptor %d: %s; closing it", door.name, conn.fd, reason)
        self.ctx._table.close_conn(conn, reason, report=False)

    def accept_offer(self, fd: int) -> None:
        """Send the accept verdict to door connection ``fd`` (if it is still
        the connection that made the offer)."""
        conn, _event = self.offered.pop(fd)
        handover = self.handovers.pop(fd, None) if self.handovers else None
        if handover is None:
            if self.ctx._conns.get(fd) is conn:
                self.ctx._table.send(conn, _ACCEPT_FRAME)
            return
        # A handed-over socket: the verdict on the door (the daemon then
        # closes its copy), the door closed, the client's reply first.
        self._answer_door(handover.door, _ACCEPT_FRAME)
        if self.ctx._conns.get(fd) is conn and handover.reply:
            self.ctx._table.send(conn, handover.reply)

    def accept_seen(self) -> None:
        """Accept every offer whose CONNECTION event the application has
        already been given (and did not refuse)."""
        queued = {id(ev) for ev in self.ctx._events if ev.peer is not None}
        for fd, (_conn, event) in list(self.offered.items()):
            if id(event) not in queued:
                self.accept_offer(fd)

    def refuse(self, fd: int, reason: str) -> None:
        """:meth:`Context.refuse <ipc_core.Context.refuse>` (its docstring
        says the rules): a held hand-off, or a door connection's offer."""
        if self.drop_held(fd, reason):
            log.debug("descriptor %d refused: %s", fd, _door.clean_reason(reason))
            return
        conn = self.ctx._table.get(fd)
        entry = self.offered.get(fd)
        if entry is None or entry[0] is not conn:
            raise UsageError(
                f"descriptor {fd} has no verdict to give (not a door connection,"
                " or already accepted)"
            )
        frame = _door.refuse_frame(reason)
        del self.offered[fd]
        log.debug("descriptor %d refused: %s", fd, _door.clean_reason(reason))
        handover = self.handovers.pop(fd, None) if self.handovers else None
        if handover is None:
            self.ctx._table.send(conn, frame)
            self.ctx.close(fd, flush=True)
            return
        # The refusal goes to the daemon on the door; the client gets nothing
        # and sees the close once the daemon drops its copy too.
        self._answer_door(handover.door, frame)
        self.ctx.close(fd, flush=True)


def _door_says(conn: Conn) -> bytes | None:
    """One byte from a door past its offer (b"" at EOF or on an error), or
    None when nothing is there yet."""
    try:
        data: bytes = conn.sock.recv(1)
    except BlockingIOError:
        return None
    except OSError:
        return b""
    return data


def _credentials_problem(
    ancdata: list[tuple[int, int, bytes]],
    flags: int,
    trusted: frozenset[int],
    keep: list[int] | None = None,
) -> str | None:
    """Why one read of a door connection is not believed, or None: its
    SCM_CREDENTIALS must name a trusted uid. Passed descriptors go to
    ``keep`` (a door that takes hand-offs) or are closed and refused."""
    creds = None
    passed = False
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            creds = _UCRED.unpack_from(data)
        elif kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds = [fd for (fd,) in struct.iter_unpack("i", data[:usable])]
            if keep is not None:
                keep.extend(fds)
                continue
            passed = True
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
    if flags & socket.MSG_CTRUNC:
        return "sent more descriptors than one, or other ancillary data"
    if passed:
        return "sent descriptors or other ancillary data"
    if keep is not None and len(keep) > 1:
        return f"sent {len(keep)} descriptors (a hand-off passes one)"
    if creds is None or creds[0] == 0:
        return "no credentials came with the peer information"
    pid, uid, _gid = creds
    if uid not in trusted:
        return f"uid {uid} (pid {pid}) is not trusted to give peer information"
    return None


_accept_logged = [-float("inf")]


def _accept_log_due(every: float = 5.0) -> bool:
    """Rate limit for the accept-error line (a descriptor limit lasts); the
    Context's listeners and the doors share it."""
    now = time.monotonic()
    if now - _accept_logged[0] < every:
        return False
    _accept_logged[0] = now
    return True
