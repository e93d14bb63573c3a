"""WebSocketServerLayer against websockets' Sans-I/O ClientProtocol, no sockets."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from daemons.codecs.ws import Phase, WebSocketServerLayer, origin_allowed
from ipc_core.errors import MessageTooLarge, PeerClosed, ProtocolError, UsageError
from ipc_core.framing import FrameDecoder, encode

# -- helpers -------------------------------------------------------------------


def new_client(origin: str | None = None) -> ClientProtocol:
    client = ClientProtocol(parse_uri("ws://localhost:8080/pong"), origin=origin, max_size=None)
    client.send_request(client.connect())
    return client


def wire(proto: ClientProtocol) -> bytes:
    """What the client wants to send (its end-of-stream marker dropped)."""
    return b"".join(proto.data_to_send())


def handshake(
    server: WebSocketServerLayer | None = None, origin: str | None = None
) -> tuple[WebSocketServerLayer, ClientProtocol]:
    server = server or WebSocketServerLayer()
    client = new_client(origin)
    assert server.receive_data(wire(client)) == b""
    assert server.request is not None
    assert server.accept() == b""
    client.receive_data(server.data_to_send())
    [response] = client.events_received()
    assert isinstance(response, Response) and response.status_code == 101
    assert client.state is State.OPEN
    return server, client


def to_server(client: ClientProtocol, server: WebSocketServerLayer) -> list[bytes]:
    """Deliver the client's bytes; return the LibIPC payloads that came up."""
    return FrameDecoder().feed(server.receive_data(wire(client)))


def to_client(server: WebSocketServerLayer, client: ClientProtocol) -> list[Frame]:
    client.receive_data(server.data_to_send())
    return client.events_received()


def close_code_sent(server: WebSocketServerLayer) -> int:
    """Parse the close frame at the end of what the server wants to send."""
    client = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN, max_size=None)
    client.receive_data(server.data_to_send())
    frames = [f for f in client.events_received() if f.opcode is Opcode.CLOSE]
    assert frames, "no close frame sent"
    return Close.parse(frames[-1].data).code


def raw_client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame built by hand (mask of zeros: payload unchanged)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + b"\0\0\0\0" + payload


# -- handshake -------------------------------------------------------------------


def test_upgrade_accepted_and_request_fields() -> None:
    server = WebSocketServerLayer()
    client = new_client(origin="https://app.example.com")
    request_bytes = wire(client).replace(
        b"\r\n\r\n", b"\r\nX-Forwarded-For: 192.0.2.1, 10.0.0.1\r\n\r\n"
    )
    # The head fed one byte at a time: nothing until the blank line.
    for i in range(len(request_bytes) - 1):
        assert server.receive_data(request_bytes[i : i + 1]) == b""
        assert server.request is None
    server.receive_data(request_bytes[-1:])
    req = server.request
    assert req is not None and server.phase is Phase.DECIDING
    assert req.method == "GET" and req.path == "/pong"
    assert req.is_upgrade
    assert req.origin == "https://app.example.com"
    assert req.x_forwarded_for == "192.0.2.1, 10.0.0.1"
    assert req.header("host") == "localhost:8080"
    assert ("Upgrade", "websocket") in req.headers
    assert server.accept() == b""
    assert server.phase is Phase.OPEN and server.state is State.OPEN
    client.receive_data(server.data_to_send())
    assert client.state is State.OPEN
    assert not server.closed


def test_origin_rejected_gets_403() -> None:
    server = WebSocketServerLayer(origins=["https://good.example"])
    client = new_client(origin="https://evil.example")
    server.receive_data(wire(client))
    with pytest.raises(ProtocolError, match="origin"):
        server.accept()
    out = server.data_to_send()
    assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"forbidden origin" in out
    assert server.closed


def test_origin_accepted_by_glob() -> None:
    server = WebSocketServerLayer(origins=["https://*.example.com"])
    handshake(server, origin="https://app.example.com")


