"""ipc_core.asyncio's Connection over real socket pairs (issue 17): framing,
bad input, flow control both ways, cancellation, typed messages. The far end
is a plain blocking socket, so what is on the wire is what the test wrote."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from ipc_core import MessageTooLarge, PeerClosed, ProtocolError, TypeRegistry, UsageError, encode
from ipc_core.asyncio import Connection
from tests.helpers import recv_msg

pytestmark = pytest.mark.timeout(60)


async def pair(**options: Any) -> tuple[Connection, socket.socket]:
    """An asyncio Connection and the blocking socket at its other end."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(10)
    loop = asyncio.get_running_loop()
    _t, conn = await loop.create_connection(lambda: Connection(**options), sock=ours)
    return conn, theirs


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


# ---------------------------------------------------------------- framing


def test_messages_in_any_chunking_and_empty_ones() -> None:
    async def main() -> None:
        conn, far = await pair()
        stream = encode(b"one") + encode(b"") + encode(b"x" * 70000) + encode(b"last")

        def dribble() -> None:  # split everywhere, headers included
            for i in range(0, len(stream), 7):
                far.sendall(stream[i : i + 7])

        writer = asyncio.create_task(asyncio.to_thread(dribble))
        assert [await conn.recv() for _ in range(4)] == [b"one", b"", b"x" * 70000, b"last"]
        await writer
        await conn.send(b"back")
        await conn.send(memoryview(b"y" * 100000))
        assert await asyncio.to_thread(recv_msg, far) == b"back"
        assert await asyncio.to_thread(recv_msg, far) == b"y" * 100000
        await conn.close()
        assert far.recv(1) == b""

    run(main())


def test_async_for_ends_when_the_peer_closes() -> None:
    async def main() -> None:
        conn, far = await pair()
        far.sendall(encode(b"a") + encode(b"b"))
        far.close()
        assert [m async for m in conn] == [b"a", b"b"]
        with pytest.raises(PeerClosed):
            await conn.recv()
        await conn.close()
        assert conn.closed

    run(main())


# -------------------------------------------------------------- bad input


def test_an_oversize_length_is_a_protocol_error_and_closes_at_once(caplog) -> None:
    async def main() -> None:
        conn, far = await pair(max_message_size=1000)
        far.sendall(encode(b"fine"))
        assert await conn.recv() == b"fine"
        far.sendall(struct.pack(">I", 1001) + b"zz")
        with pytest.raises(MessageTooLarge) as info:
            await conn.recv()
        assert (info.value.length, info.value.limit) == (1001, 1000)
        await conn.wait_closed()
        assert conn.closed
        assert far.recv(1) == b""  # closed at once
        with pytest.raises(PeerClosed):
            await conn.send(b"too late")

    run(main())
    assert "1001 bytes announced, limit is 1000" in caplog.text and "closing it" in caplog.text


def test_text_on_a_libipc_socket_is_named_in_the_log(caplog) -> None:
    async def main() -> None:
        conn, far = await pair()
        far.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(ProtocolError):
            await conn.recv()

    run(main())
    assert "'GET '" in caplog.text


def test_a_truncated_frame_then_eof_is_peer_closed_mid_message() -> None:
    async def main() -> None:
        conn, far = await pair()
        far.sendall(encode(b"whole") + struct.pack(">I", 10) + b"half")
        far.shutdown(socket.SHUT_WR)
        assert await conn.recv() == b"whole"
        with pytest.raises(PeerClosed, match="middle of a message"):
            await conn.recv()
        await conn.wait_closed()

    run(main())


def test_a_message_over_the_limit_is_not_sent() -> None:
    async def main() -> None:
        conn, _far = await pair(max_message_size=10)
        with pytest.raises(UsageError, match="exceeds max_message_size"):
            await conn.send(b"x" * 11)
        with pytest.raises(UsageError, match="registry="):
            await conn.send("text is not bytes")
        await conn.close()

    run(main())


def test_two_concurrent_receivers_are_a_usage_error() -> None:
    async def main() -> None:
        conn, far = await pair()
        first = asyncio.create_task(conn.recv())
        await asyncio.sleep(0.01)
        with pytest.raises(UsageError, match="already waiting"):
            await conn.recv()
        far.sendall(encode(b"for the first"))
        assert await first == b"for the first"

    run(main())


# ------------------------------------------------------------ cancellation


