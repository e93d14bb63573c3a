"""WebSocketServerLayer's memory: freed at once when closed, bounded while open.

No sockets: websockets' Sans-I/O ClientProtocol on the other side, and
hand-built frames where a client must misbehave.
"""

from __future__ import annotations

import gc
import os
import struct
import weakref
from collections.abc import Callable, Iterator

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from daemons.codecs.ws import CONTROL_BUDGET, HOLD_ALLOWANCE, HoldPool, WebSocketServerLayer
from ipc_core.errors import IPCError, PeerClosed, ProtocolError
from ipc_core.framing import FrameDecoder, encode

KiB = 1024
MiB = 1024 * KiB


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes = b"\x11\x22\x33\x44"
) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    masked = (
        bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask(payload, mask)
    )
    return head + mask + masked


def _mask(payload: bytes, mask: bytes) -> bytes:
    from websockets.utils import apply_mask

    return apply_mask(payload, mask)


def opened(**kwargs) -> WebSocketServerLayer:
    server = WebSocketServerLayer(**kwargs)
    client = ClientProtocol(parse_uri("ws://localhost:8080/pong"), max_size=None)
    client.send_request(client.connect())
    server.receive_data(b"".join(client.data_to_send()))
    server.accept()
    server.data_to_send()
    return server


def close_code(server: WebSocketServerLayer) -> int:
    client = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN, max_size=None)
    client.receive_data(server.data_to_send())
    closes = [f for f in client.events_received() if f.opcode is Opcode.CLOSE]
    assert closes, "no close frame"
    return Close.parse(closes[-1].data).code


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counting frees objects: what a cycle holds stays."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# -- item 5: a closed layer is freed at once, without the cyclic GC -------------------


def _protocol_error(server: WebSocketServerLayer) -> None:
    server.receive_data(frame(0x2, b"x" * 100_000, fin=False))  # a fragment held here
    cont = frame(0x0, b"x" * 100_000, fin=False)
    server.receive_data(cont[:50_000])  # held by websockets
    with pytest.raises(ProtocolError):
        server.receive_data(cont[50_000:] + b"\x82\x05hello")  # unmasked: protocol error


def _client_close(server: WebSocketServerLayer) -> None:
    data = frame(0x2, b"a" * 60_000)
    server.receive_data(data[:30_000])  # streamed
    server.receive_data(data[30_000:] + frame(0x9, b"p"))
    with pytest.raises(PeerClosed):
        server.receive_data(frame(0x8, b"\x03\xe8"))
    with pytest.raises(PeerClosed):  # raised again, from a copy
        server.receive_data(b"")


def _oversize(server: WebSocketServerLayer) -> None:
    with pytest.raises(ProtocolError):
        server.receive_data(frame(0x2, b"y" * 2000))


def _local_close(server: WebSocketServerLayer) -> None:
    server.receive_data(frame(0x9, b"p") + frame(0x2, b"z" * 100_000, fin=False)[:70_000])
    server.close()
    server.data_to_send()


def _text_error_while_streaming(server: WebSocketServerLayer) -> None:
    wire = frame(0x1, b"ok" * 30_000 + b"\xff")
    out = server.receive_data(wire[:20_000])
    assert out[:4] == struct.pack(">I", 60_001)
    with pytest.raises(ProtocolError, match="UTF-8"):
        server.receive_data(wire[20_000:])


@pytest.mark.parametrize(
    "drive",
    [_protocol_error, _client_close, _oversize, _local_close, _text_error_while_streaming],
    ids=["protocol-error", "client-close", "oversize", "local-close", "bad-utf8-streamed"],
)
def test_a_closed_layer_is_freed_without_the_cyclic_gc(
    no_gc: None, drive: Callable[[WebSocketServerLayer], None]
) -> None:
    server = opened(max_message_size=1000 if drive is _oversize else 1 * MiB)
    layer_ref = weakref.ref(server)
    proto_ref = weakref.ref(server._proto)
    drive(server)
    del server
    assert layer_ref() is None, "the layer is kept alive by a reference cycle"
    assert proto_ref() is None, "websockets' protocol is kept alive by a reference cycle"


def test_a_layer_that_answered_http_is_freed_without_the_cyclic_gc(no_gc: None) -> None:
    server = WebSocketServerLayer()
    server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    server.respond(200, [], b"hello")
    assert b"hello" in server.data_to_send()
    proto_ref = weakref.ref(server._proto)
    layer_ref = weakref.ref(server)
    del server
    assert layer_ref() is None and proto_ref() is None


def test_bad_http_request_is_freed_without_the_cyclic_gc(no_gc: None) -> None:
    server = WebSocketServerLayer()
    with pytest.raises(ProtocolError):
        server.receive_data(b"NOT HTTP AT ALL\r\n\r\n")
    assert b"400" in server.data_to_send()
    refs = weakref.ref(server), weakref.ref(server._proto)
    del server
    assert refs[0]() is None and refs[1]() is None


# -- item 4: control frames a client leaves unread ------------------------------------


