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
each gets one read per poll.

Writes are attempted at once; whatever the kernel does not take is queued
per connection and flushed on EPOLLOUT. Each queue has a high-water mark:
above it the loop stops reading from what feeds that queue (the partner of a
switched end, or the peer itself for a request/response service) until it
drains below a quarter of the mark. A queue that still grows past the hard
limit (an application writing to a peer that never reads) disconnects that
peer with a logged reason. Memory therefore stays bounded whatever peers do.

Peers never raise out of the loop: a broken frame, an oversize length, a
reset become a DISCONNECTION event carrying a ``reason`` and a log line.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import heapq
import itertools
import logging
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import routing
from .errors import (
    IPCError,
    MessageTooLarge,
    PeerClosed,
    ProtocolError,
    ServiceUnavailable,
    UsageError,
)
from .events import TIMER_EVENT, Event, EventType, message_rx
from .framing import DEFAULT_MAX_MESSAGE_SIZE, FrameDecoder, FrameScanner, check_limit, header
from .rundir import ServiceSocket, bind_service, rundir, socket_path
from .switch import InCallback, Layer, OutCallback, SwitchResult

log = logging.getLogger("ipc_core")


class Kind(enum.IntEnum):
    """What a descriptor of the context is (see the theory of operation)."""

    LISTENER = 0
    PEER = 1
    EXTERNAL = 2
    SWITCHED = 3


LISTENER, PEER, EXTERNAL, SWITCHED = Kind.LISTENER, Kind.PEER, Kind.EXTERNAL, Kind.SWITCHED

_unpack_header = struct.Struct(">I").unpack_from
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_EPOLLERRS = select.EPOLLERR | select.EPOLLHUP
_READABLE = _EPOLLIN | _EPOLLERRS
_READ_BUFFER = 256 * 1024
_SMALL_FRAME = 64 * 1024  # below this, header + payload are joined and sent with send()
# Reads up to this size are relayed as a copy of the read buffer: copying a
# small read is cheaper than slicing a memoryview (and C functions take a
# bytearray faster than a memoryview); larger reads keep the zero-copy view.
_COPY_READS = 4096
_IOV_BATCH = 64
_ACCEPT_BATCH = 64
DEFAULT_QUEUE_HIGH_WATER = 1 * 1024 * 1024
LINGER_SECONDS = 5.0
_TIMERS_COMPACT_MIN = 4096


class ContextStopped(IPCError):
    """The context was stopped (by ``stop()`` or a SIGINT/SIGTERM)."""