def test_a_cancelled_recv_loses_no_message() -> None:
    async def main() -> None:
        conn, far = await pair()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await conn.recv()
        # The message arrives and wakes a receiver that is cancelled before
        # it runs again: the message must stay for the next recv.
        task = asyncio.create_task(conn.recv())
        await asyncio.sleep(0.01)
        far.sendall(encode(b"kept") + encode(b"next"))
        while conn.queued_bytes == 0:
            await asyncio.sleep(0)  # let the transport read (it wakes the task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await conn.recv() == b"kept"
        assert await conn.recv() == b"next"

    run(main())


def test_many_cancelled_receives_under_a_stream_lose_nothing() -> None:
    async def main() -> None:
        conn, far = await pair()
        sent = [str(i).encode() for i in range(2000)]

        def writer() -> None:
            for m in sent:
                far.sendall(encode(m))

        thread = threading.Thread(target=writer)
        thread.start()
        got: list[bytes] = []
        while len(got) < len(sent):
            try:
                async with asyncio.timeout(0.0005):
                    got.append(await conn.recv())
            except TimeoutError:
                pass
        thread.join(10)
        assert got == sent

    run(main())


# ------------------------------------------------------------ flow control


def test_a_slow_reader_pauses_the_transport_and_memory_stays_bounded() -> None:
    async def main() -> None:
        conn, far = await pair(read_high_water=64 * 1024)
        far.setblocking(False)
        chunk = encode(b"m" * 4000)
        pushed = 0
        # Flood without reading on our side: the transport must stop reading,
        # the kernel buffers fill and the far end's writes stop being taken.
        stalled = 0
        while stalled < 20:
            try:
                pushed += far.send(chunk)
                stalled = 0
            except BlockingIOError:
                stalled += 1
                await asyncio.sleep(0.02)
        assert conn._reading_paused
        assert conn.queued_bytes <= 64 * 1024 + 256 * 1024 + 4004  # mark + one read + a frame
        assert pushed < 16 * 1024 * 1024  # bounded: not everything was taken
        # Reading below the low mark resumes; everything arrives in order.
        far.setblocking(True)
        received = 0
        while received < pushed // len(chunk):
            assert await conn.recv() == b"m" * 4000
            received += 1

    run(main())


def test_a_fast_writer_waits_on_drain() -> None:
    async def main() -> None:
        conn, far = await pair(write_high_water=64 * 1024)
        sent = 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                while True:  # the far end never reads
                    await conn.send(b"w" * 16000)
                    sent += 1
        assert conn.pending_bytes <= 64 * 1024 + 16004
        assert sent < 1000  # send stopped returning, memory did not grow

        # Once the far end reads, the sends go on and nothing was lost.
        def read_all() -> list[bytes]:
            return [recv_msg(far) for _ in range(sent + 1)]

        got, _ = await asyncio.gather(asyncio.to_thread(read_all), conn.send(b"w" * 16000))
        assert got == [b"w" * 16000] * (sent + 1)

    run(main())


def test_the_peer_half_closes_and_still_reads_replies() -> None:
    async def main() -> None:
        conn, far = await pair()
        far.sendall(encode(b"q1") + encode(b"q2"))
        far.shutdown(socket.SHUT_WR)
        async for message in conn:
            await conn.send(message.upper())
        await conn.close()
        assert [recv_msg(far), recv_msg(far)] == [b"Q1", b"Q2"]
        assert far.recv(1) == b""

    run(main())


def test_small_sends_that_are_never_awaited_long_still_wait_for_drain() -> None:
    """``send`` is a plain call (no coroutine per message) whose result is
    done at once while the transport takes the frames: once the far end
    stops reading, it must wait, small frames (coalesced) included. A send
    that never waits would run this loop to its end without ever giving
    the timeout a chance."""

    async def main() -> None:
        conn, far = await pair(write_high_water=16 * 1024)
        sent = conn.send(b"x")
        assert not asyncio.iscoroutine(sent)
        await sent
        sends = 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                for _ in range(200_000):  # 20 MB if nothing waited
                    await conn.send(b"s" * 100)
                    sends += 1
        assert sends < 50_000
        # Bounded: the mark, the frames held for one loop turn, one frame.
        assert conn.pending_bytes <= 16 * 1024 + 64 * 1024 + 104
        far.close()

    run(main())


