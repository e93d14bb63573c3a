"""The ``--metrics`` endpoint's HTTP exchange on h11
(daemons/engine/control.py MetricsExchange): routes, statuses, one exchange
per connection, bytes arriving one at a time, EOF."""

from __future__ import annotations

import h11
import pytest

from daemons.engine.control import MetricsExchange
from daemons.engine.metrics import CONTENT_TYPE, Registry


@pytest.fixture
def registry() -> Registry:
    r = Registry()
    r.counter("ipc_test_total", "A test counter.").inc(3)
    return r


def parsed(out: bytes, method: bytes = b"GET") -> tuple[int, dict[str, str], bytes]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(out)
    client.receive_data(b"")
    status, headers, body = 0, {}, b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body


def test_get_metrics(registry: Registry) -> None:
    ex = MetricsExchange(registry)
    out = ex.receive_data(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
    status, headers, body = parsed(out)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert status == 200 and headers["content-type"] == CONTENT_TYPE
    assert headers["connection"] == "close"
    assert body.decode() == registry.render()
    assert ex.done and ex.status == 200
    assert ex.receive_data(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == b""  # one only


def test_healthz(registry: Registry) -> None:
    out = MetricsExchange(registry).receive_data(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert parsed(out)[::2] == (200, b"ok\n")
    sick = MetricsExchange(registry, health=lambda: "stopping")
    status, _h, body = parsed(sick.receive_data(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert (status, body) == (503, b"stopping\n")


def test_byte_by_byte_and_query(registry: Registry) -> None:
    ex = MetricsExchange(registry)
    request = b"GET /metrics?x=1 HTTP/1.1\nHost: x\n\n"
    out = b""
    for i in range(len(request)):
        out += ex.receive_data(request[i : i + 1])
        assert ex.done == (i == len(request) - 1)
    assert parsed(out)[0] == 200


def test_head_has_the_length_but_no_body(registry: Registry) -> None:
    out = MetricsExchange(registry).receive_data(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = parsed(out, b"HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) == len(registry.render())


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /metricsx HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (b"hello\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\nHost: x\r\n\r\n", 404),  # not a path we serve
        (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n", 400),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000, 431),
    ],
)
def test_refusals(registry: Registry, request_bytes: bytes, status: int) -> None:
    ex = MetricsExchange(registry)
    out = ex.receive_data(request_bytes)
    assert ex.done and ex.status == status
    assert out.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"connection: close" in out.lower()


def test_405_says_allow(registry: Registry) -> None:
    out = MetricsExchange(registry).receive_data(b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parsed(out)[1]["allow"] == "GET, HEAD"


def test_eof(registry: Registry) -> None:
    ex = MetricsExchange(registry)
    assert ex.receive_data(b"") == b""  # a port check: nothing to answer
    assert ex.done
    cut = MetricsExchange(registry)
    assert cut.receive_data(b"GET /met") == b""
    assert cut.receive_data(b"").startswith(b"HTTP/1.1 400 ")
