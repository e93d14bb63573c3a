"""The Sans-I/O HTTP layer of ipc-httpd (daemons/codecs/http.py), driven by
hand: requests in, LibIPC frames up, replies in, HTTP answers out. The
answers are parsed back with h11's client side."""

from __future__ import annotations

import h11
import pytest

from daemons.codecs.http import HttpConnection, HttpHandshake, HttpOptions, Phase
from daemons.codecs.wsrequest import HostPolicy
from ipc_core import PeerClosed, ProtocolError, encode
from ipc_core.peerinfo import PeerInfo


def post(body: bytes, path: str = "/pong", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def answers(data: bytes, methods: list[bytes] | None = None) -> list[tuple[int, dict, bytes]]:
    """Parse the responses in ``data`` (one per request method given)."""
    client = h11.Connection(h11.CLIENT)
    out = []
    client.receive_data(data)
    for method in methods or [b"POST"] * 16:
        client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                return out
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.append((status, headers, body))
                break
            elif isinstance(event, h11.InformationalResponse):
                continue
        if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
            return out
        client.start_next_cycle()
    return out


def opened(data: bytes, options: HttpOptions | None = None, **kw) -> tuple[HttpConnection, bytes]:
    """A connection whose first request named its service and was accepted."""
    conn = HttpConnection(options or HttpOptions(), **kw)
    hs = HttpHandshake(conn)
    hs.receive_data(data)
    assert hs.service == "pong" and not hs.finished
    layer, early = hs.accept()
    assert layer is conn and conn.phase is Phase.OPEN
    return conn, early


def test_post_body_is_one_message_and_the_reply_the_answer() -> None:
    conn, early = opened(post(b"hello"))
    assert early == encode(b"hello")
    assert conn.waiting_since is not None
    conn.send(encode(b"HELLO"))
    [(status, headers, body)] = answers(conn.data_to_send())
    assert (status, body) == (200, b"HELLO")
    assert headers["content-type"] == "application/octet-stream"
    assert conn.waiting_since is None


def test_body_split_across_reads_and_keepalive() -> None:
    data = post(b"abcdef")
    conn, early = opened(data[:-4])
    assert early == b""
    assert conn.receive_data(data[-4:]) == encode(b"abcdef")
    conn.send(encode(b"1"))
    assert conn.receive_data(post(b"again")) == encode(b"again")  # same connection
    assert answers(conn.data_to_send())[0][2] == b"1"


def test_pipelined_requests_wait_for_the_previous_answer() -> None:
    ready: list[int] = []
    conn, early = opened(post(b"one") + post(b"two") + post(b"three"))
    conn.on_ready = lambda: ready.append(1)
    assert early == encode(b"one")  # only the first goes up
    conn.send(encode(b"1"))
    assert ready and conn.take_up() == encode(b"two")
    conn.send(encode(b"2"))
    assert conn.take_up() == encode(b"three")
    conn.send(encode(b"3"))
    assert [a[2] for a in answers(conn.data_to_send())] == [b"1", b"2", b"3"]


def test_pipelining_is_bounded() -> None:
    conn, _ = opened(post(b"x"), HttpOptions(max_pipelined=1000, max_header_size=1000))
    conn.receive_data(post(b"y" * 1500))
    with pytest.raises(ProtocolError, match="ahead"):
        conn.receive_data(b"z" * 1000)


def test_content_length_over_the_limit_is_413_before_the_body() -> None:
    conn = HttpConnection(HttpOptions(max_message_size=10))
    hs = HttpHandshake(conn)
    with pytest.raises(ProtocolError, match="413"):
        hs.receive_data(b"POST /pong HTTP/1.1\r\nHost: localhost\r\nContent-Length: 11\r\n\r\n")
    [(status, headers, _)] = answers(hs.data_to_send())
    assert status == 413 and headers["connection"] == "close"


def test_chunked_body_over_the_limit_is_413() -> None:
    head = b"POST /pong HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    conn, _ = opened(head, HttpOptions(max_message_size=10))
    assert conn.receive_data(b"5\r\nabcde\r\n") == b""
    with pytest.raises(ProtocolError, match="413"):
        conn.receive_data(b"6\r\nfghijk\r\n")
    assert answers(conn.data_to_send())[0][0] == 413


def test_chunked_body_within_the_limit() -> None:
    head = b"POST /pong HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    conn, _ = opened(head + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    # the body arrived with the head: accept() already sent it up
    assert conn.waiting_since is not None


def test_service_closing_without_a_reply_is_502() -> None:
    conn, _ = opened(post(b"x"))
    conn.close()
    [(status, headers, _)] = answers(conn.data_to_send())
    assert status == 502 and headers["connection"] == "close"


def test_idle_connection_closing_says_nothing() -> None:
    conn, _ = opened(post(b"x"))
    conn.send(encode(b"y"))
    conn.data_to_send()
    conn.close()
    assert conn.data_to_send() == b""


def test_late_reply_is_504_and_closes() -> None:
    conn, _ = opened(post(b"x"))
    conn.expire()
    [(status, headers, _)] = answers(conn.data_to_send())
    assert status == 504 and headers["connection"] == "close"
    assert conn.must_close
    conn.send(encode(b"late"))  # dropped: nothing waits for it
    assert conn.data_to_send() == b""


def test_message_nobody_waits_for_is_dropped() -> None:
    conn, _ = opened(post(b"x"))
    conn.send(encode(b"a") + encode(b"b"))
    assert [a[2] for a in answers(conn.data_to_send())] == [b"a"]


def test_health_check_answers_once_connected_and_keeps_alive() -> None:
    conn, early = opened(b"GET /pong HTTP/1.1\r\nHost: localhost\r\n\r\n" + post(b"after"))
    assert early == encode(b"after")
    conn.send(encode(b"A"))
    got = answers(conn.data_to_send(), [b"GET", b"POST"])
    assert [(s, b) for s, _h, b in got] == [(200, b""), (200, b"A")]


def test_head_has_no_body() -> None:
    conn, _ = opened(b"HEAD /pong HTTP/1.1\r\nHost: localhost\r\n\r\n")
    [(status, _h, body)] = answers(conn.data_to_send(), [b"HEAD"])
    assert (status, body) == (200, b"")


def test_other_methods_405_first_closes_later_keeps_alive() -> None:
    conn = HttpConnection(HttpOptions())
    hs = HttpHandshake(conn)
    hs.receive_data(b"DELETE /pong HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert hs.finished and hs.service is None
    [(status, headers, _)] = answers(hs.data_to_send(), [b"DELETE"])
    assert status == 405 and headers["allow"] == "POST, GET, HEAD, OPTIONS"
    conn, _ = opened(post(b"x"))
    conn.send(encode(b"y"))
    put = b"PUT /pong HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabc"
    assert conn.receive_data(put + post(b"z")) == encode(b"z")
    assert not conn.must_close


def test_another_service_on_the_connection_is_421_and_closes() -> None:
    conn, _ = opened(post(b"x"))
    conn.send(encode(b"y"))
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="421"):
        conn.receive_data(post(b"x", "/other"))
    assert answers(conn.data_to_send())[0][0] == 421


@pytest.mark.parametrize("path", ["/", "/a/b", "/..", "/%ff"])
def test_bad_paths_are_404(path: str) -> None:
    hs = HttpHandshake(HttpConnection(HttpOptions()))
    with pytest.raises(ProtocolError, match="404"):
        hs.receive_data(post(b"x", path))
    assert answers(hs.data_to_send())[0][0] == 404


def test_engine_refusal_answers_the_status() -> None:
    hs = HttpHandshake(HttpConnection(HttpOptions()))
    hs.receive_data(post(b"x"))
    hs.reject("no such service", 404)
    [(status, headers, body)] = answers(hs.data_to_send())
    assert (status, body) == (404, b"Unknown service.\n")
    assert headers["connection"] == "close"


def test_handshake_timeout_before_any_request_answers_408() -> None:
    hs = HttpHandshake(HttpConnection(HttpOptions()))
    hs.receive_data(b"POST /po")
    hs.reject("timeout", 408)
    assert hs.data_to_send().startswith(b"HTTP/1.1 408 ")


def test_garbage_is_400() -> None:
    hs = HttpHandshake(HttpConnection(HttpOptions()))
    with pytest.raises(ProtocolError, match="400"):
        hs.receive_data(b"NOT HTTP AT ALL\r\n\r\n")
    assert hs.data_to_send().startswith(b"HTTP/1.1 400 ")


def test_head_over_the_header_limit_is_431() -> None:
    hs = HttpHandshake(HttpConnection(HttpOptions(max_header_size=1024)))
    with pytest.raises(ProtocolError, match="431"):
        hs.receive_data(b"POST /pong HTTP/1.1\r\nX-Big: " + b"a" * 2000)
    assert hs.data_to_send().startswith(b"HTTP/1.1 431 ")


def test_eof_is_peer_closed() -> None:
    conn, _ = opened(post(b"x"))
    with pytest.raises(PeerClosed):
        conn.receive_data(b"")
    with pytest.raises(PeerClosed):
        HttpHandshake(HttpConnection(HttpOptions())).receive_data(b"")


def test_connection_close_from_the_client_closes_after_the_answer() -> None:
    ready: list[int] = []
    conn, _ = opened(post(b"x", extra="Connection: close\r\n"))
    conn.on_ready = lambda: ready.append(1)
    conn.send(encode(b"y"))
    assert conn.must_close and ready
    assert answers(conn.data_to_send())[0][1]["connection"] == "close"


def test_http10_closes_after_the_answer() -> None:
    conn, _ = opened(b"POST /pong HTTP/1.0\r\nContent-Length: 1\r\n\r\nx")
    conn.send(encode(b"y"))
    assert conn.must_close
    assert conn.data_to_send().startswith(b"HTTP/1.1 200 OK\r\n")


def test_expect_100_continue() -> None:
    head = post(b"", extra="Expect: 100-continue\r\n").replace(
        b"Content-Length: 0", b"Content-Length: 3"
    )
    conn, early = opened(head)
    assert early == b"" and conn.data_to_send().startswith(b"HTTP/1.1 100 ")
    assert conn.receive_data(b"abc") == encode(b"abc")


# -- Host and Origin -------------------------------------------------------------------


def test_host_must_name_this_daemon() -> None:
    hosts = HostPolicy(["api.example"], [8080])
    hs = HttpHandshake(HttpConnection(HttpOptions(), hosts))
    bad = post(b"x").replace(b"Host: localhost", b"Host: evil.example:8080")
    with pytest.raises(ProtocolError, match="421"):
        hs.receive_data(bad)
    assert answers(hs.data_to_send())[0][0] == 421
    good = post(b"x").replace(b"Host: localhost", b"Host: api.example:8080")
    conn, _ = opened(good, hosts=hosts)
    conn.send(encode(b"y"))
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="421"):  # checked on every request
        conn.receive_data(bad)


