"""The asyncio service: ``async with serve(name, handler) as server``.

The run directory rules are Context's, by the same code
(:func:`ipc_core.rundir.bind_service`): the lock, sockets 0660, a stale
socket replaced, marks in the lock file, ServiceBusy for a second instance;
closing removes the socket (and the door) before the lock is released.

Each client gets a :class:`~ipc_core.asyncio.Connection` and one task
running ``handler(conn)``; the connection is closed when the handler
returns. A handler's exception is logged (a peer's PeerClosed or
ProtocolError without a traceback) and ends only that client.

The callback shape, ``serve(name, protocol=Factory)``, gives each client a
:class:`~ipc_core.asyncio.MessageProtocol` instead of a task: its
``message_received`` is called from the transport's read callback, so a
message costs no future and no task step (asyncio's own ``Protocol`` next
to its streams). Same run directory, door, limits and errors.

With ``peer_info=True`` the service also listens on its door
(:mod:`ipc_core.door`): a door connection is read here, with
``SCM_CREDENTIALS`` on every read (``recvmsg`` when readable, as Context
does), until its offer is complete; only then is it handed to the transport
(the bytes after the offer first) and its handler started with
``conn.peer`` set. An offer from an untrusted uid, a malformed one or none
within 5 s: a warning, the connection closed, no handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import door as _door
from .._doors import _CRED_SPACE, _credentials_problem
from ..errors import PeerClosed, ProtocolError, UsageError
from ..framing import DEFAULT_MAX_MESSAGE_SIZE
from ..peerinfo import PeerInfo
from ..rundir import ServiceSocket, bind_service, rundir
from ..typed import TypeRegistry
from ._stream import DEFAULT_HIGH_WATER, Connection, MessageProtocol

__all__ = ["Handler", "ProtocolFactory", "Server", "serve"]

log = logging.getLogger("ipc_core.asyncio")

Handler = Callable[[Connection], Awaitable[Any]]
ProtocolFactory = Callable[[], MessageProtocol]
_ACCEPT_BATCH = 64
_OFFER_READ = 64 * 1024


@dataclass(eq=False)
class _Offer:
    """A door connection still reading its offer."""

    sock: socket.socket
    reader: _door.OfferReader = field(default_factory=_door.OfferReader)
    timer: asyncio.TimerHandle | None = None


class Server:
    """A running service: ``serve_forever()``, ``close()``,
    ``wait_closed()``, ``handle_signals()``; made by :class:`serve`."""

    def __init__(
        self,
        service: ServiceSocket,
        handler: Handler | None,
        *,
        protocol: ProtocolFactory | None = None,
        trusted: frozenset[int],
        backlog: int,
        options: dict[str, Any],
    ) -> None:
        self.name = service.name
        self.path = service.path
        self._service = service
        self._handler = handler
        self._protocol_factory = protocol
        self._trusted = trusted
        self._backlog = backlog
        self._options = options
        self._loop = asyncio.get_running_loop()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._offers: set[_Offer] = set()
        self._adopting: set[asyncio.Task[Any]] = set()
        self._signals: list[int] = []
        self._stopped: asyncio.Future[None] = self._loop.create_future()
        self._closing = False
        self.offer_seconds = _door.OFFER_SECONDS

    async def _start(self) -> None:
        try:
            self._server = await self._loop.create_unix_server(
                self._protocol, sock=self._service.sock, backlog=self._backlog
            )
            if self._service.door is not None:
                self._loop.add_reader(self._service.door.fileno(), self._accept_door)
        except BaseException:
            self._close_sockets()
            raise
        log.debug("service %r listening on %s (asyncio)", self.name, self.path)

    # ------------------------------------------------------------ clients

    def _protocol(self, peer: PeerInfo | None = None, leftover: bytes = b"") -> Connection:
        return Connection(
            peer=peer,
            leftover=leftover,
            on_made=self._spawn,
            label=f"service {self.name!r} client",
            **self._options,
        )

    def _spawn(self, conn: Connection) -> None:
        if self._closing:
            conn.abort()
            return
        self._connections.add(conn)
        if self._protocol_factory is not None:
            self._adopt(conn, self._protocol_factory)
        else:
            task = self._loop.create_task(self._run(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if conn.peer is not None:
            # The verdict rule (see Connection.refuse): accept once the
            # handler's first step is over, unless it refused or sent first.
            self._loop.call_soon(self._verdict_due, conn)

    def _adopt(self, conn: Connection, factory: ProtocolFactory) -> None:
        """The callback shape: the client's protocol gets its messages
        from now on; the connection leaves ``connections`` once closed."""
        conn._closed.add_done_callback(lambda _: self._connections.discard(conn))
        try:
            protocol = factory()
            conn._protocol = protocol
            conn._sink = protocol.message_received
            protocol.connection_made(conn)
        except Exception as exc:
            conn._callback_failed("connection_made", exc)

    @staticmethod
    def _verdict_due(conn: Connection) -> None:
        if conn._offered:
            conn._accept()

    async def _run(self, conn: Connection) -> None:
        assert self._handler is not None
        try:
            await self._handler(conn)
        except (PeerClosed, ProtocolError) as exc:
            log.debug("service %r: handler ended: %s", self.name, exc)
        except asyncio.CancelledError:
            conn.abort()
            raise
        except Exception:
            log.exception("service %r: the handler failed; closing its connection", self.name)
        finally:
            self._connections.discard(conn)
        await conn.close()

    # -------------------------------------------------------------- doors

    def _accept_door(self) -> None:
        door = self._service.door
        assert door is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = door.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("door of service %r: cannot accept: %s", self.name, exc.strerror)
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            except OSError as exc:
                log.warning("door of service %r: %s; closing a connection", self.name, exc)
                sock.close()
                continue
            offer = _Offer(sock)
            self._offers.add(offer)
            offer.timer = self._loop.call_later(self.offer_seconds, self._offer_late, offer)
            self._loop.add_reader(sock.fileno(), self._read_offer, offer)

    def _read_offer(self, offer: _Offer) -> None:
        try:
            data, ancdata, flags, _addr = offer.sock.recvmsg(
                _OFFER_READ, _CRED_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop_offer(offer, f"read failed: {exc.strerror or exc}")
            return
        if data:
            problem = _credentials_problem(ancdata, flags, self._trusted)
            if problem is not None:
                self._drop_offer(offer, problem)
                return
        try:
            info = offer.reader.feed(data)
        except PeerClosed:
            self._drop_offer(offer, "closed before sending its peer information")
            return
        except ProtocolError as exc:
            self._drop_offer(offer, f"bad peer information: {exc}")
            return
        if info is None:
            return
        self._forget_offer(offer)
        sock = offer.sock
        try:
            # From now on an ordinary peer: whoever writes next is the relay's business.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
        except OSError as exc:
            log.warning("door of service %r: %s; closing a connection", self.name, exc)
            sock.close()
            return
        leftover = offer.reader.leftover
        task = self._loop.create_task(
            self._loop.connect_accepted_socket(lambda: self._protocol(info, leftover), sock)
        )
        self._adopting.add(task)
        task.add_done_callback(_adopted(self._adopting, sock))

    def _offer_late(self, offer: _Offer) -> None:
        offer.timer = None
        self._drop_offer(offer, f"no peer information within {self.offer_seconds:g} s")

    def _drop_offer(self, offer: _Offer, reason: str) -> None:
        """A door connection that is not believed: a warning, a close, no handler."""
        log.warning(
            "door of service %r, descriptor %d: %s; closing it",
            self.name,
            offer.sock.fileno(),
            reason,
        )
        self._forget_offer(offer)
        offer.sock.close()

    def _forget_offer(self, offer: _Offer) -> None:
        self._offers.discard(offer)
        if offer.timer is not None:
            offer.timer.cancel()
            offer.timer = None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(offer.sock.fileno())

    # ----------------------------------------------------------- stopping

    def handle_signals(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        """Stop the service cleanly on these signals (``serve_forever``
        returns; sockets and lock removed). Main thread's loop only."""
        for sig in signals:
            self._loop.add_signal_handler(sig, self._on_signal, sig)
            self._signals.append(sig)

    def _on_signal(self, sig: int) -> None:
        log.info("service %r: %s, stopping", self.name, signal.Signals(sig).name)
        self.close()

    async def serve_forever(self) -> None:
        """Serve until ``close()`` (or a handled signal); if the task is
        cancelled, the service is closed and the cancellation goes on."""
        try:
            await asyncio.shield(self._stopped)
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise
        await self.wait_closed()

    def close(self) -> None:
        """Stop accepting, remove the socket, the door and the lock, and end
        every client (handlers are cancelled). Idempotent; ``wait_closed``
        waits for the handlers to finish."""
        if self._closing:
            return
        self._closing = True
        for sig in self._signals:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(sig)
        self._signals.clear()
        self._close_sockets()
        for offer in list(self._offers):
            self._forget_offer(offer)
            offer.sock.close()
        for task in self._adopting:
            task.cancel()
        for conn in self._connections:
            conn.abort()
        for task in self._tasks:
            task.cancel()
        if not self._stopped.done():
            self._stopped.set_result(None)
        log.debug("service %r closed", self.name)

    def _close_sockets(self) -> None:
        # asyncio's server first (it unregisters and closes the listening
        # socket), then the socket file and the door, then the lock.
        if self._server is not None:
            self._server.close()
        if self._service.door is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._service.door.fileno())
        self._service.close()

    async def wait_closed(self) -> None:
        """Wait until ``close()`` has ended every handler."""
        await asyncio.shield(self._stopped)
        pending: list[Awaitable[Any]] = [*self._tasks, *self._adopting]
        pending += [conn.wait_closed() for conn in self._connections]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def is_serving(self) -> bool:
        return not self._closing

    @property
    def connections(self) -> frozenset[Connection]:
        """The clients being served (a handler running, or a protocol's
        connection not closed yet)."""
        return frozenset(self._connections)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


