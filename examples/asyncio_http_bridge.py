"""A complete asyncio program: a small HTTP handler that asks a local LibIPC
service (standard library only, plus ipc_core).

    POST /ask        the request body goes to the service as one message;
                     the service's answer is the response body (200)
    GET  /health     200 "ok"

The bridge keeps one connection to the service (``ipc_core.asyncio.connect``,
so ``IPC_NETWORK`` routes work too) shared by every request: one request at
a time on it, a new connection when the service restarted. The service is
unavailable: 503; it does not answer within 5 s: 504. ``--with-service``
also runs the service itself in the same event loop (``serve``), an
upper-casing one, to show both sides::

    python examples/upper_service.py &            # or: --with-service
    python examples/asyncio_http_bridge.py --listen 127.0.0.1:8080 --service upper
    curl -d hello http://127.0.0.1:8080/ask       # HELLO

Ctrl-C or SIGTERM stops it (the service's socket and lock removed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from ipc_core import IPCError, PeerClosed, ServiceUnavailable
from ipc_core.asyncio import Connection, connect, serve

MAX_BODY = 1024 * 1024
ANSWER_SECONDS = 5.0
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class ServiceLink:
    """One shared connection to the LibIPC service, (re)made on demand."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()

    async def ask(self, question: bytes) -> bytes:
        async with self._lock:  # one request at a time on the connection
            for attempt in (1, 2):
                if self._conn is None or self._conn.closed:
                    self._conn = await connect(self.name)
                try:
                    await self._conn.send(question)
                    async with asyncio.timeout(ANSWER_SECONDS):
                        return await self._conn.recv()
                except PeerClosed:
                    self._conn = None  # the service restarted: once more, anew
                    if attempt == 2:
                        raise
                except TimeoutError:
                    # A late answer would go to the next request: start afresh.
                    self._conn.abort()
                    self._conn = None
                    raise
            raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | int:
    """(method, path, body) of one HTTP/1.1 request, or an error status."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return 400
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return 400
    method, path, _version = parts
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit():
                return 400
            length = int(value)
        elif name.strip().lower() == "transfer-encoding":
            return 400  # this small handler reads Content-Length bodies only
    if length > MAX_BODY:
        return 413
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        return 400
    return method, path, body


def response(status: int, body: bytes, *, close: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode() + body


async def answer(link: ServiceLink, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    if path == "/health":
        return 200, b"ok"
    if path != "/ask":
        return 404, b"not found\n"
    if method != "POST":
        return 405, b"POST a body to /ask\n"
    try:
        return 200, await link.ask(body)
    except TimeoutError:
        return 504, f"service {link.name!r} did not answer in {ANSWER_SECONDS:g} s\n".encode()
    except ServiceUnavailable as exc:
        return 503, f"{exc}\n".encode()
    except IPCError as exc:
        return 503, f"service {link.name!r} failed: {exc}\n".encode()


async def http_client(
    link: ServiceLink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:  # keep-alive: one request after the other
            request = await read_request(reader)
            if isinstance(request, int):
                if not reader.at_eof():
                    writer.write(response(request, b"bad request\n", close=True))
                break
            status, body = await answer(link, *request)
            writer.write(response(status, body))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def upper(conn: Connection) -> None:
    """The --with-service service: every message back in upper case."""
    async for message in conn:
        await conn.send(message.upper())


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (port 0: any)")
    parser.add_argument("--service", default="upper", help="the LibIPC service to ask")
    parser.add_argument(
        "--with-service", action="store_true", help="also run an upper-casing service itself"
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    async with contextlib.AsyncExitStack() as stack:
        if args.with_service:
            await stack.enter_async_context(serve(args.service, upper))
        link = ServiceLink(args.service)
        stack.push_async_callback(link.close)
        http = await asyncio.start_server(
            lambda r, w: http_client(link, r, w), host or "127.0.0.1", int(port)
        )
        stack.push_async_callback(http.wait_closed)
        stack.callback(http.close)
        bound = http.sockets[0].getsockname()
        print(f"listening on {bound[0]}:{bound[1]}, asking {args.service!r}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    print("stopped", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except (ServiceUnavailable, OSError) as exc:
        sys.exit(f"asyncio_http_bridge: {exc}")