class TimerHandle:
    """A callback scheduled with :meth:`Context.call_later`; ``cancel()`` it."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], Any]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        # Drop the callback now: what its closure holds (a handshake, an
        # SSLObject) must not live on until the deadline would have fired.
        self.cancelled = True
        self.callback = _no_callback


def _no_callback() -> None:
    """What a cancelled timer holds instead of its callback."""


class _RawFd:
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


def _wrap_fd(fd: int) -> Any:
    try:
        return socket.socket(fileno=fd)
    except OSError as exc:
        if exc.errno != errno.ENOTSOCK:
            raise
        return _RawFd(fd)


class _Conn:
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
        "plain",
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
        self.fd = sock.fileno()
        self.owned = owned
        self.mask = 0
        self.out: collections.deque[list[Any]] = collections.deque()
        self.out_bytes = 0
        self.paused = False  # reading stopped because a queue we feed is full
        self.feeding_paused: _Conn | None = None  # whom we stopped reading from
        self.decoder: FrameDecoder | None = None
        self.scanner: FrameScanner | None = None
        self.partner: _Conn | None = None
        self.plain = False  # switched, and both ends carry the LibIPC stream as is
        self.layer: Layer | None = None
        # Optional Layer fast hooks for what this end reads (see _refresh_fast).
        self.fast_in: Callable[[bytearray | memoryview], bytes | None] | None = None
        self.fast_out: Callable[[bytearray | memoryview], bytes | None] | None = None
        self.in_cb: InCallback | None = None
        self.out_cb: OutCallback | None = None
        self.service: ServiceSocket | None = None
        self.origin = -1
        self.closing = False  # close once the send queue is flushed
        self.eof = False  # a switched end whose peer half-closed: read no more
        self.shut_pending = False  # shut our write side once the queue is flushed
        self.linger: TimerHandle | None = None
        #: While lingering: called for the next piece once the queue is empty
        #: (close(fd, flush=True, refill=...)); b"" ends it.
        self.refill: Callable[[], Any] | None = None
        self.stats: Counters = _NO_STATS


class Counters:
    """What was read from switched ends under one tag (``Context.stats``)."""

    __slots__ = ("bytes", "messages")

    def __init__(self) -> None:
        self.bytes = 0
        self.messages = 0

    def __repr__(self) -> str:
        return f"Counters(bytes={self.bytes}, messages={self.messages})"


_NO_STATS = Counters()  # not counted: a descriptor that is not switched


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
        self.queue_high_water = queue_high_water
        self.queue_low_water = queue_high_water // 4
        # A relay copies only what the far socket refuses; reading on while the
        # far end is full would only copy more. So a switched end stops its
        # partner as soon as one read's worth is queued (like socat, bounded).
        self.switch_high_water = min(queue_high_water, _READ_BUFFER)
        self.queue_hard_limit = queue_hard_limit or max(
            8 * queue_high_water, queue_high_water + max_message_size + 4
        )
        self.switch_events = switch_events
        #: Bytes and messages read from switched ends, by tag (see set_tag).
        self.stats: dict[str, Counters] = {}
        self.timer: float | None = None
        self._ep = select.epoll()
        self._conns: dict[int, _Conn] = {}
        self._events: collections.deque[Event] = collections.deque()
        self._buf = bytearray(_READ_BUFFER)
        self._view = memoryview(self._buf)
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._timer_seq = itertools.count()
        self._timers_compact_at = _TIMERS_COMPACT_MIN
        self._closed = False
        self._stopped = False
        self._loop_thread = threading.get_ident()
        self._deferred_close: list[Any] = []  # closed once their events are consumed
        self._always_ready: set[int] = set()  # regular files: epoll refuses them
        self._inbox: collections.deque[Callable[[], Any]] = collections.deque()
        self._inbox_lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, _EPOLLIN)
        self._signal_sock: socket.socket | None = None
        self._signal_handlers: dict[int, Callable[[int], Any]] = {}
        self._old_signal_state: list[tuple[int, Any]] = []
        self._old_wakeup_fd: int | None = None

    # ------------------------------------------------------------------ setup

    def service_init(self, name: str, backlog: int = 1024, *, local_only: bool = False) -> int:
        """Listen as service ``name``; return the listening descriptor.

        ``local_only=True`` declares a service that must never be reached from
        the network (a router, a daemon's outbound side, a control service):
        protocol daemons refuse to connect a remote peer to it. Raises
        ServiceBusy if another instance runs, InvalidServiceName for a bad name.
        """
        self._check_open()
        service = bind_service(name, self.rundir, backlog, local_only=local_only)
        conn = _Conn(LISTENER, service.sock)
        conn.service = service
        self._add(conn, _EPOLLIN)
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
        conn = _Conn(PEER, sock)
        conn.decoder = FrameDecoder(self.max_message_size)
        self._add(conn, _EPOLLIN)
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
            sock, owned = _wrap_fd(fd), False
        if sock.fileno() in self._conns:
            raise UsageError(f"descriptor {sock.fileno()} is already in the context")
        conn = _Conn(EXTERNAL, sock, owned=owned)
        try:
            self._add(conn, _EPOLLIN)
        except PermissionError:
            # epoll refuses regular files: they are always readable.
            self._conns[conn.fd] = conn
            self._always_ready.add(conn.fd)
        return conn.fd

    def remove_external(self, fd: int) -> None:
        """Stop watching an external descriptor without closing it."""
        conn = self._get(fd)
        if conn.kind != EXTERNAL:
            raise UsageError(f"descriptor {fd} is not external")
        self._forget(conn)
        if not conn.owned:
            conn.sock.detach()

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
        a.plain = b.plain = True
        for end in (a, b):
            end.kind = SWITCHED
            if end.stats is _NO_STATS:
                end.stats = self._counters("switched")
            end.scanner = FrameScanner(self.max_message_size)
            self._update_mask(end)
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
        self._no_longer_plain(conn)
        self._refresh_fast(conn)
        if out_cb is not None and conn.partner is not None and conn.partner.decoder is None:
            conn.partner.decoder = FrameDecoder(self.max_message_size)

    def set_switch_codec(self, fd: int, layer: Layer) -> None:
        """Put a Sans-I/O protocol layer (TLS, WebSocket...) on a switched end.

        The loop reads ``fd``, feeds ``layer.receive_data`` and forwards the
        LibIPC stream it returns; what the partner sends goes through
        ``layer.send``; ``layer.data_to_send()`` is written to ``fd``.
        """
        conn = self._switched(fd)
        conn.layer = layer
        self._no_longer_plain(conn)
        self._refresh_fast(conn)
        self.flush_switch(fd)

    @staticmethod
    def _refresh_fast(conn: _Conn) -> None:
        """Use a layer's optional fast hooks where one end has the layer and
        the other carries the plain LibIPC stream (no callbacks either side)."""
        partner = conn.partner
        for end, other in ((conn, partner), (partner, conn)):
            if end is None:
                continue
            end.fast_in = end.fast_out = None
            if other is None or end.in_cb is not None or other.out_cb is not None:
                continue
            if end.layer is not None and other.layer is None:
                end.fast_in = getattr(end.layer, "fast_receive", None)
            elif end.layer is None and other.layer is not None:
                end.fast_out = getattr(other.layer, "fast_send", None)

    def set_tag(self, fd: int, tag: str) -> None:
        """Count bytes/messages read from switched end ``fd`` under
        ``ctx.stats[tag]`` (e.g. "network" vs "local" in a daemon)."""
        self._get(fd).stats = self._counters(tag)

    def _counters(self, tag: str) -> Counters:
        counters = self.stats.get(tag)
        if counters is None:
            counters = self.stats[tag] = Counters()
        return counters

    @staticmethod
    def _no_longer_plain(conn: _Conn) -> None:
        conn.plain = False
        if conn.partner is not None:
            conn.partner.plain = False

    def feed_switch(self, fd: int, data: bytes) -> None:
        """Forward LibIPC stream bytes as if they had come from switched end
        ``fd`` (already decoded by its layer): the bytes a daemon received
        past its handshake, so that nothing sent early is lost."""
        conn = self._switched(fd)
        if data:
            self._relay_data(conn, data, decoded=True)

    def flush_switch(self, fd: int) -> None:
        """Write what the end's layer wants to send (after a ping, a close...)."""
        conn = self._switched(fd)
        if conn.layer is not None:
            pending = conn.layer.data_to_send()
            if pending:
                self._send(conn, pending)

    # ------------------------------------------------------------- messaging

    def write(self, fd: int, payload: bytes | bytearray | memoryview) -> bool:
        """Send one message now; what the socket does not take is queued.

        Never blocks. Returns False if the peer is gone (a DISCONNECTION
        event follows).
        """
        conn = self._conns.get(fd)
        if conn is None:
            if self._disconnection_pending(fd):
                # The peer went while earlier events for it were still queued
                # (e.g. the 2nd of 3 messages read together): not a misuse.
                return False
            raise UsageError(f"descriptor {fd} is not in the context")
        n = len(payload)
        if n > self.max_message_size:
            raise UsageError(f"message of {n} bytes exceeds max_message_size")
        if n >= _SMALL_FRAME:
            return self._send_vector(conn, header(n), payload, notify=False)
        data = header(n) + payload
        if conn.out:
            return self._enqueue(conn, data)
        try:  # the common case, inlined: one send() takes the whole frame
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(conn, exc)
            return False
        if sent == len(data):
            return True
        return self._enqueue(conn, memoryview(data)[sent:])

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
            if threading.get_ident() == self._loop_thread and self._closed:
                return
            self._events.append(Event(EventType.ERROR, fd, reason="schedule: unknown descriptor"))
            return
        n = len(payload)
        if n > self.max_message_size:
            raise UsageError(f"message of {n} bytes exceeds max_message_size")
        self._send_vector(conn, header(n), payload, notify=True)

    def send_raw(self, fd: int, data: bytes) -> bool:
        """Write raw bytes (no framing) to a descriptor of the context, queued
        if needed: a daemon's handshake replies. False if the peer is gone."""
        if fd not in self._conns and self._disconnection_pending(fd):
            return False
        return self._send(self._get(fd), data)

    def read(self, fd: int, timeout: float | None = None) -> bytes:
        """Block until one message arrives on peer ``fd`` and return it.

        Messages already received are returned first. Raises PeerClosed when
        the peer goes away, TimeoutError after ``timeout`` seconds.
        """
        conn = self._get(fd)
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
                self._close_conn(conn, f"read failed: {exc}", report=False)
                raise PeerClosed(f"peer on descriptor {fd} failed: {exc}") from exc
            if n == 0:
                self._close_conn(conn, None, report=False)
                raise PeerClosed(f"peer on descriptor {fd} closed the connection")
            try:
                messages = conn.decoder.feed(self._view[:n])
            except ProtocolError:
                self._close_conn(conn, "protocol error", report=False)
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
        handle = TimerHandle(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (handle.when, next(self._timer_seq), handle))
        if len(self._timers) > self._timers_compact_at:
            # Cancelled entries stay in the heap until due; purge them when the
            # heap has doubled since the last purge (amortised O(1) per timer).
            self._timers = [t for t in self._timers if not t[2].cancelled]
            heapq.heapify(self._timers)
            self._timers_compact_at = max(_TIMERS_COMPACT_MIN, 2 * len(self._timers))
        return handle

    def call_soon_threadsafe(self, callback: Callable[[], Any]) -> None:
        """Run ``callback()`` in the loop's thread soon; wakes the loop."""
        with self._inbox_lock:
            self._inbox.append(callback)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self._wake_fd, 1)

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
        if self._signal_sock is None:
            rsock, wsock = socket.socketpair()
            rsock.setblocking(False)
            wsock.setblocking(False)
            self._signal_sock = rsock
            self._signal_wsock = wsock
            self._old_wakeup_fd = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
            self._ep.register(rsock.fileno(), _EPOLLIN)
        for sig in handlers:
            self._old_signal_state.append((sig, signal.signal(sig, _noop_signal_handler)))
        self._signal_handlers.update(handlers)

    def stop(self) -> None:
        """Close everything; the next ``wait_event`` raises ContextStopped."""
        self._stopped = True
        self.close_all()

    # ------------------------------------------------------------------ loop

    def wait_event(self, timeout: float | None = None) -> Event:
        """Return the next event, waiting at most ``timeout`` seconds (default:
        the context's ``timer``); a TIMER event when that time passes idle."""
        events = self._events
        if events:
            return events.popleft()
        if self._stopped or self._closed:
            raise ContextStopped("the context is stopped")
        self._loop_thread = threading.get_ident()
        if timeout is None:
            timeout = self.timer
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = self._ep.poll
        while True:
            wait = -1.0
            timers = self._timers
            while timers and timers[0][2].cancelled:
                heapq.heappop(timers)  # cancelled handshake deadlines cost nothing
            if timers or deadline is not None:
                now = time.monotonic()
                wait = _next_wait(now, deadline, timers)
            if self._always_ready:
                wait = 0.0
                for fd in self._always_ready:
                    events.append(Event(EventType.EXTERNAL, fd))
            if self._deferred_close:
                self._close_deferred()
            ready = poll(wait, 512)
            if ready:
                self._dispatch(ready)
            timers = self._timers
            if timers and timers[0][0] <= time.monotonic():
                self._run_timers()
            if events:
                return events.popleft()
            if self._stopped or self._closed:
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
        read_peer = self._read_peer  # bound once per batch, not once per descriptor
        read_switched = self._read_switched
        for fd, mask in ready:
            conn = conns.get(fd)
            if conn is None:
                if fd == self._wake_fd:
                    self._drain_inbox()
                elif self._signal_sock is not None and fd == self._signal_sock.fileno():
                    self._drain_signals()
                continue
            if mask & _EPOLLOUT:
                self._flush(conn)
                if conn.fd not in conns:
                    continue
            if mask & _READABLE:
                kind = conn.kind
                if kind == SWITCHED:
                    read_switched(conn)
                elif kind == PEER:
                    read_peer(conn)
                elif kind == LISTENER:
                    self._accept(conn)
                elif kind == EXTERNAL:
                    self._events.append(Event(EventType.EXTERNAL, fd))

    def _read_peer(self, conn: _Conn) -> None:
        try:
            n = conn.sock.recv_into(self._buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close_conn(conn, f"read failed: {exc.strerror or exc}")
            return
        if n == 0:
            if conn.out and not conn.closing:
                # The peer half-closed: it may still read the replies queued
                # for it, so write them before closing (bounded by the linger).
                self._linger(conn)
                return
            self._close_conn(conn, None)
            return
        try:
            messages = conn.decoder.feed(self._view[:n])  # type: ignore[union-attr]
        except ProtocolError as exc:
            log.warning("%s; closing it", _bad_input(conn, exc))
            self._close_conn(conn, str(exc))
            return
        fd = conn.fd
        append = self._events.append
        for message in messages:
            append(message_rx(fd, message))

    def _accept(self, conn: _Conn) -> None:
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
            peer = _Conn(PEER, sock)
            peer.decoder = FrameDecoder(self.max_message_size)
            peer.origin = conn.fd
            self._add(peer, _EPOLLIN)
            self._events.append(Event(EventType.CONNECTION, peer.fd, origin=conn.fd))

    def _pause_listener(self, conn: _Conn) -> None:
        conn.paused = True
        self._update_mask(conn)

        def resume() -> None:
            if self._conns.get(conn.fd) is conn:
                conn.paused = False
                self._update_mask(conn)

        self.call_later(0.1, resume)

    # ------------------------------------------------------------- switching

    def _read_switched(self, conn: _Conn) -> None:
        if conn.in_cb is not None:
            self._read_switched_callback(conn)
            return
        try:
            n = conn.sock.recv_into(self._buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close_pair(conn, f"read failed: {exc.strerror or exc}")
            return
        if n == 0:
            self._switch_eof(conn)
            return
        partner: _Conn = conn.partner  # type: ignore[assignment]
        data: Any = self._buf[:n] if n <= _COPY_READS else self._view[:n]
        # The hot path of a relay, inlined. What is read is either the LibIPC
        # stream (a plain end, or the plain end facing a layer's fast_send) or
        # a layer's wire bytes (fast_receive); a whole unit is sent straight
        # on and only what the partner's socket does not take is queued.
        # Anything else goes to the general path, _relay_data.
        size = n
        scanner: FrameScanner = conn.scanner  # type: ignore[assignment]
        if conn.plain or conn.fast_out is not None:
            if (
                scanner.idle
                and n >= 4
                and (length := _unpack_header(self._buf)[0]) + 4 == n
                and length <= scanner.max_message_size
            ):
                frames = 1  # exactly one whole frame: FrameScanner.scan's fast path, inlined
                if not conn.plain:  # the partner's layer: one message -> its wire bytes
                    out = conn.fast_out(data)  # type: ignore[misc]
                    if out is None:
                        self._relay_data(conn, data)
                        return
                    data = out
            elif not conn.plain:
                self._relay_data(conn, data)
                return
            else:
                try:
                    frames = scanner.scan(data)
                except MessageTooLarge:
                    self._relay_data(conn, data)  # the slow path logs, forwards the good part
                    return
        else:
            fast_in = conn.fast_in  # this end's layer: wire bytes -> LibIPC stream
            out = None if fast_in is None else fast_in(data)
            if out is None:
                self._relay_data(conn, data)
                return
            size = len(out)
            if not (
                scanner.idle
                and size >= 4
                and (length := _unpack_header(out)[0]) + 4 == size
                and length <= scanner.max_message_size
            ):
                self._relay_data(conn, out, decoded=True)  # scans, counts, forwards
                return
            data = out
            frames = 1
        stats = conn.stats
        stats.bytes += size
        stats.messages += frames
        if partner.out:
            # a copy of a small read is private already; a view of the buffer is not
            self._enqueue(partner, bytes(data) if type(data) is memoryview else data)
        else:
            try:
                sent = partner.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(partner, exc)
                return
            if sent < len(data):
                self._enqueue(partner, bytes(data[sent:]))
        if self.switch_events:
            self._events.append(Event(EventType.SWITCH_RX, conn.fd))
            self._events.append(Event(EventType.SWITCH_TX, partner.fd))

    def _switch_eof(self, conn: _Conn) -> None:
        """End ``conn`` of a pair read EOF: honour a half-close.

        Between two plain socket ends (the TCPd relay), the partner's write
        side is shut down once what is queued for it is written, and the other
        direction keeps flowing until its reader sees EOF (or an error) too;
        only then are both closed. A peer that sends its requests then
        ``shutdown(SHUT_WR)`` so gets every reply. Layered or callback ends
        (TLS, WebSocket: the protocol has its own close, and its layer speaks
        for the socket), a peer that is wholly gone (POLLHUP: a Unix peer that
        closed, not just shut its write side) and a second EOF close the pair
        as before.
        """
        partner = conn.partner
        if conn.layer is not None:
            with contextlib.suppress(PeerClosed, ProtocolError):
                conn.layer.receive_data(b"")
            self._close_pair(conn, None)
            return
        if (
            conn.eof
            or partner is None
            or partner.eof
            or not _can_shut_write(partner)
            or _hung_up(conn.sock)
        ):
            self._close_pair(conn, None)
            return
        conn.eof = True
        self._update_mask(conn)  # no more EPOLLIN: a half-closed socket stays readable
        if partner.out:
            partner.shut_pending = True
        else:
            self._shut_write(partner)

    def _shut_write(self, conn: _Conn) -> None:
        conn.shut_pending = False
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._lost(conn, exc)

    def _relay_data(self, conn: _Conn, data: bytes | memoryview, *, decoded: bool = False) -> None:
        """Forward bytes read from ``conn`` to its partner: the general path
        (layers, callbacks, partial or several frames); _read_switched keeps
        the common whole-message cases inline."""
        partner = conn.partner
        assert partner is not None
        layer = conn.layer
        if layer is not None and not decoded:
            try:
                data = layer.receive_data(bytes(data))
            except PeerClosed:
                self._flush_layer(conn)
                self._close_pair(conn, None)
                return
            except ProtocolError as exc:
                log.warning("descriptor %d: %s; closing the pair", conn.fd, exc)
                self._flush_layer(conn)
                self._close_pair(conn, str(exc))
                return
            pending = layer.data_to_send()  # e.g. a TLS alert or a pong
            if pending:
                self._send(conn, pending)
            if not data or conn.fd not in self._conns:
                return
        try:
            frames = conn.scanner.scan(data)  # type: ignore[union-attr]
        except MessageTooLarge as exc:
            log.warning("%s; closing the pair", _bad_input(conn, exc))
            if exc.valid_bytes:  # deliver the good messages before the bad header
                self._forward(conn, partner, data[: exc.valid_bytes])
            self._close_pair(conn, str(exc))
            return
        stats = conn.stats
        stats.bytes += len(data)
        stats.messages += frames
        self._forward(conn, partner, data)
        if self.switch_events:
            self._events.append(Event(EventType.SWITCH_RX, conn.fd))
            self._events.append(Event(EventType.SWITCH_TX, partner.fd))

    def _forward(self, conn: _Conn, partner: _Conn, data: bytes | memoryview) -> None:
        if partner.layer is not None:
            try:
                # Layers copy what they keep (SSLObject.write, FrameDecoder), so
                # the read buffer's view can be passed without a copy.
                partner.layer.send(data)  # type: ignore[arg-type]
            except ProtocolError as exc:
                log.warning("descriptor %d: %s; closing the pair", partner.fd, exc)
                self._flush_layer(partner)
                self._close_pair(partner, str(exc))
                return
            self._flush_layer(partner)
        elif partner.out_cb is not None:
            self._write_switched_callback(conn, partner, data)
        else:
            self._send(partner, data, copy=True)

    def _flush_layer(self, conn: _Conn) -> None:
        pending = conn.layer.data_to_send()  # type: ignore[union-attr]
        if pending:
            self._send(conn, pending)

    def _read_switched_callback(self, conn: _Conn) -> None:
        partner = conn.partner
        assert partner is not None and conn.in_cb is not None
        try:
            result, payload = conn.in_cb(conn.fd)
        except Exception as exc:  # a callback's bug must not kill the loop
            log.exception("switch in-callback failed on %d", conn.fd)
            self._close_pair(conn, f"in callback raised {exc!r}")
            return
        if result == SwitchResult.IGNORE:
            return
        if result != SwitchResult.NO_ERROR or payload is None:
            reason = None if result == SwitchResult.FD_CLOSING else "in callback: error"
            self._close_pair(conn, reason)
            return
        if partner.out_cb is not None:
            self._call_out_cb(partner, payload)
        elif partner.layer is not None:
            partner.layer.send(header(len(payload)) + payload)
            self._flush_layer(partner)
        else:
            self._send(partner, header(len(payload)) + payload)
        if self.switch_events:
            self._events.append(Event(EventType.SWITCH_RX, conn.fd))
            self._events.append(Event(EventType.SWITCH_TX, partner.fd))

    def _write_switched_callback(
        self, conn: _Conn, partner: _Conn, data: bytes | memoryview
    ) -> None:
        if conn.decoder is None:
            conn.decoder = FrameDecoder(self.max_message_size)
        for payload in conn.decoder.feed(data):
            if not self._call_out_cb(partner, payload):
                return

    def _call_out_cb(self, conn: _Conn, payload: bytes) -> bool:
        assert conn.out_cb is not None
        try:
            result = conn.out_cb(conn.fd, payload)
        except Exception as exc:
            log.exception("switch out-callback failed on %d", conn.fd)
            self._close_pair(conn, f"out callback raised {exc!r}")
            return False
        if result in (SwitchResult.NO_ERROR, SwitchResult.IGNORE):
            return True
        self._close_pair(conn, None if result == SwitchResult.FD_CLOSING else "out callback: error")
        return False

    def _close_pair(self, conn: _Conn, reason: str | None) -> None:
        """One end of a pair failed or closed: close it now and its partner as
        soon as what is queued for the partner is written (bounded by a linger
        deadline)."""
        partner = conn.partner
        self._close_conn(conn, reason)
        if partner is None or partner.fd not in self._conns or partner.closing:
            return
        partner.partner = None
        if partner.layer is not None:
            with contextlib.suppress(IPCError):
                partner.layer.close()
            with contextlib.suppress(IPCError):
                self._flush_layer(partner)
        if partner.fd not in self._conns:
            return
        if not partner.out:
            self._close_conn(partner, reason)
            return
        self._linger(partner)

    # ---------------------------------------------------------------- output

    def _send(self, conn: _Conn, data: bytes | memoryview, *, copy: bool = False) -> bool:
        """Write now what the socket takes, queue the rest (the only writer)."""
        if conn.out:
            return self._enqueue(conn, bytes(data) if copy else data)
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(conn, exc)
            return False
        if sent == len(data):
            return True
        rest = data[sent:] if copy else memoryview(data)[sent:]
        return self._enqueue(conn, bytes(rest) if copy else rest)

    def _send_vector(self, conn: _Conn, head: bytes, payload: Any, *, notify: bool) -> bool:
        if conn.out:
            ok = self._enqueue(conn, head)
            return ok and self._enqueue(conn, payload, notify=notify)
        total = len(head) + len(payload)
        try:
            sent = conn.sock.sendmsg((head, payload))
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(conn, exc)
            return False
        if sent == total:
            if notify:
                self._events.append(Event(EventType.MESSAGE_TX, conn.fd))
            return True
        if sent < len(head):
            if not self._enqueue(conn, head[sent:]):
                return False
            return self._enqueue(conn, payload, notify=notify)
        return self._enqueue(conn, memoryview(payload)[sent - len(head) :], notify=notify)

    def _enqueue(self, conn: _Conn, data: Any, *, notify: bool = False) -> bool:
        size = len(data)
        if conn.out_bytes and conn.out_bytes + size > self.queue_hard_limit:
            reason = f"send queue over {self.queue_hard_limit} bytes: peer is not reading"
            log.warning("descriptor %d: %s; closing it", conn.fd, reason)
            if conn.kind == SWITCHED:
                self._close_pair(conn, reason)
            else:
                self._close_conn(conn, reason)
            return False
        first = not conn.out
        conn.out.append([data, notify])
        conn.out_bytes += size
        if first:
            self._update_mask(conn)
        mark = self.switch_high_water if conn.kind == SWITCHED else self.queue_high_water
        if conn.out_bytes > mark and conn.feeding_paused is None:
            feeder = conn.partner if conn.kind == SWITCHED else conn
            if feeder is not None and feeder.kind in (PEER, SWITCHED):
                conn.feeding_paused = feeder
                feeder.paused = True
                self._update_mask(feeder)
        return True

    def _flush(self, conn: _Conn) -> None:
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
                self._lost(conn, exc)
                return
            conn.out_bytes -= sent
            while sent:
                item = out[0]
                size = len(item[0])
                if sent >= size:
                    sent -= size
                    out.popleft()
                    if item[1]:
                        self._events.append(Event(EventType.MESSAGE_TX, conn.fd))
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
            if paused.fd in self._conns and not paused.closing:
                paused.paused = False
                self._update_mask(paused)
        if not out:
            if conn.closing:
                if conn.refill is not None and self._refill(conn):
                    return
                self._close_conn(conn, None)
                return
            if conn.shut_pending:
                self._shut_write(conn)
                if conn.fd not in self._conns:
                    return
            self._update_mask(conn)

    def _lost(self, conn: _Conn, exc: OSError) -> None:
        reason = f"write failed: {exc.strerror or exc}"
        if conn.kind == SWITCHED:
            self._close_pair(conn, reason)
        else:
            self._close_conn(conn, reason)

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
        conn = self._conns.get(fd)
        if conn is None:
            return
        if conn.kind == SWITCHED:
            self._close_pair(conn, None)
        elif flush and (conn.out or refill is not None):
            conn.refill = refill
            self._linger(conn)
            if not conn.out and not self._refill(conn):
                self._close_conn(conn, None)
        else:
            self._close_conn(conn, None, report=flush)

    def _linger(self, conn: _Conn) -> None:
        conn.closing = True
        conn.paused = True
        self._update_mask(conn)
        self._restart_linger(conn)

    def _restart_linger(self, conn: _Conn) -> None:
        if conn.linger is not None:
            conn.linger.cancel()
        conn.linger = self.call_later(
            LINGER_SECONDS, lambda: self._close_conn(conn, "linger timeout: peer not reading")
        )

    def _refill(self, conn: _Conn) -> bool:
        """Queue the next piece of a streamed answer; False when it is over
        (or failed: the connection is then closed with the reason)."""
        assert conn.refill is not None
        try:
            piece = conn.refill()
        except Exception as exc:  # the producer's bug costs only this connection
            conn.refill = None
            self._close_conn(conn, f"streaming failed: {exc!r}")
            return True
        if not piece:
            conn.refill = None
            return False
        self._restart_linger(conn)
        self._enqueue(conn, piece)
        return True

    def send_fd(self, fd: int, data: bytes, passed_fd: int) -> None:
        """Send ``data`` with descriptor ``passed_fd`` attached (SCM_RIGHTS) on
        Unix peer ``fd``; the router hands connections to clients this way."""
        conn = self._get(fd)
        if conn.out:
            raise UsageError(f"descriptor {fd} has queued data; cannot pass a descriptor now")
        socket.send_fds(conn.sock, [data], [passed_fd])

    def close_all(self) -> None:
        """Close every descriptor, remove every service's socket and lock."""
        for conn in list(self._conns.values()):
            self._close_conn(conn, None, report=False)
        self._close_deferred()
        self._events.clear()
        if not self._closed:
            self._closed = True
            self._restore_signals()
            with contextlib.suppress(OSError):
                os.close(self._wake_fd)
            self._ep.close()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close_all()

    @property
    def descriptors(self) -> list[int]:
        """Every descriptor the context manages."""
        return list(self._conns)

    def __contains__(self, fd: object) -> bool:
        return fd in self._conns

    def socket_of(self, fd: int) -> Any:
        """The socket object behind descriptor ``fd`` (for EXTERNAL ones the
        application reads itself)."""
        return self._get(fd).sock

    def pending_bytes(self, fd: int) -> int:
        """Bytes queued for sending on ``fd`` (its send queue's size)."""
        return self._get(fd).out_bytes

    def _close_conn(self, conn: _Conn, reason: str | None, *, report: bool = True) -> None:
        if self._conns.get(conn.fd) is not conn:
            return
        fd = conn.fd
        self._forget(conn)
        conn.refill = None  # a streamed answer's producer (and its buffers) goes now
        if conn.linger is not None:
            conn.linger.cancel()
        if conn.service is not None:
            conn.service.close()
        elif not conn.owned:
            conn.sock.detach()
        elif report and not self._closed:
            # Keep the descriptor number taken until the application has seen
            # the DISCONNECTION event: otherwise a connection accepted in the
            # same batch could reuse the number and be mistaken for this one.
            # shutdown() lets the peer see the close now.
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            self._deferred_close.append(conn.sock)
        else:
            conn.sock.close()
        conn.out.clear()
        if conn.feeding_paused is not None:
            feeder = conn.feeding_paused
            conn.feeding_paused = None
            if feeder.fd in self._conns and not feeder.closing:
                feeder.paused = False
                self._update_mask(feeder)
        if report:
            if reason is not None:
                log.debug("descriptor %d closed: %s", fd, reason)
            self._events.append(Event(EventType.DISCONNECTION, fd, reason=reason))
        else:
            self._drop_events(fd)

    def _close_deferred(self) -> None:
        socks, self._deferred_close = self._deferred_close, []
        for sock in socks:
            sock.close()

    def _drop_events(self, fd: int) -> None:
        if self._events:
            kept = [ev for ev in self._events if ev.fd != fd]
            self._events.clear()
            self._events.extend(kept)

    # --------------------------------------------------------------- helpers

    def _add(self, conn: _Conn, mask: int) -> None:
        self._conns[conn.fd] = conn
        conn.mask = mask
        self._ep.register(conn.fd, mask)

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn.fd, None)
        if conn.fd in self._always_ready:
            self._always_ready.discard(conn.fd)
            return
        if not self._closed:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(conn.fd)

    def _update_mask(self, conn: _Conn) -> None:
        mask = 0 if conn.paused or conn.eof else _EPOLLIN
        if conn.out:
            mask |= _EPOLLOUT
        if mask != conn.mask and conn.fd in self._conns:
            conn.mask = mask
            self._ep.modify(conn.fd, mask)

    def _get(self, fd: int) -> _Conn:
        conn = self._conns.get(fd)
        if conn is None:
            if self._disconnection_pending(fd):
                raise PeerClosed(f"descriptor {fd} is closed (its DISCONNECTION is pending)")
            raise UsageError(f"descriptor {fd} is not in the context")
        return conn

    def _disconnection_pending(self, fd: int) -> bool:
        """True for a descriptor closed by the loop whose DISCONNECTION event
        the application has not consumed yet (its number is still reserved)."""
        return any(s.fileno() == fd for s in self._deferred_close)

    def _switched(self, fd: int) -> _Conn:
        conn = self._get(fd)
        if conn.kind != SWITCHED:
            raise UsageError(f"descriptor {fd} is not switched")
        return conn

    def _switch_end(self, fd: int | socket.socket) -> _Conn:
        self._check_open()
        if isinstance(fd, socket.socket):
            conn = self._conns.get(fd.fileno())
            if conn is None:
                fd.setblocking(False)
                conn = _Conn(SWITCHED, fd)
                self._add(conn, _EPOLLIN)
            return conn
        conn = self._conns.get(fd)
        if conn is None:
            if self._disconnection_pending(fd):
                raise UsageError(f"descriptor {fd} was closed (its DISCONNECTION is pending)")
            sock = _wrap_fd(fd)
            sock.setblocking(False)
            conn = _Conn(SWITCHED, sock)
            self._add(conn, _EPOLLIN)
        elif conn.kind not in (PEER, EXTERNAL):
            raise UsageError(f"descriptor {fd} cannot be switched (already switched or a service)")
        if conn.kind == EXTERNAL:
            conn.owned = True
        return conn

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the context is closed")

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, handle = heapq.heappop(timers)
            if handle.cancelled:
                continue
            try:
                handle.callback()
            except Exception:
                log.exception("timer callback failed")

    def _drain_inbox(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)
        while True:
            with self._inbox_lock:
                if not self._inbox:
                    return
                callback = self._inbox.popleft()
            try:
                callback()
            except Exception:
                log.exception("callback from another thread failed")

    def _drain_signals(self) -> None:
        assert self._signal_sock is not None
        try:
            data = self._signal_sock.recv(256)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            log.info("received signal %s", _signal_name(signum))
            if handler is not None:
                try:
                    handler(signum)
                except Exception:
                    log.exception("signal handler failed")
            if self._closed:
                return

    def _restore_signals(self) -> None:
        if self._signal_sock is None:
            return
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(self._old_wakeup_fd if self._old_wakeup_fd is not None else -1)
        for sig, old in reversed(self._old_signal_state):
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)
        self._old_signal_state.clear()
        self._signal_sock.close()
        self._signal_wsock.close()
        self._signal_sock = None


