"""ipc_core.asyncio against the rest of the system (issue 17): Context services
and clients, `ipc pongd`, the run-directory rules (lock, mode, stale sockets,
ServiceBusy, clean stop on cancellation and on signals) and the bad-input
cases the Context tests use. Real sockets, real processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ipc_core import (
    Context,
    EventType,
    InvalidServiceName,
    PeerClosed,
    ServiceBusy,
    ServiceUnavailable,
    encode,
    service_alive,
    service_marks,
)
from ipc_core.asyncio import Connection, MessageProtocol, Server, connect, serve
from tests.helpers import ROOT, connectable, recv_msg, wait_for

pytestmark = pytest.mark.timeout(90)


def run(coro: Awaitable[Any], timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


async def echo(conn: Connection) -> None:
    async for message in conn:
        await conn.send(message)


@contextmanager
def service_in_thread(
    name: str, handler: Callable[[Connection], Awaitable[Any]] = echo, **options: Any
) -> Iterator[Server]:
    """An asyncio service on its own loop in a thread (for blocking clients)."""
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        try:
            async with serve(name, handler, **options) as server:
                box["server"], box["loop"] = server, asyncio.get_running_loop()
                started.set()
                await server.serve_forever()
        except BaseException as exc:
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    if "error" in box:
        raise box["error"]
    try:
        yield box["server"]
    finally:
        box["loop"].call_soon_threadsafe(box["server"].close)
        thread.join(10)
        assert not thread.is_alive()


@contextmanager
def context_echo(name: str) -> Iterator[None]:
    """A Context echo service in a thread."""
    ctx = Context()
    ctx.service_init(name)

    def loop() -> None:
        for ev in ctx:
            if ev.type == EventType.MESSAGE_RX:
                assert ev.message is not None
                ctx.write(ev.fd, ev.message)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        ctx.call_soon_threadsafe(ctx.stop)
        thread.join(5)


def raw_client(rundir: Path, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(rundir / name))
    return s


# ------------------------------------------------------ with the rest of LibIPC


def test_asyncio_client_and_a_context_service(rundir: Path) -> None:
    async def main() -> None:
        async with connect("ctxecho") as conn:
            for size in (0, 1, 1000, 70000, 3 * 1024 * 1024):
                await conn.send(os.urandom(size))
            for size in (0, 1, 1000, 70000, 3 * 1024 * 1024):
                assert len(await conn.recv()) == size

    with context_echo("ctxecho"):
        run(main())


def test_context_clients_and_an_asyncio_service(rundir: Path) -> None:
    with service_in_thread("aecho"), Context() as ctx:
        fds = [ctx.connect_service("aecho") for _ in range(20)]
        for i, fd in enumerate(fds):
            ctx.write(fd, b"n%d" % i)
        for i, fd in enumerate(fds):
            assert ctx.read(fd, timeout=10) == b"n%d" % i
        big = os.urandom(5 * 1024 * 1024)
        s = raw_client(rundir, "aecho")  # a blocking writer for a message this big
        s.sendall(encode(big))
        assert recv_msg(s) == big


def test_asyncio_client_against_ipc_pongd(rundir: Path, procs) -> None:
    procs.pongd(rundir)

    async def one(i: int) -> None:
        async with connect("pong") as conn:
            for j in range(20):
                await conn.send(b"%d.%d" % (i, j))
                assert await conn.recv() == b"%d.%d" % (i, j)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(100)))

    run(main())


def test_asyncio_client_and_service_100_clients(rundir: Path) -> None:
    async def main() -> None:
        async with serve("many", echo) as server:

            async def one(i: int) -> bytes:
                async with connect("many") as conn:
                    await conn.send(b"c%d" % i)
                    return await conn.recv()

            got = await asyncio.gather(*(one(i) for i in range(100)))
            assert got == [b"c%d" % i for i in range(100)]
            assert server.is_serving

    run(main())


def test_a_service_and_a_client_send_each_other_typed_messages(rundir: Path) -> None:
    from dataclasses import dataclass

    from ipc_core import TypeRegistry

    registry = TypeRegistry()

    @registry.register(1)
    @dataclass
    class Add:
        a: int
        b: int

    @registry.register(2)
    @dataclass
    class Sum:
        value: int

    async def adder(conn: Connection) -> None:
        while True:
            try:
                request = await conn.recv_typed()
            except PeerClosed:
                return
            await conn.send(Sum(request.a + request.b))

    async def main() -> None:
        async with (
            serve("adder", adder, registry=registry),
            connect("adder", registry=registry) as conn,
        ):
            await conn.send(Add(2, 40))
            assert await conn.recv_typed() == Sum(42)

    run(main())


# ------------------------------------------------------------ the run directory


def test_run_directory_rules(rundir: Path) -> None:
    async def main() -> None:
        # a stale socket (a crashed instance: no lock held) is replaced
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(rundir / "svc"))
        stale.close()
        async with serve("svc", echo, local_only=True) as server:
            assert stat.S_IMODE(os.stat(rundir / "svc").st_mode) == 0o660
            assert stat.S_IMODE(os.stat(rundir / "svc.lock").st_mode) == 0o660
            assert service_alive("svc") and service_marks("svc") == {"local-only"}
            # a second instance, asyncio or Context, is refused
            with pytest.raises(ServiceBusy):
                await serve("svc", echo)
            with Context() as ctx, pytest.raises(ServiceBusy):
                ctx.service_init("svc")
            assert server.path == rundir / "svc"
            with pytest.raises(InvalidServiceName):
                await serve("bad.door", echo)
        assert not (rundir / "svc").exists() and not (rundir / "svc.lock").exists()
        # and a Context service makes an asyncio one busy too
        with Context() as ctx:
            ctx.service_init("held")
            with pytest.raises(ServiceBusy):
                await serve("held", echo)

    run(main())


def test_cancelling_serve_forever_removes_the_socket_and_the_lock(rundir: Path) -> None:
    async def main() -> None:
        ended = asyncio.Event()

        async def handler(conn: Connection) -> None:
            try:
                await conn.recv()
            finally:
                ended.set()

        server = await serve("cancelme", handler)
        task = asyncio.create_task(server.serve_forever())
        client = await connect("cancelme")
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended.is_set()  # the handler was ended too
        assert not (rundir / "cancelme").exists() and not (rundir / "cancelme.lock").exists()
        with pytest.raises(PeerClosed):
            await client.recv()
        await client.close()
        # the name is free again
        async with serve("cancelme", echo):
            pass

    run(main())


SIGNALLED = r"""
import asyncio, sys
from ipc_core.asyncio import serve

