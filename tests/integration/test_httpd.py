"""ipc-httpd with real processes on 127.0.0.1: curl, Python's http.client,
raw sockets (pipelining, slow and vanishing clients) and h11's client side
to read raw answers; ``ipc pongd`` and a small service (:data:`KIT`) whose
replies depend on the message: a per-connection counter, silence, a close
without a reply, its peer information."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h11
import pytest

from tests.helpers import (
    BIN,
    LogReader,
    Pki,
    Processes,
    connectable,
    start_listening_daemon,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

#: count -> this connection's counter; silent -> no reply; close -> closes
#: without a reply; peer -> the peer information; anything else is echoed.
KIT = r"""
import sys
from ipc_core import Context, EventType, peerinfo

counts = {}
with Context() as ctx:
    ctx.service_init(sys.argv[1], peer_info=len(sys.argv) > 2)
    ctx.handle_signals()
    for event in ctx:
        if event.type is EventType.CONNECTION:
            counts[event.fd] = 0
        elif event.type is EventType.DISCONNECTION:
            counts.pop(event.fd, None)
        elif event.type is EventType.MESSAGE_RX:
            m = bytes(event.message)
            if m == b"count":
                counts[event.fd] += 1
                ctx.schedule(event.fd, str(counts[event.fd]).encode())
            elif m == b"silent":
                pass
            elif m == b"close":
                ctx.close(event.fd)
            elif m == b"peer":
                info = ctx.peer_info(event.fd)
                ctx.schedule(event.fd, b"null" if info is None else peerinfo.encode(info))
            else:
                ctx.schedule(event.fd, m)