def _bad_input(conn: _Conn, exc: ProtocolError) -> str:
    """The log text of a peer's bad input: the descriptor, and for an
    oversize length the peer and what the four "length" bytes look like (a
    text or TLS client talking to a LibIPC socket is the usual cause)."""
    if not isinstance(exc, MessageTooLarge):
        return f"descriptor {conn.fd}: {exc}"
    return f"descriptor {conn.fd} ({_peer_of(conn.sock)}): {exc}{_header_hint(exc.length)}"


def _peer_of(sock: socket.socket) -> str:
    """``peer 192.0.2.7:51212``, ``peer [2001:db8::1]:443`` or ``local pid 1234``."""
    try:
        if sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return f"local pid {struct.unpack('3i', creds)[0]}"
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return "peer unknown"
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]  # IPv4-mapped: a plain IPv4 peer of a dual-stack listener
    return f"peer [{host}]:{port}" if ":" in host else f"peer {host}:{port}"


def _header_hint(length: int) -> str:
    """Why a peer announced ``length``: its four bytes read as text or TLS."""
    raw = length.to_bytes(4, "big")
    if raw[0] == 0x16 and raw[1] == 0x03:
        return " (the bytes look like a TLS handshake: a TLS client on a plain LibIPC socket?)"
    if all(0x20 <= b < 0x7F or b in b"\t\r\n" for b in raw):
        return f" (the bytes {raw.decode()!r} look like text: a text or HTTP client, not LibIPC?)"
    return ""


