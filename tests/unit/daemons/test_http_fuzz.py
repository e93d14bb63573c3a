"""Property tests of ipc-httpd's HTTP layer (daemons/codecs/http.py): however
the bytes of pipelined requests are split, every body reaches the service
once, in order, and every reply answers its own request; random bytes never
raise anything but ProtocolError or PeerClosed, and never grow a buffer past
its bound."""

from __future__ import annotations

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.codecs.http import HttpConnection, HttpHandshake, HttpOptions, Phase
from ipc_core import FrameDecoder, PeerClosed, ProtocolError, encode

bodies = st.lists(st.binary(max_size=300), min_size=1, max_size=6)


def request(body: bytes, chunked: bool) -> bytes:
    if not chunked:
        head = f"POST /svc HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body
    head = b"POST /svc HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
    )
    return head + chunks + b"0\r\n\r\n"


def read_answers(data: bytes, count: int) -> list[bytes]:
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    out = []
    for _ in range(count):
        client.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        body = b""
        while True:
            event = client.next_event()
            assert event is not h11.NEED_DATA, out
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.append(body)
                break
        client.start_next_cycle()
    return out


@settings(max_examples=150, deadline=None)
@given(bodies, st.lists(st.booleans(), min_size=6, max_size=6), st.data())
def test_any_split_same_messages_same_answers(
    payloads: list[bytes], chunked: list[bool], data: st.DataObject
) -> None:
    stream = b"".join(request(b, c) for b, c in zip(payloads, chunked, strict=False))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    conn = HttpConnection(HttpOptions())
    hs = HttpHandshake(conn)
    service = FrameDecoder()
    seen: list[bytes] = []

    def serve(up: bytes) -> None:
        # The service echoes at once; pipelined requests come through take_up.
        while up:
            for message in service.feed(up):
                seen.append(message)
                conn.send(encode(message[::-1]))
            up = conn.take_up()

    pending = list(pieces)
    while conn.phase is Phase.READING and pending:
        piece = pending.pop(0)
        if piece:  # b"" would mean EOF
            hs.receive_data(piece)
    if conn.phase is Phase.READING:
        return  # the first head was never complete: nothing to check
    assert hs.service == "svc"
    _layer, early = hs.accept()
    serve(early)
    for piece in pending:
        if piece:
            serve(conn.receive_data(piece))
    assert seen == payloads
    assert read_answers(conn.data_to_send(), len(payloads)) == [p[::-1] for p in payloads]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=200), max_size=10))
def test_random_bytes_only_fail_politely(chunks: list[bytes]) -> None:
    options = HttpOptions(max_message_size=1000, max_header_size=512, max_pipelined=2048)
    conn = HttpConnection(options)
    hs = HttpHandshake(conn)
    try:
        for chunk in chunks:
            if conn.phase is Phase.READING:
                hs.receive_data(chunk)
                if hs.finished:
                    return
                if conn.phase is Phase.DECIDING:
                    hs.accept()
            else:
                conn.receive_data(chunk)
                conn.send(encode(b"r"))
            assert len(conn._body) <= options.max_message_size
    except (ProtocolError, PeerClosed):
        pass
    conn.data_to_send()