"""

CURL = "/usr/bin/curl"


def start_kit(procs: Processes, rundir: Path, name: str = "kit", *extra: str) -> None:
    proc = procs.start(sys.executable, "-c", KIT, name, *extra, env={"RUNDIR": str(rundir)})
    sockets = [rundir / name] + ([rundir / f"{name}.door"] if extra else [])
    wait_for(
        lambda: all(connectable(s) for s in sockets) or proc.poll() is not None,
        what=f"{name} up",
    )
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""


def httpd(procs: Processes, rundir: Path, *args: str) -> tuple[LogReader, int]:
    _proc, logs, port = start_listening_daemon(
        procs, "ipc-httpd", "--listen", "127.0.0.1:0", *args, env={"RUNDIR": str(rundir)}
    )
    return logs, port


@pytest.fixture
def served(rundir: Path, procs: Processes) -> tuple[LogReader, int]:
    """pongd, the kit service, and ipc-httpd with a short reply timeout."""
    procs.pongd(rundir)
    start_kit(procs, rundir)
    return httpd(procs, rundir, "--reply-timeout", "1", "--max-message-size", "4096")


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [CURL, "-sS", "--max-time", "10", *args], capture_output=True, timeout=20, check=False
    )


def curl_stdin(body: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    """curl posting ``body`` from its standard input."""
    return subprocess.run(
        [CURL, "-sS", "--max-time", "10", "--data-binary", "@-", *args],
        input=body,
        capture_output=True,
        timeout=20,
        check=False,
    )


def request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def raw_answers(
    sock: socket.socket, count: int, methods: list[bytes] | None = None
) -> list[tuple[int, dict[str, str], bytes]]:
    """Read ``count`` answers from a raw socket (h11's client side parses)."""
    client = h11.Connection(h11.CLIENT)
    out: list[tuple[int, dict[str, str], bytes]] = []
    methods = methods or [b"POST"] * count
    for method in methods[:count]:
        client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                client.receive_data(data)
                if not data:
                    return out
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.append((status, headers, body))
                break
        if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
            return out
        client.start_next_cycle()
    return out


def post_bytes(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


# -- the basics ----------------------------------------------------------------


def test_curl_post_through_pongd(served: tuple[LogReader, int]) -> None:
    _logs, port = served
    body = bytes(range(256)) * 3
    out = curl_stdin(body, "-D", "-", f"http://127.0.0.1:{port}/pong")
    assert out.returncode == 0, out.stderr
    head, _, got = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"content-type: application/octet-stream" in head.lower()
    assert got == body


def test_content_type_option(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    _logs, port = httpd(procs, rundir, "--content-type", "text/plain; charset=utf-8")
    status, headers, body = request(port, "POST", "/pong", b"hi")
    assert (status, body) == (200, b"hi")
    assert headers["content-type"] == "text/plain; charset=utf-8"


def test_keepalive_is_one_libipc_connection(served: tuple[LogReader, int]) -> None:
    _logs, port = served
    a = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    b = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for expected in (b"1", b"2", b"3"):
            a.request("POST", "/kit", body=b"count")
            assert a.getresponse().read() == expected
        b.request("POST", "/kit", body=b"count")
        assert b.getresponse().read() == b"1"  # its own LibIPC connection
        a.request("POST", "/kit", body=b"count")
        assert a.getresponse().read() == b"4"
    finally:
        a.close()
        b.close()


def test_curl_reuses_the_connection(served: tuple[LogReader, int]) -> None:
    _logs, port = served
    url = f"http://127.0.0.1:{port}/kit"
    out = curl("--data-binary", "count", url, "--next", "--data-binary", "count", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"12"


def test_pipelined_requests_answered_in_order(served: tuple[LogReader, int]) -> None:
    _logs, port = served
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    with s:
        s.sendall(
            post_bytes("/kit", b"count")
            + post_bytes("/kit", b"second")
            + b"GET /kit HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            + post_bytes("/kit", b"count")
        )
        got = raw_answers(s, 4, [b"POST", b"POST", b"GET", b"POST"])
    assert [(st, b) for st, _h, b in got] == [
        (200, b"1"),
        (200, b"second"),
        (200, b""),
        (200, b"2"),
    ]


def test_health_check(served: tuple[LogReader, int]) -> None:
    _logs, port = served
    assert request(port, "GET", "/pong")[0] == 200
    assert request(port, "HEAD", "/pong")[0] == 200
    assert request(port, "GET", "/nope")[0] == 404


# -- refusals ------------------------------------------------------------------


def test_unknown_and_denied_services_answer_alike(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    procs.pongd(rundir, "secret")
    logs, port = httpd(procs, rundir, "--deny", "sec*")
    unknown = request(port, "POST", "/nope", b"x")
    denied = request(port, "POST", "/secret", b"x")
    assert unknown[0] == denied[0] == 404
    assert unknown[2] == denied[2]
    logs.wait_for("'secret'")
    assert request(port, "POST", "/pong", b"x")[2] == b"x"


def test_router_not_reachable(rundir: Path, procs: Processes) -> None:
    ipcd = procs.start(BIN / "ipcd", env={"RUNDIR": str(rundir)})
    wait_for(lambda: connectable(rundir / "ipc") or ipcd.poll() is not None, what="ipcd")
    _logs, port = httpd(procs, rundir)
    assert request(port, "POST", "/ipc", b"x")[0] == 404
    assert request(port, "POST", "/http.ctl", b"x")[0] == 404


def test_body_over_the_limit_is_413_before_it_is_sent(served: tuple[LogReader, int]) -> None:
    _logs, port = served
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    with s:
        s.sendall(b"POST /pong HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\n")
        [(status, headers, _)] = raw_answers(s, 1)
        assert status == 413 and headers["connection"] == "close"
    big = curl_stdin(
        b"x" * 5000, "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/pong"
    )
    assert big.stdout == b"413"
    assert request(port, "POST", "/pong", b"x" * 4096)[2] == b"x" * 4096  # the limit itself


def test_service_closing_without_reply_is_502(served: tuple[LogReader, int]) -> None:
    logs, port = served
    status, headers, _ = request(port, "POST", "/kit", b"close")
    assert status == 502
    logs.wait_for("502")
    assert request(port, "POST", "/kit", b"again")[2] == b"again"


def test_no_reply_in_time_is_504(served: tuple[LogReader, int]) -> None:
    logs, port = served
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/kit", body=b"silent")
        r = conn.getresponse()
        assert r.status == 504
        assert r.getheader("connection") == "close"
        r.read()
    finally:
        conn.close()
    assert 0.9 < time.monotonic() - t0 < 8
    logs.wait_for("--reply-timeout")
    assert request(port, "POST", "/kit", b"fine")[2] == b"fine"


def test_a_body_that_does_not_arrive_in_time_is_408(served: tuple[LogReader, int]) -> None:
    logs, port = served
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    with s:
        s.sendall(post_bytes("/kit", b"count"))
        assert raw_answers(s, 1)[0][2] == b"1"
        s.sendall(post_bytes("/kit", b"count")[:-2])  # trickles, then stops
        [(status, headers, _)] = raw_answers(s, 1)
        assert status == 408 and headers["connection"] == "close"
        assert closed_by_peer(s)
    logs.wait_for("the request body did not arrive within 1 s")


def test_other_methods_405(served: tuple[LogReader, int]) -> None:
    _logs, port = served
    for method in ("PUT", "DELETE", "PATCH"):
        status, headers, _ = request(port, method, "/pong", b"x")
        assert status == 405, method
        assert headers["allow"] == "POST, GET, HEAD, OPTIONS"


def test_another_service_on_one_connection_is_421(served: tuple[LogReader, int]) -> None:
    _logs, port = served
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    with s:
        s.sendall(post_bytes("/kit", b"a"))
        assert raw_answers(s, 1)[0][2] == b"a"
        s.sendall(post_bytes("/pong", b"b"))
        [(status, headers, _)] = raw_answers(s, 1)
        assert status == 421 and headers["connection"] == "close"
        assert closed_by_peer(s)


def test_bad_requests(served: tuple[LogReader, int]) -> None:
    _logs, port = served
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    with s:
        s.sendall(b"HELLO\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400 ")
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    with s:
        s.sendall(b"POST /pong HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000)
        assert s.recv(100).startswith(b"HTTP/1.1 431 ")


# -- Host, CORS ------------------------------------------------------------------


def test_host_must_name_this_daemon(served: tuple[LogReader, int]) -> None:
    logs, port = served
    status, _h, _b = request(port, "POST", "/pong", b"x", {"Host": f"evil.example:{port}"})
    assert status == 421
    logs.wait_for("DNS rebinding")
    assert request(port, "POST", "/pong", b"x", {"Host": "localhost:1234"})[0] == 200


def test_browser_origin_needs_cors(served: tuple[LogReader, int]) -> None:
    _logs, port = served
    status, headers, _ = request(port, "POST", "/pong", b"x", {"Origin": "https://a.example"})
    assert status == 403
    assert "access-control-allow-origin" not in headers


def test_cors(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    _logs, port = httpd(procs, rundir, "--cors", "https://app.example")
    status, headers, body = request(port, "POST", "/pong", b"x", {"Origin": "https://app.example"})
    assert (status, body) == (200, b"x")
    assert headers["access-control-allow-origin"] == "https://app.example"
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    status, headers, _ = request(port, "OPTIONS", "/pong", None, preflight)
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert headers["access-control-allow-headers"] == "content-type"
    preflight["Origin"] = "https://evil.example"
    assert request(port, "OPTIONS", "/pong", None, preflight)[0] == 403
    assert request(port, "POST", "/pong", b"x", {"Origin": "https://evil.example"})[0] == 403


# -- HTTPS, peer information ------------------------------------------------------------


def test_https_with_curl(rundir: Path, procs: Processes, pki: Pki) -> None:
    procs.pongd(rundir)
    start_kit(procs, rundir)
    _logs, port = httpd(
        procs, rundir, "--cert", str(pki.cert), "--key", str(pki.key), "--reply-timeout", "1"
    )
    url = f"https://localhost:{port}/pong"
    out = curl(
        "--cacert",
        str(pki.ca),
        "--data-binary",
        "secret",
        url,
        "--next",
        "--cacert",
        str(pki.ca),
        "--data-binary",
        "again",
        url,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"secretagain"
    kit = f"https://localhost:{port}/kit"
    late = curl("--cacert", str(pki.ca), "-w", "%{http_code}", "--data-binary", "silent", kit)
    assert late.returncode == 0, late.stderr  # a clean TLS close after the 504
    assert late.stdout.endswith(b"504")
    gone = curl("--cacert", str(pki.ca), "-w", "%{http_code}", "--data-binary", "close", kit)
    assert gone.stdout.endswith(b"502")
    plain = curl("--data-binary", "x", f"http://127.0.0.1:{port}/pong")
    assert plain.returncode != 0 or not plain.stdout.startswith(b"x")


def test_peer_information(rundir: Path, procs: Processes, pki: Pki) -> None:
    start_kit(procs, rundir, "who", "peer-info")
    _logs, port = httpd(procs, rundir, "--cors", "*")
    status, _h, body = request(
        port,
        "POST",
        "/who?x=1&y=%C3%A9",
        b"peer",
        {
            "User-Agent": "test/1",
            "Authorization": "Bearer T",
            "Cookie": "a=b",
            "Origin": "https://app.example",
        },
    )
    assert status == 200, body
    info = json.loads(body)
    assert info["transport"] == "http"
    assert info["method"] == "POST"
    assert info["client_address"] == "127.0.0.1"
    assert info["local_port"] == port
    assert info["path"] == "/who"
    assert info["query"] == [["x", "1"], ["y", "é"]]
    assert info["user_agent"] == "test/1"
    assert info["authorization"] == "Bearer T"
    assert info["cookie"] == "a=b"
    assert info["origin"] == "https://app.example"
    _logs, sport = httpd(
        procs, rundir, "--cert", str(pki.cert), "--key", str(pki.key), "--control-name", "https"
    )
    context = ssl.create_default_context(cafile=str(pki.ca))
    conn = http.client.HTTPSConnection("localhost", sport, timeout=10, context=context)
    try:
        conn.request("POST", "/who", body=b"peer")
        info = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert info["transport"] == "https"
    assert info["tls_version"].startswith("TLS")


# -- slow and vanished peers ------------------------------------------------------------


def test_slow_and_vanished_clients_do_not_hurt_others(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    start_kit(procs, rundir)
    logs, port = httpd(procs, rundir, "--handshake-timeout", "1", "--reply-timeout", "5")
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(b"POST /pong HTTP/1.1\r\nHo")  # never finishes its head
    gone = socket.create_connection(("127.0.0.1", port), timeout=10)
    gone.sendall(post_bytes("/kit", b"silent"))  # waits for a reply, then vanishes
    half = socket.create_connection(("127.0.0.1", port), timeout=10)
    half.sendall(post_bytes("/kit", b"count")[:-2])  # body never completes
    time.sleep(0.2)
    gone.close()
    assert request(port, "POST", "/pong", b"fine")[2] == b"fine"
    with slow:
        assert slow.recv(100).startswith(b"HTTP/1.1 408 ")
    logs.wait_for("handshake not finished")
    half.close()
    for _ in range(3):
        assert request(port, "POST", "/kit", b"count")[2] == b"1"


@pytest.mark.parametrize(
    "request_bytes",
    [
        post_bytes("/pong", b"bye", "Connection: close\r\n"),
        b"POST /pong HTTP/1.0\r\nContent-Length: 3\r\n\r\nbye",
    ],
    ids=["connection-close", "http-1.0"],
)
def test_the_daemon_closes_when_asked(served: tuple[LogReader, int], request_bytes: bytes) -> None:
    _logs, port = served
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    with s:
        s.sendall(request_bytes)
        data = b""
        while chunk := s.recv(65536):  # EOF after the answer: the daemon closed
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nbye")


def test_expect_100_continue_with_curl(served: tuple[LogReader, int]) -> None:
    _logs, port = served
    t0 = time.monotonic()
    out = curl_stdin(
        b"y" * 3000, "-H", "Expect: 100-continue", "--expect100-timeout", "5",
        f"http://127.0.0.1:{port}/pong",
    )  # fmt: skip
    assert out.stdout == b"y" * 3000
    assert time.monotonic() - t0 < 4  # the 100 came: curl did not wait its timeout


# -- systemd socket activation, metrics, PROXY protocol ------------------------------


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate not installed (Debian package: systemd)",
)
def test_socket_activated_with_metrics(rundir: Path, procs: Processes) -> None:
    """The unit's way: systemd holds the ports (fd names ``httpd`` and
    ``metrics``); a --listen that cannot work proves the inherited one is used."""
    from tests.integration.test_activation import UNUSABLE_LISTEN, free_port, socket_activate

    procs.pongd(rundir)
    port, metrics_port = free_port(), free_port()
    _proc, logs = socket_activate(
        procs,
        "ipc-httpd",
        [(port, "httpd"), (metrics_port, "metrics")],
        "--listen",
        UNUSABLE_LISTEN,
        env={"RUNDIR": str(rundir)},
    )
    assert request(port, "POST", "/pong", b"activated")[2] == b"activated"
    logs.wait_for(f"listening on 127.0.0.1:{port}")
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        body = r.read().decode()
    assert "ipc_switched_total 1" in body
    assert 'ipc_messages_total{direction="in"} 1' in body


def test_proxy_protocol_names_the_client(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    logs, port = httpd(procs, rundir, "--proxy-protocol", "127.0.0.1")
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    with s:
        s.sendall(b"PROXY TCP4 203.0.113.5 127.0.0.1 51234 8000\r\n" + post_bytes("/pong", b"p"))
        assert raw_answers(s, 1)[0][2] == b"p"
    logs.wait_for("203.0.113.5:51234 (via 127.0.0.1:")
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    with s:
        s.sendall(post_bytes("/pong", b"no header"))  # a listed source must send one
        assert closed_by_peer(s)


@pytest.mark.parametrize(
    "args",
    [
        ["--content-type", " text/plain"],
        ["--cors", "app.example.com"],
        ["--host", "a b"],
        ["--client-ca", "/nonexistent.pem"],
    ],
)
def test_bad_flags_exit_2_before_binding(rundir: Path, args: list[str]) -> None:
    out = subprocess.run(
        [BIN / "ipc-httpd", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"RUNDIR": str(rundir), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
