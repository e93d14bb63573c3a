"""Context: the event loop, and the one place in ipc_core that does I/O.

Theory of operation
-------------------
A context owns a set of descriptors ("connections"), each of one kind:

* LISTENER  a service socket in the run directory; readable = clients to accept
* PEER      a LibIPC peer (accepted or connected): bytes are decoded into
            MESSAGE_RX events by a per-connection :class:`FrameDecoder`
* EXTERNAL  any descriptor the application added: readable = EXTERNAL event;
            the application reads it, the loop may write to it (send_raw)
* SWITCHED  one end of a switched pair: what is read is forwarded to the
            partner inside the loop (optionally through a Sans-I/O layer)

``wait_event`` returns queued events first; only when the queue is empty does
it call ``epoll.poll`` once and handle *every* ready descriptor (one read of
up to 256 KiB into a shared buffer each) before returning the first new
event. Readiness costs O(ready), and one busy peer cannot starve the others:
each gets one read per poll. Each connection carries its ``reader``, chosen
when it is made or switched, so a readable descriptor costs one call.

Writes are attempted at once; whatever the kernel does not take is queued
per connection and flushed on EPOLLOUT. Each queue has a high-water mark:
above it the loop stops reading from what feeds that queue (the partner of a
switched end, or the peer itself for a request/response service) until it
drains below a quarter of the mark. A queue that still grows past the hard
limit (an application writing to a peer that never reads) disconnects that
peer with a logged reason. Memory therefore stays bounded whatever peers do.

Peers never raise out of the loop: a broken frame, an oversize length, a
reset become a DISCONNECTION event carrying a ``reason`` and a log line.

Inside the Context
------------------
``Context`` is the public face; its parts live in private modules of one
concept each (as trio's loop does):

* ``_connections``  connection records (:class:`Kind`, counters), the table,
  output queues, back-pressure, closing and lingering
* ``_relay``        relaying between switched ends: one strategy per end,
  chosen when the switch is set up
* ``_scheduling``   timers, callbacks from other threads, signals
* ``_doors``        the doors of peer-information and hand-off services:
  offers, credentials, adopted sockets, verdicts

This module keeps the loop itself (``wait_event``, dispatch), LibIPC peers
and listeners (read, accept), and the public methods. Door connections wait
in ``_offered`` for a verdict; the hot paths pay one truthiness test of it
(empty but for those moments), ordinary peers' reads nothing.
"""

from __future__ import annotations

import collections
import errno
import functools
import heapq
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from . import door as _door
from . import routing
from ._connections import (
    EXTERNAL,
    LINGER_SECONDS,
    LISTENER,
    NO_STATS,
    PEER,
    SWITCHED,
    Conn,
    Connections,
    Counters,
    Kind,
    bad_input,
    wrap_fd,
)
from ._connections import header_hint as _header_hint  # noqa: F401  (tests import it here)
from ._doors import Door, Doors, HandedOver, _accept_log_due
from ._relay import Relay
from ._scheduling import Inbox, Signals, TimerHandle, Timers, next_wait
from .errors import IPCError, PeerClosed, ProtocolError, ServiceUnavailable, UsageError
from .events import TIMER_EVENT, Event, EventType, message_rx
from .framing import DEFAULT_MAX_MESSAGE_SIZE, FrameDecoder, FrameScanner, check_limit, header
from .peerinfo import PeerInfo
from .rundir import bind_service, rundir, socket_path
from .switch import InCallback, Layer, OutCallback

log = logging.getLogger("ipc_core")

_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_READABLE = _EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_READ_BUFFER = 256 * 1024
_SMALL_FRAME = 64 * 1024  # below this, header + payload are joined and sent with send()
_ACCEPT_BATCH = 64
DEFAULT_QUEUE_HIGH_WATER = 1 * 1024 * 1024
_CONNECTION = EventType.CONNECTION
__all__ = [
    "LINGER_SECONDS",
    "Context",
    "ContextStopped",
    "Counters",
    "Kind",
    "ServiceUnavailable",
    "TimerHandle",
    "socket_path",
]


class ContextStopped(IPCError):
    """The context was stopped (by ``stop()`` or a SIGINT/SIGTERM)."""


