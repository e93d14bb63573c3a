"""TLSConnector against TLSHandshake (TLS around the TCPd handshake), no sockets.

The tests pump bytes between the client and the server objects the way the
outbound dialer and the daemon engine would, then relay LibIPC frames through
the layers they hand over for the switched phase.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemons.codecs.tcp import TcpdClient, TcpdHandshake
from daemons.codecs.tls import TLSLayer
from daemons.codecs.tlswrap import TLSConnector, TLSHandshake, describe_identity
from daemons.engine import certs
from daemons.engine.handshake import describes_peer, knows_client
from daemons.engine.tlsconfig import client_context, server_context
from ipc_core import StackedLayer
from ipc_core.errors import PeerClosed, ProtocolError
from ipc_core.framing import encode
from ipc_core.peerinfo import PeerInfo

# -- certificates ------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca: Path
    other_ca: Path
    server: tuple[Path, Path]
    alice: tuple[Path, Path]
    mallory: tuple[Path, Path]  # signed by the other CA
    dave: tuple[Path, Path]  # a client certificate with SANs


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = certs.make_ca("Test CA")
    other, other_key = certs.make_ca("Other CA")

    def write(stem: str, pair: tuple[object, certs.PrivateKey]) -> tuple[Path, Path]:
        certificate, key = pair
        certs.write_cert(d / f"{stem}.pem", certificate)  # type: ignore[arg-type]
        certs.write_key(d / f"{stem}.key", key)
        return d / f"{stem}.pem", d / f"{stem}.key"

    certs.write_cert(d / "ca.pem", ca)
    certs.write_cert(d / "other.pem", other)
    return PKI(
        ca=d / "ca.pem",
        other_ca=d / "other.pem",
        server=write(
            "server", certs.make_cert(ca, ca_key, "localhost", ["localhost", "127.0.0.1"])
        ),
        alice=write("alice", certs.make_cert(ca, ca_key, "alice", [], usage="client")),
        mallory=write("mallory", certs.make_cert(other, other_key, "mallory", [], usage="client")),
        dave=write(
            "dave",
            certs.make_cert(ca, ca_key, "dave", ["dave.example", "192.0.2.9"], usage="client"),
        ),
    )


def server_ctx(pki: PKI, *, mtls: bool = False) -> ssl.SSLContext:
    return server_context(*pki.server, client_ca=pki.ca if mtls else None, require_client_cert=mtls)


def client_ctx(
    pki: PKI, *, cert: tuple[Path, Path] | None = None, ca: Path | None = None
) -> ssl.SSLContext:
    return client_context(
        ca=ca or pki.ca, cert=cert[0] if cert else None, key=cert[1] if cert else None
    )


# -- pumping -------------------------------------------------------------------


def pump(client: TLSConnector, server: TLSHandshake, *, accept: bool = True) -> None:
    """Move bytes until quiet, accepting the service like the engine does."""
    accepted = False
    for _ in range(20):
        to_server = client.data_to_send()
        if to_server:
            server.receive_data(to_server)
        if accept and server.service is not None and not accepted:
            accepted = True
            server.layer, server.early = server.accept()  # type: ignore[attr-defined]
        to_client = server.data_to_send()
        if to_client:
            client.receive_data(to_client)
        if not to_server and not to_client:
            return
    raise AssertionError("the handshake did not settle")


def server_refusal(client: TLSConnector, server: TLSHandshake) -> ProtocolError:
    """Pump until the *server* refuses (it is the side that logs why); return its error."""
    for _ in range(20):
        to_server = client.data_to_send()
        if to_server:
            try:
                server.receive_data(to_server)
            except ProtocolError as exc:
                return exc
        to_client = server.data_to_send()
        if to_client:
            client.receive_data(to_client)
    raise AssertionError("the server accepted")


def relay(a: TLSLayer, b: TLSLayer) -> bytes:
    """Send what ``a`` has for ``b``; return the plaintext ``b`` got."""
    data = a.data_to_send()
    return b.receive_data(data) if data else b""


def connect(
    pki: PKI,
    *,
    server: ssl.SSLContext | None = None,
    client: ssl.SSLContext | None = None,
    service: str = "pong",
    **kwargs: object,
) -> tuple[TLSConnector, TLSHandshake]:
    conn = TLSConnector(client or client_ctx(pki), "localhost", TcpdClient(service))
    hs = TLSHandshake(server or server_ctx(pki), TcpdHandshake(lambda n: n == "pong"), **kwargs)  # type: ignore[arg-type]
    return conn, hs


# -- tests ---------------------------------------------------------------------


def test_tcpd_handshake_inside_tls_then_frames_both_ways(pki: PKI) -> None:
    conn, hs = connect(pki)
    pump(conn, hs)
    assert hs.service == "pong"
    assert conn.done
    server_layer, early = hs.layer, hs.early  # type: ignore[attr-defined]
    assert early == b""
    assert server_layer is hs.tls  # TCPd: no inner layer, TLS carries the LibIPC stream
    client_layer, client_early = conn.result()
    assert client_layer is conn.tls and client_early == b""
    assert conn.tls.version == "TLSv1.3"

    client_layer.send(encode(b"hello"))
    assert relay(client_layer, server_layer) == encode(b"hello")
    server_layer.send(encode(b"hello back"))
    assert relay(server_layer, client_layer) == encode(b"hello back")


def test_plaintext_before_ok_is_kept_as_early_bytes(pki: PKI) -> None:
    """A client that sends the name and a first message at once loses nothing."""
    hs = TLSHandshake(server_ctx(pki), TcpdHandshake())
    client = TLSLayer(client_ctx(pki), server_side=False, server_hostname="localhost")
    client.send(b"pong" + encode(b"first"))
    for _ in range(5):
        data = client.data_to_send()
        if data:
            hs.receive_data(data)
        back = hs.data_to_send()
        if back:
            client.receive_data(back)
    assert hs.service == "pong"
    layer, early = hs.accept()
    assert early == encode(b"first")
    assert client.receive_data(hs.data_to_send()) == b"ok"
    assert layer is hs.tls


def test_remote_early_bytes_after_ok_reach_the_client(pki: PKI) -> None:
    conn, hs = connect(pki)
    pump(conn, hs, accept=False)
    assert hs.service == "pong" and not conn.done
    hs.accept()
    hs.tls.send(encode(b"greeting"))  # the service spoke at once
    conn.receive_data(hs.data_to_send())
    assert conn.done
    _layer, early = conn.result()
    assert early == encode(b"greeting")


def test_inner_layer_is_stacked_under_tls(pki: PKI) -> None:
    class Upper:
        def receive_data(self, data: bytes) -> bytes:
            return data.upper()

        def send(self, data: bytes) -> None:
            self.out = data

        def data_to_send(self) -> bytes:
            out, self.out = getattr(self, "out", b""), b""
            return out

        def close(self) -> None:
            pass

    class InnerWithLayer(TcpdHandshake):
        def accept(self):  # type: ignore[no-untyped-def]
            _none, early = super().accept()
            return Upper(), early

    hs = TLSHandshake(server_ctx(pki), InnerWithLayer(lambda n: n == "pong"))
    conn = TLSConnector(client_ctx(pki), "localhost", TcpdClient("pong"))
    pump(conn, hs, accept=False)
    layer, _early = hs.accept()
    assert isinstance(layer, StackedLayer) and layer.lower is hs.tls
    conn.receive_data(hs.data_to_send())
    client_layer, _ = conn.result()
    client_layer.send(b"abc")
    assert layer.receive_data(client_layer.data_to_send()) == b"ABC"


def test_reject_closes_tls_and_the_client_says_refused(pki: PKI) -> None:
    conn, hs = connect(pki, service="nosuch")
    pump(conn, hs, accept=False)
    hs.settle()  # the engine's pause timer: take "nosuch" as the name
    assert hs.service == "nosuch"
    hs.reject("no local service 'nosuch'", 404)
    assert hs.finished
    with pytest.raises(PeerClosed, match="refused or unknown"):
        conn.receive_data(hs.data_to_send())


def test_inner_answer_then_close_notify_when_the_inner_handshake_finishes(pki: PKI) -> None:
    """E.g. an HTTP 404 from the WebSocket handshake: the answer, then a clean close."""

    class Refusing(TcpdHandshake):
        def receive_data(self, data: bytes) -> None:
            self._out += b"HTTP/1.1 404 Not Found\r\n\r\n"
            self.finished = True

    hs = TLSHandshake(server_ctx(pki), Refusing())
    client = TLSLayer(client_ctx(pki), server_side=False, server_hostname="localhost")
    client.send(b"GET /nope HTTP/1.1\r\n\r\n")
    got = b""
    with pytest.raises(PeerClosed, match="close_notify"):
        for _ in range(5):
            hs.receive_data(client.data_to_send())
            got += client.receive_data(hs.data_to_send())
    assert got == b"HTTP/1.1 404 Not Found\r\n\r\n"
    assert hs.finished


def test_settle_waits_for_tls(pki: PKI) -> None:
    conn, hs = connect(pki)
    assert hs.settle_after is None  # inside the TLS handshake: no name yet
    hs.settle()  # harmless
    assert hs.service is None
    hs.receive_data(conn.data_to_send())
    conn.receive_data(hs.data_to_send())
    assert hs.settle_after is None
    pump(conn, hs, accept=False)
    assert hs.settle_after == TcpdHandshake.settle_after


def test_wrong_hostname_is_refused_by_the_connector(pki: PKI) -> None:
    conn = TLSConnector(client_ctx(pki), "example.org", TcpdClient("pong"))
    hs = TLSHandshake(server_ctx(pki), TcpdHandshake())
    with pytest.raises(ProtocolError, match="certificate verify failed"):
        pump(conn, hs)
    assert hs.service is None


def test_unknown_ca_is_refused_by_the_connector(pki: PKI) -> None:
    conn, hs = connect(pki, client=client_ctx(pki, ca=pki.other_ca))
    with pytest.raises(ProtocolError, match="certificate verify failed"):
        pump(conn, hs)


def test_mtls_good_client_identity_is_reported(pki: PKI) -> None:
    seen: list[certs.CertIdentity | None] = []
    conn, hs = connect(
        pki,
        server=server_ctx(pki, mtls=True),
        client=client_ctx(pki, cert=pki.alice),
        allow_client=["CN:alice"],
        on_identity=seen.append,
    )
    pump(conn, hs)
    assert conn.done and hs.service == "pong"
    assert len(seen) == 1 and seen[0] is not None
    assert seen[0].cn == "alice"
    assert seen[0].fingerprint == certs.fingerprint(pki.alice[0])
    assert hs.identity == seen[0]
    assert describe_identity(seen[0]).startswith("CN=alice SHA256:")


def test_mtls_allow_by_fingerprint(pki: PKI) -> None:
    fp = certs.fingerprint(pki.alice[0])
    conn, hs = connect(
        pki,
        server=server_ctx(pki, mtls=True),
        client=client_ctx(pki, cert=pki.alice),
        allow_client=[fp],
    )
    pump(conn, hs)
    assert conn.done


def test_mtls_client_not_in_allow_list(pki: PKI) -> None:
    seen: list[certs.CertIdentity | None] = []
    conn, hs = connect(
        pki,
        server=server_ctx(pki, mtls=True),
        client=client_ctx(pki, cert=pki.alice),
        allow_client=["bob"],
        on_identity=seen.append,
    )
    err = server_refusal(conn, hs)
    assert re.search(r"CN=alice SHA256:[0-9A-F:]{95} is not in --allow-client", str(err))
    assert hs.service is None  # the name never reached the inner handshake
    assert seen == []  # only admitted clients are reported


def test_mtls_missing_client_certificate(pki: PKI) -> None:
    conn, hs = connect(pki, server=server_ctx(pki, mtls=True))
    assert "did not return a certificate" in str(server_refusal(conn, hs))


def test_mtls_client_from_another_ca(pki: PKI) -> None:
    conn, hs = connect(
        pki, server=server_ctx(pki, mtls=True), client=client_ctx(pki, cert=pki.mallory)
    )
    assert "certificate verify failed" in str(server_refusal(conn, hs))


def test_allow_client_without_a_certificate_request(pki: PKI) -> None:
    """allow_client on a context that never asks for certificates refuses everyone."""
    conn, hs = connect(pki, allow_client=["alice"])
    assert "no client certificate" in str(server_refusal(conn, hs))


def test_eof_during_tls_handshake(pki: PKI) -> None:
    conn, hs = connect(pki)
    hs.receive_data(conn.data_to_send()[:10])
    with pytest.raises(PeerClosed):
        hs.receive_data(b"")


def test_garbage_instead_of_tls(pki: PKI) -> None:
    _conn, hs = connect(pki)
    with pytest.raises(ProtocolError, match="tls"):
        hs.receive_data(b"pong\n\x00\x00\x00\x05hello")


# -- peer information ------------------------------------------------------------

TCP_INFO = PeerInfo(
    transport="tcp",
    client_address="192.0.2.1",
    client_port=40000,
    local_address="127.0.0.1",
    local_port=9443,
)


def test_describe_without_a_client_certificate(pki: PKI) -> None:
    conn, hs = connect(pki)
    pump(conn, hs)
    info = hs.describe(TCP_INFO)
    assert info.transport == "tls"
    assert info.tls_version == "TLSv1.3"
    assert info.tls_cipher == hs.tls.cipher[0]  # type: ignore[index]
    assert info.tls_sni == "localhost"  # what TLSConnector sent
    assert (info.client_address, info.client_port) == ("192.0.2.1", 40000)
    assert (info.local_address, info.local_port) == ("127.0.0.1", 9443)
    assert info.cert_subject is None and info.cert_sans == () and info.cert_sha256 is None
    assert not info.cert_verified


def test_describe_with_a_verified_client_certificate(pki: PKI) -> None:
    conn, hs = connect(
        pki, server=server_ctx(pki, mtls=True), client=client_ctx(pki, cert=pki.dave)
    )
    pump(conn, hs)
    info = hs.describe(TCP_INFO)
    assert info.transport == "tls"
    assert info.cert_subject == "CN=dave"
    assert info.cert_sans == ("DNS:dave.example", "IP:192.0.2.9")
    assert info.cert_sha256 == certs.fingerprint(pki.dave[0])
    assert info.cert_verified is True


def test_describe_tls_12_and_no_sni_for_an_ip_address(pki: PKI) -> None:
    client = client_ctx(pki)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    conn = TLSConnector(client, "127.0.0.1", TcpdClient("pong"))  # an IP is never sent as SNI
    hs = TLSHandshake(server_ctx(pki), TcpdHandshake(lambda n: n == "pong"))
    pump(conn, hs)
    info = hs.describe(TCP_INFO)
    assert info.tls_version == "TLSv1.2"
    assert info.tls_cipher is not None and info.tls_cipher.startswith("ECDHE-")
    assert info.tls_sni is None


class _WsLike(TcpdHandshake):
    """An inner handshake with its own facts (what the WebSocket upgrade adds)."""

    def __init__(self) -> None:
        super().__init__(lambda n: n == "pong")

    @property
    def client(self) -> tuple[str, int | None] | None:
        return ("198.51.100.7", None)

    def describe(self, info: PeerInfo) -> PeerInfo:
        import dataclasses

        return dataclasses.replace(info, transport="ws", path="/pong")


def test_describe_asks_the_inner_handshake_first_ws_becomes_wss(pki: PKI) -> None:
    conn = TLSConnector(client_ctx(pki), "localhost", TcpdClient("pong"))
    hs = TLSHandshake(server_ctx(pki), _WsLike())
    pump(conn, hs)
    info = hs.describe(TCP_INFO)
    assert info.transport == "wss" and info.path == "/pong"
    assert info.tls_version is not None
    assert hs.client == ("198.51.100.7", None)  # the inner handshake's client, passed through


def test_capabilities_are_declared_by_the_class(pki: PKI) -> None:
    _, hs = connect(pki)
    assert describes_peer(hs) is hs
    assert knows_client(hs) is hs
    assert hs.client is None  # TcpdHandshake names nobody
    assert describes_peer(TcpdHandshake()) is not None
    assert TcpdHandshake().describe(TCP_INFO) is TCP_INFO


# -- the server name, read from the ClientHello ----------------------------------------


def client_hello(pki: PKI, hostname: str = "localhost") -> bytes:
    """The first flight of a real client (one ClientHello record)."""
    return TLSLayer(client_ctx(pki), server_side=False, server_hostname=hostname).data_to_send()


def test_sni_read_from_a_clienthello_split_anywhere(pki: PKI) -> None:
    hello = client_hello(pki, "sni.example")
    for cut in (1, 3, 5, 6, 40, len(hello) - 1):
        layer = TLSLayer(server_ctx(pki), server_side=True)
        layer.receive_data(hello[:cut])
        layer.receive_data(hello[cut:])
        assert layer.server_name == "sni.example", cut


def test_sni_read_from_a_clienthello_fragmented_over_records(pki: PKI) -> None:
    hello = client_hello(pki, "frag.example")
    body = hello[5:]
    records = b"".join(
        hello[:3] + len(piece).to_bytes(2, "big") + piece
        for piece in (body[i : i + 50] for i in range(0, len(body), 50))
    )
    layer = TLSLayer(server_ctx(pki), server_side=True)
    layer.receive_data(records)
    assert layer.server_name == "frag.example"


def test_a_name_that_is_not_printable_ascii_is_not_reported(
    pki: PKI, recwarn: pytest.WarningsRecorder
) -> None:
    """OpenSSL's own callback path would print an 'Exception ignored' traceback
    for such a name (CPython decodes it as ASCII): we never ask it."""
    hello = bytearray(client_hello(pki, "abcdefgh.example"))
    at = hello.find(b"abcdefgh.example")
    hello[at : at + 3] = "é".encode() + b"c"
    layer = TLSLayer(server_ctx(pki), server_side=True)
    with contextlib.suppress(ProtocolError):  # OpenSSL may refuse the name: its business
        layer.receive_data(bytes(hello))
    assert layer.server_name is None
    assert not [w for w in recwarn if "unraisable" in str(w.category).lower()]


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", b"\x16\x03\x01\xff\xff"],
    ids=["http", "not-a-clienthello", "partial-record"],
)
def test_no_name_from_bytes_that_are_not_a_clienthello(pki: PKI, data: bytes) -> None:
    layer = TLSLayer(server_ctx(pki), server_side=True)
    with contextlib.suppress(ProtocolError):
        layer.receive_data(data)
    assert layer.server_name is None
