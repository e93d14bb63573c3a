"""Adversarial input for the TCPd handshake (daemons.codecs.tcp), both sides, no sockets.

The server side must end every input in exactly one of: a service name (then
the engine's ServiceAccess decides) or a ProtocolError / PeerClosed, never
another exception; it must never hold more than 100 bytes of an unfinished
name; and the outcome must not depend on how TCP cut the bytes into segments.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.codecs.tcp import TcpdClient, TcpdHandshake
from daemons.engine.policy import MAX_SERVICE_NAME_BYTES, ServiceAccess
from ipc_core.errors import PeerClosed, ProtocolError
from ipc_core.framing import encode

ACCESS = ServiceAccess()


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(stream) + 1) for p in points} - {0, len(stream)})
    return [stream[a:b] for a, b in zip([0, *marks], [*marks, len(stream)], strict=True)]


def bytewise(stream: bytes) -> list[bytes]:
    return cut(stream, list(range(1, len(stream))))


def outcome(chunks: list[bytes]) -> tuple[str, str | None, bytes]:
    """Drive a handshake like the engine does: feed, settle when the peer
    pauses, then apply the default access policy. Returns ("refused", None, b"")
    or ("service", name, early bytes)."""
    h = TcpdHandshake()
    later = b""  # read by the relay once switched (the engine connects at once)
    try:
        for chunk in chunks:
            if h.service is not None:
                later += chunk
                continue
            h.receive_data(chunk)
            # Between reads the unfinished name is bounded.
            assert h.service is not None or len(h._buf) <= MAX_SERVICE_NAME_BYTES
        if h.service is None:
            h.settle()
        if h.service is None:
            return ("refused", None, b"")  # an empty stream: the deadline closes it
    except (ProtocolError, PeerClosed):
        return ("refused", None, b"")
    if ACCESS.check(h.service) is not None:
        return ("refused", None, b"")
    layer, early = h.accept()
    assert layer is None and h.data_to_send() == b"ok"
    return ("service", h.service, early + later)


# -- strategies ----------------------------------------------------------------------

names_ascii = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120)
terminators = st.sampled_from([b"", b"\n", b"\r\n", b"\x00", b"\r", b"\x01", b"\x1f"])
tails = st.lists(st.binary(max_size=20).map(encode), max_size=4).map(b"".join)
# Random bytes, multi-byte UTF-8 and \r\n cut anywhere: both used to
# depend on segmentation (fixed in ece0507, see the two tests below).
raw_bytes = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.text(min_size=1, max_size=40).map(lambda t: t.encode(errors="surrogatepass") + b"\r\n"),
)


@st.composite
def handshake_streams(draw: st.DrawFn) -> bytes:
    return draw(
        st.one_of(
            raw_bytes,
            st.builds(lambda n, t, r: n.encode() + t + r, names_ascii, terminators, tails),
        )
    )


# -- properties ------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(stream=handshake_streams(), points=st.lists(st.integers(min_value=0), max_size=8))
def test_outcome_does_not_depend_on_segmentation(stream: bytes, points: list[int]) -> None:
    whole = outcome([stream])
    assert outcome(cut(stream, points)) == whole
    assert outcome(bytewise(stream)) == whole


@settings(max_examples=300, deadline=None)
@given(stream=handshake_streams())
def test_accepted_name_and_early_bytes_rebuild_the_stream(stream: bytes) -> None:
    kind, name, early = outcome([stream])
    if kind == "refused":
        return
    assert name is not None and not any(ord(c) < 0x20 for c in name)
    consumed = stream[len(name.encode()) : len(stream) - len(early)]
    # Only a newline is ever swallowed; a NUL (the next frame's header) is kept.
    # (or a lone \r that ended the stream: it may have been half of a \r\n).
    assert consumed in (b"", b"\n", b"\r\n") or (consumed == b"\r" and not early)
    assert name.encode() + consumed + early == stream


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(min_size=1, max_size=30).filter(lambda s: all(ord(c) >= 0x20 for c in s)),
    data=st.data(),
)
def test_utf8_names_split_between_characters(name: str, data: st.DataObject) -> None:
    """Any UTF-8 name works when segments end between characters."""
    raw = name.encode() + b"\n"
    bounds = [len(name[:i].encode()) for i in range(1, len(name))]
    points = data.draw(st.lists(st.sampled_from(bounds), max_size=4)) if bounds else []
    assert outcome(cut(raw, points)) == outcome([raw])


def test_utf8_name_split_inside_a_character() -> None:
    raw = "café".encode() + b"\n"
    assert outcome([raw[:4], raw[4:]]) == outcome([raw]) == ("service", "café", b"")


def test_crlf_terminator_split_between_segments() -> None:
    raw = b"pong\r\n" + encode(b"x")
    assert outcome([raw[:5], raw[5:]]) == outcome([raw]) == ("service", "pong", encode(b"x"))


# -- hand-picked names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"pong", ("service", "pong", b"")),
        (b"pong\n" + encode(b"x"), ("service", "pong", encode(b"x"))),
        (b"pong" + encode(b"x"), ("service", "pong", encode(b"x"))),  # NUL starts the header
        (b"a/b", ("refused", None, b"")),
        (b"../pong", ("refused", None, b"")),
        (b"..", ("refused", None, b"")),
        (b".", ("refused", None, b"")),
        (b"\n", ("refused", None, b"")),
        (b"\x00\x00\x00\x05hello", ("refused", None, b"")),  # a frame with no name
        (b"po\x00ng", ("service", "po", b"\x00ng")),  # NUL ends the name, kept as data
        (b"x" * 2000, ("refused", None, b"")),
        (b"x" * 2000 + b"\n", ("refused", None, b"")),
        (b"x" * 101 + b"\n", ("refused", None, b"")),
        (b"x" * 100, ("service", "x" * 100, b"")),
        # A lone "\r" after an over-long name used to be held (issue 11, item 21).
        (b"x" * 101 + b"\r", ("refused", None, b"")),
        (b"x" * 100 + b"\r", ("service", "x" * 100, b"")),
        (b"x" * 100 + b"\r\n", ("service", "x" * 100, b"")),
        (b"\r", ("refused", None, b"")),
        (b"\xff\xfe", ("refused", None, b"")),
        (b"ipc", ("refused", None, b"")),  # protected
        (b"tcp.ctl\n", ("refused", None, b"")),
        (b"p\x7fng", ("refused", None, b"")),  # DEL is not a terminator but is refused
    ],
)
def test_hand_picked_names(raw: bytes, expected: tuple[str, str | None, bytes]) -> None:
    assert outcome([raw]) == expected
    assert outcome(bytewise(raw)) == expected


def test_2000_byte_name_fails_without_buffering_it() -> None:
    h = TcpdHandshake()
    with pytest.raises(ProtocolError, match="no end of service name"):
        for _ in range(40):
            h.receive_data(b"y" * 50)
    assert len(h._buf) <= MAX_SERVICE_NAME_BYTES + 50


def test_overlong_name_ending_in_cr_fails_at_once() -> None:
    """The limit is checked before waiting for the "\n" of a "\r\n"."""
    h = TcpdHandshake()
    with pytest.raises(ProtocolError, match="no end of service name"):
        h.receive_data(b"x" * 101 + b"\r")


def test_existing_service_completes_the_name_without_a_terminator() -> None:
    h = TcpdHandshake(service_exists=lambda name: name == "pong")
    h.receive_data(b"po")
    assert h.service is None
    h.receive_data(b"ng")
    assert h.service == "pong"


def test_eof_before_a_name() -> None:
    h = TcpdHandshake()
    with pytest.raises(PeerClosed):
        h.receive_data(b"")


# -- client side -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(answer=st.binary(max_size=40), points=st.lists(st.integers(min_value=0), max_size=4))
def test_client_accepts_only_ok(answer: bytes, points: list[int]) -> None:
    c = TcpdClient("pong")
    assert c.data_to_send() == b"pong"
    try:
        for chunk in cut(answer, points) if answer else [b""]:
            c.receive_data(chunk)
    except (ProtocolError, PeerClosed):
        assert not answer.startswith(b"ok")
        return
    if answer.startswith(b"ok"):
        assert c.done
        layer, early = c.result()
        assert layer is None and early == answer[2:]
    else:
        assert not c.done and len(answer) < 2  # waits for the second byte
