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
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
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
        if self._leftover:
            leftover, self._leftover = self._leftover, b""
            self._feed(leftover)
        if self._on_made is not None:
            self._on_made(self)

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
        self._queue.extend(messages)
        queued = self._queued = self._queued + sum(map(len, messages))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if queued > self._read_high and not self._reading_paused and not self._lost:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()

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
            return False
        self._set_error(PeerClosed(f"{self._label}: peer closed the connection"), clean=True)
        # Keep our side open: a peer that half-closed may still read replies.
        return True

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
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
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

    async def recv(self) -> bytes:
        """The next message. Raises PeerClosed once the peer is gone and
        every message it sent has been returned; ProtocolError (e.g.
        MessageTooLarge) if it broke the framing (the connection is then
        closed). Cancelling a ``recv`` loses no message."""
        if self._offered:
            self._accept()
        queue = self._queue
        while not queue:
            if self._error is not None:
                raise self._error
            if self._waiter is not None:
                raise UsageError("another coroutine is already waiting in recv()")
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._take()

    def _take(self) -> bytes:
        """The first queued message off the queue (reading resumes below
        the low mark)."""
        message = self._queue.popleft()
        self._queued -= len(message)
        if self._reading_paused and self._queued <= self._read_low:
            self._reading_paused = False
            if not self._lost:
                assert self._transport is not None
                self._transport.resume_reading()
        return message

    async def recv_typed(self) -> Any:
        """The next message, decoded by the connection's ``registry``."""
        if self.registry is None:
            raise UsageError("recv_typed() needs a connection made with registry=")
        return self.registry.decode(await self.recv())

    async def send(self, message: Message | Any) -> None:
        """Send one message (bytes-like, or a dataclass registered in the
        connection's ``registry``). Returns once the transport took it and
        its buffer is below ``write_high_water``: a peer that does not read
        makes ``send`` wait. Raises PeerClosed when the connection is
        closed, UsageError for a message over ``max_message_size``.

        A ``send`` cancelled while it waits has sent its message already
        (the frame is in the transport's buffer, never half of it)."""
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
        if n < _SMALL_FRAME:
            transport.write(header(n) + message)
        else:
            transport.write(header(n))
            transport.write(message)
        if self._writing_paused:
            await self._drain()

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

    async def refuse(self, reason: str) -> None:
        """Refuse a client that came through the door (``peer`` is not
        None): the daemon gets ``reason`` (cut to 512 UTF-8 bytes, control
        characters replaced) and closes its client; this connection closes.

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
        await self.close()

    async def close(self) -> None:
        """Close the connection once what was sent is written (at most
        5 s for a peer that does not read; then it is cut). Idempotent."""
        transport = self._transport
        if transport is None:
            return
        self._offered = False  # closed without a verdict: the daemon sees EOF
        if not transport.is_closing():
            transport.close()
        if self._lost:
            return
        try:
            async with asyncio.timeout(LINGER_SECONDS):
                await asyncio.shield(self._closed)
        except TimeoutError:
            log.warning("%s: peer not reading after %g s; cutting it", self._label, LINGER_SECONDS)
            transport.abort()
            await asyncio.shield(self._closed)

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
        return self._transport.get_write_buffer_size()

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> bytes:
        """``async for message in conn`` ends when the connection closes
        between two messages; a peer that vanished in the middle of one, a
        reset or a protocol error is raised (PeerClosed, ProtocolError)."""
        # recv's body again, one coroutine frame less per message.
        if self._offered:
            self._accept()
        queue = self._queue
        while not queue:
            if self._error is not None:
                if self._clean_end:
                    raise StopAsyncIteration
                raise self._error
            if self._waiter is not None:
                raise UsageError("another coroutine is already waiting in recv()")
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._take()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._lost else "open"
        return f"<Connection {self._label} {state}>"
