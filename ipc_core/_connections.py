"""Connection records, their output queues, back-pressure and closing.

Theory of operation
-------------------
Every descriptor of a :class:`~ipc_core.Context` is a :class:`Conn`: its
:class:`Kind`, its socket (or a pipe behind :class:`RawFd`), the epoll mask
last set, its send queue, and ``reader``, the function the loop calls when
the descriptor is readable (chosen when the connection is made or switched,
never re-decided per read).

:class:`Connections` is the table of them and the only writer:

* ``send``/``send_vector`` write at once and queue only what the kernel
  refuses; ``flush`` writes queues out on EPOLLOUT, up to 64 buffers per
  ``sendmsg``.
* Back-pressure: past a queue's high-water mark the table stops reading
  from what feeds it (a switched end's partner, or the peer itself) and
  resumes below the low mark. Past the hard limit the peer is disconnected
  with the reason "send queue over N bytes: peer is not reading".
* Closing: ``close_conn`` reports a DISCONNECTION and keeps the descriptor's
  number reserved until the application has seen it (``deferred_close``);
  ``linger`` closes once the queue is written or at a deadline; a pair whose
  one end goes closes its partner after the partner's queue (``close_pair``).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import itertools
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import (
    IPCError,
    MessageTooLarge,
    PeerClosed,
    PeerNotReading,
    ProtocolError,
    UsageError,
)
from .events import Event, EventType

if TYPE_CHECKING:
    from ._scheduling import TimerHandle, Timers
    from .framing import FrameDecoder, FrameScanner
    from .peerinfo import PeerInfo
    from .rundir import ServiceSocket
    from .switch import FastHook, InCallback, Layer, OutCallback

log = logging.getLogger("ipc_core")

_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_IOV_BATCH = 64
#: Seconds a closing connection may take to write its queue (per piece).
LINGER_SECONDS = 5.0

Reader = Callable[["Conn"], None]


class Kind(enum.IntEnum):
    """What a descriptor of the context is."""

    LISTENER = 0  # a service socket: readable = clients to accept
    PEER = 1  # a LibIPC peer: bytes are decoded into MESSAGE_RX events
    EXTERNAL = 2  # the application's descriptor: readable = EXTERNAL event
    SWITCHED = 3  # one end of a pair: what is read goes to the partner


LISTENER, PEER, EXTERNAL, SWITCHED = Kind.LISTENER, Kind.PEER, Kind.EXTERNAL, Kind.SWITCHED


class Counters:
    """What was read from switched ends under one tag (``Context.stats``)."""

    __slots__ = ("bytes", "messages")

    def __init__(self) -> None:
        self.bytes = 0
        self.messages = 0

    def __repr__(self) -> str:
        return f"Counters(bytes={self.bytes}, messages={self.messages})"


NO_STATS = Counters()  # not counted: a descriptor that is not switched


class RawFd:
    """A non-socket descriptor (pipe, tty) behind the subset of the socket API
    the loop uses, so that pipes can be external or even switched."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def send(self, data: Any) -> int:
        return os.write(self._fd, data)

    def sendmsg(self, buffers: Any) -> int:
        return os.writev(self._fd, list(buffers))

    def recv_into(self, buf: Any) -> int:
        return os.readv(self._fd, [buf])

    def setblocking(self, flag: bool) -> None:
        os.set_blocking(self._fd, flag)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def detach(self) -> int:
        fd, self._fd = self._fd, -1
        return fd


def wrap_fd(fd: int) -> Any:
    """A socket object for ``fd``, or a :class:`RawFd` for a pipe or tty."""
    try:
        return socket.socket(fileno=fd)
    except OSError as exc:
        if exc.errno != errno.ENOTSOCK:
            raise
        return RawFd(fd)


def _unread(conn: Conn) -> None:
    """The reader of a connection not set up yet (never called)."""


