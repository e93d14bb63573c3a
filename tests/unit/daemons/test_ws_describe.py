"""ipc-websocketd's side of "who is calling", without sockets: the token's
three places and its removal, 401/403 before the service, the subprotocol
the 101 selects, the client behind trusted proxies, the peer information
(``describe``) and tokens kept out of log text."""

from __future__ import annotations

import base64
import logging

import pytest
from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.uri import parse_uri

from daemons.codecs.forwarded import ForwardedHeader
from daemons.codecs.proxied import ProxyFront
from daemons.codecs.wsrequest import (
    Forwarding,
    TokenScrubber,
    peer_address,
    scrub_tokens,
)
from daemons.engine.tokens import TokenAuthority, mint, parse_token_file
from daemons.engine.trust import TrustedNetworks
from daemons.engine.webauth import TokenSource
from daemons.websocketd import WebSocketHandshake, WebSocketOptions, _WebSocketProxyFront
from ipc_core import ProtocolError
from ipc_core.peerinfo import PeerInfo, encode

KEY = base64.b64encode(b"0123456789abcdef").decode()
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"
CAROL = "carol-token-0123456789abcdef"
SECRET = b"s" * 32
TOKENS = f"{ALICE} alice pong,chat-*\n{BOB} bob other\n"
SOCKET_INFO = PeerInfo(
    transport="tcp",
    client_address="127.0.0.1",
    client_port=40000,
    local_address="127.0.0.1",
    local_port=8080,
)


def request(target: str = "/pong", headers: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
    ).encode()


def tokens(now: float = 1_000_000.0) -> TokenSource:
    authority = TokenAuthority(parse_token_file(TOKENS), SECRET)
    return TokenSource(authority, None, None, now=lambda: now)


def handshake(
    *, with_tokens: bool = True, peer: str = "127.0.0.1:40000", **options: object
) -> WebSocketHandshake:
    return WebSocketHandshake(
        peer, WebSocketOptions(tokens=tokens() if with_tokens else None, **options)
    )


def refused(hs: WebSocketHandshake, raw: bytes) -> tuple[int, str]:
    with pytest.raises(ProtocolError) as caught:
        hs.receive_data(raw)
    head = hs.data_to_send().split(b"\r\n", 1)[0].decode()
    return int(head.split()[1]), str(caught.value)


# -- where the token goes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (f"/pong?token={ALICE}", ""),
        ("/pong", f"Cookie: ipc_token={ALICE}\r\n"),
        ("/pong", f"Sec-WebSocket-Protocol: ipc.token.{ALICE}\r\n"),
    ],
    ids=["query", "cookie", "subprotocol"],
)
def test_a_token_in_any_of_its_three_places_lets_the_client_in(target: str, headers: str) -> None:
    hs = handshake()
    hs.receive_data(request(target, headers))
    assert hs.service == "pong" and hs.token_name == "alice"
    info = hs.describe(SOCKET_INFO)
    assert info.token_name == "alice"
    assert ALICE not in encode(info).decode()


def test_no_bad_or_expired_token_is_401_and_another_service_403() -> None:
    assert refused(handshake(), request())[0] == 401
    status, reason = refused(handshake(), request("/pong?token=nobodys-token-000000000"))
    assert status == 401 and "unknown token" in reason
    expired = mint(SECRET, "carol", ["pong"], now=1_000_000.0 - 3600, ttl=60)
    status, reason = refused(handshake(), request(f"/pong?token={expired}"))
    assert status == 401 and "expired" in reason and expired not in reason
    status, reason = refused(handshake(), request(f"/pong?token={BOB}"))
    assert status == 403 and "'bob'" in reason and "not for service 'pong'" in reason
    assert BOB not in reason
    # A pattern in the file: chat-* covers chat-room; signed tokens work too.
    hs = handshake()
    hs.receive_data(request(f"/chat-room?token={ALICE}"))
    assert hs.service == "chat-room"
    signed = mint(SECRET, "dave", ["pong"], now=1_000_000.0, ttl=60)
    hs = handshake()
    hs.receive_data(request("/pong", f"Cookie: a=1; ipc_token={signed}; b=2\r\n"))
    assert hs.token_name == "dave"
    assert hs.describe(SOCKET_INFO).cookie == "a=1; b=2"


def test_two_different_tokens_are_refused() -> None:
    raw = request(f"/pong?token={ALICE}", f"Sec-WebSocket-Protocol: ipc.token.{BOB}\r\n")
    status, reason = refused(handshake(), raw)
    assert status == 401 and "two different tokens" in reason