def test_origin_refused_without_cors() -> None:
    hs = HttpHandshake(HttpConnection(HttpOptions()))
    with pytest.raises(ProtocolError, match="403"):
        hs.receive_data(post(b"x", extra="Origin: https://evil.example\r\n"))
    [(status, headers, _)] = answers(hs.data_to_send())
    assert status == 403 and "access-control-allow-origin" not in headers


def test_cors_origin_allowed_gets_the_header() -> None:
    options = HttpOptions(cors=("https://*.example.com",))
    conn, _ = opened(post(b"x", extra="Origin: https://app.example.com\r\n"), options)
    conn.send(encode(b"y"))
    [(status, headers, _)] = answers(conn.data_to_send())
    assert status == 200
    assert headers["access-control-allow-origin"] == "https://app.example.com"
    assert headers["vary"] == "Origin"


def test_preflight() -> None:
    options = HttpOptions(cors=("https://app.example.com",))
    request = (
        b"OPTIONS /pong HTTP/1.1\r\nHost: localhost\r\nOrigin: https://app.example.com\r\n"
        b"Access-Control-Request-Method: POST\r\n"
        b"Access-Control-Request-Headers: content-type\r\n\r\n"
    )
    hs = HttpHandshake(HttpConnection(options))
    hs.receive_data(request)
    assert hs.finished
    [(status, headers, _)] = answers(hs.data_to_send(), [b"OPTIONS"])
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://app.example.com"
    assert headers["access-control-allow-headers"] == "content-type"
    assert "POST" in headers["access-control-allow-methods"]
    hs = HttpHandshake(HttpConnection(options))
    with pytest.raises(ProtocolError, match="403"):
        hs.receive_data(request.replace(b"app.example.com", b"evil.example"))