class Conn:
    """One descriptor of the context (see the module docstring)."""

    __slots__ = (
        "closing",
        "decoder",
        "eof",
        "fast_in",
        "fast_out",
        "fd",
        "feeding_paused",
        "in_cb",
        "kind",
        "layer",
        "linger",
        "mask",
        "origin",
        "out",
        "out_bytes",
        "out_cb",
        "owned",
        "partner",
        "paused",
        "peer",
        "reader",
        "refill",
        "scanner",
        "service",
        "shut_pending",
        "sock",
        "stats",
    )

    def __init__(self, kind: Kind, sock: Any, *, owned: bool = True) -> None:
        self.kind = kind
        self.sock = sock
        self.fd: int = sock.fileno()
        self.owned = owned
        self.mask = 0
        #: Called when the descriptor is readable (set by the Context/Relay).
        self.reader: Reader = _unread
        self.out: collections.deque[list[Any]] = collections.deque()
        self.out_bytes = 0
        self.paused = False  # reading stopped because a queue we feed is full
        self.feeding_paused: Conn | None = None  # whom we stopped reading from
        self.decoder: FrameDecoder | None = None
        self.scanner: FrameScanner | None = None
        self.partner: Conn | None = None
        self.layer: Layer | None = None
        # A layer's fast hooks for what this end reads (see Relay.choose).
        self.fast_in: FastHook | None = None
        self.fast_out: FastHook | None = None
        self.in_cb: InCallback | None = None
        self.out_cb: OutCallback | None = None
        self.service: ServiceSocket | None = None
        self.origin = -1
        #: Who the client is (a door connection's offer), else None.
        self.peer: PeerInfo | None = None
        self.closing = False  # close once the send queue is flushed
        self.eof = False  # a switched end whose peer half-closed: read no more
        self.shut_pending = False  # shut our write side once the queue is flushed
        #: The lingering deadline; for a door connection still waiting for
        #: its offer, the offer's deadline (cancelled the same way on close).
        self.linger: TimerHandle | None = None
        #: While lingering: called for the next piece once the queue is empty
        #: (close(fd, flush=True, refill=...)); b"" ends it.
        self.refill: Callable[[], Any] | None = None
        self.stats: Counters = NO_STATS


