"""ipc-websocketd end to end: real processes on 127.0.0.1, a websockets client, ipc pongd."""

from __future__ import annotations

import base64
import contextlib
import os
import random
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from daemons.engine import certs
from tests.helpers import BIN, Processes, wait_for

MiB = 1024 * 1024
#: What a client sees when the daemon closes on it before or during the handshake.
REFUSED = (InvalidHandshake, ConnectionClosed, EOFError, OSError)


@dataclass
class WsDaemon:
    """A running ipc-websocketd: its port and its log (stderr, in a file)."""

    proc: object
    port: int
    log_path: Path
    scheme: str = "ws"

    def url(self, service: str = "pong") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/{service}"

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        return wait_for(lambda: re.search(pattern, self.log), timeout, what=f"log {pattern!r}")

    def connect(self, service: str = "pong", **kwargs) -> ClientConnection:
        kwargs.setdefault("open_timeout", 5)
        kwargs.setdefault("max_size", None)
        kwargs.setdefault("close_timeout", 2)
        return connect(self.url(service), **kwargs)


@pytest.fixture
def websocketd(rundir: Path, procs: Processes, tmp_path: Path) -> Iterator[Callable[..., WsDaemon]]:
    """Start ``ipc pongd`` once and ``ipc-websocketd ARGS`` on a free port."""
    procs.pongd(rundir)
    count = 0

    def start(*args: str, scheme: str = "ws") -> WsDaemon:
        nonlocal count
        count += 1
        log_path = tmp_path / f"websocketd-{count}.log"
        with log_path.open("wb") as log:
            proc = procs.start(
                BIN / "ipc-websocketd",
                "--listen",
                "127.0.0.1:0",
                "--control-name",
                f"ws{count}",
                *args,
                env={"RUNDIR": str(rundir)},
                stderr=log,
            )

        def port() -> int | None:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
            if match is None and proc.poll() is not None:
                raise AssertionError(f"ipc-websocketd exited: {log_path.read_text()}")
            return int(match.group(1)) if match else None

        return WsDaemon(proc, wait_for(port, what="ipc-websocketd up"), log_path, scheme)

    yield start


def echo(ws: ClientConnection, message: str | bytes, timeout: float = 5) -> str | bytes:
    ws.send(message)
    return ws.recv(timeout=timeout)