def test_ping_flood_from_a_client_that_does_not_read_is_cut() -> None:
    server = opened()
    ping = frame(0x9, b"x" * 125)
    with pytest.raises(ProtocolError, match="pings faster than it reads"):
        for _ in range(CONTROL_BUDGET // 127 + 10):
            server.receive_data(ping * 1)  # data_to_send() never called: nothing drains
    assert server.closed


def test_pings_from_a_client_that_reads_are_answered_forever() -> None:
    server = opened()
    ping = frame(0x9, b"x" * 125)
    for _ in range(3 * CONTROL_BUDGET // 127):
        server.receive_data(ping)
        assert server.data_to_send()  # the pong, handed to a socket that takes it
    assert not server.closed


def test_the_drivers_backlog_counts_as_unread() -> None:
    """Pongs handed out but stuck in the driver's queue still count."""
    server = opened()
    stuck = 0

    def backlog() -> int:
        return stuck

    server.backlog = backlog
    ping = frame(0x9, b"x" * 125)
    with pytest.raises(ProtocolError, match="pings faster"):
        for _ in range(CONTROL_BUDGET // 127 + 10):
            server.receive_data(ping)
            stuck += len(server.data_to_send())


def test_a_big_data_backlog_does_not_count_against_control_frames() -> None:
    """Data frames queued for a slow reader are the relay's (back-pressured)
    business: a keepalive ping answer next to them is fine."""
    server = opened(max_message_size=16 * MiB)
    server.backlog = lambda: 8 * MiB
    server.send(encode(b"d" * MiB))
    for _ in range(100):
        server.receive_data(frame(0x9, b"k"))
    assert not server.closed


# -- item 4: unfinished messages --------------------------------------------------------


def test_a_big_frame_is_streamed_not_held() -> None:
    server = opened(max_message_size=16 * MiB)
    payload = os.urandom(4 * MiB)
    wire = frame(0x2, payload)
    decoder = FrameDecoder(16 * MiB)
    got: list[bytes] = []
    for i in range(0, len(wire), 65_537):
        got += decoder.feed(server.receive_data(wire[i : i + 65_537]))
        assert len(server._proto.reader.buffer) == 0  # websockets holds nothing
        assert server._fragments is None
    assert got == [payload]
    # and the fast path works again after it
    assert server.receive_data(frame(0x2, b"after")) == encode(b"after")


def test_a_streamed_text_frame_is_checked_across_chunks() -> None:
    server = opened()
    text = ("é" * 50_000).encode()
    wire = frame(0x1, text)
    out = b"".join(server.receive_data(wire[i : i + 777]) for i in range(0, len(wire), 777))
    assert out == encode(text)


def test_control_frames_between_data_frames_never_make_websockets_hold_data() -> None:
    """[ping][start of a 1 MiB frame] in one read: websockets gets the ping
    alone, the data frame is streamed."""
    server = opened()
    wire = frame(0x9, b"p") + frame(0x2, b"d" * MiB)
    out = server.receive_data(wire[: 300 * KiB])
    assert len(server._proto.reader.buffer) == 0
    assert out[:4] == struct.pack(">I", MiB)
    assert server.data_to_send()  # the pong


def test_fragmented_messages_share_a_pool_beyond_the_allowance() -> None:
    pool = HoldPool(1 * MiB)
    a, b = opened(pool=pool, max_message_size=4 * MiB), opened(pool=pool, max_message_size=4 * MiB)
    piece = b"f" * (HOLD_ALLOWANCE // 2)
    for _ in range(2 + 1 * MiB // len(piece)):  # a: the allowance plus the whole pool
        a.receive_data(frame(0x2 if _ == 0 else 0x0, piece, fin=False))
    assert pool.used == 1 * MiB
    with pytest.raises(ProtocolError, match="too many unfinished messages"):
        for i in range(4):
            b.receive_data(frame(0x2 if i == 0 else 0x0, piece, fin=False))
    assert close_code(b) == 1013
    assert pool.used == 1 * MiB  # b gave back its share
    out = a.receive_data(frame(0x0, b"end"))
    assert FrameDecoder(4 * MiB).feed(out) == [piece * (2 + 1 * MiB // len(piece)) + b"end"]
    assert pool.used == 0


def test_a_fragmented_message_larger_than_the_pool_closes_1009() -> None:
    pool = HoldPool(HOLD_ALLOWANCE)
    server = opened(pool=pool, max_message_size=16 * MiB)
    piece = b"g" * (200 * KiB)
    with pytest.raises(ProtocolError, match="over the daemon's limit"):
        for i in range(5):
            server.receive_data(frame(0x2 if i == 0 else 0x0, piece, fin=False))
    assert close_code(server) == 1009


def test_a_dropped_layer_gives_its_share_back(no_gc: None) -> None:
    pool = HoldPool(4 * MiB)
    server = opened(pool=pool, max_message_size=8 * MiB)
    server.receive_data(frame(0x2, b"h" * MiB, fin=False))
    assert pool.used == MiB - HOLD_ALLOWANCE
    del server
    assert pool.used == 0


def test_release_is_idempotent_and_later_calls_raise() -> None:
    server = opened()
    server.release()
    server.release()
    with pytest.raises(IPCError):
        server.receive_data(frame(0x2, b"late"))