def _can_shut_write(conn: _Conn) -> bool:
    """Whether a switched end can be half-closed by shutting its socket's
    write side: a plain socket (no layer or out-callback speaking for it)."""
    return conn.layer is None and conn.out_cb is None and isinstance(conn.sock, socket.socket)


def _hung_up(sock: socket.socket) -> bool:
    """True when both directions of ``sock`` are shut (POLLHUP): a Unix peer
    that closed, as opposed to one that only shut its write side. One poll,
    made once per connection (at its EOF)."""
    poller = select.poll()
    poller.register(sock.fileno(), 0)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


_accept_logged = [-float("inf")]


def _accept_log_due(every: float = 5.0) -> bool:
    """Rate limit for the accept-error line (a descriptor limit lasts)."""
    now = time.monotonic()
    if now - _accept_logged[0] < every:
        return False
    _accept_logged[0] = now
    return True


def _noop_signal_handler(signum: int, frame: object) -> None:
    """The real work happens in the loop, woken by the wakeup fd."""


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _next_wait(now: float, deadline: float | None, timers: list[Any]) -> float:
    wait = -1.0 if deadline is None else max(0.0, deadline - now)
    if timers:
        t = max(0.0, timers[0][0] - now)
        wait = t if wait < 0 else min(wait, t)
    return wait


__all__ = [
    "Context",
    "ContextStopped",
    "ServiceUnavailable",
    "TimerHandle",
    "socket_path",
]