class Connections:
    """The table of connections and everything that writes to them."""

    def __init__(
        self,
        events: collections.deque[Event],
        timers: Timers,
        *,
        queue_high_water: int,
        switch_high_water: int,
        queue_hard_limit: int,
    ) -> None:
        self.conns: dict[int, Conn] = {}
        self.ep = select.epoll()
        self.events = events
        self.timers = timers
        self.queue_high_water = queue_high_water
        self.queue_low_water = queue_high_water // 4
        self.switch_high_water = switch_high_water
        self.queue_hard_limit = queue_hard_limit
        self.closed = False
        self.deferred_close: list[Any] = []  # closed once their events are consumed
        self.always_ready: set[int] = set()  # regular files: epoll refuses them
        #: A peer-information service's listener fd -> its door's listener,
        #: closed with it.
        self.doors: dict[int, Conn] = {}

    # ----------------------------------------------------------------- table

    def add(self, conn: Conn, mask: int) -> None:
        self.conns[conn.fd] = conn
        conn.mask = mask
        self.ep.register(conn.fd, mask)

    def forget(self, conn: Conn) -> None:
        self.conns.pop(conn.fd, None)
        if conn.fd in self.always_ready:
            self.always_ready.discard(conn.fd)
            return
        if not self.closed:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(conn.fd)

    def update_mask(self, conn: Conn) -> None:
        mask = 0 if conn.paused or conn.eof else _EPOLLIN
        if conn.out:
            mask |= _EPOLLOUT
        if mask != conn.mask and conn.fd in self.conns:
            conn.mask = mask
            self.ep.modify(conn.fd, mask)

    def get(self, fd: int) -> Conn:
        conn = self.conns.get(fd)
        if conn is None:
            if self.disconnection_pending(fd):
                raise PeerClosed(f"descriptor {fd} is closed (its DISCONNECTION is pending)")
            raise UsageError(f"descriptor {fd} is not in the context")
        return conn

    def disconnection_pending(self, fd: int) -> bool:
        """True for a descriptor closed by the loop whose DISCONNECTION event
        the application has not consumed yet (its number is still reserved)."""
        return any(s.fileno() == fd for s in self.deferred_close)

    # ---------------------------------------------------------------- output

    def send(self, conn: Conn, data: bytes | memoryview, *, copy: bool = False) -> bool:
        """Write now what the socket takes, queue the rest (the only writer)."""
        if conn.out:
            return self.enqueue(conn, bytes(data) if copy else data)
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.lost(conn, exc)
            return False
        if sent == len(data):
            return True
        rest = data[sent:] if copy else memoryview(data)[sent:]
        return self.enqueue(conn, bytes(rest) if copy else rest)

    def send_vector(self, conn: Conn, head: bytes, payload: Any, *, notify: bool) -> bool:
        """Write header and payload with one ``sendmsg`` (no concatenation);
        ``notify``: a MESSAGE_TX event once the payload is all written."""
        if conn.out:
            ok = self.enqueue(conn, head)
            return ok and self.enqueue(conn, payload, notify=notify)
        total = len(head) + len(payload)
        try:
            sent = conn.sock.sendmsg((head, payload))
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.lost(conn, exc)
            return False
        if sent == total:
            if notify:
                self.events.append(Event(EventType.MESSAGE_TX, conn.fd))
            return True
        if sent < len(head):
            if not self.enqueue(conn, head[sent:]):
                return False
            return self.enqueue(conn, payload, notify=notify)
        return self.enqueue(conn, memoryview(payload)[sent - len(head) :], notify=notify)

    def enqueue(self, conn: Conn, data: Any, *, notify: bool = False) -> bool:
        """Queue ``data`` for ``conn``; apply back-pressure and the hard limit."""
        size = len(data)
        if conn.out_bytes and conn.out_bytes + size > self.queue_hard_limit:
            reason = f"send queue over {self.queue_hard_limit} bytes: peer is not reading"
            log.warning("descriptor %d: %s; closing it", conn.fd, reason)
            if conn.kind == SWITCHED:
                self.close_pair(conn, reason, error=PeerNotReading)
            else:
                self.close_conn(conn, reason, error=PeerNotReading)
            return False
        first = not conn.out
        conn.out.append([data, notify])
        conn.out_bytes += size
        if first:
            self.update_mask(conn)
        mark = self.switch_high_water if conn.kind == SWITCHED else self.queue_high_water
        if conn.out_bytes > mark and conn.feeding_paused is None:
            feeder = conn.partner if conn.kind == SWITCHED else conn
            if feeder is not None and feeder.kind in (PEER, SWITCHED):
                conn.feeding_paused = feeder
                feeder.paused = True
                self.update_mask(feeder)
        return True

    def flush(self, conn: Conn) -> None:
        """Write out ``conn``'s queue (EPOLLOUT); resume what it paused."""
        out = conn.out
        sock = conn.sock
        while out:
            if len(out) == 1:
                buffers: Any = (out[0][0],)
            else:
                buffers = [item[0] for item in itertools.islice(out, _IOV_BATCH)]
            try:
                sent = sock.sendmsg(buffers)
            except BlockingIOError:
                break
            except OSError as exc:
                self.lost(conn, exc)
                return
            conn.out_bytes -= sent
            while sent:
                item = out[0]
                size = len(item[0])
                if sent >= size:
                    sent -= size
                    out.popleft()
                    if item[1]:
                        self.events.append(Event(EventType.MESSAGE_TX, conn.fd))
                else:
                    item[0] = memoryview(item[0])[sent:]
                    sent = 0
                    break
            if out and len(buffers) < _IOV_BATCH:
                break  # the kernel buffer is full
        paused = conn.feeding_paused
        low = self.switch_high_water // 2 if conn.kind == SWITCHED else self.queue_low_water
        if paused is not None and conn.out_bytes <= low:
            conn.feeding_paused = None
            if paused.fd in self.conns and not paused.closing:
                paused.paused = False
                self.update_mask(paused)
        if not out:
            if conn.closing:
                if conn.refill is not None and self.refill(conn):
                    return
                self.close_conn(conn, None)
                return
            if conn.shut_pending:
                self.shut_write(conn)
                if conn.fd not in self.conns:
                    return
            self.update_mask(conn)

    def lost(self, conn: Conn, exc: OSError) -> None:
        """A write failed: the connection (and a switched end's pair) goes."""
        reason = f"write failed: {exc.strerror or exc}"
        if conn.kind == SWITCHED:
            self.close_pair(conn, reason)
        else:
            self.close_conn(conn, reason)

    def shut_write(self, conn: Conn) -> None:
        """Pass a half-close on: shut ``conn``'s write side."""
        conn.shut_pending = False
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.lost(conn, exc)

    def flush_layer(self, conn: Conn) -> None:
        """Write what ``conn``'s layer wants to send."""
        assert conn.layer is not None
        pending = conn.layer.data_to_send()
        if pending:
            self.send(conn, pending)

    # --------------------------------------------------------------- closing

    def linger(self, conn: Conn) -> None:
        """Read no more; close once the queue is written (or at the deadline)."""
        conn.closing = True
        conn.paused = True
        self.update_mask(conn)
        self.restart_linger(conn)

    def restart_linger(self, conn: Conn) -> None:
        if conn.linger is not None:
            conn.linger.cancel()
        conn.linger = self.timers.call_later(
            LINGER_SECONDS,
            lambda: self.close_conn(conn, "linger timeout: peer not reading", error=PeerNotReading),
        )

    def refill(self, conn: Conn) -> bool:
        """Queue the next piece of a streamed answer; False when it is over
        (or failed: the connection is then closed with the reason)."""
        assert conn.refill is not None
        try:
            piece = conn.refill()
        except Exception as exc:  # the producer's bug costs only this connection
            conn.refill = None
            self.close_conn(conn, f"streaming failed: {exc!r}")
            return True
        if not piece:
            conn.refill = None
            return False
        self.restart_linger(conn)
        self.enqueue(conn, piece)
        return True

    def close_conn(
        self,
        conn: Conn,
        reason: str | None,
        *,
        report: bool = True,
        error: type[BaseException] | None = None,
    ) -> None:
        """Close one connection; ``report``: a DISCONNECTION event (with the
        descriptor's number reserved until the application has taken it)
        carrying ``reason`` and the ``error`` class behind it."""
        if self.conns.get(conn.fd) is not conn:
            return
        fd = conn.fd
        self.forget(conn)
        conn.refill = None  # a streamed answer's producer (and its buffers) goes now
        if conn.linger is not None:
            conn.linger.cancel()
        if conn.service is not None:
            door = self.doors.pop(fd, None)
            if door is not None:
                self.close_conn(door, None, report=False)
            conn.service.close()  # removes the door's socket file, then the lock
        elif not conn.owned:
            conn.sock.detach()
        elif report and not self.closed:
            # Keep the descriptor number taken until the application has seen
            # the DISCONNECTION event: otherwise a connection accepted in the
            # same batch could reuse the number and be mistaken for this one.
            # shutdown() lets the peer see the close now.
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            self.deferred_close.append(conn.sock)
        else:
            conn.sock.close()
        conn.out.clear()
        if conn.feeding_paused is not None:
            feeder = conn.feeding_paused
            conn.feeding_paused = None
            if feeder.fd in self.conns and not feeder.closing:
                feeder.paused = False
                self.update_mask(feeder)
        if report:
            if reason is not None:
                log.debug("descriptor %d closed: %s", fd, reason)
            self.events.append(Event(EventType.DISCONNECTION, fd, reason=reason, error=error))
        else:
            self.drop_events(fd)

    def close_pair(
        self, conn: Conn, reason: str | None, *, error: type[BaseException] | None = None
    ) -> None:
        """One end of a pair failed or closed: close it now and its partner as
        soon as what is queued for the partner is written (bounded by a linger
        deadline)."""
        partner = conn.partner
        self.close_conn(conn, reason, error=error)
        if partner is None or partner.fd not in self.conns or partner.closing:
            return
        partner.partner = None
        partner.reader = self.read_orphan
        if partner.layer is not None:
            with contextlib.suppress(IPCError):
                partner.layer.close()
            with contextlib.suppress(IPCError):
                self.flush_layer(partner)
        if partner.fd not in self.conns:
            return
        if not partner.out:
            self.close_conn(partner, reason, error=error)
            return
        self.linger(partner)

    def read_orphan(self, conn: Conn) -> None:
        """The reader of a lingering end whose partner is gone (called only on
        EPOLLHUP/EPOLLERR: it reads no more): nothing can take what it reads,
        so drop it; an error or EOF closes the end now."""
        try:
            n = conn.sock.recv_into(bytearray(65536))
        except BlockingIOError:
            return
        except OSError as exc:
            self.close_conn(conn, f"read failed: {exc.strerror or exc}")
            return
        if n == 0:
            self.close_conn(conn, None)

    def close_deferred(self) -> None:
        socks, self.deferred_close = self.deferred_close, []
        for sock in socks:
            sock.close()

    def drop_events(self, fd: int) -> None:
        events = self.events
        if events:
            kept = [ev for ev in events if ev.fd != fd]
            events.clear()
            events.extend(kept)


