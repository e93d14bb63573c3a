"""TLSLayer: a server and a client layer pumped against each other, no sockets."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemons.codecs.tls import TLSLayer
from daemons.engine import certs
from daemons.engine.tlsconfig import client_context, server_context
from ipc_core.errors import PeerClosed, ProtocolError

# -- certificates (daemons.engine.certs: a CA, another CA, a server and a client cert) --


@dataclass(frozen=True)
class PKI:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = certs.make_ca("Test CA")
    other, _ = certs.make_ca("Other CA")
    srv, srv_key = certs.make_cert(ca, ca_key, "localhost", ["localhost", "127.0.0.1"])
    cli, cli_key = certs.make_cert(ca, ca_key, "client-1", usage="client")
    paths = PKI(
        ca=d / "ca.pem",
        other_ca=d / "other-ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
    )
    certs.write_cert(paths.ca, ca)
    certs.write_cert(paths.other_ca, other)
    certs.write_cert(paths.server_cert, srv)
    certs.write_key(paths.server_key, srv_key)
    certs.write_cert(paths.client_cert, cli)
    certs.write_key(paths.client_key, cli_key)
    return paths


# -- pumping -----------------------------------------------------------------


def pump(a: TLSLayer, b: TLSLayer, rounds: int = 10) -> tuple[bytes, bytes]:
    """Move bytes both ways until quiet; return (plaintext a got, plaintext b got)."""
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    for _ in range(rounds):
        to_b = a.data_to_send()
        to_a = b.data_to_send()
        if not to_a and not to_b:
            break
        if to_b:
            got_b.append(b.receive_data(to_b))
        if to_a:
            got_a.append(a.receive_data(to_a))
    return b"".join(got_a), b"".join(got_b)


def make_pair(
    pki: PKI,
    *,
    hostname: str = "localhost",
    ca: Path | None = None,
    client_cert: bool = False,
    client_ca: bool = False,
    require_client_cert: bool = False,
) -> tuple[TLSLayer, TLSLayer]:
    sctx = server_context(
        pki.server_cert,
        pki.server_key,
        client_ca=pki.ca if client_ca else None,
        require_client_cert=require_client_cert,
    )
    cctx = client_context(
        ca=ca or pki.ca,
        cert=pki.client_cert if client_cert else None,
        key=pki.client_key if client_cert else None,
    )
    server = TLSLayer(sctx, server_side=True)
    client = TLSLayer(cctx, server_side=False, server_hostname=hostname)
    return server, client


# -- tests -------------------------------------------------------------------


def test_handshake_and_data_both_ways(pki: PKI) -> None:
    server, client = make_pair(pki)
    assert not server.handshake_complete
    assert server.version is None and server.cipher is None
    assert server.peer_certificate_der() is None
    pump(client, server)
    assert server.handshake_complete and client.handshake_complete
    assert client.version in ("TLSv1.2", "TLSv1.3")
    assert client.cipher is not None
    assert client.peer_certificate_der() == ssl.PEM_cert_to_DER_cert(pki.server_cert.read_text())
    assert server.peer_certificate_der() is None  # no client certificate asked

    client.send(b"\x00\x00\x00\x04ping")
    got_client, got_server = pump(client, server)
    assert got_server == b"\x00\x00\x00\x04ping"
    server.send(b"\x00\x00\x00\x04pong")
    got_client, got_server = pump(client, server)
    assert got_client == b"\x00\x00\x00\x04pong"
    assert not server.closed and not client.closed


def test_send_before_handshake_is_flushed(pki: PKI) -> None:
    server, client = make_pair(pki)
    client.send(b"early")
    server.send(b"early too")
    got_client, got_server = pump(client, server)
    assert got_server == b"early"
    assert got_client == b"early too"


def test_ip_address_hostname(pki: PKI) -> None:
    server, client = make_pair(pki, hostname="127.0.0.1")
    client.send(b"x")
    assert pump(client, server)[1] == b"x"


def test_one_mebibyte_each_way(pki: PKI) -> None:
    server, client = make_pair(pki)
    pump(client, server)
    blob = bytes(range(256)) * 4096
    client.send(blob)
    # One receive_data call gets the whole MiB: all records are decrypted at once.
    assert server.receive_data(client.data_to_send()) == blob
    server.send(blob[::-1])
    assert client.receive_data(server.data_to_send()) == blob[::-1]


def test_ciphertext_fed_in_small_chunks(pki: PKI) -> None:
    server, client = make_pair(pki)
    pump(client, server)
    blob = b"abc" * 10000
    client.send(blob)
    wire = client.data_to_send()
    got = b"".join(server.receive_data(wire[i : i + 7]) for i in range(0, len(wire), 7))
    assert got == blob


def test_wrong_ca_fails_verification(pki: PKI) -> None:
    server, client = make_pair(pki, ca=pki.other_ca)
    with pytest.raises(ProtocolError, match="certificate verify failed"):
        pump(client, server)
    assert not client.closed  # an alert is queued for the server
    alert = client.data_to_send()
    assert alert and client.closed
    with pytest.raises(ProtocolError, match="unknown ca"):
        server.receive_data(alert)


def test_hostname_mismatch_fails(pki: PKI) -> None:
    server, client = make_pair(pki, hostname="example.org")
    with pytest.raises(ProtocolError, match="certificate verify failed: Hostname mismatch"):
        pump(client, server)


def test_mtls_client_certificate_accepted(pki: PKI) -> None:
    server, client = make_pair(pki, client_cert=True, client_ca=True, require_client_cert=True)
    client.send(b"hello")
    assert pump(client, server)[1] == b"hello"
    der = server.peer_certificate_der()
    assert der is not None
    client_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client-1")])
    assert x509.load_der_x509_certificate(der).subject == client_name


def test_mtls_missing_client_certificate_fails_on_server(pki: PKI) -> None:
    server, client = make_pair(pki, client_ca=True, require_client_cert=True)
    with pytest.raises(ProtocolError, match="certificate"):
        pump(client, server)
    server.data_to_send()
    assert server.closed
    assert not server.handshake_complete


def test_require_client_cert_needs_a_ca(pki: PKI) -> None:
    with pytest.raises(ValueError):
        server_context(pki.server_cert, pki.server_key, require_client_cert=True)


def test_contexts_have_secure_defaults(pki: PKI) -> None:
    sctx = server_context(pki.server_cert, pki.server_key)
    cctx = client_context(ca=pki.ca)
    for ctx in (sctx, cctx):
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert cctx.check_hostname and cctx.verify_mode == ssl.CERT_REQUIRED
    insecure = client_context(insecure=True)
    assert not insecure.check_hostname and insecure.verify_mode == ssl.CERT_NONE


def test_garbage_before_client_hello(pki: PKI) -> None:
    server, _ = make_pair(pki)
    with pytest.raises(ProtocolError, match=r"^tls: "):
        server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert server.closed
    # The error sticks: the connection is unusable from now on.
    with pytest.raises(ProtocolError):
        server.receive_data(b"more")


def test_close_notify_is_peer_closed(pki: PKI) -> None:
    server, client = make_pair(pki)
    pump(client, server)
    client.close()
    assert not client.closed  # until close_notify is taken by the driver
    with pytest.raises(PeerClosed, match="close_notify"):
        server.receive_data(client.data_to_send())
    assert client.closed and server.closed
    client.send(b"dropped after close")
    assert client.data_to_send() == b""


def test_data_then_close_notify_in_one_chunk(pki: PKI) -> None:
    server, client = make_pair(pki)
    pump(client, server)
    client.send(b"last words")
    client.close()
    assert server.receive_data(client.data_to_send()) == b"last words"
    assert server.closed  # the data came first; the close is reported next
    with pytest.raises(PeerClosed):
        server.receive_data(b"")


def test_eof_without_close_notify(pki: PKI) -> None:
    server, client = make_pair(pki)
    pump(client, server)
    with pytest.raises(PeerClosed):
        server.receive_data(b"")


def test_eof_mid_handshake(pki: PKI) -> None:
    server, client = make_pair(pki)
    hello = client.data_to_send()
    server.receive_data(hello[:20])
    with pytest.raises((PeerClosed, ProtocolError)):
        server.receive_data(b"")
    # And on the client side, after the ServerHello started arriving.
    server, client = make_pair(pki)
    server.receive_data(client.data_to_send())
    flight = server.data_to_send()
    client.receive_data(flight[:50])
    with pytest.raises((PeerClosed, ProtocolError)):
        client.receive_data(b"")


def test_close_before_handshake(pki: PKI) -> None:
    server, _ = make_pair(pki)
    server.close()
    assert server.closed
    assert server.data_to_send() == b""


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chunks=st.lists(st.binary(min_size=0, max_size=300), max_size=8))
def test_random_bytes_only_raise_protocol_errors(pki: PKI, chunks: list[bytes]) -> None:
    server = TLSLayer(server_context(pki.server_cert, pki.server_key), server_side=True)
    for chunk in chunks:
        try:
            server.receive_data(chunk)
        except (ProtocolError, PeerClosed):
            break
        server.data_to_send()


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_corrupted_client_flight_only_raises_protocol_errors(pki: PKI, data: st.DataObject) -> None:
    """A real ClientHello with random bytes flipped: parsing goes deeper than noise."""
    server, client = make_pair(pki)
    hello = bytearray(client.data_to_send())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(hello) - 1))
        hello[pos] = data.draw(st.integers(0, 255))
    try:
        server.receive_data(bytes(hello))
        server.receive_data(b"")
    except (ProtocolError, PeerClosed):
        pass


# -- the fast hooks the core's relay calls first --------------------------------------------


def fast_then_general(layer: TLSLayer, data: bytes) -> bytes:
    """What the core's relay does with one read."""
    out = layer.fast_receive(data)
    return out if out is not None else layer.receive_data(data)