def test_replies_of_many_connections_in_one_turn_arrive_whole_and_in_order(monkeypatch) -> None:
    """Forty connections echo in the same loop turns, so their small frames
    are coalesced (held, then written together): every reply arrives, in
    order, per connection; big frames in between keep their place."""
    from ipc_core.asyncio import _stream

    bursts: list[int] = []  # connections per flush
    flush = _stream._Coalescer.flush

    def counting_flush(self: Any) -> None:
        bursts.append(len({id(t) for t, _ in self.frames}))
        flush(self)

    monkeypatch.setattr(_stream._Coalescer, "flush", counting_flush)

    async def main() -> None:
        pairs = [await pair() for _ in range(40)]
        rounds = 150

        async def echo(conn: Connection) -> None:
            for _ in range(rounds):
                message = await conn.recv()
                await conn.send(b"<")  # three frames per turn: held together
                await conn.send(message)
                await conn.send(b">")

        def client(far: socket.socket, i: int) -> None:
            for j in range(rounds):
                body = b"%d.%d" % (i, j)
                if j % 50 == 7:
                    body += b"B" * 100_000  # not coalesced: flushes what is held first
                far.sendall(encode(body))
                assert [recv_msg(far) for _ in range(3)] == [b"<", body, b">"]

        handlers = [asyncio.create_task(echo(conn)) for conn, _ in pairs]
        await asyncio.gather(
            *(asyncio.to_thread(client, far, i) for i, (_, far) in enumerate(pairs))
        )
        await asyncio.gather(*handlers)
        assert max(bursts) > 1  # some flushes wrote the replies of several connections

    run(main())


def test_held_frames_go_out_on_their_own_and_before_a_close() -> None:
    async def main() -> None:
        conn, far = await pair()
        out = conn._out
        out.holding = True  # as in a busy loop: small frames are held for the turn
        await conn.send(b"held")
        assert out.frames and conn.pending_bytes == 8
        assert await asyncio.to_thread(recv_msg, far) == b"held"  # flushed by the loop
        assert not out.holding  # that flush carried one frame: back to writing at once
        out.holding = True
        await conn.send(b"one")
        await conn.send(b"two")
        await conn.send(b"3" * 70_000)  # too big to hold: the held ones go first
        await conn.send(b"four")
        await conn.close()  # held frames first, then the end of the stream
        got = await asyncio.to_thread(lambda: [recv_msg(far) for _ in range(4)])
        assert got == [b"one", b"two", b"3" * 70_000, b"four"]
        assert far.recv(1) == b""

        conn2, far2 = await pair()
        out.holding = True
        await conn2.send(b"dropped")
        conn2.abort()  # abort drops what is not written, held frames included
        await conn2.wait_closed()
        assert far2.recv(100) == b""

    run(main())


@pytest.mark.parametrize("awaited", [True, False])
def test_close_cuts_a_peer_that_does_not_read_after_the_linger(
    monkeypatch, caplog, awaited: bool
) -> None:
    """close() starts at once (a protocol's callback calls it without
    await) and a peer that reads nothing is cut after the linger."""
    monkeypatch.setattr("ipc_core.asyncio._stream.LINGER_SECONDS", 0.3)

    async def main() -> None:
        conn, far = await pair(write_high_water=16 * 1024)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                while True:  # the far end never reads
                    await conn.send(b"p" * 60000)
        assert conn.pending_bytes > 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        closing = conn.close()
        if awaited:
            await closing
        else:
            await asyncio.sleep(0)  # the close is under way without anyone waiting
            assert not conn.closed
            await conn.wait_closed()
        assert conn.closed and 0.2 < loop.time() - start < 5
        assert "peer not reading after 0.3 s; cutting it" in caplog.text
        far.close()

    run(main())


# ---------------------------------------------------------- typed messages


@pytest.mark.parametrize("fmt", ["json", "cbor"])
def test_typed_messages(fmt: str) -> None:
    registry = TypeRegistry(fmt)  # type: ignore[arg-type]

    @registry.register(7)
    @dataclass
    class Ping:
        seq: int
        note: str

    async def main() -> None:
        conn, far = await pair(registry=registry)
        await conn.send(Ping(3, "hi"))
        payload = await asyncio.to_thread(recv_msg, far)
        assert registry.decode(payload) == Ping(3, "hi") and payload[0] == 7
        far.sendall(encode(registry.encode(Ping(4, "back"))) + encode(b"\x07{bad"))
        assert await conn.recv_typed() == Ping(4, "back")
        with pytest.raises(ProtocolError):
            await conn.recv_typed()

    run(main())


def test_recv_typed_needs_a_registry() -> None:
    async def main() -> None:
        conn, _far = await pair()
        with pytest.raises(UsageError, match="registry="):
            await conn.recv_typed()

    run(main())