@pytest.mark.parametrize(
    ("origin", "allowed", "expected"),
    [
        ("https://a.com", None, True),
        (None, ["https://a.com"], True),
        ("https://a.com", ["https://a.com"], True),
        ("HTTPS://A.com", ["https://a.com/"], True),
        ("https://b.com", ["https://a.com"], False),
        ("https://x.a.com", ["https://*.a.com"], True),
        ("https://x.y.a.com", ["https://*.a.com"], True),
        ("https://evil.com/.a.com", ["https://*.a.com"], False),
        ("https://evil.com@x.a.com", ["https://*.a.com"], False),
        ("https://a.com:8443", ["https://a.com:*"], True),
        ("https://a.com:8443", ["https://a.com"], False),
        ("null", ["*"], False),
        ("null", ["https://*"], False),
        ("null", ["null"], True),
        ("null", None, True),
        ("https://anything.org", ["*"], True),
        ("http://a.com", ["https://a.com"], False),
    ],
)
def test_origin_allowed(origin: str | None, allowed: list[str] | None, expected: bool) -> None:
    assert origin_allowed(origin, allowed) is expected


def test_plain_get_is_not_an_upgrade_and_can_be_answered() -> None:
    server = WebSocketServerLayer()
    server.receive_data(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
    req = server.request
    assert req is not None and not req.is_upgrade and req.origin is None
    server.respond(200, [("Content-Type", "text/html")], b"<h1>hi</h1>")
    out = server.data_to_send()
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/html" in head
    assert b"Content-Length: 11" in head and b"Connection: close" in head
    assert body == b"<h1>hi</h1>"
    assert server.closed
    assert server.receive_data(b"ignored after the answer") == b""


def test_head_request_gets_no_body() -> None:
    server = WebSocketServerLayer()
    server.receive_data(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    server.respond(200, [], b"12345")
    head, body = server.data_to_send().split(b"\r\n\r\n", 1)
    assert b"Content-Length: 5" in head and body == b""


def test_reject_unknown_service() -> None:
    server = WebSocketServerLayer()
    server.receive_data(wire(new_client()))
    server.reject(404, "no such service\n")
    out = server.data_to_send()
    assert out.startswith(b"HTTP/1.1 404 Not Found\r\n") and out.endswith(b"no such service\n")
    assert server.closed
    with pytest.raises(UsageError):
        server.accept()


def test_accept_plain_get_fails_with_426() -> None:
    server = WebSocketServerLayer()
    server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ProtocolError, match="handshake failed"):
        server.accept()
    assert server.data_to_send().startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert server.closed


def test_oversize_head_gets_431() -> None:
    server = WebSocketServerLayer()
    server.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError, match="head over 8192 bytes"):
        for _ in range(100):
            server.receive_data(b"X-Filler: " + b"a" * 100 + b"\r\n")
    assert server.data_to_send().startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
    assert server.closed
    # Complete but too large in one piece: also 431.
    server = WebSocketServerLayer(max_request_size=100)
    with pytest.raises(ProtocolError):
        server.receive_data(b"GET / HTTP/1.1\r\nX: " + b"a" * 100 + b"\r\n\r\n")
    assert b" 431 " in server.data_to_send()


def test_malformed_request_gets_400() -> None:
    server = WebSocketServerLayer()
    with pytest.raises(ProtocolError, match="invalid HTTP request"):
        server.receive_data(b"HELLO\r\n\r\n")
    assert server.data_to_send().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert server.closed


def test_eof_during_handshake() -> None:
    server = WebSocketServerLayer()
    server.receive_data(b"GET / HT")
    with pytest.raises(PeerClosed):
        server.receive_data(b"")


def test_data_sent_ahead_of_the_101_is_returned_by_accept() -> None:
    server = WebSocketServerLayer()
    client = new_client()
    request_bytes = wire(client)
    early = raw_client_frame(Opcode.BINARY, b"eager")
    server.receive_data(request_bytes + early)
    assert server.accept() == encode(b"eager")