def opened_pair(pki: PKI) -> tuple[TLSLayer, TLSLayer]:
    server, client = make_pair(pki)
    pump(client, server)
    assert server.handshake_complete and client.handshake_complete
    return server, client


def test_fast_receive_decrypts_one_record_in_one_call(pki: PKI) -> None:
    server, client = opened_pair(pki)
    for size in (0, 64, 16_000):
        message = b"\x00\x00\x3e\x80" + b"m" * size
        client.send(message)
        assert server.fast_receive(client.data_to_send()) == message
    assert server.data_to_send() == b""


def test_fast_receive_declines_and_receive_data_finishes_the_read(pki: PKI) -> None:
    server, client = opened_pair(pki)
    client.send(b"abc")
    record = client.data_to_send()
    assert server.fast_receive(record[:7]) is None  # a partial record
    assert server.receive_data(record[:7]) == b""
    assert fast_then_general(server, record[7:]) == b"abc"
    client.send(b"one")
    client.send(b"two")
    two = client.data_to_send()
    assert server.fast_receive(two) is None  # two records: the second is left over
    assert server.receive_data(two) == b"onetwo"
    client.send(b"last")
    client.close()
    tail = client.data_to_send()
    assert server.fast_receive(tail) is None  # data, then close_notify
    assert server.receive_data(tail) == b"last"
    with pytest.raises(PeerClosed, match="close_notify"):
        server.receive_data(b"")