class Context:
    """An application's connections and its event loop.

    ``max_message_size`` caps what a peer may announce; ``queue_high_water``
    is the per-connection send-queue mark (bytes) above which the loop stops
    reading from what feeds it; ``queue_hard_limit`` (default 8x the mark, and
    at least one maximal message more) disconnects a peer whose queue still
    grows. ``switch_events=False`` stops SWITCH_RX/SWITCH_TX events, which a
    daemon relaying many messages does not need.
    """

    def __init__(
        self,
        *,
        rundir_path: str | os.PathLike[str] | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        queue_high_water: int = DEFAULT_QUEUE_HIGH_WATER,
        queue_hard_limit: int | None = None,
        switch_events: bool = True,
    ) -> None:
        self.rundir = Path(rundir_path) if rundir_path is not None else rundir()
        self.max_message_size = check_limit(max_message_size)
        #: Bytes and messages read from switched ends, by tag (see set_tag).
        self.stats: dict[str, Counters] = {}
        self.timer: float | None = None
        self._events: collections.deque[Event] = collections.deque()
        self._timers = Timers()
        self._table = Connections(
            self._events,
            self._timers,
            queue_high_water=queue_high_water,
            # A relay copies only what the far socket refuses; reading on while
            # the far end is full would only copy more. So a switched end stops
            # its partner as soon as one read's worth is queued (like socat).
            switch_high_water=min(queue_high_water, _READ_BUFFER),
            queue_hard_limit=queue_hard_limit
            or max(8 * queue_high_water, queue_high_water + max_message_size + 4),
        )
        self._buf = bytearray(_READ_BUFFER)
        self._view = memoryview(self._buf)
        self._relay = Relay(
            self._table,
            self._buf,
            self._events,
            max_message_size=self.max_message_size,
            switch_events=switch_events,
        )
        # The table's parts the hot paths use, bound once.
        self._conns = self._table.conns
        self._ep = self._table.ep
        self._stopped = False
        self._loop_thread = threading.get_ident()
        self._inbox = Inbox()
        self._ep.register(self._inbox.fd, _EPOLLIN)
        self._signals = Signals()
        #: Door connections whose CONNECTION is out and whose verdict is not:
        #: fd -> (connection, its CONNECTION event).
        self._offered: dict[int, tuple[Conn, Event]] = {}
        #: The doors of peer-information and hand-off services (_doors.py).
        self._doors = Doors(self)
        #: Seconds a door connection has to send its offer.
        self._offer_seconds = _door.OFFER_SECONDS

    @property
    def switch_events(self) -> bool:
        """Whether switched ends produce SWITCH_RX/SWITCH_TX events."""
        return self._relay.switch_events

    @switch_events.setter
    def switch_events(self, value: bool) -> None:
        self._relay.switch_events = value

    @property
    def queue_high_water(self) -> int:
        return self._table.queue_high_water

    @property
    def queue_hard_limit(self) -> int:
        return self._table.queue_hard_limit

    # ------------------------------------------------------------------ setup

    def service_init(
        self,
        name: str,
        backlog: int = 1024,
        *,
        local_only: bool = False,
        peer_info: bool = False,
        handoff: bool = False,
        handoff_websocket: bool = False,
        trusted_uids: Iterable[int] = (),
        marks: Iterable[str] = (),
    ) -> int:
        """Listen as service ``name``; return the listening descriptor.

        ``local_only=True`` declares a service that must never be reached from
        the network (a router, a daemon's outbound side, a control service):
        protocol daemons refuse to connect a remote peer to it.

        ``peer_info=True`` asks the protocol daemons who each client is: the
        service also listens on its door (``$RUNDIR/NAME.door``), and a client
        relayed through it arrives as a CONNECTION event whose ``peer`` is a
        :class:`~ipc_core.peerinfo.PeerInfo` (also ``peer_info(fd)``); the
        application may then ``refuse(fd, reason)`` it. The door believes only
        root, this process's effective uid, the run directory's owner and
        ``trusted_uids``. Clients connecting to ``NAME`` itself arrive as
        before, with ``peer`` None.

        ``handoff=True`` takes network connections over from the protocol
        daemons whose stream is plain LibIPC after their handshake (ipc-tcpd):
        the daemon passes the TCP socket itself through the door and keeps no
        copy, so no relay stays in the path. A handed-over connection arrives
        as a CONNECTION event with ``peer`` set (the door's offer comes with
        it), and is an ordinary peer from then on: this context's limits
        (message size, queues) apply to it, the daemon's no longer do.

        ``handoff_websocket=True`` (lock mark ``handoff-websocket``) takes
        WebSocket connections over from ipc-websocketd, before it answered
        their handshake: the CONNECTION event (``peer.transport`` is ``ws``)
        is for :meth:`take_handoff`, which gives the client's socket and the
        bytes the daemon read (the HTTP request first); the application
        speaks WebSocket itself (``ipc exec`` does). One not taken by the
        next ``wait_event`` is refused.

        ``marks``: more lines for the lock file (lower-case words), which
        other programs read with :func:`~ipc_core.service_marks` (ipc-tcpd's
        outbound side says ``hands-over`` so that ipcd asks it for sockets).

        Raises ServiceBusy if another instance runs, InvalidServiceName for a
        bad name (names ending in ``.door`` are reserved).
        """
        self._check_open()
        trusted = frozenset(trusted_uids)
        for uid in trusted:
            if type(uid) is not int or uid < 0:
                raise UsageError(f"trusted_uids: {uid!r} is not a uid")
        service = bind_service(
            name,
            self.rundir,
            backlog,
            local_only=local_only,
            peer_info=peer_info,
            handoff=handoff,
            handoff_websocket=handoff_websocket,
            marks=tuple(marks),
        )
        conn = Conn(LISTENER, service.sock)
        conn.service = service
        conn.reader = self._accept
        self._table.add(conn, _EPOLLIN)
        if service.door is not None:
            trusting = trusted | {0, os.geteuid(), service.owner_uid}
            door = Door(name, conn.fd, trusting, handoff, handoff_websocket)
            gate = Conn(LISTENER, service.door)
            gate.reader = functools.partial(self._doors.accept, door)
            self._table.add(gate, _EPOLLIN)
            self._table.doors[conn.fd] = gate
            log.debug("service %r: door on %s", name, service.door_path)
        log.debug("service %r listening on %s", name, service.path)
        return conn.fd

    def connect_service(self, name: str, *, timeout: float = 5.0) -> int:
        """Connect to service ``name``; return the connection's descriptor.

        When ``IPC_NETWORK`` is set and names a route for ``name``, the router
        ``ipc`` is asked for the connection (the reference's behaviour); when it
        names none, or ipcd is not running, the service is reached directly.
        """
        self._check_open()
        sock = routing.connect(name, self.rundir, timeout=timeout)
        return self.adopt(sock)

    def adopt(self, sock: socket.socket) -> int:
        """Manage an already connected LibIPC socket (e.g. one received by
        descriptor passing) as a peer; return its descriptor."""
        self._check_open()
        sock.setblocking(False)
        return self._add_peer(sock, origin=-1)

    def _add_peer(self, sock: socket.socket, *, origin: int) -> int:
        conn = Conn(PEER, sock)
        conn.decoder = FrameDecoder(self.max_message_size)
        conn.origin = origin
        conn.reader = self._read_peer
        self._table.add(conn, _EPOLLIN)
        return conn.fd

    def add_external(self, fd: int | socket.socket) -> int:
        """Watch any descriptor: readable means an EXTERNAL event.

        A socket object is owned by the context from then on (closed by
        ``close``); a plain integer stays the caller's.
        """
        self._check_open()
        if isinstance(fd, socket.socket):
            sock, owned = fd, True
        else:
            sock, owned = wrap_fd(fd), False
        if sock.fileno() in self._conns:
            raise UsageError(f"descriptor {sock.fileno()} is already in the context")
        conn = Conn(EXTERNAL, sock, owned=owned)
        conn.reader = self._read_external
        try:
            self._table.add(conn, _EPOLLIN)
        except PermissionError:
            # epoll refuses regular files: they are always readable.
            self._conns[conn.fd] = conn
            self._table.always_ready.add(conn.fd)
        return conn.fd

    def remove_external(self, fd: int) -> None:
        """Stop watching an external descriptor without closing it."""
        conn = self._table.get(fd)
        if conn.kind != EXTERNAL:
            raise UsageError(f"descriptor {fd} is not external")
        self._table.forget(conn)
        if not conn.owned:
            conn.sock.detach()

    # ------------------------------------------------------------- switching

    def add_switch(self, fd1: int | socket.socket, fd2: int | socket.socket) -> None:
        """Join two descriptors: what is read on one is written to the other.

        Descriptors that are not yet in the context are adopted (and owned).
        Bytes a peer's decoder already holds are forwarded first, so nothing
        received before the switch is lost.
        """
        a, b = self._switch_end(fd1), self._switch_end(fd2)
        if a is b:
            raise UsageError("cannot switch a descriptor with itself")
        a.partner, b.partner = b, a
        for end in (a, b):
            end.kind = SWITCHED
            if end.stats is NO_STATS:
                end.stats = self._counters("switched")
            end.scanner = FrameScanner(self.max_message_size)
            self._table.update_mask(end)
        self._relay.choose(a)
        for end in (a, b):
            decoder, end.decoder = end.decoder, None
            if decoder is not None and decoder.pending and end.partner is not None:
                self.feed_switch(end.fd, decoder.take_pending())

    def set_switch_callbacks(
        self, fd: int, in_cb: InCallback | None = None, out_cb: OutCallback | None = None
    ) -> None:
        """Replace plain reads/writes on one switched end (the reference API).

        ``in_cb(fd)`` must read from ``fd`` and return ``(result, payload)``;
        ``out_cb(fd, payload)`` must write one message to ``fd``.
        """
        conn = self._switched(fd)
        conn.in_cb, conn.out_cb = in_cb, out_cb
        self._relay.choose(conn)
        if out_cb is not None and conn.partner is not None and conn.partner.decoder is None:
            conn.partner.decoder = FrameDecoder(self.max_message_size)

    def set_switch_codec(self, fd: int, layer: Layer) -> None:
        """Put a Sans-I/O protocol layer (TLS, WebSocket...) on a switched end.

        The loop reads ``fd``, feeds ``layer.receive_data`` and forwards the
        LibIPC stream it returns; what the partner sends goes through
        ``layer.send``; ``layer.data_to_send()`` is written to ``fd``. A
        layer's optional fast hooks (:class:`~ipc_core.switch.FastReceive`,
        :class:`~ipc_core.switch.FastSend`) are looked up here, once.
        """
        conn = self._switched(fd)
        conn.layer = layer
        self._relay.choose(conn)
        self.flush_switch(fd)

    def set_tag(self, fd: int, tag: str) -> None:
        """Count bytes/messages read from switched end ``fd`` under
        ``ctx.stats[tag]`` (e.g. "network" vs "local" in a daemon)."""
        self._table.get(fd).stats = self._counters(tag)

    def _counters(self, tag: str) -> Counters:
        counters = self.stats.get(tag)
        if counters is None:
            counters = self.stats[tag] = Counters()
        return counters

    def feed_switch(self, fd: int, data: bytes) -> None:
        """Forward LibIPC stream bytes as if they had come from switched end
        ``fd`` (already decoded by its layer): the bytes a daemon received
        past its handshake, so that nothing sent early is lost."""
        conn = self._switched(fd)
        if data:
            self._relay.relay_data(conn, data, decoded=True)

    def flush_switch(self, fd: int) -> None:
        """Write what the end's layer wants to send (after a ping, a close...)."""
        conn = self._switched(fd)
        if conn.layer is not None:
            self._table.flush_layer(conn)

    # ------------------------------------------------------------- messaging

    def write(self, fd: int, payload: bytes | bytearray | memoryview) -> bool:
        """Send one message now; what the socket does not take is queued.

        Never blocks. Returns False if the peer is gone (a DISCONNECTION
        event follows).
        """
        conn = self._conns.get(fd)
        if conn is None:
            if self._table.disconnection_pending(fd):
                # The peer went while earlier events for it were still queued
                # (e.g. the 2nd of 3 messages read together): not a misuse.
                return False
            raise UsageError(f"descriptor {fd} is not in the context")
        if self._offered and fd in self._offered:
            self._doors.accept_offer(fd)
        n = len(payload)
        if n > self.max_message_size:
            raise UsageError(f"message of {n} bytes exceeds max_message_size")
        if n >= _SMALL_FRAME:
            return self._table.send_vector(conn, header(n), payload, notify=False)
        data = header(n) + payload
        if conn.out:
            return self._table.enqueue(conn, data)
        try:  # the common case, inlined: one send() takes the whole frame
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._table.lost(conn, exc)
            return False
        if sent == len(data):
            return True
        return self._table.enqueue(conn, memoryview(data)[sent:])

    def schedule(self, fd: int, payload: bytes | bytearray | memoryview) -> None:
        """Queue one message; a MESSAGE_TX event reports when it is fully sent.

        Safe to call from any thread (the loop is woken up).
        """
        if threading.get_ident() != self._loop_thread:
            self.call_soon_threadsafe(lambda: self._schedule_now(fd, bytes(payload)))
            return
        self._schedule_now(fd, payload)

    def _schedule_now(self, fd: int, payload: bytes | bytearray | memoryview) -> None:
        conn = self._conns.get(fd)
        if conn is None:
            if threading.get_ident() == self._loop_thread and self._table.closed:
                return
            self._events.append(Event(EventType.ERROR, fd, reason="schedule: unknown descriptor"))
            return
        if self._offered and fd in self._offered:
            self._doors.accept_offer(fd)
        n = len(payload)
        if n > self.max_message_size:
            raise UsageError(f"message of {n} bytes exceeds max_message_size")
        self._table.send_vector(conn, header(n), payload, notify=True)

    def send_raw(self, fd: int, data: bytes) -> bool:
        """Write raw bytes (no framing) to a descriptor of the context, queued
        if needed: a daemon's handshake replies. False if the peer is gone."""
        if fd not in self._conns and self._table.disconnection_pending(fd):
            return False
        if self._offered and fd in self._offered:
            self._doors.accept_offer(fd)
        return self._table.send(self._table.get(fd), data)

    def send_fd(self, fd: int, data: bytes, passed_fd: int) -> None:
        """Send ``data`` with descriptor ``passed_fd`` attached (SCM_RIGHTS) on
        Unix peer ``fd``; the router hands connections to clients this way."""
        if self._offered and fd in self._offered:
            self._doors.accept_offer(fd)
        conn = self._table.get(fd)
        if conn.out:
            raise UsageError(f"descriptor {fd} has queued data; cannot pass a descriptor now")
        socket.send_fds(conn.sock, [data], [passed_fd])

    def read(self, fd: int, timeout: float | None = None) -> bytes:
        """Block until one message arrives on peer ``fd`` and return it.

        Messages already received are returned first. Raises PeerClosed when
        the peer goes away, TimeoutError after ``timeout`` seconds.
        """
        conn = self._table.get(fd)
        for i, ev in enumerate(self._events):
            if ev.fd == fd and ev.type == EventType.MESSAGE_RX:
                del self._events[i]
                assert ev.message is not None
                return ev.message
        if conn.kind != PEER or conn.decoder is None:
            raise UsageError(f"descriptor {fd} is not a LibIPC peer")
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not poller.poll(None if wait is None else wait * 1000):
                raise TimeoutError(f"no message on descriptor {fd} within {timeout} s")
            try:
                n = conn.sock.recv_into(self._buf)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._table.close_conn(conn, f"read failed: {exc}", report=False)
                raise PeerClosed(f"peer on descriptor {fd} failed: {exc}") from exc
            if n == 0:
                self._table.close_conn(conn, None, report=False)
                raise PeerClosed(f"peer on descriptor {fd} closed the connection")
            try:
                messages = conn.decoder.feed(self._view[:n])
            except ProtocolError:
                self._table.close_conn(conn, "protocol error", report=False)
                raise
            if messages:
                for extra in messages[1:]:
                    self._events.append(message_rx(fd, extra))
                return messages[0]

    # ----------------------------------------------------------------- timers

    def set_timer(self, seconds: float | None) -> None:
        """TIMER events after ``seconds`` with nothing else to report (None: off)."""
        self.timer = seconds

    def call_later(self, delay: float, callback: Callable[[], Any]) -> TimerHandle:
        """Run ``callback()`` inside the loop after ``delay`` seconds."""
        return self._timers.call_later(delay, callback)

    def call_soon_threadsafe(self, callback: Callable[[], Any]) -> None:
        """Run ``callback()`` in the loop's thread soon; wakes the loop."""
        self._inbox.put(callback)

    # ---------------------------------------------------------------- signals

    def handle_signals(
        self,
        handlers: dict[int, Callable[[int], Any]] | None = None,
        stop_on: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
    ) -> None:
        """Route signals into the loop through a self-pipe.

        SIGINT/SIGTERM stop the context cleanly (every socket file and lock
        removed; ``wait_event`` then raises ContextStopped and iteration ends).
        ``handlers`` maps other signals (e.g. SIGHUP) to callbacks run inside
        the loop, never inside the signal handler. Main thread only.
        """
        handlers = dict(handlers or {})
        for sig in stop_on:
            handlers.setdefault(sig, lambda _s: self.stop())
        self._signals.install(self._ep, handlers)

    def stop(self) -> None:
        """Close everything; the next ``wait_event`` raises ContextStopped."""
        self._stopped = True
        self.close_all()

    # ------------------------------------------------------------------ loop

    def wait_event(self, timeout: float | None = None) -> Event:
        """Return the next event, waiting at most ``timeout`` seconds (default:
        the context's ``timer``); a TIMER event when that time passes idle."""
        if self._offered:
            self._doors.accept_seen()
        if self._doors.held:
            self._doors.untaken()
        events = self._events
        if events:
            return events.popleft()
        table = self._table
        if self._stopped or table.closed:
            raise ContextStopped("the context is stopped")
        self._loop_thread = threading.get_ident()
        if timeout is None:
            timeout = self.timer
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = self._ep.poll
        timers = self._timers.heap  # one list for the context's life
        always_ready = table.always_ready
        while True:
            wait = -1.0
            while timers and timers[0][2].cancelled:
                heapq.heappop(timers)  # cancelled handshake deadlines cost nothing
            if timers or deadline is not None:
                wait = next_wait(time.monotonic(), deadline, timers)
            if always_ready:
                wait = 0.0
                for fd in always_ready:
                    events.append(Event(EventType.EXTERNAL, fd))
            if table.deferred_close:
                table.close_deferred()
            ready = poll(wait, 512)
            if ready:
                self._dispatch(ready)
            if timers and timers[0][0] <= time.monotonic():
                self._timers.run_due()
            if events:
                return events.popleft()
            if self._stopped or table.closed:
                raise ContextStopped("the context is stopped")
            if deadline is not None and time.monotonic() >= deadline:
                return TIMER_EVENT

    def __iter__(self) -> Iterator[Event]:
        """Yield events until the context is stopped."""
        while True:
            try:
                yield self.wait_event()
            except ContextStopped:
                return

    def _dispatch(self, ready: list[tuple[int, int]]) -> None:
        conns = self._conns
        flush = self._table.flush
        for fd, mask in ready:
            conn = conns.get(fd)
            if conn is None:
                if fd == self._inbox.fd:
                    self._inbox.drain()
                elif fd == self._signals.fd:
                    self._signals.drain(lambda: self._table.closed)
                continue
            if mask & _EPOLLOUT:
                flush(conn)
                if conn.fd not in conns:
                    continue
            if mask & _READABLE:
                conn.reader(conn)

    # ------------------------------------------------- peers, listeners, externals

    def _read_peer(self, conn: Conn) -> None:
        try:
            n = conn.sock.recv_into(self._buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._table.close_conn(conn, f"read failed: {exc.strerror or exc}")
            return
        if n == 0:
            if conn.out and not conn.closing:
                # The peer half-closed: it may still read the replies queued
                # for it, so write them before closing (bounded by the linger).
                self._table.linger(conn)
                return
            self._table.close_conn(conn, None)
            return
        try:
            messages = conn.decoder.feed(self._view[:n])  # type: ignore[union-attr]
        except ProtocolError as exc:
            log.warning("%s; closing it", bad_input(conn, exc))
            self._table.close_conn(conn, str(exc), error=type(exc))
            return
        fd = conn.fd
        append = self._events.append
        for message in messages:
            append(message_rx(fd, message))

    def _read_external(self, conn: Conn) -> None:
        self._events.append(Event(EventType.EXTERNAL, conn.fd))

    def _accept(self, conn: Conn) -> None:
        lsock = conn.sock
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if _accept_log_due():  # retried every 100 ms: log every 5 s at most
                        log.error("cannot accept on %s: %s; pausing 100 ms", conn.fd, exc.strerror)
                    self._pause_listener(conn)
                return
            sock.setblocking(False)
            fd = self._add_peer(sock, origin=conn.fd)
            self._events.append(Event(EventType.CONNECTION, fd, origin=conn.fd))

    def _pause_listener(self, conn: Conn) -> None:
        conn.paused = True
        self._table.update_mask(conn)

        def resume() -> None:
            if self._conns.get(conn.fd) is conn:
                conn.paused = False
                self._table.update_mask(conn)

        self.call_later(0.1, resume)

    # ------------------------------------------------------------------ doors

    def refuse(self, fd: int, reason: str) -> None:
        """Refuse a client that came through the door (its CONNECTION event
        carried ``peer``): the daemon gets the refusal with ``reason`` (cut
        to 512 UTF-8 bytes, control characters replaced) and the connection
        closes once that is written; a DISCONNECTION event follows.

        Only before the verdict: without a refusal the accept is sent at the
        next ``wait_event()`` call or before the first write to ``fd``
        (UsageError after that, or for a connection that did not come
        through a door).
        """
        self._doors.refuse(fd, reason)

    def peer_info(self, fd: int) -> PeerInfo | None:
        """Who the client on ``fd`` is, when it came through the service's
        door (the CONNECTION event's ``peer``); None for any other descriptor."""
        held = self._doors.held.get(fd)
        if held is not None:
            return held.taken.peer
        return self._table.get(fd).peer

    def take_handoff(self, fd: int) -> HandedOver | None:
        """Take WebSocket hand-off ``fd`` (a CONNECTION event of a
        ``handoff_websocket=True`` service whose ``peer.transport`` is
        ``ws``): the daemon gets the accept and closes its copy; the caller
        owns the socket, parses ``early`` (the client's HTTP request, then
        any frames) before reading it, and answers the handshake itself.
        ``refuse(fd, reason)`` instead turns it down. None, with nothing
        done, when ``fd`` is no such hand-off (a client relayed as before,
        or one taken already)."""
        return self._doors.take(fd)

    # ---------------------------------------------------------------- closing

    def close(
        self,
        fd: int,
        *,
        flush: bool = False,
        refill: Callable[[], bytes | bytearray | memoryview] | None = None,
    ) -> None:
        """Close one descriptor of the context (a service's socket file is
        removed). For a switched end, its partner is closed too.

        With ``flush=True`` the descriptor stops being read and is closed once
        its send queue is written (a refusal message, an HTTP error), or after
        a linger deadline; a DISCONNECTION event reports the close.

        ``refill`` streams a long answer (a static file) instead of queueing it
        whole: each time the queue is written out, ``refill()`` gives the next
        piece, until it returns an empty one. Memory per connection stays one
        piece whatever the answer's size, and the linger deadline restarts with
        every piece, so it bounds a stall, not the whole transfer.
        """
        table = self._table
        conn = self._conns.get(fd)
        if conn is None:
            if self._doors.held:  # a WebSocket hand-off not taken: refused
                self._doors.drop_held(fd, "closed by the service")
            return
        if self._offered:
            self._offered.pop(fd, None)  # closed without a verdict: the daemon sees EOF
            self._doors.drop_handover(fd)
        if conn.kind == SWITCHED:
            table.close_pair(conn, None)
        elif flush and (conn.out or refill is not None):
            conn.refill = refill
            table.linger(conn)
            if not conn.out and not table.refill(conn):
                table.close_conn(conn, None)
        else:
            table.close_conn(conn, None, report=flush)

    def release(self, fd: int) -> socket.socket:
        """Give peer ``fd`` up: remove it from the loop and return its socket,
        open and untouched (no shutdown, nothing more read or written).

        Why: a program that speaks LibIPC itself can be given the client's
        connection (``ipc exec --framed`` passes it as a child's stdin and
        stdout) instead of being relayed. ``close`` would end the connection
        for every holder (a reported close shuts the socket down); after
        ``release`` the caller owns the socket and closing its copy closes
        only that copy.

        A door connection still waiting for its verdict gets the accept
        first (as before a write). The socket is still in non-blocking mode
        (the flag belongs to the open file, which a duplicate shares: set
        ``setblocking(True)`` before giving it to a program that expects
        blocking reads). No DISCONNECTION event follows; events still queued
        for ``fd`` are dropped.

        Raises UsageError, and the connection stays in the context, for
        what would lose bytes or is not a peer: a switched, listening or
        external descriptor; bytes the context already read from the peer
        and not yet delivered (MESSAGE_RX events queued, or part of a frame
        in its decoder: the caller reads them first, or keeps the
        connection); bytes queued for sending (the accept included) that the
        socket did not take yet. PeerClosed if the peer is gone (a failed
        accept: its DISCONNECTION event follows).
        """
        conn = self._table.get(fd)
        if conn.kind != PEER or conn.decoder is None:
            raise UsageError(f"descriptor {fd} is not a LibIPC peer: it cannot be released")
        if conn.decoder.pending or any(
            ev.fd == fd and ev.type is EventType.MESSAGE_RX for ev in self._events
        ):
            raise UsageError(
                f"descriptor {fd} has received bytes not yet delivered: it cannot be released"
            )
        if self._offered and fd in self._offered:
            self._doors.accept_offer(fd)
            if self._conns.get(fd) is not conn:  # the accept could not be written
                raise PeerClosed(f"descriptor {fd} closed while sending the accept")
        if conn.out:
            raise UsageError(f"descriptor {fd} has bytes queued for sending: it cannot be released")
        table = self._table
        table.forget(conn)
        if conn.linger is not None:
            conn.linger.cancel()
            conn.linger = None
        if conn.feeding_paused is not None:  # its own queue paused its reading
            conn.feeding_paused = None
        conn.paused = False
        table.drop_events(fd)
        sock: socket.socket = conn.sock
        return sock

    def close_all(self) -> None:
        """Close every descriptor, remove every service's socket and lock."""
        table = self._table
        for conn in list(self._conns.values()):
            table.close_conn(conn, None, report=False)
        table.close_deferred()
        self._events.clear()
        self._offered.clear()
        self._doors.handovers.clear()
        self._doors.close_held()
        if not table.closed:
            table.closed = True
            self._signals.restore()
            self._inbox.close()
            self._ep.close()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close_all()

    # ------------------------------------------------------------ inspection

    @property
    def descriptors(self) -> list[int]:
        """Every descriptor the context manages."""
        return list(self._conns)

    def __contains__(self, fd: object) -> bool:
        return fd in self._conns

    def socket_of(self, fd: int) -> Any:
        """The socket object behind descriptor ``fd`` (for EXTERNAL ones the
        application reads itself)."""
        return self._table.get(fd).sock

    def pending_bytes(self, fd: int) -> int:
        """Bytes queued for sending on ``fd`` (its send queue's size)."""
        return self._table.get(fd).out_bytes

    # --------------------------------------------------------------- helpers

    def _switched(self, fd: int) -> Conn:
        conn = self._table.get(fd)
        if conn.kind != SWITCHED:
            raise UsageError(f"descriptor {fd} is not switched")
        return conn

    def _switch_end(self, fd: int | socket.socket) -> Conn:
        """The connection for one end of a new pair (adopted if new)."""
        self._check_open()
        if isinstance(fd, socket.socket):
            conn = self._conns.get(fd.fileno())
            if conn is None:
                fd.setblocking(False)
                conn = self._new_switched(fd)
            return conn
        if self._offered and fd in self._offered:
            self._doors.accept_offer(fd)
        conn = self._conns.get(fd)
        if conn is None:
            if self._table.disconnection_pending(fd):
                raise UsageError(f"descriptor {fd} was closed (its DISCONNECTION is pending)")
            sock = wrap_fd(fd)
            sock.setblocking(False)
            conn = self._new_switched(sock)
        elif conn.kind not in (PEER, EXTERNAL):
            raise UsageError(f"descriptor {fd} cannot be switched (already switched or a service)")
        if conn.kind == EXTERNAL:
            conn.owned = True
        return conn

    def _new_switched(self, sock: Any) -> Conn:
        conn = Conn(SWITCHED, sock)
        conn.reader = self._table.read_orphan  # until add_switch chooses its strategy
        self._table.add(conn, _EPOLLIN)
        return conn

    def _check_open(self) -> None:
        if self._table.closed:
            raise UsageError("the context is closed")
