"""Adversarial input for the TLS codec (daemons.codecs.tls.TLSLayer) and the TLS
wrapper around the TCPd handshake (daemons.codecs.tlswrap), no sockets.

Bad bytes must end in ProtocolError / PeerClosed (never another exception,
never plaintext that was not sent), and a peer must not be able to make the
layer hold more than one TLS record (~18 KiB) of its input.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemons.codecs.tcp import TcpdClient, TcpdHandshake
from daemons.codecs.tls import TLSLayer
from daemons.codecs.tlswrap import TLSConnector, TLSHandshake
from daemons.engine.policy import ServiceAccess
from daemons.engine.tlsconfig import client_context, server_context
from ipc_core.errors import PeerClosed, ProtocolError
from ipc_core.framing import FrameDecoder, encode
from tests.helpers import Pki

#: The largest TLS record a peer may announce (RFC 8446: 2^14 + 256 for
#: TLS 1.3 ciphertext; OpenSSL allows 2^14 + 2048 for TLS 1.2).
MAX_RECORD = 2**14 + 2048 + 5
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def server(pki: Pki) -> TLSLayer:
    return TLSLayer(server_context(pki.cert, pki.key), server_side=True)


def client(pki: Pki) -> TLSLayer:
    return TLSLayer(client_context(ca=pki.ca), server_side=False, server_hostname="localhost")


def pump(a: TLSLayer, b: TLSLayer) -> bytes:
    """Run the handshake between a client ``a`` and a server ``b``; return what
    ``b`` decrypted."""
    got = b""
    for _ in range(10):
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            break
        if to_b:
            got += b.receive_data(to_b)
        if to_a:
            a.receive_data(to_a)
    return got


def connected(pki: Pki) -> tuple[TLSLayer, TLSLayer]:
    c, s = client(pki), server(pki)
    pump(c, s)
    assert c.handshake_complete and s.handshake_complete
    return c, s


def feed_until_error(layer: TLSLayer, chunks: list[bytes]) -> tuple[bytes, Exception | None]:
    """Feed chunks; return (plaintext, the error that ended it or None), checking
    after each that the layer never holds more than one record of input."""
    plain = b""
    for chunk in chunks:
        try:
            plain += layer.receive_data(chunk)
        except (ProtocolError, PeerClosed) as exc:
            layer.data_to_send()  # an alert, maybe: the driver writes it out
            assert layer.closed  # ... and then closes the connection
            return plain, exc
        layer.data_to_send()
        assert layer._incoming.pending <= MAX_RECORD
    return plain, None


# -- garbage before a ClientHello ------------------------------------------------------

GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"pong",
    b"\x00" * 16,
    encode(b"a LibIPC frame"),
    b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10",  # an SSLv2-style hello header
    b"\x15\x03\x03\x00\x02\x02\x28",  # a fatal alert record
    b"\x17\x03\x03\x00\x05hello",  # application data before any handshake
    b"\x16\x03\x01\x00\x00",  # an empty handshake record
    b"\xff" * 10,
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_before_a_client_hello(pki: Pki, garbage: bytes) -> None:
    s = server(pki)
    hello = client(pki).data_to_send()
    plain, err = feed_until_error(s, [garbage + hello, b""])
    assert plain == b"" and not s.handshake_complete
    assert isinstance(err, ProtocolError | PeerClosed)


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=300), split=st.booleans())
def test_random_garbage_before_a_client_hello(pki: Pki, garbage: bytes, split: bool) -> None:
    s = server(pki)
    hello = client(pki).data_to_send()
    chunks = [garbage, hello, b""] if split else [garbage + hello, b""]
    plain, err = feed_until_error(s, chunks)
    # Never a handshake after garbage: either refused, or still waiting for the
    # rest of a record the garbage announced (the engine's deadline ends it).
    assert plain == b"" and not s.handshake_complete and err is not None


@pytest.mark.parametrize("length", [2**14 + 2048 + 1, 0xFFFF])
@pytest.mark.parametrize("kind", [0x16, 0x17, 0x15])
def test_oversize_record_refused_at_its_header(pki: Pki, kind: int, length: int) -> None:
    s = server(pki)
    with pytest.raises(ProtocolError, match=r"^tls: "):
        s.receive_data(bytes([kind, 3, 3]) + length.to_bytes(2, "big"))


def test_a_peer_cannot_make_the_layer_buffer_more_than_one_record(pki: Pki) -> None:
    """A record header announcing the maximum, then a slow trickle of its body:
    the layer holds at most that one record, and fails when it is complete."""
    s = server(pki)
    head = b"\x16\x03\x01" + (2**14).to_bytes(2, "big")
    chunks = [head] + [os.urandom(1000) for _ in range(64)]
    plain, err = feed_until_error(s, chunks)
    assert plain == b"" and isinstance(err, ProtocolError)


# -- after the handshake ------------------------------------------------------------------


@FUZZ
@given(chunks=st.lists(st.binary(min_size=1, max_size=400), min_size=1, max_size=6))
def test_random_bytes_after_the_handshake_never_become_plaintext(
    pki: Pki, chunks: list[bytes]
) -> None:
    _, s = connected(pki)
    plain, _ = feed_until_error(s, [*chunks, b""])
    assert plain == b""


@FUZZ
@given(data=st.data())
def test_tampered_application_records_are_refused(pki: Pki, data: st.DataObject) -> None:
    c, s = connected(pki)
    c.send(encode(b"secret") * 3)
    records = bytearray(c.data_to_send())
    pos = data.draw(st.integers(5, len(records) - 1))  # a byte of a record body
    records[pos] ^= data.draw(st.integers(1, 255))
    plain, err = feed_until_error(s, [bytes(records)])
    assert plain == b"" and isinstance(err, ProtocolError)


def test_forged_max_size_application_record_after_the_handshake(pki: Pki) -> None:
    _, s = connected(pki)
    head = b"\x17\x03\x03" + (2**14 + 256).to_bytes(2, "big")
    plain, err = feed_until_error(s, [head] + [b"\x00" * 4096] * 8)
    assert plain == b"" and isinstance(err, ProtocolError)


@pytest.mark.parametrize("split_every", [1, 7, 1000])
def test_records_split_at_every_byte(pki: Pki, split_every: int) -> None:
    """LibIPC frames inside TLS records, fed byte by byte (or in odd pieces),
    come out whole and in order; tiny messages too."""
    messages = [b"", b"x", b"\x00\x00\x00\x00", os.urandom(3000)] + [b"t"] * 2000
    c, s = connected(pki)
    for m in messages:
        c.send(encode(m))
    wire = c.data_to_send()
    plain = b""
    for i in range(0, len(wire), split_every):
        plain += s.receive_data(wire[i : i + split_every])
        assert s._incoming.pending <= MAX_RECORD
    assert FrameDecoder().feed(plain) == messages


def test_thousands_of_tiny_records_in_one_read(pki: Pki) -> None:
    c, s = connected(pki)
    for _ in range(5000):
        c.send(encode(b"t"))  # one TLS record each
    plain = s.receive_data(c.data_to_send())
    assert FrameDecoder().feed(plain) == [b"t"] * 5000


# -- TLS around the TCPd handshake (ipc-tlsd's inbound side) -------------------------------


def tls_tcpd_outcome(pki: Pki, name_bytes: bytes) -> str | None:
    """What ipc-tlsd's handshake makes of a name sent inside TLS: the service
    name the engine would connect to, or None if refused."""
    hs = TLSHandshake(
        server_context(pki.cert, pki.key), TcpdHandshake(), on_identity=lambda i: None
    )
    c = client(pki)
    for _ in range(6):
        to_s = c.data_to_send()
        if to_s:
            hs.receive_data(to_s)
        back = hs.data_to_send()
        if back:
            c.receive_data(back)
        if c.handshake_complete and not to_s and not back:
            break
    assert c.handshake_complete
    c.send(name_bytes)
    try:
        hs.receive_data(c.data_to_send())
        if hs.service is None:
            hs.settle()
    except (ProtocolError, PeerClosed):
        return None
    if hs.service is None or ServiceAccess().check(hs.service) is not None:
        return None
    return hs.service


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"pong", "pong"),
        (b"a/b", None),
        (b"..", None),
        (b"../pong", None),
        (b"po\x00ng", "po"),  # the NUL starts the first frame, as over TCP
        (b"x" * 2000, None),
        (b"tls", None),
        (b"\xff", None),
    ],
)
def test_hostile_service_names_inside_tls(pki: Pki, name: bytes, expected: str | None) -> None:
    assert tls_tcpd_outcome(pki, name) == expected


@FUZZ
@given(answer=st.binary(min_size=1, max_size=300))
def test_outbound_connector_against_a_hostile_server(pki: Pki, answer: bytes) -> None:
    """ipc-tlsd's client side fed random bytes by the 'server': refused, never done."""
    conn = TLSConnector(client_context(ca=pki.ca), "localhost", TcpdClient("pong"))
    assert conn.data_to_send()  # the ClientHello
    try:
        conn.receive_data(answer)
        conn.receive_data(b"")
    except (ProtocolError, PeerClosed):
        pass
    assert not conn.done
