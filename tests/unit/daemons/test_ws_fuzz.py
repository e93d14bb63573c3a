"""Adversarial input for the WebSocket codec (daemons.codecs.ws) and ipc-websocketd's
handshake (daemons.websocketd.WebSocketHandshake), no sockets.

Frames announcing 64-bit lengths, frames split at every byte, thousands of
tiny frames in one read, endless fragments, random bytes and hostile HTTP
requests must end in LibIPC messages or a close (an HTTP error or a close
frame, then ProtocolError / PeerClosed), never another exception, and never
make the layer allocate what a peer announces.
"""

from __future__ import annotations

import base64
import os
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Close, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from daemons.codecs.ws import WebSocketServerLayer
from daemons.websocketd import WebSocketHandshake, WebSocketOptions
from ipc_core.errors import MessageTooLarge, PeerClosed, ProtocolError
from ipc_core.framing import FrameDecoder, encode

KEY = base64.b64encode(b"0123456789abcdef").decode()


def request(path: str = "/pong", extra: str = "", host: str = "127.0.0.1:8080") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def opened(max_message_size: int = 1 << 24) -> WebSocketServerLayer:
    server = WebSocketServerLayer(max_message_size=max_message_size)
    assert server.receive_data(request()) == b""
    assert server.accept() == b""
    assert server.data_to_send().startswith(b"HTTP/1.1 101 ")
    return server


def frame(opcode: int, payload: bytes, *, fin: bool = True, length: int | None = None) -> bytes:
    """A masked client frame; ``length`` overrides the announced length
    (always in the 64-bit form when given)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    mask = b"\x11\x22\x33\x44"
    if length is not None:
        head += bytes([0x80 | 127]) + struct.pack(">Q", length)
    elif len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    elif len(payload) < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def close_code_sent(server: WebSocketServerLayer) -> int | None:
    client = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN, max_size=None)
    client.receive_data(server.data_to_send())
    closes = [f for f in client.events_received() if f.opcode is Opcode.CLOSE]
    return Close.parse(closes[-1].data).code if closes else None


def deliver(
    server: WebSocketServerLayer,
    chunks: list[bytes],
    *,
    eof: bool = False,
    fast: bool = False,
    sent: list[bytes] | None = None,
) -> tuple[list[bytes], Exception | None]:
    """Feed the non-empty chunks (then EOF if ``eof``); return the LibIPC
    payloads that came up and the error that ended it. With ``fast``, drive
    it as the core's relay does: ``fast_receive`` first, then receive_data.
    ``sent`` collects what the server wrote back (pongs, close frames)."""
    sent = [] if sent is None else sent
    decoder = FrameDecoder()
    out: list[bytes] = []
    for chunk in [c for c in chunks if c] + ([b""] if eof else []):
        try:
            up = server.fast_receive(chunk) if fast and chunk else None
            if up is None:
                up = server.receive_data(chunk)
            out += decoder.feed(up)
        except (ProtocolError, PeerClosed) as exc:
            sent.append(server.data_to_send())
            assert server.closed
            return out, exc
        sent.append(server.data_to_send())
    return out, None


# -- 64-bit lengths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length", [2**24 + 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
)
def test_frame_with_a_64_bit_length_closes_1009_without_allocating(length: int) -> None:
    server = opened(max_message_size=2**24)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            server.receive_data(frame(0x2, b"", length=length) + b"x" * 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{peak} bytes allocated for an announced {length}"
    assert close_code_sent(server) in (1009, 1002)
    assert server.closed


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536])
def test_small_lengths_in_the_64_bit_form_are_accepted(length: int) -> None:
    """Non-minimal length encodings are legal for websockets: the message comes up."""
    server = opened()
    payload = os.urandom(length)
    out, err = deliver(server, [frame(0x2, payload, length=length)])
    assert err is None and out == [payload]


def test_announced_length_under_the_limit_is_not_preallocated() -> None:
    server = opened(max_message_size=2**24)
    tracemalloc.start()
    try:
        # Streamed: the LibIPC header goes up at once, nothing is reserved.
        assert server.receive_data(frame(0x2, b"", length=2**24)) == struct.pack(">I", 2**24)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


# -- split at every byte, thousands in one read ---------------------------------------------


def test_frames_split_at_every_byte() -> None:
    messages = [b"", b"a", b"\x00\x00\x00\x00", os.urandom(300), b"text"]
    wire = (
        frame(0x2, messages[0])
        + frame(0x2, messages[1])
        + frame(0x9, b"ping!")  # a ping in the middle: answered, not delivered
        + frame(0x2, messages[2])
        + frame(0x2, messages[3][:100], fin=False)
        + frame(0x0, messages[3][100:200], fin=False)
        + frame(0x0, messages[3][200:])
        + frame(0x1, messages[4])
    )
    for cut in range(len(wire) + 1):
        server = opened()
        out, err = deliver(server, [wire[:cut], wire[cut:]])
        assert err is None and out == messages, cut


def test_thousands_of_tiny_frames_in_one_read() -> None:
    server = opened()
    wire = frame(0x2, b"t") * 10_000 + frame(0x2, b"") * 10_000
    out, err = deliver(server, [wire])
    assert err is None and out == [b"t"] * 10_000 + [b""] * 10_000


def test_local_side_thousands_of_tiny_messages_in_one_chunk() -> None:
    server = opened()
    server.send(encode(b"r") * 10_000)
    client = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN, max_size=None)
    client.receive_data(server.data_to_send())
    assert [f.data for f in client.events_received()] == [b"r"] * 10_000


# -- fragments and sizes ----------------------------------------------------------------------


def test_endless_fragments_are_bounded_by_the_message_limit() -> None:
    limit = 64 * 1024
    server = opened(max_message_size=limit)
    chunks = [frame(0x2, b"f" * 16384, fin=False)]
    chunks += [frame(0x0, b"f" * 16384, fin=False) for _ in range(63)]
    tracemalloc.start()
    try:
        out, err = deliver(server, chunks)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == [] and isinstance(err, ProtocolError)
    assert peak < 8 * limit


@pytest.mark.parametrize("length", [2**31, 2**32 - 1])
def test_local_service_announcing_a_huge_message(length: int) -> None:
    """The other direction: the local service's stream is checked too."""
    server = opened(max_message_size=1 << 20)
    server.send(encode(b"fine"))
    with pytest.raises(MessageTooLarge):
        server.send(struct.pack(">I", length))
    assert close_code_sent(server) == 1011