def test_send_before_accept_is_a_usage_error() -> None:
    server = WebSocketServerLayer()
    with pytest.raises(UsageError):
        server.send(encode(b"x"))


# -- messages ----------------------------------------------------------------------


def test_binary_and_text_messages_both_ways() -> None:
    server, client = handshake()
    client.send_binary(b"\x00\xff binary")
    client.send_text("h\u00e9llo".encode())
    assert to_server(client, server) == [b"\x00\xff binary", "h\u00e9llo".encode()]
    server.send(encode(b"\x00\x01\x02") + encode(b""))
    frames = to_client(server, client)
    assert [(f.opcode, f.data) for f in frames] == [
        (Opcode.BINARY, b"\x00\x01\x02"),
        (Opcode.BINARY, b""),
    ]


def test_text_replies() -> None:
    server, client = handshake(WebSocketServerLayer(text_replies=True))
    server.send(encode("caf\u00e9".encode()))
    [frame] = to_client(server, client)
    assert frame.opcode is Opcode.TEXT and frame.data == "caf\u00e9".encode()


def test_text_replies_invalid_utf8_closes_1007() -> None:
    server, _ = handshake(WebSocketServerLayer(text_replies=True))
    with pytest.raises(ProtocolError, match="UTF-8"):
        server.send(encode(b"\xff\xfe"))
    assert close_code_sent(server) == 1007
    assert server.closed


def test_client_text_with_invalid_utf8_closes_1007() -> None:
    server, _ = handshake()
    with pytest.raises(ProtocolError, match="UTF-8"):
        server.receive_data(raw_client_frame(Opcode.TEXT, b"ok \xc3\x28"))
    assert close_code_sent(server) == 1007


def test_one_mebibyte_messages_both_ways() -> None:
    server, client = handshake()
    blob = bytes(range(256)) * 4096
    client.send_binary(blob)
    data = wire(client)
    up = b"".join(server.receive_data(data[i : i + 65536]) for i in range(0, len(data), 65536))
    assert up == encode(blob)
    server.send(encode(blob[::-1]))
    [frame] = to_client(server, client)
    assert frame.opcode is Opcode.BINARY and frame.data == blob[::-1]


def test_fragmented_client_message_is_one_libipc_message() -> None:
    server, client = handshake()
    client.send_binary(b"one ", fin=False)
    client.send_continuation(b"", fin=False)
    client.send_continuation(b"two ", fin=False)
    assert server.receive_data(wire(client)) == b""
    client.send_continuation(b"three", fin=True)
    client.send_text(b"next")
    assert to_server(client, server) == [b"one two three", b"next"]


def test_fragmented_text_message_validated_as_a_whole() -> None:
    server, client = handshake()
    euro = "\u20ac".encode()
    client.send_text(euro[:1], fin=False)
    client.send_continuation(euro[1:], fin=True)
    assert to_server(client, server) == [euro]


def test_pipelined_libipc_messages_become_separate_ws_messages() -> None:
    server, client = handshake()
    server.send(encode(b"first") + encode(b"second") + encode(b"third"))
    frames = to_client(server, client)
    assert [f.data for f in frames] == [b"first", b"second", b"third"]
    assert all(f.fin for f in frames)


def test_pipelined_client_messages_in_one_chunk() -> None:
    server, client = handshake()
    for i in range(3):
        client.send_binary(b"m%d" % i)
    assert to_server(client, server) == [b"m0", b"m1", b"m2"]


def test_local_stream_fed_one_byte_at_a_time() -> None:
    server, client = handshake()
    stream = encode(b"alpha") + encode(b"") + encode(b"beta")
    for i in range(len(stream)):
        server.send(stream[i : i + 1])
    frames = to_client(server, client)
    assert [f.data for f in frames] == [b"alpha", b"", b"beta"]