def http_get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def raw_upgrade(port: int, service: str = "pong", extra: str = "") -> socket.socket:
    """A hand-written WebSocket client: sends the upgrade, reads the 101 head,
    then leaves everything (pings included) to the test."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /{service} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


def read_until_eof(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def still_serves(daemon: WsDaemon) -> None:
    with daemon.connect() as ws:
        assert echo(ws, b"still here") in (b"still here", "still here")


class FrameClient:
    """A client whose sending never blocks its receiving (websockets' sync
    client holds its lock while a send blocks, so it cannot read meanwhile):
    websockets' Sans-I/O ClientProtocol over a raw socket, frames written by
    another thread."""

    def __init__(self, port: int, service: str = "pong") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/{service}"), max_size=None)
        self.proto.send_request(self.proto.connect())
        self.sock.sendall(b"".join(self.proto.data_to_send()))
        self.pending: list[bytes] = []
        while not self._events():
            self.proto.receive_data(self.sock.recv(65536))

    def _events(self) -> bool:
        events = self.proto.events_received()
        self.pending += [e.data for e in events if isinstance(e, Frame)]
        return bool(events)

    @staticmethod
    def frame(payload: bytes | str) -> bytes:
        if isinstance(payload, str):
            return Frame(Opcode.TEXT, payload.encode()).serialize(mask=True)
        return Frame(Opcode.BINARY, payload).serialize(mask=True)

    def recv(self) -> bytes:
        while not self.pending:
            data = self.sock.recv(MiB)
            assert data, "closed by the daemon"
            self.proto.receive_data(data)
            self._events()
        return bytes(self.pending.pop(0))


# -- messages ------------------------------------------------------------------------


def test_text_and_binary_messages_are_echoed_byte_exact(websocketd) -> None:
    daemon = websocketd()
    with daemon.connect() as ws:
        for text in ["hello", "héllo wörld ✓ 🎉", "", "a\x00b"]:
            # Replies are binary by default: the UTF-8 bytes of the text sent.
            assert echo(ws, text) == text.encode()
        for data in [b"\x00\xff\xfe\x80", b"", bytes(range(256)), b"\x00\x00\x00\x05hello"]:
            assert echo(ws, data) == data


def test_one_mib_messages_pipelined_keep_their_boundaries(websocketd) -> None:
    daemon = websocketd()
    rng = random.Random(5)
    messages: list[str | bytes] = []
    for i in range(16):
        messages.append(rng.randbytes(MiB))
        messages.append(f"small {i}")
        messages.append(rng.randbytes(rng.randrange(1, 70000)))
    messages.append("é" * (MiB // 2))  # a 1 MiB text message
    client = FrameClient(daemon.port)
    wire = b"".join(FrameClient.frame(m) for m in messages)  # all in one go
    sender = threading.Thread(target=client.sock.sendall, args=(wire,), daemon=True)
    sender.start()
    for sent in messages:
        expected = sent.encode() if isinstance(sent, str) else sent
        got = client.recv()
        assert len(got) == len(expected) and got == expected
    sender.join(10)
    client.sock.close()


def test_fragmented_client_messages_become_one_message(websocketd) -> None:
    daemon = websocketd()
    big = random.Random(1).randbytes(MiB)
    with daemon.connect() as ws:
        assert echo(ws, [b"ab", b"", b"cd", b"ef"]) == b"abcdef"
        assert echo(ws, ["hé", "llo ", "wörld"]) == "héllo wörld".encode()
        pieces = [big[i : i + 65536] for i in range(0, len(big), 65536)]
        assert echo(ws, pieces) == big
        assert echo(ws, b"after") == b"after"


def test_text_replies_and_invalid_utf8(websocketd) -> None:
    daemon = websocketd("--text")
    with daemon.connect() as ws:
        assert echo(ws, "héllo") == "héllo"
        assert echo(ws, b"binary but utf-8") == "binary but utf-8"
        # The service echoes bytes that are not UTF-8: a text reply is impossible.
        ws.send(b"\xff\xfe")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1007
    still_serves(daemon)
    # A client text message that is not UTF-8: 1007 as well (binary mode too).
    with daemon.connect() as ws:
        ws.send(b"\xc3\x28", text=True)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1007


def test_oversize_message_closes_with_1009(websocketd) -> None:
    daemon = websocketd("--max-message-size", "1000")
    with daemon.connect() as ws:
        assert echo(ws, b"x" * 1000) == b"x" * 1000
        ws.send(b"x" * 1001)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    # Over the limit only once the fragments are put together: 1009 too.
    with daemon.connect() as ws:
        ws.send([b"x" * 600, b"x" * 600])
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    still_serves(daemon)


# -- refusals ------------------------------------------------------------------------


def test_second_instance_needs_its_own_control_name(websocketd) -> None:
    websocketd("--control-name", "shared")
    with pytest.raises(AssertionError, match="already running"):
        websocketd("--control-name", "shared")


def test_origin_policy(websocketd) -> None:
    daemon = websocketd()
    # Default: same origin only (the demo page served by this daemon).
    with daemon.connect(origin=f"http://127.0.0.1:{daemon.port}") as ws:
        assert echo(ws, b"same origin") == b"same origin"
    for origin in [
        "http://evil.example",
        "null",
        f"http://127.0.0.1:{daemon.port + 1}",
        "http://[zz",
        "not a url",
    ]:
        with pytest.raises(InvalidStatus) as info:
            daemon.connect(origin=origin)
        assert info.value.response.status_code == 403
    daemon.wait_log(
        r"WARNING .*127\.0\.0\.1:\d+: websocket: origin 'http://evil.example' "
        r"not allowed"
    )
    still_serves(daemon)

    listed = websocketd("--origin", "https://*.example.com", "--origin", "null")
    for origin in ["https://app.example.com", "null"]:
        with listed.connect(origin=origin) as ws:
            assert echo(ws, origin) == origin.encode()
    for origin in ["https://example.com.evil.net", f"http://127.0.0.1:{listed.port}"]:
        with pytest.raises(InvalidStatus) as info:
            listed.connect(origin=origin)
        assert info.value.response.status_code == 403


def test_unknown_and_refused_services(websocketd) -> None:
    daemon = websocketd("--deny", "secret*")
    # A refused name is answered like a missing one (no existence oracle).
    for service, status in [("nope", 404), ("", 404), ("secret-thing", 404), ("ipc", 404)]:
        started = time.monotonic()
        with pytest.raises(InvalidStatus) as info:
            daemon.connect(service)
        assert info.value.response.status_code == status, service
        assert time.monotonic() - started < 2  # an answer, never a hang
    daemon.wait_log(r"no local service 'nope'")
    daemon.wait_log(r"'secret-thing' is denied")
    still_serves(daemon)


def test_plain_http_requests(websocketd) -> None:
    daemon = websocketd()
    status, headers, body = http_get(daemon.http("/pong"))
    assert status == 426 and headers["Upgrade"] == "websocket"
    daemon.wait_log(r"HTTP GET '/pong' -> 426")
    status, headers, body = http_get(daemon.http("/"))
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"LibIPC WebSocket console" in body
    status, headers, body = http_get(daemon.http("/"), method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
    assert http_get(daemon.http("/nope"))[0] == 404
    assert http_get(daemon.http("/"), method="POST")[0] == 405
    for evil in ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd"]:
        assert http_get(daemon.http(evil))[0] == 404
    still_serves(daemon)

    nothing = websocketd("--no-static")
    assert http_get(nothing.http("/"))[0] == 404


def test_static_directory(websocketd, tmp_path: Path) -> None:
    root = tmp_path / "site"
    (root / "sub").mkdir(parents=True)
    (root / "app.js").write_text("console.log(1)")
    (root / "sub" / "index.html").write_text("<p>sub</p>")
    (root / ".secret").write_text("hidden")
    (root / "escape").symlink_to("/etc/hostname")
    daemon = websocketd("--static", str(root))
    status, headers, body = http_get(daemon.http("/app.js"))
    assert (status, body) == (200, b"console.log(1)")
    assert headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert http_get(daemon.http("/sub/"))[2] == b"<p>sub</p>"
    assert http_get(daemon.http("/"))[0] == 404  # no index.html in this directory
    assert http_get(daemon.http("/.secret"))[0] == 404
    assert http_get(daemon.http("/escape"))[0] == 404
    still_serves(daemon)


def test_client_that_stalls_in_the_handshake_gets_408(websocketd) -> None:
    daemon = websocketd("--handshake-timeout", "0.5")
    stalled = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
    stalled.sendall(b"GET /pong HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line, ever
    silent = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
    still_serves(daemon)  # while the two others hang
    started = time.monotonic()
    answer = read_until_eof(stalled, 5)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert read_until_eof(silent, 5).startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 2
    daemon.wait_log(r"handshake not finished after 0\.5 s")
    stalled.close()
    silent.close()
    still_serves(daemon)


def test_client_that_never_answers_pings_is_closed(websocketd) -> None:
    daemon = websocketd("--ping-interval", "0.3")
    with daemon.connect() as healthy:  # websockets answers pings by itself
        mute = raw_upgrade(daemon.port)
        started = time.monotonic()
        data = read_until_eof(mute, 5)  # our pings, then a close frame, then EOF
        assert time.monotonic() - started < 2
        assert data[:1] == b"\x89"  # a ping frame came first
        assert b"\x88" in data  # then a close frame (1011 keepalive ping timeout)
        daemon.wait_log(r"127\.0\.0\.1:\d+: no pong within 0\.3 s; closing")
        time.sleep(0.7)  # more ping rounds: the healthy client survives them
        assert echo(healthy, b"alive") == b"alive"
        mute.close()


def test_idle_timeout_closes_quiet_connections(websocketd) -> None:
    # Pings (answered) do not count as activity; messages do.
    daemon = websocketd("--idle-timeout", "0.8", "--ping-interval", "0.2")
    with daemon.connect() as ws:
        for _ in range(4):
            time.sleep(0.4)
            assert echo(ws, b"busy") == b"busy"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert 0.5 < time.monotonic() - started < 2.5
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "idle timeout")
    daemon.wait_log(r"idle for 0\.8 s; closing")


def test_max_connections(websocketd) -> None:
    daemon = websocketd("--max-connections", "2")
    with daemon.connect() as first, daemon.connect():
        with pytest.raises(REFUSED):
            daemon.connect()
        daemon.wait_log(r"refusing 127\.0\.0\.1:\d+: 2 connections open")
        first.close()
        time.sleep(0.2)
        with daemon.connect() as ws:
            assert echo(ws, b"room again") == b"room again"


def test_trust_proxy_logs_the_forwarded_client(websocketd) -> None:
    daemon = websocketd("--trust-proxy", "127.0.0.1/32", "--host", "chat.example.com")
    headers = {
        "X-Forwarded-For": "203.0.113.50, 198.51.100.7",
        "X-Forwarded-Host": "chat.example.com",
        "X-Forwarded-Proto": "https",
    }
    # Same origin is judged on the host and scheme the browser saw
    # (X-Forwarded-Host, X-Forwarded-Proto); the public name is named with --host.
    with daemon.connect(additional_headers=headers, origin="https://chat.example.com") as ws:
        assert echo(ws, b"proxied") == b"proxied"
    for origin in ["http://chat.example.com", "http://chat.example.com:443"]:
        with pytest.raises(InvalidStatus) as info:  # the scheme is part of the origin
            daemon.connect(additional_headers=headers, origin=origin)
        assert info.value.response.status_code == 403
    rebound = {**headers, "X-Forwarded-Host": "evil.example"}
    with pytest.raises(InvalidStatus) as info:  # a proxy passing a rebound name on
        daemon.connect(additional_headers=rebound, origin="https://evil.example")
    assert info.value.response.status_code == 421
    daemon.wait_log(r"198\.51\.100\.7 \(via 127\.0\.0\.1:\d+\) -> 'pong'")
    with pytest.raises(InvalidStatus):
        daemon.connect("nope", additional_headers={"X-Forwarded-For": "2001:db8::9"})
    daemon.wait_log(r"2001:db8::9 \(via 127\.0\.0\.1:\d+\): no local service 'nope'")
    # Not an address: ignored, the socket's peer is logged.
    with pytest.raises(InvalidStatus):
        daemon.connect("nope2", additional_headers={"X-Forwarded-For": "evil injected"})
    daemon.wait_log(r" 127\.0\.0\.1:\d+: no local service 'nope2'")
    assert "evil injected" not in daemon.log

    plain = websocketd()  # without --trust-proxy the header means nothing
    with plain.connect(additional_headers={"X-Forwarded-For": "198.51.100.7"}) as ws:
        assert echo(ws, b"x") == b"x"
    plain.wait_log(r" 127\.0\.0\.1:\d+ -> 'pong'")
    assert "198.51.100.7" not in plain.log


def test_slow_browser_is_back_pressured(websocketd) -> None:
    """A client that stops reading stops the relay; the daemon's memory stays bounded."""
    daemon = websocketd()
    client = FrameClient(daemon.port)
    payload = random.Random(7).randbytes(MiB)
    frame = FrameClient.frame(payload)
    total = 200
    sent = 0

    def flood() -> None:
        nonlocal sent
        with contextlib.suppress(OSError):
            while sent < total:
                client.sock.sendall(frame)
                sent += 1

    def rss_kib() -> int:
        status = Path(f"/proc/{daemon.proc.pid}/status").read_text()  # type: ignore[attr-defined]
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

    before = rss_kib()
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()

    def blocked() -> bool:  # every buffer on the way is full: the sender waits
        count = sent
        time.sleep(0.5)
        return sent == count

    wait_for(blocked, 20, what="the sender to block")
    stuck_at = sent
    assert stuck_at < 64, f"{stuck_at} MiB accepted by a client that does not read"
    grown = rss_kib() - before
    assert grown < 48 * 1024, f"the daemon grew by {grown} KiB with {stuck_at} MiB pushed"
    for _ in range(total):  # now read: everything arrives, in order, intact
        assert client.recv() == payload
    sender.join(10)
    client.sock.close()
    still_serves(daemon)