# -- random frames ------------------------------------------------------------------------------

payloads = st.binary(max_size=40)
pieces = st.one_of(
    payloads.map(lambda p: ("msg", p, frame(0x2, p))),
    st.just(("ctl", b"", frame(0x9, b"p"))),  # ping
    st.just(("ctl", b"", frame(0xA, b""))),  # unsolicited pong
    st.binary(min_size=1, max_size=12).map(lambda g: ("bad", b"", g)),
    st.sampled_from([2**32, 2**63, 2**64 - 1]).map(
        lambda n: ("bad", b"", frame(0x2, b"", length=n))
    ),
    st.just(("bad", b"", b"\x82\x02hi")),  # unmasked
    st.just(("bad", b"", frame(0x3, b"?"))),  # reserved opcode
    st.just(("bad", b"", frame(0x1, b"\xff\xfe"))),  # text that is not UTF-8
    st.just(("bad", b"", frame(0x9, b"p" * 126))),  # control frame too long
    st.just(("bad", b"", frame(0x0, b"c"))),  # continuation out of the blue
)


@settings(max_examples=400, deadline=None)
@given(
    sequence=st.lists(pieces, max_size=12),
    points=st.lists(st.integers(0), max_size=6),
    per_frame=st.booleans(),
)
def test_random_frames_give_a_prefix_of_the_messages_then_a_clean_close(
    sequence: list[tuple[str, bytes, bytes]], points: list[int], per_frame: bool
) -> None:
    """Driven as receive_data only, and as the core's relay does (fast_receive
    first): the same messages, the same end, what the client sends back too."""
    wire = b"".join(raw for _, _, raw in sequence)
    marks = sorted({p % (len(wire) + 1) for p in points})
    chunks = [wire[a:b] for a, b in zip([0, *marks], [*marks, len(wire)], strict=True)]
    if per_frame:  # one read per frame: what an interactive client produces
        chunks = [raw for _, _, raw in sequence]
    good = []
    for kind, payload, _ in sequence:
        if kind == "bad":
            break
        if kind == "msg":
            good.append(payload)
    outcomes = []
    for fast in (False, True):
        server = opened(max_message_size=1 << 16)
        sent: list[bytes] = []
        out, err = deliver(server, chunks, eof=True, fast=fast, sent=sent)
        assert isinstance(err, ProtocolError | PeerClosed)  # the final EOF at the latest
        # Everything before the first bad piece arrives; nothing invented after
        # it (random "bad" bytes may happen to start a valid frame: a prefix).
        assert out[: len(good)] == good
        assert server.closed
        outcomes.append((out, type(err), str(err), server.close_code, b"".join(sent)))
    assert outcomes[0] == outcomes[1]