# -- peer information -------------------------------------------------------------------


def test_describe_the_first_request() -> None:
    hs = HttpHandshake(HttpConnection(HttpOptions(cors=("*",))))
    hs.receive_data(
        b"POST /pong?a=1&b=%C3%A9 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
        b"User-Agent: curl/8\r\nAuthorization: Bearer t\r\nCookie: c=1\r\n"
        b"Origin: https://app.example\r\n\r\n"
    )
    info = hs.describe(PeerInfo(transport="tcp", client_address="127.0.0.1", client_port=1))
    assert info.transport == "http"
    assert info.path == "/pong"
    assert info.query == (("a", "1"), ("b", "é"))
    assert info.user_agent == "curl/8"
    assert info.authorization == "Bearer t"
    assert info.cookie == "c=1"
    assert info.origin == "https://app.example"
    assert info.client_address == "127.0.0.1"


def test_expect_100_continue_on_a_later_request() -> None:
    conn, _ = opened(post(b"x"))
    conn.send(encode(b"y"))
    conn.data_to_send()
    head = post(b"", extra="Expect: 100-continue\r\n").replace(
        b"Content-Length: 0", b"Content-Length: 2"
    )
    assert conn.receive_data(head) == b""
    assert conn.data_to_send().startswith(b"HTTP/1.1 100 ")
    assert conn.receive_data(b"ab") == encode(b"ab")


def test_a_body_that_does_not_arrive_is_408() -> None:
    conn, _ = opened(post(b"abcdef")[:-3])
    assert conn.reading_since is not None and conn.busy_since == conn.reading_since
    assert conn.expire() == 408
    [(status, headers, _)] = answers(conn.data_to_send())
    assert status == 408 and headers["connection"] == "close"
    assert conn.must_close and conn.busy_since is None


def test_nothing_in_progress_nothing_expires() -> None:
    conn, _ = opened(post(b"x"))
    conn.send(encode(b"y"))
    conn.data_to_send()
    assert conn.busy_since is None and conn.expire() is None
    assert conn.data_to_send() == b""