def test_bad_paths_are_404_before_the_token_and_static_files_stay_public() -> None:
    assert refused(handshake(), request("/a/b"))[0] == 404
    hs = handshake()
    hs.receive_data(
        b"GET /pong?token=x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
    )  # plain HTTP: no probing of which services run (no 426 with tokens)
    assert hs.finished and hs.data_to_send().startswith(b"HTTP/1.1 404 ")


def test_without_tokens_configured_a_token_is_still_removed() -> None:
    hs = handshake(with_tokens=False)
    hs.receive_data(request(f"/pong?a=1&token={ALICE}&b=2"))
    info = hs.describe(SOCKET_INFO)
    assert info.query == (("a", "1"), ("b", "2")) and info.token_name is None


# -- the subprotocol the 101 selects ---------------------------------------------------------


def answer(hs: WebSocketHandshake) -> Response:
    hs.accept()
    client = ClientProtocol(parse_uri("ws://127.0.0.1:8080/pong"))
    client.receive_data(hs.data_to_send())
    [response] = client.events_received()
    assert isinstance(response, Response) and response.status_code == 101
    return response


def test_a_token_subprotocol_is_selected_unless_another_was_offered() -> None:
    hs = handshake()
    hs.receive_data(request("/pong", f"Sec-WebSocket-Protocol: ipc.token.{ALICE}\r\n"))
    response = answer(hs)
    assert response.headers["Sec-WebSocket-Protocol"] == f"ipc.token.{ALICE}"
    assert hs.describe(SOCKET_INFO).subprotocol is None  # never the token entry
    hs = handshake()
    hs.receive_data(request("/pong", f"Sec-WebSocket-Protocol: chat.v2, ipc.token.{ALICE}\r\n"))
    assert answer(hs).headers["Sec-WebSocket-Protocol"] == "chat.v2"
    assert hs.describe(SOCKET_INFO).subprotocol == "chat.v2"
    hs = handshake()  # a token elsewhere: no subprotocol, as before
    hs.receive_data(request(f"/pong?token={ALICE}"))
    assert "Sec-WebSocket-Protocol" not in answer(hs).headers


# -- peer information ----------------------------------------------------------------------


def test_describe_gives_the_request_facts_without_the_token() -> None:
    hs = handshake()
    hs.receive_data(
        request(
            f"/pong?room=a%20b&token={ALICE}&x=%E2%9C%93&empty=&bad=%00",
            "Origin: http://127.0.0.1:8080\r\nUser-Agent: test/1 café\r\n"  # UTF-8 bytes
            f"Cookie: theme=dark; ipc_token={ALICE}\r\nCookie: lang=fr\r\n"
            "Authorization: Bearer abc\r\n",
        )
    )
    info = hs.describe(SOCKET_INFO)
    assert info.transport == "ws"
    assert info.path == "/pong"
    assert info.query == (("room", "a b"), ("x", "\u2713"), ("empty", ""), ("bad", "\ufffd"))
    assert info.query_value("room") == "a b"
    assert info.origin == "http://127.0.0.1:8080"
    assert info.user_agent == "test/1 café"
    assert info.cookie == "theme=dark; lang=fr"
    assert info.authorization == "Bearer abc"
    assert info.token_name == "alice"
    # The socket's facts are kept; no forwarding: no via.
    assert (info.client_address, info.client_port, info.local_port) == ("127.0.0.1", 40000, 8080)
    assert info.via is None and info.proxy_address is None
    assert ALICE not in encode(info).decode()


def test_the_client_is_believed_only_from_a_trusted_proxy() -> None:
    xff = "X-Forwarded-For: 203.0.113.9, 10.0.0.2\r\n"
    trusted = TrustedNetworks.parse(["127.0.0.1/32", "10.0.0.0/8"])
    hs = handshake(with_tokens=False, trust_proxy=trusted)
    hs.receive_data(request("/pong", xff))
    assert hs.client == ("203.0.113.9", None)  # rightmost untrusted
    assert hs.peer == "203.0.113.9 (via 127.0.0.1:40000)"
    info = hs.describe(SOCKET_INFO)
    assert (info.client_address, info.client_port) == ("203.0.113.9", None)
    assert (info.via, info.proxy_address) == ("x-forwarded-for", "127.0.0.1")
    # Another peer: the header means nothing.
    hs = handshake(with_tokens=False, trust_proxy=trusted, peer="192.0.2.1:5")
    hs.receive_data(request("/pong", xff))
    assert hs.client is None and hs.peer == "192.0.2.1:5"
    assert hs.describe(SOCKET_INFO).via is None
    # Forwarded mode reads Forwarded (with a port) and ignores X-Forwarded-For.
    forwarding = Forwarding(trusted, ForwardedHeader.FORWARDED)
    hs = handshake(with_tokens=False, trust_proxy=forwarding)
    hs.receive_data(request("/pong", xff + 'Forwarded: for="[2001:db8::7]:4711"\r\n'))
    assert hs.client == ("2001:db8::7", 4711)
    assert hs.peer == "[2001:db8::7]:4711 (via 127.0.0.1:40000)"
    assert hs.describe(SOCKET_INFO).via == "forwarded"


