"""One LibIPC connection on an asyncio transport: the protocol and its API.

The connection is the transport's protocol (as in python-websockets, the
connection *is* the protocol; a :class:`asyncio.BufferedProtocol`, so the
transport reads into a buffer shared by the loop's connections, as Context
reads into one), and the bytes go ``buffer_updated -> FrameDecoder.feed ->
queue`` with no stream layer in between. Only this module touches the
transport.

Flow control, both ways:

* sending: every ``send`` hands its frame to the transport, then waits on
  *drain* while the transport's write buffer is above ``write_high_water``
  (``pause_writing``/``resume_writing``): a writer faster than its peer
  waits instead of growing memory.
* receiving: decoded messages wait in a queue for ``recv``; once the queue
  holds more than ``read_high_water`` bytes the transport stops reading
  (the kernel buffers fill and the peer's writes block), and it reads again
  once the application brought it below a quarter of that. What one
  connection holds is therefore bounded by the mark, one read of the
  transport, and one unfinished frame (``max_message_size``).

``recv`` takes a message off the queue only after its wait is over, so a
cancelled ``recv`` (``asyncio.timeout``, ``wait_for``, a task cancelled)
loses nothing: the next ``recv`` returns the message.

Small frames are coalesced per event loop (:class:`_Coalescer`): when many
connections reply in the same turn of the loop (a busy service), their
frames are written together at the end of that turn instead of one by one
between the handlers' steps; a peer on the same CPU is then woken once for
a burst instead of preempting the service after each reply (measured:
bench/suites/asyncio.py). A lone connection (ping-pong) writes at once.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from .. import door as _door
from .._connections import LINGER_SECONDS, header_hint, peer_of
from ..errors import MessageTooLarge, PeerClosed, ProtocolError, UsageError
from ..framing import DEFAULT_MAX_MESSAGE_SIZE, FrameDecoder, check_limit, header
from ..peerinfo import PeerInfo
from ..typed import TypeRegistry

log = logging.getLogger("ipc_core.asyncio")

#: The default marks, in bytes: the Context's send-queue mark for both ways.
DEFAULT_HIGH_WATER = 1024 * 1024
_SMALL_FRAME = 64 * 1024  # below this, header and payload are joined (one write)
_ACCEPT_FRAME = _door.accept_frame()
_CORK_FRAME = 4096  # frames below this may be coalesced...
_CORK_BYTES = 64 * 1024  # ...up to this many bytes per loop turn, then written at once
_PROBE_EVERY = 64  # while writing directly, every 64th small frame tries coalescing

Message = bytes | bytearray | memoryview


_READ_BUFFER = 256 * 1024
_buffers = threading.local()


def _read_buffer() -> memoryview:
    """The read buffer of this thread's event loop, shared by its
    connections as Context shares one: a transport calls ``get_buffer``,
    reads into it and calls ``buffer_updated`` in one go, and the decoder
    copies out what it keeps. (``sock.recv(256 KiB)`` into a new bytes
    object per read would cost several times the read itself.)"""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(_READ_BUFFER))
    return view


class _Coalescer:
    """Small frames of one event loop's connections, written together.

    Direct mode (the default): ``send`` writes at once. Every
    ``_PROBE_EVERY``-th small frame is held instead and a flush is scheduled
    (``call_soon``: after the callbacks and task steps already due in this
    turn of the loop); frames sent meanwhile by any connection join it. A
    flush that carried more than one frame keeps the coalescing on (the
    loop is busy: many replies per turn); one that carried a single frame
    turns it off again (a lone connection pays the extra turn once per 64
    messages). Held bytes are bounded (``_CORK_BYTES``: written at once
    beyond), and each connection's frames keep their order: while frames are
    held, every small frame is held behind them; a large one flushes them
    first. Why: on one CPU, a write that wakes the peer lets it preempt the
    service; a burst of writes is one wakeup for many replies.
    """

    __slots__ = ("bytes", "countdown", "done", "frames", "holding", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: What ``send`` returns when it need not wait: a finished future
        #: (awaiting it returns at once, in C; no coroutine per message).
        self.done: asyncio.Future[None] = loop.create_future()
        self.done.set_result(None)
        self.frames: list[tuple[asyncio.Transport, bytes]] = []
        self.bytes = 0
        self.holding = False
        self.countdown = _PROBE_EVERY

    def hold(self, transport: asyncio.Transport, data: bytes) -> None:
        frames = self.frames
        if not frames:
            self.loop.call_soon(self.flush)
        frames.append((transport, data))
        self.bytes += len(data)
        if self.bytes > _CORK_BYTES:
            self.flush()

    def flush(self) -> None:
        frames = self.frames
        if not frames:
            return
        if len(frames) == 1:
            self.holding = False
        self.frames = []
        self.bytes = 0
        for transport, data in frames:
            if not transport.is_closing():
                transport.write(data)

    def held_for(self, transport: asyncio.BaseTransport) -> int:
        return sum(len(data) for t, data in self.frames if t is transport)


_coalescers = threading.local()


def _coalescer(loop: asyncio.AbstractEventLoop) -> _Coalescer:
    """The running loop's coalescer (one per loop; a thread runs one loop
    at a time)."""
    out: _Coalescer | None = getattr(_coalescers, "out", None)
    if out is None or out.loop is not loop:
        # A new loop in this thread: the old coalescer stays with its own
        # connections (its scheduled flush runs on its loop).
        out = _coalescers.out = _Coalescer(loop)
    return out


class MessageProtocol(abc.ABC):
    """The callback shape of a service, as :class:`asyncio.Protocol` is
    the callback shape of asyncio's streams: ``serve(name,
    protocol=Factory)`` makes one per client and calls these methods from
    the event loop, with no task per client and no task switch per message
    (the handler shape costs a future and a task step per message: see
    docs/performance.md). A callback must not block; it replies with
    ``conn.send(message)`` (not awaited: the frame is queued at once) and
    ends the client with ``conn.close()``.

    Back-pressure: while the client does not read what is sent to it
    (the transport's buffer above ``write_high_water``), its messages are
    not read either; what one callback sends in a row is its own bound.
    """

    def connection_made(self, conn: Connection) -> None:  # noqa: B027  (optional hook)
        """A client arrived (``conn.peer`` is set for a door connection;
        ``conn.refuse(reason)`` here refuses it)."""

    @abc.abstractmethod
    def message_received(self, message: bytes) -> None:
        """One message from the client, in order (the one method a
        protocol must define)."""

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: B027  (optional hook)
        """The client is gone: None when it closed between two messages
        (or the service closed it), else why (PeerClosed in the middle of
        a message or on a reset, ProtocolError for bad framing)."""


class Connection(asyncio.BufferedProtocol):
    """A LibIPC connection for asyncio: ``send``, ``recv``, ``async for``,
    ``close``; made by :func:`~ipc_core.asyncio.connect` (a client) or given
    to a :func:`~ipc_core.asyncio.serve` handler (a service's client).

    ``peer`` is the client's :class:`~ipc_core.peerinfo.PeerInfo` when it
    came through the door of a ``peer_info=True`` service, else None.
    ``registry`` (a :class:`~ipc_core.typed.TypeRegistry`) makes ``send``
    accept registered dataclasses and gives ``recv_typed``.
    """

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        read_high_water: int = DEFAULT_HIGH_WATER,
        write_high_water: int = DEFAULT_HIGH_WATER,
        registry: TypeRegistry | None = None,
        peer: PeerInfo | None = None,
        leftover: bytes = b"",
        on_made: Callable[[Connection], None] | None = None,
        label: str = "connection",
    ) -> None:
        if read_high_water < 1 or write_high_water < 1:
            raise UsageError("read_high_water and write_high_water must be positive")
        self.max_message_size = check_limit(max_message_size)
        self.registry = registry
        #: Who the client is (a peer-information service's door), else None.
        self.peer = peer
        self._decoder = FrameDecoder(self.max_message_size)
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._read_high = read_high_water
        self._read_low = read_high_water // 4
        self._write_high = write_high_water
        self._reading_paused = False
        self._writing_paused = False
        self._drainers: list[asyncio.Future[None]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None  # raised by recv once the queue is empty
        self._clean_end = False  # the peer closed between messages (iteration just ends)
        self._transport: asyncio.Transport | None = None
        self._lost = False
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._leftover = leftover
        self._on_made = on_made
        #: A door connection whose verdict is not given yet.
        self._offered = peer is not None
        self._label = label
        self._view = _read_buffer()
        self._out = _coalescer(self._loop)
        self._linger: asyncio.TimerHandle | None = None
        #: The callback shape (serve(protocol=...)): messages go to it, not to recv.
        self._protocol: MessageProtocol | None = None
        self._sink: Callable[[bytes], object] | None = None

    # ------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they
        # have the same methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=self._write_high, low=self._write_high // 4)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._label = f"{self._label} (descriptor {sock.fileno()})"
        if self._on_made is not None:
            # First: a callback-shape service sets its protocol here, before
            # the door's leftover bytes are delivered.
            self._on_made(self)
        if self._leftover:
            leftover, self._leftover = self._leftover, b""
            if not transport.is_closing():
                self._feed(leftover)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        try:
            messages = self._decoder.feed(self._view[:nbytes])
        except ProtocolError as exc:
            self._bad_input(exc)
            return
        if not messages:
            return
        sink = self._sink
        if sink is not None:
            if len(messages) == 1 and not self._queue:  # the common case, inlined
                try:
                    sink(messages[0])
                except Exception as exc:
                    self._callback_failed("message_received", exc)
            else:
                self._deliver(messages)
            return
        self._queue.extend(messages)
        if len(messages) == 1:
            queued = self._queued = self._queued + len(messages[0])
        else:
            queued = self._queued = self._queued + sum(map(len, messages))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if queued > self._read_high and not self._reading_paused and not self._lost:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def _deliver(self, messages: list[bytes]) -> None:
        """The callback shape: each message to ``message_received``, in
        order, until the connection closes (a callback closed it: the rest
        is dropped, as a handler that returns drops what it did not read)
        or its writing pauses (the client does not read its replies): then
        the rest waits in the queue, reading is paused, and
        ``resume_writing`` delivers it."""
        sink = self._sink
        transport = self._transport
        assert sink is not None and transport is not None
        queue = self._queue
        if queue:  # older messages are still waiting for the client to read
            queue.extend(messages)
            self._queued += sum(map(len, messages))
            return
        rest = iter(messages)
        try:
            for message in rest:
                sink(message)
                if transport.is_closing():
                    return
                if self._writing_paused:
                    queue.extend(rest)
                    self._queued += sum(map(len, queue))
                    return
        except Exception as exc:
            self._callback_failed("message_received", exc)

    def _deliver_queued(self) -> None:
        """Writing resumed: the messages held back by ``_deliver``."""
        sink = self._sink
        transport = self._transport
        assert sink is not None and transport is not None
        queue = self._queue
        try:
            while queue and not self._writing_paused and not transport.is_closing():
                message = queue.popleft()
                self._queued -= len(message)
                sink(message)
        except Exception as exc:
            self._callback_failed("message_received", exc)
            return
        if queue or transport.is_closing():
            return
        if self._error is not None:  # the client half-closed meanwhile
            self.close()
        elif self._reading_paused:
            self._resume()

    def _callback_failed(self, what: str, exc: Exception) -> None:
        """A protocol callback raised: logged (a peer's PeerClosed or
        ProtocolError without a traceback, as for a handler), this client
        closed, the others unaffected."""
        if isinstance(exc, (PeerClosed, ProtocolError)):
            log.debug("%s: %s ended it: %s", self._label, what, exc)
        else:
            log.error("%s: %s failed; closing it", self._label, what, exc_info=exc)
        self.close()

    def _feed(self, data: bytes) -> None:
        """Bytes read before the transport existed (a door's leftover, at
        most one read of the door): through the read buffer, as if read."""
        self._view[: len(data)] = data
        self.buffer_updated(len(data))

    def eof_received(self) -> bool:
        pending = self._decoder.pending
        if pending:
            # Like a Context peer: the connection ends; the unfinished frame
            # is dropped and said, not delivered.
            self._set_error(
                PeerClosed(
                    f"{self._label}: peer closed in the middle of a message ({pending} bytes)"
                )
            )
            if self._protocol is not None:
                self._end_protocol()
                return True
            return False
        self._set_error(PeerClosed(f"{self._label}: peer closed the connection"), clean=True)
        # Keep our side open: a peer that half-closed may still read replies.
        if self._protocol is not None:
            self._end_protocol()
        return True

    def _end_protocol(self) -> None:
        """The callback shape, at the client's EOF: nothing more will come,
        so close once the replies are written, or, with messages still held
        back for a client that does not read, once they are delivered
        (``_deliver_queued``); the linger bounds the wait either way."""
        if not self._queue:
            self.close()
        elif self._linger is None:
            self._linger = self._loop.call_later(LINGER_SECONDS, self._cut)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None:
            self._set_error(PeerClosed(f"{self._label}: connection lost: {exc}"))
        else:
            self._set_error(PeerClosed(f"{self._label}: connection closed"), clean=True)
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self._closed.done():
            self._closed.set_result(None)
        protocol = self._protocol
        if protocol is not None:
            self._protocol = self._sink = None
            error = self._error
            try:
                protocol.connection_lost(
                    None if self._clean_end or not isinstance(error, Exception) else error
                )
            except Exception:
                log.exception("%s: connection_lost failed", self._label)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._sink is not None and not self._reading_paused and not self._lost:
            # The callback shape has no send to wait in: stop reading the
            # client until it reads what it was sent.
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._sink is not None:
            self._deliver_queued()
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()

    def _set_error(self, error: BaseException, *, clean: bool = False) -> None:
        if self._error is None:
            self._error = error
            self._clean_end = clean
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _bad_input(self, exc: ProtocolError) -> None:
        """A peer broke the framing: a logged reason, this connection
        closed at once, the error raised by ``recv`` once the messages
        received before it are consumed."""
        hint = header_hint(exc.length) if isinstance(exc, MessageTooLarge) else ""
        sock = self._transport.get_extra_info("socket") if self._transport else None
        who = f" ({peer_of(sock)})" if sock is not None else ""
        log.warning("%s%s: %s%s; closing it", self._label, who, exc, hint)
        self._set_error(exc)
        if self._transport is not None:
            self._transport.abort()

    # ----------------------------------------------------------------- API

    def recv(self) -> Coroutine[Any, Any, bytes]:
        """The next message. Raises PeerClosed once the peer is gone and
        every message it sent has been returned; ProtocolError (e.g.
        MessageTooLarge) if it broke the framing (the connection is then
        closed). Cancelling a ``recv`` loses no message."""
        return self._next(False)

    async def _next(self, iterating: bool) -> bytes:
        """``recv`` and ``async for``: one coroutine per message either way;
        ``iterating`` ends the iteration at a clean close instead of raising."""
        if self._offered:
            self._accept()
        queue = self._queue
        while not queue:
            if self._sink is not None:
                raise UsageError("this connection's messages go to its protocol")
            if self._error is not None:
                if iterating and self._clean_end:
                    raise StopAsyncIteration
                raise self._error
            if self._waiter is not None:
                raise UsageError("another coroutine is already waiting in recv()")
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        message = queue.popleft()
        self._queued -= len(message)
        if self._reading_paused and self._queued <= self._read_low:
            self._resume()
        return message

    def _resume(self) -> None:
        self._reading_paused = False
        if not self._lost:
            assert self._transport is not None
            self._transport.resume_reading()

    async def recv_typed(self) -> Any:
        """The next message, decoded by the connection's ``registry``."""
        if self.registry is None:
            raise UsageError("recv_typed() needs a connection made with registry=")
        return self.registry.decode(await self.recv())

    def send(self, message: Message | Any) -> Awaitable[None]:
        """Send one message (bytes-like, or a dataclass registered in the
        connection's ``registry``): ``await conn.send(message)``. The frame
        is handed over at once; the returned awaitable waits while the
        transport's buffer is above ``write_high_water`` (a peer that does
        not read makes it wait) and is done at once otherwise. Raises
        PeerClosed when the connection is closed, UsageError for a message
        over ``max_message_size``.

        An awaitable, not a coroutine (no coroutine object per message):
        ``asyncio.ensure_future(conn.send(m))`` makes it a task if needed.
        Cancelled while it waits, the message is sent already (the frame is
        in the transport's buffer, never half of it)."""
        if self._offered:
            self._accept()
        if type(message) is bytes:
            n = len(message)
        else:
            message = self._payload(message)
            n = message.nbytes if isinstance(message, memoryview) else len(message)
        if n > self.max_message_size:
            raise UsageError(f"message of {n} bytes exceeds max_message_size")
        transport = self._transport
        if transport is None or transport.is_closing():
            raise self._closed_error()
        if n < _CORK_FRAME:
            data = header(n) + message
            out = self._out
            if out.holding:
                out.hold(transport, data)
            else:
                out.countdown -= 1
                if out.countdown:
                    transport.write(data)
                else:  # probe: is the loop busy enough to coalesce?
                    out.countdown = _PROBE_EVERY
                    out.holding = True
                    out.hold(transport, data)
        else:
            if self._out.frames:
                self._out.flush()  # what this connection sent before goes first
            if n < _SMALL_FRAME:
                transport.write(header(n) + message)
            else:
                transport.write(header(n))
                transport.write(message)
        if self._writing_paused and self._sink is None:
            return self._drain()
        return self._out.done

    def _payload(self, message: Any) -> Message:
        if isinstance(message, (bytes, bytearray, memoryview)):
            return message
        if self.registry is None:
            raise UsageError(
                f"cannot send a {type(message).__name__}: bytes, or a connection"
                " made with registry= for typed messages"
            )
        return self.registry.encode(message)

    async def _drain(self) -> None:
        while self._writing_paused and not self._lost:
            fut = self._loop.create_future()
            self._drainers.append(fut)
            await fut
        if self._lost:
            raise self._closed_error()

    def _closed_error(self) -> PeerClosed:
        if isinstance(self._error, PeerClosed):
            return PeerClosed(str(self._error))
        return PeerClosed(f"{self._label} is closed")

    def _accept(self) -> None:
        """Send the door's accept verdict (see :meth:`refuse`)."""
        self._offered = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_ACCEPT_FRAME)

    def refuse(self, reason: str) -> Awaitable[None]:
        """Refuse a client that came through the door (``peer`` is not
        None): the daemon gets ``reason`` (cut to 512 UTF-8 bytes, control
        characters replaced) and closes its client; this connection closes
        (``await`` it to wait for that; a protocol's ``connection_made``
        just calls it).

        Only before the verdict: unless the handler refuses first, the
        accept is sent when the handler first gives control back to the
        event loop (its first ``await`` that waits) or before its first
        ``send``/``recv``, whichever comes first: Context's rule, where the
        accept goes at the next ``wait_event()``. So decide from ``peer``
        before awaiting anything else. UsageError after the verdict or for
        a connection that did not come through a door.
        """
        if not self._offered:
            raise UsageError(
                "this connection has no verdict to give (not a door connection,"
                " or already accepted)"
            )
        frame = _door.refuse_frame(reason)
        self._offered = False
        log.debug("%s refused: %s", self._label, _door.clean_reason(reason))
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame)
        return self.close()

    def close(self) -> Awaitable[None]:
        """Close the connection once what was sent is written (at most
        5 s for a peer that does not read; then it is cut). Idempotent.
        The closing starts at once; ``await`` the result to wait until the
        connection is closed (a protocol's callback need not)."""
        transport = self._transport
        if transport is None or self._lost:
            return self._out.done
        self._offered = False  # closed without a verdict: the daemon sees EOF
        if not transport.is_closing():
            self._out.flush()  # this connection's held frames go before the close
            transport.close()
        if self._linger is None and not self._lost:
            self._linger = self._loop.call_later(LINGER_SECONDS, self._cut)
        return asyncio.shield(self._closed)

    def _cut(self) -> None:
        self._linger = None
        if not self._lost and self._transport is not None:
            log.warning("%s: peer not reading after %g s; cutting it", self._label, LINGER_SECONDS)
            self._transport.abort()

    def abort(self) -> None:
        """Close now, dropping whatever is not written yet."""
        self._offered = False
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (by either side)."""
        await asyncio.shield(self._closed)

    @property
    def closed(self) -> bool:
        """True once the connection is closed (by either side)."""
        return self._lost

    @property
    def queued_bytes(self) -> int:
        """Bytes of received messages waiting for ``recv`` (bounded by
        ``read_high_water`` plus one read and one message)."""
        return self._queued

    @property
    def pending_bytes(self) -> int:
        """Bytes handed to ``send`` and not written to the socket yet."""
        if self._transport is None or self._lost:
            return 0
        return self._transport.get_write_buffer_size() + self._out.held_for(self._transport)

    def __aiter__(self) -> Connection:
        return self

    def __anext__(self) -> Coroutine[Any, Any, bytes]:
        """``async for message in conn`` ends when the connection closes
        between two messages; a peer that vanished in the middle of one, a
        reset or a protocol error is raised (PeerClosed, ProtocolError)."""
        return self._next(True)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._lost else "open"
        return f"<Connection {self._label} {state}>"
