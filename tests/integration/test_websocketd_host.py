"""ipc-websocketd answers only to its own names (DNS rebinding), and peers'
text cannot forge its log lines. Real processes on 127.0.0.1."""

from __future__ import annotations

import base64
import os
import socket

import pytest
from websockets.exceptions import InvalidStatus

from tests.integration.test_websocketd import echo, websocketd  # noqa: F401


def request(port: int, head: str | bytes, *, upgrade: bool = True) -> bytes:
    """Send a hand-written request head; return the whole answer."""
    if isinstance(head, str):
        head = head.encode("latin-1")
    if upgrade:
        key = base64.b64encode(os.urandom(16))
        head += (
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
            + key
            + b"\r\nSec-WebSocket-Version: 13\r\n"
        )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + b"\r\n")
        sock.settimeout(5)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if answer.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in answer:
                break  # switched: the connection stays open
        return answer


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_dns_rebinding_names_are_refused_before_the_upgrade(websocketd) -> None:  # noqa: F811
    daemon = websocketd()
    port = daemon.port
    # The attack: a page on evil.example re-pointed at 127.0.0.1. Host and
    # Origin agree, so the same-origin check alone let it in (101).
    rebound = (
        f"GET /pong HTTP/1.1\r\nHost: evil.example:{port}\r\nOrigin: http://evil.example:{port}\r\n"
    )
    answer = request(port, rebound)
    assert status(answer) == 421, answer
    assert b"Misdirected" in answer
    # ... and no static file (the demo page) for it either.
    page = f"GET / HTTP/1.1\r\nHost: evil.example:{port}\r\n"
    assert status(request(port, page, upgrade=False)) == 421
    daemon.wait_log(r"WARNING .*Host 'evil\.example:\d+' is not a name of this daemon")
    # Our own names work, with our port only.
    for host in [
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"LOCALHOST.:{port}",
        f"app.localhost:{port}",
    ]:
        answer = request(port, f"GET /pong HTTP/1.1\r\nHost: {host}\r\n")
        assert answer.startswith(b"HTTP/1.1 101 "), (host, answer[:80])
        assert status(request(port, f"GET / HTTP/1.1\r\nHost: {host}\r\n", upgrade=False)) == 200
    for host in [f"127.0.0.1:{port + 1}", "127.0.0.1"]:  # a tunnel's port: still loopback
        answer = request(port, f"GET /pong HTTP/1.1\r\nHost: {host}\r\n")
        assert answer.startswith(b"HTTP/1.1 101 "), (host, answer[:80])
    for host in [
        f"[::2]:{port}",
        "a b",
        f"evil.example.:{port}",
    ]:
        answer = request(port, f"GET /pong HTTP/1.1\r\nHost: {host}\r\n")
        assert status(answer) in (400, 421), (host, answer[:80])
    # Two Host headers, or none: 400.
    two = f"GET /pong HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example:{port}\r\n"
    assert status(request(port, two)) == 400
    assert status(request(port, "GET /pong HTTP/1.1\r\n")) == 400
    daemon.wait_log(r"2 Host headers")
    # The browser's own path still works: the demo page's origin is our Host.
    with daemon.connect(origin=f"http://127.0.0.1:{port}") as ws:
        assert echo(ws, b"same origin") == b"same origin"
    # The origin's scheme counts: an https page is not this ws:// daemon's.
    with pytest.raises(InvalidStatus) as info:
        daemon.connect(origin=f"https://127.0.0.1:{port}")
    assert info.value.response.status_code == 403


def test_host_names_given_with_the_host_flag(websocketd) -> None:  # noqa: F811
    daemon = websocketd("--host", "chat.example.com", "--host", "api.example.com:8443")
    port = daemon.port
    for host in ["chat.example.com", f"chat.example.com:{port}", "api.example.com:8443"]:
        answer = request(port, f"GET /pong HTTP/1.1\r\nHost: {host}\r\n")
        assert answer.startswith(b"HTTP/1.1 101 "), (host, answer[:80])
    for host in ["chat.example.com:9999", "api.example.com", "evil.example"]:
        assert status(request(port, f"GET /pong HTTP/1.1\r\nHost: {host}\r\n")) == 421, host


def test_a_wildcard_listener_accepts_loopback_and_its_host_name(websocketd) -> None:  # noqa: F811
    daemon = websocketd("--listen", "0.0.0.0:0")
    port = daemon.port
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"{socket.gethostname()}:{port}"]:
        answer = request(port, f"GET /pong HTTP/1.1\r\nHost: {host}\r\n")
        assert answer.startswith(b"HTTP/1.1 101 "), (host, answer[:80])
    assert status(request(port, f"GET /pong HTTP/1.1\r\nHost: evil.example:{port}\r\n")) == 421


def test_newlines_esc_and_nul_in_requests_cannot_forge_log_lines(websocketd) -> None:  # noqa: F811
    daemon = websocketd("-v")
    port = daemon.port
    forged = "\n2026-01-01 00:00:00 WARNING ipc.websocketd: FORGED"
    paths = [
        f"/nope{forged}\x1b[31mred\x00nul",
        "/nope\x1b[31mred\x00nul\r2026-01-01\x0bFORGED",
        "/%0a2026-01-01%20WARNING%20FORGED%1b%00",
        f"/two words{forged}\x1b[0m",
    ]
    for path in paths:
        for upgrade in (True, False):
            head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            request(port, head, upgrade=upgrade)
        request(port, f"GET {path} HTTP/1.1\r\nHost: evil.example:{port}\r\n", upgrade=False)
    request(port, "GET /pong HTTP/1.1\r\nHost: evil\x1b[2J.example\r\n")
    request(port, f"GET /pong HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://x\x1b[2J\r\n")
    daemon.wait_log(r"not a name of this daemon")
    with daemon.connect() as still:
        assert echo(still, b"still serving") == b"still serving"
    log = daemon.log
    lines = log.splitlines()
    assert not [line for line in lines if "FORGED" in line and not line.startswith(lines[0][:2])]
    assert not any(line.startswith("2026-01-01") for line in lines), log[-2000:]
    assert "\x1b" not in log and "\x00" not in log, log[-2000:]
    assert r"'/nope\x1b[31mred\x00nul\r2026-01-01\x0bFORGED'" in log, log[-3000:]