def test_a_withheld_client_counts_under_the_proxy_that_reported_it() -> None:
    trusted = TrustedNetworks.parse(["127.0.0.1"])
    hs = handshake(with_tokens=False, trust_proxy=trusted)
    hs.receive_data(request("/pong", "X-Forwarded-For: unknown\r\n"))
    assert hs.client == ("127.0.0.1", None)
    assert hs.describe(SOCKET_INFO).client_address == "unknown"


def test_peer_address_reads_the_engine_peer_names() -> None:
    assert peer_address("192.0.2.7:51212") == ("192.0.2.7", 51212)
    assert peer_address("[2001:db8::1]:443") == ("2001:db8::1", 443)
    assert peer_address("unix-peer") == "unix-peer"
    assert peer_address("/run/x.sock") == "/run/x.sock"
    assert peer_address("2001:db8::1:443") == "2001:db8::1:443"  # not how IPv6 is named


# -- tokens out of log text ------------------------------------------------------------------


def test_scrub_tokens_in_its_three_places() -> None:
    text = (
        f"< GET /pong?a=1&token={ALICE}&%74oken={BOB}&t%6Fken={CAROL} HTTP/1.1"
        f" | Cookie: x=1; ipc_token={ALICE}"
        f" | > Sec-WebSocket-Protocol: ipc.token.{ALICE}, chat | Referer: http://h/?token={BOB}"
    )
    clean = scrub_tokens(text)
    assert ALICE not in clean and BOB not in clean and CAROL not in clean
    assert "a=1" in clean and "x=1" in clean and "chat" in clean
    assert scrub_tokens("nothing here") == "nothing here"


def test_the_frame_log_filter_removes_tokens(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.ws.scrubbed")
    logger.addFilter(TokenScrubber())
    with caplog.at_level(logging.DEBUG, logger="test.ws.scrubbed"):
        logger.debug("< %s %s", "GET", f"/pong?token={ALICE}")
        try:
            raise ValueError(f"bad request line: GET /?token={ALICE} HTTP/1.0")
        except ValueError:
            logger.debug("! invalid", exc_info=True)
    assert ALICE not in caplog.text
    assert "/pong?token=(token removed)" in caplog.text


def test_a_bad_request_line_quoting_the_token_is_logged_without_it() -> None:
    hs = handshake()
    with pytest.raises(ProtocolError) as caught:
        hs.receive_data(f"GET /pong?token={ALICE} HTTP/2.0\r\nHost: x\r\n\r\n".encode())
    assert ALICE not in str(caught.value)


# -- behind a PROXY protocol balancer -----------------------------------------------------


def test_behind_a_proxy_header_the_request_decides_who_the_client_is() -> None:
    front = _WebSocketProxyFront(ProxyFront.from_networks(TrustedNetworks.parse(["127.0.0.1"])))
    options = WebSocketOptions(trust_proxy=TrustedNetworks.parse(["10.0.0.0/8"]))
    for source, client in [
        ("10.9.9.9", ("198.51.100.4", None)),
        ("192.0.2.3", ("192.0.2.3", 5555)),
    ]:
        hs = WebSocketHandshake("127.0.0.1:4000", options)
        wrapped = front.wrap(("127.0.0.1", 4000), hs)
        wrapped.receive_data(f"PROXY TCP4 {source} 127.0.0.1 5555 8080\r\n".encode())
        # The header alone does not settle it: an HTTP proxy may name another client.
        assert wrapped.client is None  # type: ignore[attr-defined]
        assert hs.peer == f"{source}:5555 (via 127.0.0.1:4000)"
        wrapped.receive_data(request("/pong", "X-Forwarded-For: 198.51.100.4\r\n"))
        assert hs.service == "pong"
        assert wrapped.client == client  # type: ignore[attr-defined]
        info = wrapped.describe(SOCKET_INFO)  # type: ignore[attr-defined]
        assert info.client_address == client[0]