def _adopted(tasks: set[asyncio.Task[Any]], sock: socket.socket) -> Callable[[Any], None]:
    """Done callback of a door connection's hand-over to the transport."""

    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.warning("cannot set up a door connection: %s", task.exception())
            sock.close()

    return done


class serve:  # a class used like a function, as in python-websockets
    """Listen as service ``name``; every client runs ``handler(conn)`` in
    its own task, or, with ``protocol=Factory`` instead of a handler, gets
    ``Factory()`` (a :class:`MessageProtocol`) whose callbacks run on the
    loop with no task per client.

    ``server = await serve(name, handler)`` or ``async with serve(name,
    handler) as server: await server.serve_forever()`` (closed at the end).
    ``local_only``, ``peer_info``, ``trusted_uids`` and ``backlog`` are
    ``Context.service_init``'s; the limits and ``registry`` are each
    connection's (see :class:`Connection`). Raises ServiceBusy when
    another instance runs, InvalidServiceName for a bad name.
    """

    def __init__(
        self,
        name: str,
        handler: Handler | None = None,
        *,
        protocol: ProtocolFactory | None = None,
        backlog: int = 1024,
        local_only: bool = False,
        peer_info: bool = False,
        trusted_uids: Iterable[int] = (),
        rundir_path: str | os.PathLike[str] | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        read_high_water: int = DEFAULT_HIGH_WATER,
        write_high_water: int = DEFAULT_HIGH_WATER,
        registry: TypeRegistry | None = None,
    ) -> None:
        if (handler is None) == (protocol is None):
            raise UsageError("serve() needs a handler or a protocol= factory (one of them)")
        trusted = frozenset(trusted_uids)
        for uid in trusted:
            if type(uid) is not int or uid < 0:
                raise UsageError(f"trusted_uids: {uid!r} is not a uid")
        self.name = name
        self.handler = handler
        self.protocol = protocol
        self.directory = Path(rundir_path) if rundir_path is not None else rundir()
        self._backlog = backlog
        self._local_only = local_only
        self._peer_info = peer_info
        self._trusted = trusted
        self._options: dict[str, Any] = {
            "max_message_size": max_message_size,
            "read_high_water": read_high_water,
            "write_high_water": write_high_water,
            "registry": registry,
        }
        self._server: Server | None = None

    async def _create(self) -> Server:
        service = bind_service(
            self.name,
            self.directory,
            self._backlog,
            local_only=self._local_only,
            peer_info=self._peer_info,
        )
        trusted = self._trusted | {0, os.geteuid(), service.owner_uid}
        server = Server(
            service,
            self.handler,
            protocol=self.protocol,
            trusted=trusted,
            backlog=self._backlog,
            options=self._options,
        )
        await server._start()
        return server

    def __await__(self) -> Generator[Any, None, Server]:
        return self._create().__await__()

    async def __aenter__(self) -> Server:
        self._server = await self._create()
        return self._server

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