def test_oversize_client_message_closes_1009() -> None:
    server, client = handshake(WebSocketServerLayer(max_message_size=1000))
    client.send_binary(b"x" * 1001)
    with pytest.raises(ProtocolError, match="message too large"):
        server.receive_data(wire(client))
    assert close_code_sent(server) == 1009
    assert server.closed


def test_oversize_fragmented_message_closes_1009() -> None:
    server, client = handshake(WebSocketServerLayer(max_message_size=1000))
    client.send_binary(b"x" * 400, fin=False)
    client.send_continuation(b"x" * 400, fin=False)
    client.send_continuation(b"x" * 400, fin=False)
    with pytest.raises(ProtocolError, match="message too large"):
        server.receive_data(wire(client))
    assert close_code_sent(server) == 1009


def test_huge_announced_length_is_refused_without_allocating() -> None:
    server, _ = handshake()
    header = bytes([0x82, 0x80 | 127]) + struct.pack(">Q", 2**63 - 1) + b"\0\0\0\0"
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="message too large"):
            server.receive_data(header + b"some body bytes")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert close_code_sent(server) == 1009


def test_local_oversize_message_fails_the_connection() -> None:
    server, _ = handshake(WebSocketServerLayer(max_message_size=10))
    with pytest.raises(MessageTooLarge):
        server.send(struct.pack(">I", 11))
    assert close_code_sent(server) == 1011


# -- control frames and closing --------------------------------------------------------


def test_client_ping_gets_pong() -> None:
    server, client = handshake()
    client.send_ping(b"are you there")
    assert server.receive_data(wire(client)) == b""
    [frame] = to_client(server, client)
    assert frame.opcode is Opcode.PONG and frame.data == b"are you there"


def test_server_ping_and_pong_bookkeeping() -> None:
    server, client = handshake()
    assert server.pong_received_since_last_ping()
    server.ping(b"k1")
    assert not server.pong_received_since_last_ping()
    [frame] = to_client(server, client)  # the client answers automatically
    assert frame.opcode is Opcode.PING
    assert server.receive_data(wire(client)) == b""
    assert server.pong_received_since_last_ping()
    assert server.pings_sent == 1 and server.pongs_received == 1


def test_client_close_handshake() -> None:
    server, client = handshake()
    client.send_close(1000, "bye")
    with pytest.raises(PeerClosed, match="bye"):
        server.receive_data(wire(client))
    [frame] = to_client(server, client)  # the echoed close frame
    assert frame.opcode is Opcode.CLOSE and Close.parse(frame.data).code == 1000
    assert server.closed and server.close_code == 1000
    server.send(encode(b"dropped"))  # the local side racing the close
    assert server.data_to_send() == b""


def test_message_then_close_in_one_chunk() -> None:
    server, client = handshake()
    client.send_binary(b"last words")
    client.send_close(1000)
    assert server.receive_data(wire(client)) == encode(b"last words")
    assert not server.closed  # the echoed close frame is still to be sent
    assert server.data_to_send()
    assert server.closed
    with pytest.raises(PeerClosed):
        server.receive_data(b"")


def test_server_initiated_close() -> None:
    server, client = handshake()
    server.close(1001, "going away")
    assert not server.closed  # waiting for the client's reply
    [frame] = to_client(server, client)
    assert Close.parse(frame.data).code == 1001
    with pytest.raises(PeerClosed):
        server.receive_data(wire(client))  # the client's echo
    assert server.closed


def test_eof_without_close_frame() -> None:
    server, _ = handshake()
    with pytest.raises(PeerClosed, match="without a close frame"):
        server.receive_data(b"")


def test_unmasked_client_frame_is_a_protocol_error() -> None:
    server, _ = handshake()
    with pytest.raises(ProtocolError, match="masking"):
        server.receive_data(b"\x82\x02hi")
    assert close_code_sent(server) == 1002