# -- ipc-websocketd's handshake: hostile HTTP requests ------------------------------------------


def hs_outcome(raw: bytes, **options: object) -> tuple[str, str | None]:
    """("service", name) | ("finished", None) | ("refused", None) | ("waiting", None)."""
    hs = WebSocketHandshake("127.0.0.1:5", WebSocketOptions(**options))
    try:
        hs.receive_data(raw)
    except (ProtocolError, PeerClosed):
        hs.data_to_send()
        return ("refused", None)
    out = hs.data_to_send()
    if hs.service is not None:
        return ("service", hs.service)
    if hs.finished:
        assert out.startswith(b"HTTP/1.1 ")
        return ("finished", None)
    return ("waiting", None)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/pong", ("service", "pong")),
        ("/a/b", ("refused", None)),
        ("/a%2Fb", ("refused", None)),
        ("/..", ("refused", None)),
        ("/%2e%2e", ("refused", None)),
        ("/.", ("refused", None)),
        ("/po%00ng", ("refused", None)),
        ("/%ff", ("refused", None)),
        ("/", ("refused", None)),
        ("/" + "x" * 2000, ("refused", None)),
        ("/" + "x" * 101, ("refused", None)),
        ("/" + "x" * 95, ("service", "x" * 95)),  # valid name; see test_faults.py
        ("/pong?x=1#frag", ("service", "pong")),
        ("pong", ("refused", None)),
        ("/%", ("service", "%")),  # a lone % is left as is
    ],
)
def test_hostile_paths(path: str, expected: tuple[str, str | None]) -> None:
    assert hs_outcome(request(path)) == expected


ORIGINS = st.one_of(
    st.sampled_from(
        [
            "null",
            "http://127.0.0.1:8080",
            "https://evil.example",
            "http://127.0.0.1",
            "file://",
            "http://",
            "x",
            "",
            "http://127.0.0.1:8080/",
            "HTTP://127.0.0.1:8080",
        ]
    ),
    st.text(alphabet="abc:/.[]@%0123456789", max_size=30),
)


header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    origin=ORIGINS,
    forwarded=st.one_of(st.none(), header_values),
    path=st.text(alphabet="/.%0123456789abcdefABCDEF?#x", max_size=30),
    trust_proxy=st.booleans(),
    origins=st.one_of(
        st.none(),
        st.lists(st.sampled_from(["*", "null", "http://*.x", "http://a"]), max_size=2).map(tuple),
    ),
)
def test_random_requests_end_in_a_decision(
    origin: str,
    forwarded: str | None,
    path: str,
    trust_proxy: bool,
    origins: tuple[str, ...] | None,
) -> None:
    extra = f"Origin: {origin}\r\n" if origin else ""
    if forwarded is not None:
        extra += f"X-Forwarded-For: {forwarded}\r\nX-Forwarded-Host: {forwarded}\r\n"
    kind, name = hs_outcome(
        request("/" + path.lstrip("/"), extra), trust_proxy=trust_proxy, origins=origins
    )
    assert kind in ("service", "refused", "finished")
    if kind == "service":
        assert name and "/" not in name and name not in (".", "..")


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.sampled_from(
                [
                    request(),
                    b"GET /pong HTTP/1.1\r\n",
                    b"Origin: http://[\r\n",
                    b"\r\n\r\n",
                    b"Content-Length: 99999999999\r\n",
                    b"Transfer-Encoding: chunked\r\n",
                    b"Host: " + b"h" * 9000 + b"\r\n",
                ]
            ),
        ),
        max_size=6,
    )
)
def test_random_request_bytes_never_escape(chunks: list[bytes]) -> None:
    """Whatever arrives: a decision, an HTTP error, or waiting for more; any
    exception other than ProtocolError/PeerClosed would kill the daemon."""
    hs = WebSocketHandshake("127.0.0.1:5", WebSocketOptions())
    for chunk in chunks:
        if hs.service is not None or hs.finished:
            break
        try:
            hs.receive_data(chunk)
        except (ProtocolError, PeerClosed):
            break
        hs.data_to_send()


# Found by this file (it crashed ipc-websocketd, see test_faults.py); fixed in
# 80d0710, kept as a regression test.
@pytest.mark.parametrize("origin", ["http://[", "http://[::1", "http://a]b"])
def test_unparsable_origin_is_refused_not_raised(origin: str) -> None:
    assert hs_outcome(request(extra=f"Origin: {origin}\r\n")) == ("refused", None)
