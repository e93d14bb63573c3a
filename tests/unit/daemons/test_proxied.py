"""ProxiedHandshake and ProxyFront: the PROXY header gate in front of a real
daemon handshake (TCPd, TLS then TCPd), bytes in, results out, no sockets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from daemons.codecs.proxied import (
    ProxiedHandshake,
    ProxyFront,
    describe_sources,
    use_proxy_protocol,
)
from daemons.codecs.proxy import (
    V2_SIGNATURE,
    Endpoint,
    ProxyGate,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
)
from daemons.codecs.tcp import TcpdClient, TcpdHandshake
from daemons.codecs.tlswrap import TLSConnector, TLSHandshake
from daemons.engine import certs
from daemons.engine.handshake import describes_peer, knows_client, settles
from daemons.engine.tlsconfig import client_context, server_context
from daemons.engine.trust import TrustedNetworks
from ipc_core import Layer
from ipc_core.errors import PeerClosed, ProtocolError, UsageError
from ipc_core.framing import encode
from ipc_core.peerinfo import PeerInfo

PROXY = ("127.0.0.1", 51000)  # the socket's peer: HAProxy
CLIENT = Endpoint("203.0.113.5", 40123)
FRONTEND = Endpoint("192.0.2.10", 9000)
V1 = encode_v1(CLIENT, FRONTEND)
V2 = encode_v2(CLIENT, FRONTEND)
SOCKET_INFO = PeerInfo(
    transport="tcp",
    client_address="127.0.0.1",
    client_port=51000,
    local_address="127.0.0.1",
    local_port=9000,
)


def tcpd(exists: tuple[str, ...] = ("pong",)) -> TcpdHandshake:
    return TcpdHandshake(lambda name: name in exists)


def proxied(trusted: bool = True, inner: object | None = None) -> ProxiedHandshake:
    return ProxiedHandshake(ProxyGate(trusted), inner or tcpd(), PROXY)  # type: ignore[arg-type]


# -- the header, then the inner handshake -------------------------------------------


@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
def test_header_and_name_and_first_message_in_one_read(header: bytes) -> None:
    hs = proxied()
    hs.receive_data(header + b"pong" + encode(b"first"))
    assert hs.service == "pong"
    assert hs.client == ("203.0.113.5", 40123)
    assert hs.header is not None and hs.header.version == (1 if header == V1 else 2)
    layer, early = hs.accept()
    assert layer is None and early == encode(b"first")
    assert hs.data_to_send() == b"ok"


@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
def test_header_split_across_reads_byte_by_byte(header: bytes) -> None:
    hs = proxied()
    for i in range(len(header)):
        assert hs.client is None
        assert hs.settle_after is None  # a pause inside the header is not a name's end
        hs.receive_data(header[i : i + 1])
    assert hs.through and hs.client == ("203.0.113.5", 40123)
    assert hs.service is None
    hs.receive_data(b"po")
    hs.receive_data(b"ng\n")
    assert hs.service == "pong"


def test_header_split_in_the_middle_with_the_name_behind_it() -> None:
    hs = proxied()
    hs.receive_data(V2[:7])
    hs.receive_data(V2[7:20])
    hs.receive_data(V2[20:] + b"pong\n")
    assert hs.service == "pong" and hs.client == ("203.0.113.5", 40123)


def test_ipv6_client() -> None:
    hs = proxied()
    hs.receive_data(encode_v2(Endpoint("2001:db8::7", 5), Endpoint("2001:db8::1", 9000)) + b"pong")
    assert hs.client == ("2001:db8::7", 5)


@pytest.mark.parametrize(
    "header",
    [encode_v2(None, None, local=True), b"PROXY UNKNOWN\r\n", encode_v1(None, None)],
    ids=["v2-local", "v1-unknown", "v1-unknown-encoded"],
)
def test_local_and_unknown_headers_keep_the_socket_peer(header: bytes) -> None:
    hs = proxied()
    hs.receive_data(header + b"pong\n")
    assert hs.service == "pong"
    assert hs.client is None
    assert hs.describe(SOCKET_INFO) == SOCKET_INFO


# -- refusals ------------------------------------------------------------------


@pytest.mark.parametrize("header", [V1, V2, V1[:6], V2[:12]], ids=["v1", "v2", "v1sig", "v2sig"])
def test_a_header_from_an_unlisted_peer_is_refused(header: bytes) -> None:
    hs = proxied(trusted=False)
    with pytest.raises(ProxyProtocolError, match="not listed in --proxy-protocol") as err:
        hs.receive_data(header + b"pong")
    assert "forging" in str(err.value)
    assert hs.client is None and hs.service is None


def test_a_header_split_so_each_piece_is_ambiguous_is_still_refused() -> None:
    hs = proxied(trusted=False)
    hs.receive_data(b"PRO")
    hs.receive_data(b"XY")
    with pytest.raises(ProxyProtocolError, match="not listed"):
        hs.receive_data(b" TCP4 10.0.0.1 10.0.0.2 1 2\r\npong")


def test_an_unlisted_peer_without_a_header_is_served_unchanged() -> None:
    hs = proxied(trusted=False)
    hs.receive_data(b"pong" + encode(b"x"))
    assert hs.service == "pong" and hs.client is None
    assert hs.accept() == (None, encode(b"x"))
    assert hs.describe(SOCKET_INFO) == SOCKET_INFO


@pytest.mark.parametrize("first", [b"pong", b"pong\n", b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1"])
def test_a_listed_source_without_a_header_is_refused(first: bytes) -> None:
    hs = proxied()
    with pytest.raises(ProxyProtocolError, match="no PROXY protocol header") as err:
        hs.receive_data(first)
    assert "must send one" in str(err.value)
    assert hs.service is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "lone CR or LF"),
        (b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", "address '1.2.3.400'"),
        (b"PROXY TCP4 " + b"1" * 120, "without CRLF"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12, "version 3"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "limit is"),
    ],
    ids=["lone-lf", "bad-ip", "too-long", "v2-version", "v2-oversize"],
)
def test_malformed_headers_are_refused(data: bytes, reason: str) -> None:
    hs = proxied()
    with pytest.raises(ProxyProtocolError, match=reason):
        hs.receive_data(data)
    assert isinstance(ProxyProtocolError(reason), ProtocolError)  # what the engine logs


def test_eof_inside_the_header_and_after_it() -> None:
    hs = proxied()
    hs.receive_data(V2[:10])
    with pytest.raises(PeerClosed, match="after 10 bytes of the PROXY"):
        hs.receive_data(b"")
    hs = proxied()
    hs.receive_data(V2)
    with pytest.raises(PeerClosed, match="EOF before a service name"):
        hs.receive_data(b"")  # now the inner handshake's EOF


def test_a_refusal_before_the_header_is_through_sends_nothing() -> None:
    hs = proxied()
    hs.receive_data(V1[:10])
    hs.reject("handshake not finished", 408)
    assert hs.data_to_send() == b"" and not hs.finished
    hs = proxied()
    hs.receive_data(V1 + b"nope\n")
    hs.reject("no local service 'nope'", 404)
    assert hs.finished  # the inner handshake refused


# -- the pause rule (Settles) -----------------------------------------------------------


def test_settle_passes_through_once_the_header_is_read() -> None:
    hs = proxied()
    hs.receive_data(V2)
    hs.receive_data(b"echo")  # no terminator, no such service: the pause ends the name
    assert hs.service is None
    assert hs.settle_after == TcpdHandshake.settle_after
    hs.settle()
    assert hs.service == "echo"


def test_settle_inside_the_header_does_nothing() -> None:
    hs = proxied()
    hs.receive_data(V1[:8])
    assert hs.settle_after is None
    hs.settle()
    hs.receive_data(V1[8:] + b"pong")
    assert hs.service == "pong"


def test_an_unlisted_peer_pausing_on_a_header_prefix_is_a_name() -> None:
    """``PROX`` might begin a header: held; but no more bytes means no header."""
    hs = proxied(trusted=False)
    hs.receive_data(b"PROX")
    assert hs.service is None and not hs.through
    assert hs.settle_after == TcpdHandshake.settle_after
    hs.settle()
    assert hs.through and hs.service == "PROX"


def test_an_unlisted_peer_with_a_known_name_that_begins_like_a_header() -> None:
    hs = proxied(trusted=False, inner=tcpd(("PRO",)))
    hs.receive_data(b"PRO")
    assert hs.service is None  # still held by the gate
    hs.settle()
    assert hs.service == "PRO"


class _Plain:
    """A handshake with no pause rule and no facts (the Handshake protocol only)."""

    service: str | None = None
    finished = False

    def receive_data(self, data: bytes) -> None:
        if data:
            self.service = data.decode()

    def data_to_send(self) -> bytes:
        return b""

    def accept(self) -> tuple[Layer | None, bytes]:
        return None, b""

    def reject(self, reason: str, status: int) -> None:
        self.finished = True


def test_an_inner_handshake_without_a_pause_rule_never_settles() -> None:
    hs = proxied(inner=_Plain())
    hs.receive_data(V1 + b"svc")
    assert hs.service == "svc"
    assert hs.settle_after is None
    hs.settle()  # harmless
    assert hs.describe(SOCKET_INFO).client_address == "203.0.113.5"


def test_capabilities_are_always_there() -> None:
    """Decided once per class: the wrapper has every member, whatever it wraps."""
    for inner in (tcpd(), _Plain()):
        hs = proxied(inner=inner)
        assert settles(hs) is hs
        assert knows_client(hs) is hs
        assert describes_peer(hs) is hs


# -- peer information -----------------------------------------------------------


def test_describe_puts_in_the_header_addresses_and_the_proxy() -> None:
    hs = proxied()
    hs.receive_data(V2 + b"pong")
    info = hs.describe(SOCKET_INFO)
    assert info == dataclasses.replace(
        SOCKET_INFO,
        client_address="203.0.113.5",
        client_port=40123,
        local_address="192.0.2.10",
        local_port=9000,
        via="proxy-protocol",
        proxy_address="127.0.0.1",
    )


def test_describe_an_ipv4_mapped_proxy_is_named_as_ipv4() -> None:
    hs = ProxiedHandshake(ProxyGate(True), tcpd(), ("::ffff:10.1.2.3", 5000, 0, 0))
    hs.receive_data(V1 + b"pong")
    assert hs.describe(SOCKET_INFO).proxy_address == "10.1.2.3"


class _Forwarding(TcpdHandshake):
    """An inner handshake that learns the client itself (a trusted
    X-Forwarded-For behind the proxy) and adds its own facts."""

    @property
    def client(self) -> tuple[str, int | None] | None:
        return ("198.51.100.9", None)

    def describe(self, info: PeerInfo) -> PeerInfo:
        return dataclasses.replace(info, client_address="198.51.100.9", client_port=None)


def test_the_inner_handshake_has_the_last_word() -> None:
    hs = proxied(inner=_Forwarding(lambda n: n == "pong"))
    hs.receive_data(V1 + b"pong")
    assert hs.client == ("198.51.100.9", None)
    info = hs.describe(SOCKET_INFO)
    assert info.client_address == "198.51.100.9" and info.client_port is None
    assert info.via == "proxy-protocol" and info.local_address == "192.0.2.10"


# -- PROXY below TLS (ipc-tlsd behind HAProxy in TCP mode) ---------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = certs.make_ca("Test CA")
    certs.write_cert(d / "ca.pem", ca)
    pairs = {
        "server": certs.make_cert(ca, ca_key, "localhost", ["localhost"]),
        "carol": certs.make_cert(ca, ca_key, "carol", ["carol.example"], usage="client"),
    }
    for stem, (cert, key) in pairs.items():
        certs.write_cert(d / f"{stem}.pem", cert)
        certs.write_key(d / f"{stem}.key", key)
    return {"dir": d}


def test_proxy_header_then_tls_then_the_name(tls_files: dict[str, Path]) -> None:
    d = tls_files["dir"]
    server = server_context(d / "server.pem", d / "server.key", d / "ca.pem")
    client = client_context(ca=d / "ca.pem", cert=d / "carol.pem", key=d / "carol.key")
    conn = TLSConnector(client, "localhost", TcpdClient("pong"))
    tls = TLSHandshake(server, tcpd())
    hs = proxied(inner=tls)
    first = True
    for _ in range(20):
        out = conn.data_to_send()
        if out:
            # HAProxy writes the header, then passes the TLS stream through.
            hs.receive_data(V2 + out if first else out)
            first = False
        if hs.service is not None:
            break
        back = hs.data_to_send()
        if back:
            conn.receive_data(back)
    assert hs.service == "pong"
    assert hs.client == ("203.0.113.5", 40123)
    # TLS logs the client certificate before the engine logs anything: it was told.
    assert tls.named_client == ("203.0.113.5", 40123)
    info = hs.describe(SOCKET_INFO)
    assert info.transport == "tls" and info.via == "proxy-protocol"
    assert info.client_address == "203.0.113.5" and info.proxy_address == "127.0.0.1"
    assert info.tls_sni == "localhost" and info.tls_version is not None
    assert info.cert_subject == "CN=carol" and info.cert_sans == ("DNS:carol.example",)
    assert info.cert_verified
    layer, _early = hs.accept()
    assert layer is not None


def test_tls_from_a_listed_source_without_a_header_is_refused(tls_files: dict[str, Path]) -> None:
    d = tls_files["dir"]
    client = client_context(ca=d / "ca.pem")
    conn = TLSConnector(client, "localhost", TcpdClient("pong"))
    server = server_context(d / "server.pem", d / "server.key")
    hs = proxied(inner=TLSHandshake(server, tcpd()))
    with pytest.raises(ProxyProtocolError, match=r"no PROXY protocol header.*\\x16\\x03"):
        hs.receive_data(conn.data_to_send())


# -- ProxyFront -------------------------------------------------------------------


def test_front_wraps_by_the_socket_peer() -> None:
    front = ProxyFront.from_cidrs(["127.0.0.0/8", "unix"])
    listed = front.wrap(("127.0.0.1", 5000), tcpd())
    assert isinstance(listed, ProxiedHandshake) and listed.gate.trusted
    other = front.wrap(("192.0.2.7", 5000), tcpd())
    assert isinstance(other, ProxiedHandshake) and not other.gate.trusted
    unix = front.wrap("", tcpd())  # accept() on a Unix socket
    assert isinstance(unix, ProxiedHandshake) and unix.gate.trusted
    mapped = front.wrap(("::ffff:127.0.0.2", 5000, 0, 0), tcpd())
    assert isinstance(mapped, ProxiedHandshake) and mapped.gate.trusted


def test_front_describes_its_sources_for_the_log() -> None:
    assert "from 127.0.0.1/32 (" in ProxyFront.from_cidrs(["127.0.0.1"]).summary()
    both = TrustedNetworks.parse(["10.0.0.0/8", "::1", "unix"])
    assert describe_sources(both) == "10.0.0.0/8, ::1/128 and Unix-socket peers"
    assert describe_sources(TrustedNetworks()) == "nobody"


def test_a_gate_that_let_bytes_through_cannot_release_them() -> None:
    gate = ProxyGate(False)
    gate.feed(b"pong")
    with pytest.raises(UsageError):
        gate.release()
    with pytest.raises(UsageError):
        ProxyGate(True).release()


class _Daemon:
    """The members use_proxy_protocol sets (Daemon's)."""

    def __init__(self, trusted: TrustedNetworks | None = None) -> None:
        self.name = "ipc-test"
        self.front: object = None
        self.trusted_proxies = trusted


def test_use_proxy_protocol_installs_the_front_and_adds_the_sources(caplog) -> None:
    daemon = _Daemon(TrustedNetworks.parse(["10.0.0.0/8"]))  # --trust-proxy's, say
    with caplog.at_level("INFO", logger="ipc.daemon.proxy"):
        front = use_proxy_protocol(daemon, TrustedNetworks.parse(["127.0.0.1"]))  # type: ignore[arg-type]
    assert isinstance(front, ProxyFront) and daemon.front is front
    assert daemon.trusted_proxies is not None
    assert [str(n) for n in daemon.trusted_proxies.networks] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert "ipc-test: PROXY protocol header required from 127.0.0.1/32" in caplog.text
    untouched = _Daemon()
    assert use_proxy_protocol(untouched, TrustedNetworks()) is None  # type: ignore[arg-type]
    assert untouched.front is None and untouched.trusted_proxies is None