# -- fuzzing -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=200), max_size=8))
def test_random_bytes_after_upgrade_only_raise_protocol_errors(chunks: list[bytes]) -> None:
    server, _ = handshake()
    for chunk in chunks:
        try:
            server.receive_data(chunk)
        except (ProtocolError, PeerClosed):
            server.data_to_send()
            assert server.closed
            break
        server.data_to_send()


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=100),
            st.sampled_from([b"GET / HTTP/1.1\r\n", b"Upgrade: websocket\r\n", b"\r\n"]),
        ),
        max_size=8,
    )
)
def test_random_handshake_bytes_only_raise_protocol_errors(chunks: list[bytes]) -> None:
    server = WebSocketServerLayer()
    for chunk in chunks:
        try:
            server.receive_data(chunk)
            if server.request is not None and server.phase is Phase.DECIDING:
                server.accept()
        except (ProtocolError, PeerClosed):
            break


def test_head_size_cap_is_exact() -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    server = WebSocketServerLayer(max_request_size=len(head))
    server.receive_data(head)
    assert server.request is not None
    server = WebSocketServerLayer(max_request_size=len(head) - 1)
    with pytest.raises(ProtocolError):
        server.receive_data(head)


# -- the fast path ------------------------------------------------------------------


def test_fast_path_engages_only_at_a_frame_boundary() -> None:
    """Complete data frames are parsed without websockets when its parser
    waits for a new frame; that must be detectable with this websockets."""
    server, client = handshake()
    assert server._at_frame_boundary()
    ping = raw_client_frame(0x9, b"hello")
    assert server.receive_data(ping[:8]) == b""  # a partial control frame goes to websockets
    assert not server._at_frame_boundary()
    assert server.receive_data(ping[8:]) == b""
    assert server._at_frame_boundary()
    frame = raw_client_frame(0x2, b"hello")
    assert server.receive_data(frame[:3]) == b""  # a cut header is kept here
    assert server._at_frame_boundary()
    assert server.receive_data(frame[3:]) == encode(b"hello")
    assert server._at_frame_boundary()


def test_fast_and_slow_frames_interleaved_keep_order() -> None:
    """[data][ping][data][fragment start][fragment end][data] in one read, then
    split at every byte: always the same messages, in order, and one pong."""
    stream = (
        raw_client_frame(0x2, b"one")
        + raw_client_frame(0x9, b"ping")
        + raw_client_frame(0x1, "twö".encode())
        + raw_client_frame(0x2, b"thr", fin=False)
        + raw_client_frame(0x0, b"ee")
        + raw_client_frame(0x2, b"x" * 70_000)
    )
    expected = [b"one", "twö".encode(), b"three", b"x" * 70_000]
    for cut in [len(stream), *range(0, 60), *range(len(stream) - 20, len(stream))]:
        server, client = handshake()
        up = b"".join(server.receive_data(part) for part in (stream[:cut], stream[cut:]) if part)
        assert FrameDecoder().feed(up) == expected, cut
        pongs = [f for f in to_client(server, client) if f.opcode is Opcode.PONG]
        assert [p.data for p in pongs] == [b"ping"], cut


def test_server_frames_built_by_hand_parse_as_websockets_frames() -> None:
    server, client = handshake()
    sizes = [0, 1, 125, 126, 65535, 65536, 200_000]
    server.send(b"".join(encode(bytes([i % 251]) * n) for i, n in enumerate(sizes)))
    frames = to_client(server, client)
    assert [len(f.data) for f in frames] == sizes
    assert all(f.opcode is Opcode.BINARY and f.fin for f in frames)


# -- the fast hooks the core's relay calls first (fast_receive / fast_send) ----------