def test_fast_receive_close_notify_and_tampering_raise_from_receive_data(pki: PKI) -> None:
    server, client = opened_pair(pki)
    client.close()
    notify = client.data_to_send()
    assert server.fast_receive(notify) is None
    with pytest.raises(PeerClosed, match="close_notify"):
        server.receive_data(notify)
    server, client = opened_pair(pki)
    client.send(b"secret")
    tampered = bytearray(client.data_to_send())
    tampered[-1] ^= 1
    assert server.fast_receive(bytes(tampered)) is None
    with pytest.raises(ProtocolError):
        server.receive_data(bytes(tampered))
    assert server.fast_receive(b"more") is None  # failed layers always decline


def test_fast_receive_declines_before_the_handshake_without_consuming(pki: PKI) -> None:
    server, client = make_pair(pki)
    hello = client.data_to_send()
    assert server.fast_receive(hello) is None
    assert server.receive_data(hello) == b""  # the general path sees the hello once
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    assert server.handshake_complete


def test_fast_send_matches_send_and_declines_behind_queued_bytes(pki: PKI) -> None:
    server, client = opened_pair(pki)
    wire = server.fast_send(memoryview(b"\x00\x00\x00\x02hi"))
    assert wire and client.receive_data(wire) == b"\x00\x00\x00\x02hi"
    server.send(b"queued")
    assert server.fast_send(b"after") is None  # order: the queued record goes first
    assert client.receive_data(server.data_to_send()) == b"queued"
    server.close()
    assert server.fast_send(b"late") is None


def _sent(pki: PKI, messages: list[bytes], close: bool) -> tuple[TLSLayer, bytes]:
    """A fresh opened server, and the client's records for ``messages``."""
    server, client = opened_pair(pki)
    for message in messages:
        client.send(message)
    if close:
        client.close()
    return server, client.data_to_send()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    messages=st.lists(st.binary(max_size=3000), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0), max_size=5),
    close=st.booleans(),
)
def test_fast_and_general_reads_give_the_same_plaintext(
    pki: PKI, messages: list[bytes], cuts: list[int], close: bool
) -> None:
    results = []
    for drive in (TLSLayer.receive_data, fast_then_general):
        server, wire = _sent(pki, messages, close)
        marks = sorted({c % (len(wire) + 1) for c in cuts})
        chunks = [wire[a:b] for a, b in zip([0, *marks], [*marks, len(wire)], strict=True)]
        got, err = [], None
        try:
            for chunk in [c for c in chunks if c]:
                got.append(drive(server, chunk))
            server.receive_data(b"")  # EOF, as the relay reports it
        except (PeerClosed, ProtocolError) as exc:
            err = exc
        results.append((b"".join(got), type(err), "sent close_notify" in str(err)))
    assert results[0] == results[1] == (b"".join(messages), PeerClosed, close)