# ------------------------------------------------------------ what peers did


def bad_input(conn: Conn, exc: ProtocolError) -> str:
    """The log text of a peer's bad input: the descriptor, and for an
    oversize length the peer and what the four "length" bytes look like (a
    text or TLS client talking to a LibIPC socket is the usual cause)."""
    if not isinstance(exc, MessageTooLarge):
        return f"descriptor {conn.fd}: {exc}"
    return f"descriptor {conn.fd} ({peer_of(conn.sock)}): {exc}{header_hint(exc.length)}"


def peer_of(sock: socket.socket) -> str:
    """``peer 192.0.2.7:51212``, ``peer [2001:db8::1]:443`` or ``local pid 1234``."""
    try:
        if sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return f"local pid {struct.unpack('3i', creds)[0]}"
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError, AttributeError):
        return "peer unknown"
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]  # IPv4-mapped: a plain IPv4 peer of a dual-stack listener
    return f"peer [{host}]:{port}" if ":" in host else f"peer {host}:{port}"


def header_hint(length: int) -> str:
    """Why a peer announced ``length``: its four bytes read as text or TLS."""
    raw = length.to_bytes(4, "big")
    if raw[0] == 0x16 and raw[1] == 0x03:
        return " (the bytes look like a TLS handshake: a TLS client on a plain LibIPC socket?)"
    if all(0x20 <= b < 0x7F or b in b"\t\r\n" for b in raw):
        return f" (the bytes {raw.decode()!r} look like text: a text or HTTP client, not LibIPC?)"
    return ""
