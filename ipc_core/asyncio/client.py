"""The asyncio client: ``async with connect(name) as conn``.

The route is Context's (:mod:`ipc_core.routing`, same functions, same
messages): when ``IPC_NETWORK`` names a route for the service, the router
``ipc`` (ipcd) is asked and the connected descriptor it passes back over
SCM_RIGHTS is received on the event loop (``recvmsg`` when the router's
socket is readable: ``loop.add_reader``); otherwise, or when ipcd does not
run, the service's socket in the run directory is connected directly.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Generator
from pathlib import Path
from typing import Any

from .. import routing
from ..errors import PeerClosed, ServiceUnavailable
from ..fdpass import recv_fd
from ..framing import DEFAULT_MAX_MESSAGE_SIZE, encode
from ..rundir import rundir, socket_path
from ..typed import TypeRegistry
from ._stream import DEFAULT_HIGH_WATER, Connection

__all__ = ["connect", "open_socket"]


class connect:  # a class used like a function, as in python-websockets
    """Connect to service ``name``: ``conn = await connect(name)`` or
    ``async with connect(name) as conn:`` (closed at the end).

    ``timeout`` bounds connecting (and asking the router); it raises
    ServiceUnavailable like ``Context.connect_service``. The other
    arguments are the :class:`Connection`'s (limits and typed messages).
    """

    def __init__(
        self,
        name: str,
        *,
        rundir_path: str | os.PathLike[str] | None = None,
        timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        read_high_water: int = DEFAULT_HIGH_WATER,
        write_high_water: int = DEFAULT_HIGH_WATER,
        registry: TypeRegistry | None = None,
    ) -> None:
        self.name = name
        self.directory = Path(rundir_path) if rundir_path is not None else rundir()
        self.timeout = timeout
        self._options: dict[str, Any] = {
            "max_message_size": max_message_size,
            "read_high_water": read_high_water,
            "write_high_water": write_high_water,
            "registry": registry,
        }
        self._conn: Connection | None = None

    async def _connect(self) -> Connection:
        sock = await open_socket(self.name, self.directory, self.timeout)
        loop = asyncio.get_running_loop()
        try:
            _transport, conn = await loop.create_connection(
                lambda: Connection(label=f"service {self.name!r}", **self._options), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        return conn

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._connect().__await__()

    async def __aenter__(self) -> Connection:
        self._conn = await self._connect()
        return self._conn

    async def __aexit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            await self._conn.close()


async def open_socket(name: str, directory: Path, timeout: float = 5.0) -> socket.socket:
    """A non-blocking socket connected to ``name`` (through the router when
    ``IPC_NETWORK`` says so), within ``timeout`` seconds."""
    route = routing.route_for(name)
    if route is None:
        return await _direct(name, directory, timeout)
    target, network = route
    try:
        router = await _direct(routing.ROUTER_SERVICE, directory, timeout)
    except ServiceUnavailable:
        # No router: the local service if there is one (Context's fallback).
        try:
            return await _direct(name, directory, timeout)
        except ServiceUnavailable:
            raise routing.no_router_error(name, target, directory) from None
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_sendall(
                router, encode(routing.lookup_message(name, network))
            )
            data, fd = await _recv_fd(router)
    except TimeoutError:
        raise ServiceUnavailable(f"router gave no answer for {name!r} within {timeout} s") from None
    except OSError as exc:
        raise PeerClosed(f"router failed: {exc}") from exc
    finally:
        router.close()
    sock = routing.router_answer(name, data, fd)
    sock.setblocking(False)
    return sock


async def _direct(name: str, directory: Path, timeout: float) -> socket.socket:
    path = socket_path(name, directory)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, os.fspath(path))
    except TimeoutError:
        sock.close()
        raise ServiceUnavailable(f"cannot connect to service {name!r}: timed out") from None
    except OSError as exc:
        sock.close()
        raise routing.connect_error(name, directory, exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _recv_fd(sock: socket.socket) -> tuple[bytes, int | None]:
    """``fdpass.recv_fd`` on the event loop: wait until readable, then
    ``recvmsg`` (extra descriptors closed there)."""
    loop = asyncio.get_running_loop()
    fileno = sock.fileno()
    while True:
        try:
            return recv_fd(sock)
        except BlockingIOError:
            pass
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fileno, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fileno)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
