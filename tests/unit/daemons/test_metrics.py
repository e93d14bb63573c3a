"""Tests for daemons.engine.metrics: exact text rendering, snapshot, and the HTTP responder."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest

from daemons.engine.metrics import CONTENT_TYPE, Counter, Gauge, HttpResponder, Registry


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    conns = reg.gauge("ipc_connections", "Open connections.")
    conns.set(3)
    accepted = reg.counter("ipc_accepted_total", "Accepted connections.", ["proto"])
    accepted.inc(proto="tcp")
    accepted.inc(2, proto="tcp")
    accepted.inc(proto="tls")
    reg.counter("ipc_refused_total", 'Refused "peers"\nby reason \\ policy.', ["reason"])
    return reg


def test_render_exact(registry: Registry) -> None:
    registry.counter("ipc_bytes_total", "Bytes relayed.").inc(1.5)
    assert registry.render() == (
        "# HELP ipc_connections Open connections.\n"
        "# TYPE ipc_connections gauge\n"
        "ipc_connections 3\n"
        "# HELP ipc_accepted_total Accepted connections.\n"
        "# TYPE ipc_accepted_total counter\n"
        'ipc_accepted_total{proto="tcp"} 3\n'
        'ipc_accepted_total{proto="tls"} 1\n'
        '# HELP ipc_refused_total Refused "peers"\\nby reason \\\\ policy.\n'
        "# TYPE ipc_refused_total counter\n"
        "# HELP ipc_bytes_total Bytes relayed.\n"
        "# TYPE ipc_bytes_total counter\n"
        "ipc_bytes_total 1.5\n"
    )


def test_label_value_escaping_and_special_values() -> None:
    g = Gauge("g", "h", ["a", "b"])
    g.set(float("inf"), a='q"uote', b="back\\slash\nnl")
    g.set(float("-inf"), a="x", b="y")
    g.set(float("nan"), a="x", b="z")
    g.set(-2, a="n", b="1")
    g.set(0.25, a="f", b="1")
    g.set(1e20, a="big", b="1")
    assert g.render().splitlines()[2:] == [
        'g{a="q\\"uote",b="back\\\\slash\\nnl"} +Inf',
        'g{a="x",b="y"} -Inf',
        'g{a="x",b="z"} NaN',
        'g{a="n",b="1"} -2',
        'g{a="f",b="1"} 0.25',
        'g{a="big",b="1"} 1e+20',
    ]


def test_counter_rules() -> None:
    c = Counter("c_total", "h", ["peer"])
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, peer="a")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc()
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(peer="a", extra="b")
    c.inc(peer=7)  # values are stringified
    assert c.value(peer="7") == 1
    assert c.value(peer="never") == 0
    c.remove(peer="7")
    assert c.samples() == []


def test_gauge_ops_and_function() -> None:
    g = Gauge("g", "h")
    g.inc(5)
    g.dec(2)
    assert g.value() == 3
    items = [1, 2]
    g.set_function(lambda: len(items))
    items.append(3)
    assert g.render().endswith("g 3\n")
    with pytest.raises(ValueError, match="without labels"):
        Gauge("l", "h", ["x"]).set_function(lambda: 1)


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("1bad", ()),
        ("with-dash", ()),
        ("", ()),
        ("ok", ("bad-label",)),
        ("ok", ("__x",)),
        ("ok", ("a", "a")),
    ],
)
def test_invalid_names(name: str, labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Counter(name, "h", labels)


def test_duplicate_registration(registry: Registry) -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.gauge("ipc_connections", "again")


def test_snapshot(registry: Registry) -> None:
    snap = registry.snapshot()
    assert snap == {
        "ipc_connections": 3,
        "ipc_accepted_total": [
            {"labels": {"proto": "tcp"}, "value": 3},
            {"labels": {"proto": "tls"}, "value": 1},
        ],
        "ipc_refused_total": [],
    }
    json.dumps(snap)


# --------------------------------------------------------------------------
# HttpResponder
# --------------------------------------------------------------------------


def _split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, headers, body


def test_get_metrics(registry: Registry) -> None:
    r = HttpResponder(registry)
    out = r.receive_data(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
    status, headers, body = _split(out)
    assert status == "HTTP/1.1 200 OK"
    assert headers == {
        "Content-Type": "text/plain; version=0.0.4; charset=utf-8",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    assert body.decode() == registry.render()
    assert r.done and r.status == 200
    assert r.receive_data(b"GET /metrics HTTP/1.1\r\n\r\n") == b""  # one exchange only


def test_healthz_exact_bytes(registry: Registry) -> None:
    r = HttpResponder(registry)
    assert r.receive_data(b"GET /healthz HTTP/1.0\r\n\r\n") == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 3\r\n"
        b"Connection: close\r\n\r\n"
        b"ok\n"
    )


def test_healthz_unhealthy(registry: Registry) -> None:
    r = HttpResponder(registry, health=lambda: "rundir missing")
    status, _, body = _split(r.receive_data(b"GET /healthz HTTP/1.1\r\n\r\n"))
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert body == b"rundir missing\n"


def test_byte_by_byte_and_query_string(registry: Registry) -> None:
    r = HttpResponder(registry)
    request = b"\r\nGET /metrics?x=1 HTTP/1.1\nHost: x\n\n"
    out = b""
    for i in range(len(request)):
        out += r.receive_data(request[i : i + 1])
        assert r.done == (i == len(request) - 1)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")


def test_head(registry: Registry) -> None:
    out = HttpResponder(registry).receive_data(b"HEAD /metrics HTTP/1.1\r\n\r\n")
    _, headers, body = _split(out)
    assert body == b""
    assert int(headers["Content-Length"]) == len(registry.render())


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "405 Method Not Allowed"),
        (b"hello\r\n\r\n", "400 Bad Request"),
        (b"GET /metrics\r\n\r\n", "400 Bad Request"),
        (b"GET /metrics HTTP/2.0\r\n\r\n", "400 Bad Request"),
        (b"GET metrics HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n", "400 Bad Request"),
    ],
)
def test_errors(registry: Registry, request_bytes: bytes, status: str) -> None:
    r = HttpResponder(registry)
    out = r.receive_data(request_bytes)
    assert out.startswith(f"HTTP/1.1 {status}\r\n".encode())
    assert b"Connection: close\r\n" in out
    assert r.done


def test_405_has_allow_header(registry: Registry) -> None:
    _, headers, _ = _split(HttpResponder(registry).receive_data(b"PUT /healthz HTTP/1.1\r\n\r\n"))
    assert headers["Allow"] == "GET, HEAD"


def test_request_size_cap(registry: Registry) -> None:
    r = HttpResponder(registry)
    assert r.receive_data(b"GET /metrics HTTP/1.1\r\n") == b""
    assert r.receive_data(b"X-Pad: " + b"a" * 8000 + b"\r\n") == b""
    out = r.receive_data(b"X-More: " + b"b" * 300 + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")
    assert r.done


@pytest.mark.parametrize(("size", "ok"), [(8192, True), (8193, False)])
def test_request_cap_boundary(registry: Registry, size: int, ok: bool) -> None:
    line = b"GET /healthz HTTP/1.1\r\n"
    pad = b"X: " + b"a" * (size - len(line) - 3 - 4) + b"\r\n"
    request = line + pad + b"\r\n"
    assert len(request) == size
    out = HttpResponder(registry).receive_data(request + b"body bytes are ignored")
    assert out.endswith(b"ok\n") if ok else out.startswith(b"HTTP/1.1 431 ")


def test_eof(registry: Registry) -> None:
    r = HttpResponder(registry)
    assert r.receive_data(b"") == b""
    assert r.done and r.status is None
    r = HttpResponder(registry)
    r.receive_data(b"GET /metr")
    assert r.receive_data(b"").startswith(b"HTTP/1.1 400 ")


def test_over_loopback_with_http_client(registry: Registry) -> None:
    """A real HTTP client against the responder driven by a minimal socket loop."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve_one() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            responder = HttpResponder(registry)
            while not responder.done:
                out = responder.receive_data(conn.recv(4096))
                conn.sendall(out)

    for path, ctype in (("/metrics", CONTENT_TYPE), ("/healthz", "text/plain; charset=utf-8")):
        thread = threading.Thread(target=serve_one)
        thread.start()
        client = http.client.HTTPConnection(*server.getsockname(), timeout=10)
        client.request("GET", path)
        response = client.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == ctype
        body = response.read().decode()
        assert body == (registry.render() if path == "/metrics" else "ok\n")
        client.close()
        thread.join(timeout=10)
    server.close()