async def handler(conn):
    async for m in conn:
        await conn.send(m)

async def main():
    async with serve(sys.argv[1], handler) as server:
        server.handle_signals()
        print("ready", flush=True)
        await server.serve_forever()
    print("stopped", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_service_cleanly(rundir: Path, procs, sig: int) -> None:
    proc = procs.start(
        sys.executable, "-c", SIGNALLED, "sig", stdout=subprocess.PIPE, env={"PYTHONPATH": ROOT}
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    s = raw_client(rundir, "sig")
    s.sendall(encode(b"up"))
    assert recv_msg(s) == b"up"
    proc.send_signal(sig)
    assert proc.wait(10) == 0
    assert proc.stdout.read() == b"stopped\n"
    assert s.recv(1) == b""
    assert not (rundir / "sig").exists() and not (rundir / "sig.lock").exists()


# ----------------------------------------------------------------- bad input


def test_unknown_service(rundir: Path) -> None:
    async def main() -> None:
        with pytest.raises(ServiceUnavailable, match="no service 'nothere'"):
            await connect("nothere")
        with pytest.raises(InvalidServiceName):
            await connect("a/b")

    run(main())


def test_an_oversize_length_closes_that_client_only(rundir: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with service_in_thread("guard", max_message_size=1000):
        good = raw_client(rundir, "guard")
        bad = raw_client(rundir, "guard")
        bad.sendall(struct.pack(">I", 1001) + b"x" * 10)
        assert bad.recv(1) == b""
        wait_for(lambda: "1001 bytes announced, limit is 1000" in caplog.text, what="log line")
        good.sendall(encode(b"still served"))
        assert recv_msg(good) == b"still served"
    assert "Traceback" not in caplog.text


def test_text_sent_to_a_service_is_refused_with_a_hint(rundir: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with service_in_thread("web"):
        s = raw_client(rundir, "web")
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(1) == b""
        wait_for(lambda: "closing it" in caplog.text, what="log line")
        assert "'GET '" in caplog.text


def test_a_peer_vanishing_mid_message_ends_its_handler_only(rundir: Path) -> None:
    outcomes: list[str] = []

    async def handler(conn: Connection) -> None:
        try:
            async for message in conn:
                await conn.send(message)
            outcomes.append("clean end")
        except PeerClosed as exc:
            outcomes.append(str(exc))
            raise

    with service_in_thread("mid", handler):
        other = raw_client(rundir, "mid")
        s = raw_client(rundir, "mid")
        s.sendall(encode(b"whole") + struct.pack(">I", 100) + b"only part")
        assert recv_msg(s) == b"whole"
        s.close()
        wait_for(lambda: outcomes, what="the handler's end")
        assert "middle of a message" in outcomes[0]
        other.sendall(encode(b"unaffected"))
        assert recv_msg(other) == b"unaffected"


def test_a_handler_that_fails_is_logged_and_others_go_on(rundir: Path, caplog) -> None:
    async def handler(conn: Connection) -> None:
        message = await conn.recv()
        if message == b"boom":
            raise RuntimeError("the application's bug")
        await conn.send(message)

    with service_in_thread("buggy", handler):
        s = raw_client(rundir, "buggy")
        s.sendall(encode(b"boom"))
        assert s.recv(1) == b""
        t = raw_client(rundir, "buggy")
        t.sendall(encode(b"fine"))
        assert recv_msg(t) == b"fine"
    assert "the handler failed" in caplog.text


def test_a_client_that_never_reads_does_not_grow_the_service(rundir: Path) -> None:
    """The service streams to a client that reads nothing: its send waits on
    drain, its buffer stays under the mark."""
    seen: dict[str, int] = {}

    async def flood(conn: Connection) -> None:
        try:
            while True:
                await conn.send(b"f" * 32768)
                seen["sent"] = seen.get("sent", 0) + 1
                seen["pending"] = max(seen.get("pending", 0), conn.pending_bytes)
        except PeerClosed:
            pass

    with service_in_thread("flood", flood, write_high_water=128 * 1024):
        s = raw_client(rundir, "flood")
        s.sendall(b"")
        wait_for(lambda: seen.get("sent", 0) > 0, what="some sends")
        before = -1
        while before != seen["sent"]:  # until send stops returning
            before = seen["sent"]
            threading.Event().wait(0.3)
        assert seen["pending"] <= 128 * 1024 + 32772
        assert seen["sent"] * 32772 < 32 * 1024 * 1024  # bounded by kernel buffers + the mark
        s.close()


def test_connect_timeout_and_cancellation_leave_no_descriptor(rundir: Path) -> None:
    async def main() -> None:
        async with serve("fd", echo):
            before = len(os.listdir("/proc/self/fd"))
            for _ in range(20):
                task = asyncio.create_task(connect("fd").__aenter__())
                await asyncio.sleep(0)
                task.cancel()
                try:
                    conn = await task
                except asyncio.CancelledError:
                    continue
                await conn.close()
            await asyncio.sleep(0.1)
            assert len(os.listdir("/proc/self/fd")) <= before

    run(main())


def test_a_sigstopped_service_times_out_with_asyncio_timeout(rundir: Path, procs) -> None:
    proc = procs.pongd(rundir)

    async def main() -> None:
        async with connect("pong") as conn:
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                await conn.send(b"ping")
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await conn.recv()
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            assert await conn.recv() == b"ping"  # the late answer was not lost

    run(main())
    wait_for(lambda: connectable(rundir / "pong"), what="pongd still up")


# ------------------------------------------- the callback shape (protocol=)


class Recorder(MessageProtocol):
    """Echo, and write down what happened (class-level: one list per test)."""

    events: list[Any] = []

    def connection_made(self, conn: Connection) -> None:
        self.conn = conn
        self.events.append("made")

    def message_received(self, message: bytes) -> None:
        if message == b"boom":
            raise RuntimeError("the application's bug")
        if message == b"bye":
            self.conn.close()
            return
        self.conn.send(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(exc)


@pytest.fixture
def recorder() -> Iterator[type[Recorder]]:
    Recorder.events = []
    yield Recorder


def test_protocol_service_with_context_clients_and_many_messages_per_read(
    rundir: Path, recorder: type[Recorder]
) -> None:
    with service_in_thread("cb", None, protocol=recorder), Context() as ctx:
        fds = [ctx.connect_service("cb") for _ in range(20)]
        for i, fd in enumerate(fds):
            ctx.write(fd, b"n%d" % i)
        for i, fd in enumerate(fds):
            assert ctx.read(fd, timeout=10) == b"n%d" % i
        s = raw_client(rundir, "cb")
        burst = [os.urandom(n) for n in (0, 1, 500, 70000, 3)] * 40  # many frames per read
        stream = b"".join(encode(m) for m in burst) + encode(b"bye")
        writer = threading.Thread(target=s.sendall, args=(stream,))  # the replies flow back
        writer.start()
        assert [recv_msg(s) for _ in burst] == burst
        writer.join(10)
        assert s.recv(1) == b""  # "bye": the callback closed it
    assert recorder.events.count("made") == 21
    assert recorder.events.count(None) == 21  # every client ended cleanly


def test_protocol_service_with_asyncio_clients_and_typed_messages(rundir: Path) -> None:
    from dataclasses import dataclass

    from ipc_core import TypeRegistry

    registry = TypeRegistry()

    @registry.register(1)
    @dataclass
    class Add:
        a: int
        b: int

    @registry.register(2)
    @dataclass
    class Sum:
        value: int

    class Adder(MessageProtocol):
        def connection_made(self, conn: Connection) -> None:
            self.conn = conn

        def message_received(self, message: bytes) -> None:
            assert self.conn.registry is not None
            request = self.conn.registry.decode(message)
            self.conn.send(Sum(request.a + request.b))

    async def main() -> None:
        async with serve("adder", protocol=Adder, registry=registry) as server:

            async def one(i: int) -> Any:
                async with connect("adder", registry=registry) as conn:
                    await conn.send(Add(i, 1000))
                    return await conn.recv_typed()

            got = await asyncio.gather(*(one(i) for i in range(100)))
            assert got == [Sum(i + 1000) for i in range(100)]
            assert server.is_serving

    run(main())


def test_protocol_callbacks_see_bad_input_and_failures_one_client_at_a_time(
    rundir: Path, caplog, recorder: type[Recorder]
) -> None:
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with service_in_thread("cbguard", None, protocol=recorder, max_message_size=1000):
        good = raw_client(rundir, "cbguard")
        bad = raw_client(rundir, "cbguard")
        bad.sendall(struct.pack(">I", 1001) + b"x" * 10)
        assert bad.recv(1) == b""
        wait_for(lambda: "1001 bytes announced, limit is 1000" in caplog.text, what="log line")
        buggy = raw_client(rundir, "cbguard")
        buggy.sendall(encode(b"first") + encode(b"boom") + encode(b"never answered"))
        assert recv_msg(buggy) == b"first"
        assert buggy.recv(1) == b""
        half = raw_client(rundir, "cbguard")
        half.sendall(encode(b"whole") + struct.pack(">I", 100) + b"only part")
        assert recv_msg(half) == b"whole"
        half.shutdown(socket.SHUT_WR)
        assert half.recv(1) == b""
        good.sendall(encode(b"still served"))
        assert recv_msg(good) == b"still served"
        wait_for(lambda: len(recorder.events) >= 7, what="the connection_lost calls")
    assert "message_received failed" in caplog.text and "the application's bug" in caplog.text
    kinds = sorted(type(e).__name__ for e in recorder.events if e != "made")
    assert kinds == ["MessageTooLarge", "NoneType", "NoneType", "PeerClosed"]
    assert "middle of a message" in str(
        next(e for e in recorder.events if isinstance(e, PeerClosed))
    )


def test_a_protocol_client_that_never_reads_is_not_read_either(rundir: Path) -> None:
    """Back-pressure in the callback shape: while the client reads none of
    the replies, the service stops reading its requests; its memory stays
    bounded by the mark, and everything is answered once the client reads."""
    conns: list[Connection] = []

    class Big(MessageProtocol):
        def connection_made(self, conn: Connection) -> None:
            self.conn = conn
            conns.append(conn)

        def message_received(self, message: bytes) -> None:
            self.conn.send(message * 64)  # 64 KiB of reply per 1 KiB request

    with service_in_thread("cbflood", None, protocol=Big, write_high_water=128 * 1024):
        s = raw_client(rundir, "cbflood")
        s.setblocking(False)
        request = encode(b"r" * 1024)
        sent = stalled = 0
        while stalled < 20:
            try:
                sent += s.send(request[sent % len(request) :] if sent % len(request) else request)
                stalled = 0
            except BlockingIOError:
                stalled += 1
                threading.Event().wait(0.02)
        conn = conns[0]
        assert conn._reading_paused
        # The mark and the reply that crossed it; requests: at most one read.
        assert conn.pending_bytes <= 128 * 1024 + 64 * 1024 + 4
        assert conn.queued_bytes <= 256 * 1024
        assert sent < 8 * 1024 * 1024  # the service stopped taking requests
        s.setblocking(True)
        s.settimeout(10)
        full = sent // len(request)
        for _ in range(full):
            assert recv_msg(s) == b"r" * 1024 * 64


def test_serve_wants_a_handler_or_a_protocol(rundir: Path) -> None:
    from ipc_core import UsageError

    with pytest.raises(UsageError, match="handler or a protocol"):
        serve("x")
    with pytest.raises(UsageError, match="handler or a protocol"):
        serve("x", echo, protocol=Recorder)

    async def main() -> None:
        made: list[Connection] = []

        class Probe(MessageProtocol):
            def connection_made(self, conn: Connection) -> None:
                self.conn = conn
                made.append(conn)

            def message_received(self, message: bytes) -> None:
                self.conn.send(b"ok")

        async with serve("probe", protocol=Probe) as server, connect("probe") as conn:
            await conn.send(b"?")
            assert await conn.recv() == b"ok"
            with pytest.raises(UsageError, match="go to its protocol"):
                await made[0].recv()  # a protocol's connection has no recv
            server.close()  # the service's close ends the clients: connection_lost(None)
            await server.wait_closed()
            assert not server.connections and made[0].closed

    run(main())