# -- wss ---------------------------------------------------------------------------


def test_wss_with_the_tlsd_certificate_options(websocketd, tmp_path: Path) -> None:
    ca, ca_key = certs.make_ca("test CA")
    cert, key = certs.make_cert(ca, ca_key, "localhost", ["127.0.0.1", "localhost"])
    certs.write_cert(tmp_path / "ca.pem", ca)
    certs.write_cert(tmp_path / "server.pem", cert)
    certs.write_key(tmp_path / "server.key", key)
    daemon = websocketd(
        "--cert", str(tmp_path / "server.pem"), "--key", str(tmp_path / "server.key"), scheme="wss"
    )
    client_tls = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    big = random.Random(3).randbytes(MiB)
    with daemon.connect(ssl=client_tls, origin=f"https://127.0.0.1:{daemon.port}") as ws:
        assert echo(ws, "héllo over TLS") == "héllo over TLS".encode()
        assert echo(ws, big) == big
    with pytest.raises(InvalidStatus) as info:
        daemon.connect("nope", ssl=client_tls)
    assert info.value.response.status_code == 404
    # The demo page over https, from the same port.
    request = urllib.request.urlopen(
        f"https://127.0.0.1:{daemon.port}/", context=client_tls, timeout=5
    )
    assert b"LibIPC WebSocket console" in request.read()
    # A plain-text client on the TLS port gets nowhere, and nothing breaks.
    with pytest.raises(REFUSED):
        connect(f"ws://127.0.0.1:{daemon.port}/pong", open_timeout=3)
    with daemon.connect(ssl=client_tls) as ws:
        assert echo(ws, b"still") == b"still"


