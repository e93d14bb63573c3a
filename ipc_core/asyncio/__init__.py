"""ipc_core for asyncio programs: LibIPC clients and services on the event loop.

The same framing (:class:`~ipc_core.framing.FrameDecoder`), limits, error
classes, run-directory rules and routing as :class:`~ipc_core.Context`, shaped
like python-websockets' asyncio layer::

    from ipc_core.asyncio import connect, serve

    async with connect("pong") as conn:
        await conn.send(b"hello")
        print(await conn.recv())

    async def handler(conn):
        async for message in conn:
            await conn.send(message)

    async with serve("echo", handler) as server:
        await server.serve_forever()

A connection is an :class:`asyncio.Protocol` over the socket's transport:
``send`` waits on drain above ``write_high_water``, reading pauses when more
than ``read_high_water`` bytes of messages wait for ``recv``, and a cancelled
``recv`` loses no message. Timeouts are asyncio's (``asyncio.timeout``).

A service can also take asyncio's callback shape (no task per client)::

    class Echo(MessageProtocol):
        def connection_made(self, conn):
            self.conn = conn

        def message_received(self, message):
            self.conn.send(message)

    async with serve("echo", protocol=Echo) as server:
        await server.serve_forever()
"""

from ._stream import DEFAULT_HIGH_WATER, Connection, MessageProtocol
from .client import connect
from .server import Handler, ProtocolFactory, Server, serve

__all__ = [
    "DEFAULT_HIGH_WATER",
    "Connection",
    "Handler",
    "MessageProtocol",
    "ProtocolFactory",
    "Server",
    "connect",
    "serve",
]