def test_fast_receive_takes_exactly_one_whole_data_frame() -> None:
    server, _client = handshake()
    assert server.fast_receive(raw_client_frame(0x2, b"bin")) == encode(b"bin")
    assert server.fast_receive(raw_client_frame(0x1, "tëxt".encode())) == encode("tëxt".encode())
    big = b"y" * 300
    assert server.fast_receive(memoryview(raw_client_frame(0x2, big))) == encode(big)
    declined = [
        raw_client_frame(0x2, b"partial")[:-1],
        raw_client_frame(0x2, b"a") + raw_client_frame(0x2, b"b"),  # two frames
        raw_client_frame(0x9, b"ping"),
        raw_client_frame(0x2, b"frag", fin=False),
        raw_client_frame(0x1, b"\xff\xfe"),  # invalid UTF-8: receive_data closes 1007
        raw_client_frame(0x2, b"z" * 70_000),  # 64-bit length
        b"\x82\x03abc",  # unmasked
    ]
    for raw in declined:
        assert server.fast_receive(raw) is None, raw[:8]
    assert server.activity == 3
    small = WebSocketServerLayer(max_message_size=10)
    small, _ = handshake(small)
    assert small.fast_receive(raw_client_frame(0x2, b"x" * 11)) is None


def test_fast_receive_declines_while_websockets_holds_state() -> None:
    server, _client = handshake()
    frame = raw_client_frame(0x2, b"hello")
    assert server.receive_data(frame[:3]) == b""  # websockets holds a partial frame
    assert server.fast_receive(frame) is None
    assert server.receive_data(frame[3:]) == encode(b"hello")
    assert server.fast_receive(frame) == encode(b"hello")  # boundary again
    server.receive_data(raw_client_frame(0x2, b"he", fin=False))  # a fragment pending
    assert server.fast_receive(frame) is None
    server.receive_data(raw_client_frame(0x0, b"llo"))
    assert server.fast_receive(frame) == encode(b"hello")
    server.close()
    assert server.fast_receive(frame) is None
    unopened = WebSocketServerLayer()
    assert unopened.fast_receive(frame) is None


def test_fast_send_builds_the_same_frames_as_send() -> None:
    for size in (0, 1, 125, 126, 65535, 65536, 70_000):
        payload = bytes([size % 251]) * size
        fast, _ = handshake()
        slow, client = handshake()
        wire_fast = fast.fast_send(memoryview(encode(payload)))
        slow.send(encode(payload))
        assert wire_fast == slow.data_to_send(), size
        client.receive_data(wire_fast)
        [frame] = client.events_received()
        assert (frame.opcode, frame.fin, frame.data) == (Opcode.BINARY, True, payload)
        assert fast.activity == slow.activity == 1


def test_fast_send_declines_when_order_or_options_need_the_general_path() -> None:
    server, client = handshake()
    client.send_ping(b"p")
    assert server.receive_data(wire(client)) == b""  # websockets queued the pong
    assert server.fast_send(encode(b"x")) is None  # the pong must go out first
    server.send(encode(b"x"))
    assert [f.opcode for f in to_client(server, client)] == [Opcode.PONG, Opcode.BINARY]
    assert server.fast_send(encode(b"y")) is not None
    server.send(encode(b"partial")[:5])  # the decoder holds part of a message
    assert server.fast_send(encode(b"z")) is None
    text = WebSocketServerLayer(text_replies=True)
    text, _ = handshake(text)
    assert text.fast_send(encode(b"t")) is None  # UTF-8 checks live in send()
    server.close()
    assert server.fast_send(encode(b"late")) is None


def test_activity_counts_data_messages_not_control_frames() -> None:
    server, client = handshake()
    client.send_ping(b"p")
    server.receive_data(wire(client))
    server.data_to_send()
    assert server.activity == 0
    client.send_binary(b"one")
    client.send_binary(b"two")
    server.receive_data(wire(client))
    server.send(encode(b"three") + encode(b"four"))
    assert server.activity == 4


def test_fast_send_leaves_oversize_messages_to_send() -> None:
    server, _client = handshake(WebSocketServerLayer(max_message_size=10))
    assert server.fast_send(encode(b"x" * 10)) is not None
    assert server.fast_send(encode(b"x" * 11)) is None
    with pytest.raises(MessageTooLarge):
        server.send(encode(b"x" * 11))
    assert close_code_sent(server) == 1011