def test_mutual_tls_with_allow_client(websocketd, tmp_path: Path) -> None:
    ca, ca_key = certs.make_ca("test CA")
    cert, key = certs.make_cert(ca, ca_key, "localhost", ["127.0.0.1"])
    certs.write_cert(tmp_path / "ca.pem", ca)
    certs.write_cert(tmp_path / "server.pem", cert)
    certs.write_key(tmp_path / "server.key", key)
    for name in ("alice", "bob"):
        c, k = certs.make_cert(ca, ca_key, name, usage="client")
        certs.write_cert(tmp_path / f"{name}.pem", c)
        certs.write_key(tmp_path / f"{name}.key", k)
    daemon = websocketd(
        "--cert",
        str(tmp_path / "server.pem"),
        "--key",
        str(tmp_path / "server.key"),
        "--client-ca",
        str(tmp_path / "ca.pem"),
        "--allow-client",
        "CN:alice",
        scheme="wss",
    )

    def client_tls(name: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        if name:
            context.load_cert_chain(tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        return context

    with daemon.connect(ssl=client_tls("alice")) as ws:
        assert echo(ws, b"alice here") == b"alice here"
    daemon.wait_log(r"127\.0\.0\.1:\d+: client CN=alice")
    for name in ("bob", None):
        with pytest.raises(REFUSED):
            daemon.connect(ssl=client_tls(name))
    daemon.wait_log(r"client CN=bob .*is not in --allow-client")


def test_shutdown_sends_going_away(websocketd) -> None:
    daemon = websocketd()
    with daemon.connect() as ws:
        assert echo(ws, b"before") == b"before"
        daemon.proc.terminate()  # type: ignore[attr-defined]
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "server shutting down")
    assert daemon.proc.wait(timeout=5) == 0  # type: ignore[attr-defined]


def test_bad_flags_are_refused(rundir: Path) -> None:
    for args in (
        ["--origin", "example.com"],
        ["--cert", "/nonexistent.pem"],
        ["--static", "/nonexistent-dir"],
    ):
        result = subprocess.run(
            [BIN / "ipc-websocketd", "--listen", "127.0.0.1:0", *args],
            capture_output=True,
            timeout=10,
        )
        assert result.returncode != 0, args
        assert b"Error" in result.stderr or b"ipc-websocketd" in result.stderr


def test_frames_sent_ahead_of_the_101(websocketd) -> None:
    """A client that does not wait for the 101: its messages are kept, and a
    close frame right behind the request does not upset the daemon."""
    daemon = websocketd()
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /pong HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    close = Frame(Opcode.CLOSE, b"\x03\xe8").serialize(mask=True)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(request + FrameClient.frame(b"eager") + FrameClient.frame("eager 2"))
        data = b""
        while data.count(b"eager") < 2:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 101 ") and data.endswith(b"\x82\x07eager 2")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(request + close)
        assert read_until_eof(sock, 5).startswith(b"HTTP/1.1 101 ")
    still_serves(daemon)
