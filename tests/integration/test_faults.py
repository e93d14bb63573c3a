"""Faults and bad input through every daemon, with real processes on loopback.

* Bad input at real daemons: adversarial bytes over TCP (garbage, hostile
  names, oversize headers, 64-bit WebSocket lengths, garbage before a TLS
  ClientHello, thousands of tiny messages in one write) while a good peer
  keeps talking: the daemon survives, logs a reason, serves the others.
  Also the Context loop itself over socketpairs (hypothesis).
* The local service killed (-9) mid-stream; the daemon killed (-9) and
  restarted over its stale socket and lock; the remote side of an outbound
  connection stopped or killed; a peer that stops reading while the other
  side keeps sending (memory bounded, other pairs flowing).

Every daemon prints its figures (RSS, bytes) with ``print``; run with ``-s``
to see them (docs/robustness.md records one run).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import random
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc_core import Context, EventType, PeerClosed, ServiceUnavailable, encode
from tests.helpers import (
    BIN,
    LogReader,
    Pki,
    Processes,
    connectable,
    recv_exact,
    start_listening_daemon,
    wait_for,
)

KINDS = ["tcpd", "tlsd", "websocketd"]
COMMANDS = {"tcpd": "ipc-tcpd", "tlsd": "ipc-tlsd", "websocketd": "ipc-websocketd", "ipcd": "ipcd"}
#: Files a daemon leaves in the run directory when it is killed with -9.
STALE = {
    "tcpd": ["tcp", "tcp.lock", "tcp.ctl", "tcp.ctl.lock"],
    "tlsd": ["tls", "tls.lock", "tls.ctl", "tls.ctl.lock"],
    "websocketd": ["ws.ctl", "ws.ctl.lock"],
    "ipcd": ["ipc", "ipc.lock", "ipc.ctl", "ipc.ctl.lock"],
}
MiB = 1024 * 1024


# -- measurements ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- certificates ------------------------------------------------------------------------------


# -- network peers, one class per protocol --------------------------------------------------------


class Peer:
    """A network client after its handshake, speaking LibIPC messages."""

    def __init__(self, sock: socket.socket, early: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(early)

    def wrap(self, payload: bytes) -> bytes:
        return encode(payload)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(self.wrap(payload))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _take(self) -> bytes | None:
        if len(self.buf) < 4:
            return None
        (n,) = struct.unpack_from(">I", self.buf)
        if len(self.buf) < 4 + n:
            return None
        msg = bytes(self.buf[4 : 4 + n])
        del self.buf[: 4 + n]
        return msg

    def recv(self, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        while True:
            msg = self._take()
            if msg is not None:
                return msg
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed by the daemon")
            self.buf += chunk

    def echo(self, payload: bytes, timeout: float = 5.0) -> None:
        self.send(payload)
        assert self.recv(timeout) == payload

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True if the daemon closes us (EOF, reset, TLS error) within ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(left)
                try:
                    if not self.sock.recv(65536):
                        return True
                except TimeoutError:
                    return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class WsPeer(Peer):
    """A hand-written WebSocket client: masked binary frames out, any frame in;
    pings are answered, a close frame counts as the end."""

    MASK = b"\x5a\xa5\x0f\xf0"

    def wrap(self, payload: bytes) -> bytes:
        return ws_frame(0x2, payload, self.MASK)

    def _take(self) -> bytes | None:
        while True:
            b = self.buf
            if len(b) < 2:
                return None
            opcode, n, pos = b[0] & 0x0F, b[1] & 0x7F, 2
            if n == 126:
                if len(b) < 4:
                    return None
                n, pos = struct.unpack_from(">H", b, 2)[0], 4
            elif n == 127:
                if len(b) < 10:
                    return None
                n, pos = struct.unpack_from(">Q", b, 2)[0], 10
            if len(b) < pos + n:
                return None
            payload = bytes(b[pos : pos + n])
            del b[: pos + n]
            if opcode == 0x9:
                self.sock.sendall(ws_frame(0xA, payload, self.MASK))
            elif opcode == 0x8:
                raise EOFError("close frame")
            elif opcode in (0x1, 0x2):
                return payload

    def wait_closed(self, timeout: float = 5.0) -> bool:
        with contextlib.suppress(EOFError):
            while self._take() is not None:
                pass
        return super().wait_closed(timeout)


def ws_frame(
    opcode: int, payload: bytes, mask: bytes = b"\x01\x02\x03\x04", length: int | None = None
) -> bytes:
    n = len(payload) if length is None else length
    head = bytes([0x80 | opcode])
    if length is None and n < 126:
        head += bytes([0x80 | n])
    elif length is None and n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


def ws_upgrade(sock: socket.socket, path: str, port: int) -> tuple[bytes, bytes]:
    """Send an upgrade request; return (response head, bytes after it)."""
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def raw_connect(kind: str, port: int, pki: Pki | None = None) -> socket.socket:
    """A TCP (or TLS, for tlsd) connection with no handshake of ours yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if kind == "tlsd":
        assert pki is not None
        ctx = ssl.create_default_context(cafile=pki.ca)
        return ctx.wrap_socket(sock, server_hostname="localhost")
    return sock


def connect_peer(kind: str, port: int, pki: Pki | None = None, service: str = "pong") -> Peer:
    sock = raw_connect(kind, port, pki)
    if kind == "websocketd":
        head, rest = ws_upgrade(sock, f"/{service}", port)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return WsPeer(sock, rest)
    sock.sendall(service.encode())
    assert recv_exact(sock, 2) == b"ok"
    return Peer(sock)


# -- daemons ----------------------------------------------------------------------------------


@dataclass
class Running:
    kind: str
    proc: object
    logs: LogReader
    port: int
    rundir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid  # type: ignore[attr-defined]

    def alive(self) -> bool:
        return self.proc.poll() is None  # type: ignore[attr-defined]


def start_daemon(
    procs: Processes, kind: str, rundir: Path, pki: Pki, *extra: str, port: int = 0
) -> Running:
    flags: list[str] = ["--listen", f"127.0.0.1:{port}", "--handshake-timeout", "1"]
    if kind == "tlsd":
        flags += ["--cert", str(pki.cert), "--key", str(pki.key), "--ca", str(pki.ca)]
    if kind == "websocketd":
        flags += ["--ping-interval", "0"]
    proc, logs, bound = start_listening_daemon(
        procs, COMMANDS[kind], *flags, *extra, env={"RUNDIR": str(rundir)}
    )
    if kind in ("tcpd", "tlsd"):
        name = "tcp" if kind == "tcpd" else "tls"
        wait_for(lambda: connectable(rundir / name), what=f"{name} service")
    return Running(kind, proc, logs, bound, rundir)


@pytest.fixture
def pong(rundir: Path, procs: Processes):
    return procs.pongd(rundir)


@pytest.fixture(params=KINDS)
def daemon(request, rundir: Path, procs: Processes, pki: Pki, pong) -> Running:
    return start_daemon(procs, request.param, rundir, pki)


# ==============================================================================================
# Bad input at real daemons
# ==============================================================================================


def hostile_connections(kind: str, port: int, pki: Pki) -> list[tuple[str, bytes]]:
    """(what, bytes sent right after connecting) for this daemon's protocol."""
    rng = random.Random(7)
    garbage = [(f"random bytes {i}", rng.randbytes(rng.randint(1, 3000))) for i in range(8)]
    if kind in ("tcpd", "tlsd"):
        named = [
            ("name with /", b"a/b\n"),
            ("name ..", b"..\n"),
            ("name ../pong", b"../pong"),
            ("name with NUL", b"po\x00ng"),
            ("2000-byte name", b"n" * 2000),
            ("protected name", b"ipc\n"),
            ("empty name", b"\n"),
            ("a frame instead of a name", encode(b"hello")),
            ("not UTF-8", b"\xff\xfe\n"),
        ]
        return garbage + named
    return [
        *garbage,
        ("path with /", b"GET /a/b HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("path ..", b"GET /.. HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("path with NUL", b"GET /po%00ng HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("2000-byte path", b"GET /" + b"n" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("20 KiB head", b"GET /pong HTTP/1.1\r\n" + b"X: y\r\n" * 4000 + b"\r\n"),
        ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        ("bad upgrade", b"GET /pong HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"),
    ]


def test_hostile_connections_are_closed_others_keep_flowing(daemon: Running, pki: Pki) -> None:
    kind, port = daemon.kind, daemon.port
    good = connect_peer(kind, port, pki)
    t0 = time.monotonic()
    opened = []
    for what, data in hostile_connections(kind, port, pki):  # all at once
        sock = raw_connect(kind, port, pki)
        with contextlib.suppress(OSError):
            sock.sendall(data)
        opened.append((what, sock))
        good.echo(what.encode())
    outcomes = []
    for what, sock in opened:
        outcomes.append((what, Peer(sock).wait_closed(timeout=4)))
        sock.close()
        good.echo(what.encode())
    assert all(closed for _, closed in outcomes), outcomes
    assert daemon.alive()
    # Each refusal was logged with a reason, and the handshake deadline did
    # the rest (raw bytes that never finish a handshake).
    text = daemon.logs.text()
    assert text.count("WARNING") >= len(outcomes) // 2, text[-3000:]
    fresh = connect_peer(kind, port, pki)
    fresh.echo(b"still serving")
    print(
        f"\n{kind}: {len(outcomes)} hostile connections closed in "
        f"{time.monotonic() - t0:.1f} s; daemon alive, good peer served throughout"
    )


@pytest.mark.parametrize("length", [2**31, 2**32 - 1])
def test_oversize_length_after_the_handshake_closes_only_that_pair(
    rundir: Path, procs: Processes, pki: Pki, pong, length: int
) -> None:
    for kind in KINDS:
        d = start_daemon(procs, kind, rundir, pki, "--max-message-size", str(MiB))
        good = connect_peer(kind, d.port, pki)
        bad = connect_peer(kind, d.port, pki)
        if kind == "websocketd":
            bad.send_raw(ws_frame(0x2, b"", length=length))
        else:
            bad.send_raw(encode(b"first") + struct.pack(">I", length))
        assert bad.wait_closed(5), kind
        good.echo(b"unaffected")
        d.logs.wait_for("limit is" if kind != "websocketd" else "too large")
        assert d.alive()
        procs.stop_all()
        procs.procs.clear()
        procs.pongd(rundir)


def test_thousands_of_tiny_messages_in_one_write(daemon: Running, pki: Pki) -> None:
    peer = connect_peer(daemon.kind, daemon.port, pki)
    count = 5000
    burst = b"".join(peer.wrap(b"%d" % i) for i in range(count)) + peer.wrap(b"")
    peer.send_raw(burst)
    for i in range(count):
        assert peer.recv() == b"%d" % i
    assert peer.recv() == b""


def test_garbage_before_a_tls_client_hello(rundir: Path, procs: Processes, pki: Pki, pong) -> None:
    d = start_daemon(procs, "tlsd", rundir, pki)
    good = connect_peer("tlsd", d.port, pki)
    for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"pong", b"\x00" * 64, os.urandom(600)):
        raw = socket.create_connection(("127.0.0.1", d.port), timeout=5)
        ctx = ssl.create_default_context(cafile=pki.ca)
        raw.sendall(garbage)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            ctx.wrap_socket(raw, server_hostname="localhost").sendall(b"pong")
        raw.close()
        good.echo(b"after garbage")
    d.logs.wait_for("tls: ")
    assert d.alive()


def test_websocket_frame_with_a_64_bit_length(
    rundir: Path, procs: Processes, pki: Pki, pong
) -> None:
    d = start_daemon(procs, "websocketd", rundir, pki, "--max-message-size", str(MiB))
    good = connect_peer("websocketd", d.port, pki)
    for length in (2**63 - 1, 2**64 - 1, 2**32):
        bad = connect_peer("websocketd", d.port, pki)
        before = rss_kib(d.pid)
        bad.send_raw(ws_frame(0x2, b"", length=length) + b"x" * 1000)
        assert bad.wait_closed(5)
        good.echo(b"fine")
        assert rss_kib(d.pid) - before < 4 * 1024
    d.logs.wait_for("message too large")


@pytest.mark.parametrize("kind", KINDS)
def test_name_too_long_for_the_run_directory_does_not_kill_the_daemon(
    rundir: Path, procs: Processes, pki: Pki, pong, kind: str
) -> None:
    d = start_daemon(procs, kind, rundir, pki)
    sock = raw_connect(kind, d.port, pki)
    name = "x" * 95
    if kind == "websocketd":
        ws_upgrade(sock, f"/{name}", d.port)
    else:
        sock.sendall(name.encode() + b"\n")
    Peer(sock).wait_closed(3)
    time.sleep(0.3)
    assert d.alive(), d.logs.text()[-1500:]
    connect_peer(kind, d.port, pki).echo(b"alive")


# Found by tests/unit/daemons/test_ws_fuzz.py (one request killed the daemon);
# fixed in 80d0710, kept as a regression test.
def test_unparsable_origin_does_not_kill_websocketd(
    rundir: Path, procs: Processes, pki: Pki, pong
) -> None:
    d = start_daemon(procs, "websocketd", rundir, pki)
    sock = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /pong HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Origin: http://[\r\n\r\n".encode()
    )
    assert Peer(sock).wait_closed(3)
    time.sleep(0.3)
    assert d.alive(), d.logs.text()[-1500:]
    connect_peer("websocketd", d.port, pki).echo(b"alive")


# -- ipcd ----------------------------------------------------------------------------------------


def ipc_request(rundir: Path, payload: bytes, timeout: float = 5.0) -> bytes:
    """One raw exchange with the router: what it answers (bytes) before closing."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(rundir / "ipc"))
    s.sendall(payload)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(4096):
            data += chunk
    s.close()
    return data


def test_ipcd_hostile_lookups(rundir: Path, procs: Processes, pong) -> None:
    proc = procs.start(BIN / "ipcd", "--timeout", "2", env={"RUNDIR": str(rundir)})
    logs = LogReader(proc)
    wait_for(lambda: connectable(rundir / "ipc"), what="ipcd")
    cases = {
        "not UTF-8": encode(b"\xff\xfe;pong unix://pong"),
        "no ;": encode(b"pong"),
        "empty": encode(b""),
        "empty service": encode(b" ;pong unix://pong"),
        "bad directive": encode(b"pong;pong a b c"),
        "no route": encode(b"pong;other unix://pong"),
        "service with /": encode(b"a/b;a/b unix://a/b"),
        "target ..": encode(b"pong;pong .."),
        "target with NUL": encode(b"pong;pong po\x00ng"),
        "2000-byte target": encode(b"pong;pong unix://" + b"n" * 2000),
        "2000-byte scheme": encode(b"pong;pong " + b"s" * 2000 + b"://h/p"),
        "empty scheme": encode(b"pong;pong ://h/p"),
        "scheme with /": encode(b"pong;pong a/b://h/p"),
        "the router itself": encode(b"pong;pong ipc://h/p"),
        "missing daemon": encode(b"pong;pong tcp://127.0.0.1:1/pong"),
    }
    answers = {}
    for what, payload in cases.items():
        answers[what] = ipc_request(rundir, payload)
        # One LibIPC message (framed like any answer), never a descriptor.
        (size,) = struct.unpack(">I", answers[what][:4])
        assert size == len(answers[what]) - 4, (what, answers[what])
        assert answers[what][4:].startswith(b"error: "), (what, answers[what])
    # Length headers of 2^31 and 2^32-1: the router closes the peer unanswered.
    for length in (2**31, 2**32 - 1):
        assert ipc_request(rundir, struct.pack(">I", length)) == b""
    # Thousands of tiny messages in one write: the first is the look-up.
    burst = encode(b"pong;pong unix://pong") + encode(b"x") * 5000
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(rundir / "ipc"))
    s.sendall(burst)
    data, fds, _, _ = socket.recv_fds(s, 100, 1)
    assert data == b"ok" and len(fds) == 1
    os.close(fds[0])
    s.close()
    assert proc.poll() is None
    logs.wait_for("limit is")
    with Context(rundir_path=rundir) as ctx:
        os.environ["IPC_NETWORK"] = "pong unix://pong"
        try:
            fd = ctx.connect_service("pong")
        finally:
            del os.environ["IPC_NETWORK"]
        ctx.write(fd, b"served")
        assert ctx.read(fd, timeout=5) == b"served"


# -- the Context loop itself ---------------------------------------------------------------------

peer_streams = st.one_of(
    st.binary(max_size=400),
    st.lists(
        st.one_of(
            st.binary(max_size=30).map(encode),
            st.sampled_from([2**31, 2**32 - 1, 70]).map(lambda n: struct.pack(">I", n)),
            st.binary(min_size=1, max_size=5),
        ),
        max_size=20,
    ).map(b"".join),
)


def model(stream: bytes, limit: int) -> tuple[list[bytes], bool]:
    out, pos = [], 0
    while len(stream) - pos >= 4:
        (n,) = struct.unpack_from(">I", stream, pos)
        if n > limit:
            return out, True
        if pos + 4 + n > len(stream):
            break
        out.append(stream[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out, False


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stream=peer_streams, points=st.lists(st.integers(0), max_size=4))
def test_context_loop_never_raises_on_peer_bytes(
    tmp_path: Path, stream: bytes, points: list[int]
) -> None:
    """A peer writes anything, in any pieces, then closes: the loop delivers
    the messages the model finds, then one DISCONNECTION, with a reason iff a
    header was oversize; wait_event never raises."""
    limit = 64
    expected, oversize = model(stream, limit)
    a, b = socket.socketpair()
    with Context(rundir_path=tmp_path, max_message_size=limit) as ctx:
        fd = ctx.adopt(a)
        marks = sorted({p % (len(stream) + 1) for p in points})
        for x, y in zip([0, *marks], [*marks, len(stream)], strict=True):
            with contextlib.suppress(OSError):
                b.sendall(stream[x:y])
        b.close()
        got: list[bytes] = []
        deadline = time.monotonic() + 5
        while True:
            assert time.monotonic() < deadline
            ev = ctx.wait_event(timeout=1)
            if ev.type == EventType.MESSAGE_RX:
                got.append(ev.message)
            elif ev.type == EventType.DISCONNECTION:
                assert ev.fd == fd
                assert (ev.reason is not None) == oversize
                break
    assert got == expected[: len(got)]
    if not oversize:
        assert got == expected


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stream=peer_streams)
def test_switched_pair_relays_exactly_then_closes_with_a_reason(
    tmp_path: Path, stream: bytes
) -> None:
    """A relay (what every daemon is): the bytes before the first oversize
    header reach the other end unchanged; then both ends close."""
    limit = 64
    expected, oversize = model(stream, limit)
    net_a, net_b = socket.socketpair()
    loc_a, loc_b = socket.socketpair()
    with Context(rundir_path=tmp_path, max_message_size=limit, switch_events=False) as ctx:
        ctx.add_switch(net_a, loc_a)
        net_b.sendall(stream)
        net_b.shutdown(socket.SHUT_WR)
        loc_b.settimeout(0.05)
        received = b""
        reasons = []
        eof = False
        deadline = time.monotonic() + 5
        while not (eof and len(reasons) >= 2):
            assert time.monotonic() < deadline
            ev = ctx.wait_event(timeout=0.05)
            if ev.type == EventType.DISCONNECTION:
                reasons.append(ev.reason)
            try:
                chunk = loc_b.recv(65536)
            except TimeoutError:
                continue
            received += chunk
            eof = not chunk
            if eof:  # the half-close was passed on; the pair waits for this side too
                loc_b.shutdown(socket.SHUT_WR)
    decoded, _ = model(received, limit)
    assert decoded == expected[: len(decoded)]
    if not oversize:
        assert received == stream
    assert any(r is not None for r in reasons) == oversize
    for s in (net_b, loc_b):
        s.close()


# ==============================================================================================
# The local service killed (-9) mid-stream
# ==============================================================================================


def stream_then(peer: Peer, count: int = 2000) -> None:
    """Pipeline ``count`` messages, read half of the echoes: the pair is busy."""
    peer.send_raw(b"".join(peer.wrap(b"m%d" % i) for i in range(count)))
    for i in range(count // 2):
        assert peer.recv() == b"m%d" % i


def test_service_killed_mid_stream(daemon: Running, pki: Pki, procs: Processes, pong) -> None:
    kind, port, rundir = daemon.kind, daemon.port, daemon.rundir
    peers = [connect_peer(kind, port, pki) for _ in range(3)]
    for p in peers:
        stream_then(p)
    pong.kill()
    pong.wait(5)
    assert (rundir / "pong").exists() and (rundir / "pong.lock").exists()  # left behind
    t0 = time.monotonic()
    for p in peers:
        assert p.wait_closed(5), "the network peer did not see a close"
    closed_after = time.monotonic() - t0
    assert daemon.alive()
    # While the service is down: refused, with a reason, nothing else breaks.
    down = raw_connect(kind, port, pki)
    if kind == "websocketd":
        head, _ = ws_upgrade(down, "/pong", port)
        assert not head.startswith(b"HTTP/1.1 101")
    else:
        down.sendall(b"pong")
        assert Peer(down).wait_closed(3)
    daemon.logs.wait_for("'pong'")
    # The service comes back over its stale socket and lock: served again.
    procs.pongd(rundir)
    again = connect_peer(kind, port, pki)
    stream_then(again, 200)
    print(
        f"\n{kind}: 3 busy peers saw the close {closed_after * 1000:.0f} ms after kill -9 "
        "of the service; served again once it restarted"
    )


def test_service_killed_mid_session_through_ipcd(
    rundir: Path, procs: Processes, pong, monkeypatch: pytest.MonkeyPatch
) -> None:
    procs.start(BIN / "ipcd", env={"RUNDIR": str(rundir)})
    wait_for(lambda: connectable(rundir / "ipc"), what="ipcd")
    monkeypatch.setenv("IPC_NETWORK", "pong unix://pong")
    with Context(rundir_path=rundir) as ctx:
        fd = ctx.connect_service("pong")
        for i in range(100):
            ctx.write(fd, b"%d" % i)
        pong.kill()
        pong.wait(5)
        with pytest.raises(PeerClosed):
            for _ in range(101):
                ctx.read(fd, timeout=5)
        with pytest.raises(ServiceUnavailable):
            ctx.connect_service("pong")
        procs.pongd(rundir)
        fd = ctx.connect_service("pong")
        ctx.write(fd, b"back")
        assert ctx.read(fd, timeout=5) == b"back"


# ==============================================================================================
# The daemon killed (-9), restarted over its stale socket and lock
# ==============================================================================================


def test_daemon_killed_and_restarted(daemon: Running, pki: Pki, procs: Processes) -> None:
    kind, port, rundir = daemon.kind, daemon.port, daemon.rundir
    peers = [connect_peer(kind, port, pki) for _ in range(5)]
    for p in peers:
        stream_then(p, 100)
    local = None
    if kind != "websocketd":  # a local client of the outbound side, mid-session
        local = socket.socket(socket.AF_UNIX)
        local.settimeout(5)
        local.connect(str(rundir / ("tcp" if kind == "tcpd" else "tls")))
        scheme = "tcp" if kind == "tcpd" else "tls"
        local.sendall(encode(f"{scheme}://127.0.0.1:{port}/pong".encode()))
        assert local.recv(6) == encode(b"ok")
    daemon.proc.kill()  # type: ignore[attr-defined]
    daemon.proc.wait(5)  # type: ignore[attr-defined]
    for p in peers:
        assert p.wait_closed(5)
    if local is not None:
        assert Peer(local).wait_closed(5)
    for name in STALE[kind]:
        assert (rundir / name).exists(), f"{name} was removed by a kill -9?"
    # Same port, same run directory, stale files in place.
    again = start_daemon(procs, kind, rundir, pki, port=port)
    assert again.port == port
    connect_peer(kind, port, pki).echo(b"restarted")
    if kind != "websocketd":
        scheme = "tcp" if kind == "tcpd" else "tls"
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(str(rundir / scheme))
        s.sendall(encode(f"{scheme}://127.0.0.1:{port}/pong".encode()))
        assert s.recv(6) == encode(b"ok")
        s.sendall(encode(b"outbound too"))
        assert Peer(s).recv() == b"outbound too"


def test_ipcd_killed_and_restarted(
    rundir: Path, procs: Processes, pong, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"RUNDIR": str(rundir)}
    ipcd = procs.start(BIN / "ipcd", env=env)
    wait_for(lambda: connectable(rundir / "ipc"), what="ipcd")
    # A look-up left waiting on a silent "protocol daemon" when ipcd dies.
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(rundir / "slow"))
    silent.listen()
    monkeypatch.setenv("IPC_NETWORK", "pong unix://pong ; far slow://h/far")
    with Context(rundir_path=rundir) as ctx:
        session = ctx.connect_service("pong")  # handed over: ipcd is not in its path
        result: list[BaseException | int] = []

        def waiting_lookup() -> None:
            try:
                with Context(rundir_path=rundir) as other:
                    result.append(other.connect_service("far", timeout=20))
            except BaseException as exc:  # reported below
                result.append(exc)

        t = threading.Thread(target=waiting_lookup)
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        ipcd.kill()
        ipcd.wait(5)
        t.join(10)
        assert result and isinstance(result[0], ServiceUnavailable), result
        assert time.monotonic() - t0 < 3
        for name in STALE["ipcd"]:
            assert (rundir / name).exists()
        ctx.write(session, b"session survives the router")
        assert ctx.read(session, timeout=5) == b"session survives the router"
        procs.start(BIN / "ipcd", env=env)
        wait_for(lambda: connectable(rundir / "ipc"), what="ipcd restarted")
        fd = ctx.connect_service("pong")
        ctx.write(fd, b"new look-up")
        assert ctx.read(fd, timeout=5) == b"new look-up"
    silent.close()


# ==============================================================================================
# The remote side of an outbound connection vanishes
# ==============================================================================================


@dataclass
class TwoHosts:
    remote: Running  # host B's daemon (inbound)
    local: Running  # host A's daemon (outbound), next to ipcd
    rundir_a: Path
    scheme: str

    def network(self) -> str:
        return f"pong {self.scheme}://127.0.0.1:{self.remote.port}/pong"


@pytest.fixture(params=["tcpd", "tlsd"])
def two_hosts(request, rundir: Path, procs: Processes, pki: Pki, pong) -> Iterator[TwoHosts]:
    kind = request.param
    rundir_a = Path(str(rundir) + "-a")
    rundir_a.mkdir()
    remote = start_daemon(procs, kind, rundir, pki)
    local = start_daemon(procs, kind, rundir_a, pki, "--connect-timeout", "2")
    procs.start(BIN / "ipcd", "--timeout", "8", env={"RUNDIR": str(rundir_a)})
    wait_for(lambda: connectable(rundir_a / "ipc"), what="ipcd")
    yield TwoHosts(remote, local, rundir_a, "tcp" if kind == "tcpd" else "tls")
    with contextlib.suppress(ProcessLookupError):
        os.kill(remote.pid, signal.SIGCONT)
    import shutil

    shutil.rmtree(rundir_a, ignore_errors=True)


def test_remote_stopped_gives_a_bounded_failure(
    two_hosts: TwoHosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = two_hosts
    monkeypatch.setenv("IPC_NETWORK", h.network())
    with Context(rundir_path=h.rundir_a) as ctx:
        fd = ctx.connect_service("pong")
        ctx.write(fd, b"before")
        assert ctx.read(fd, timeout=5) == b"before"
        os.kill(h.remote.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="no answer within 2"):
                ctx.connect_service("pong", timeout=15)
            failed_after = time.monotonic() - t0
            assert failed_after < 4
            assert h.local.alive()
        finally:
            os.kill(h.remote.pid, signal.SIGCONT)
        fd = ctx.connect_service("pong")
        ctx.write(fd, b"after")
        assert ctx.read(fd, timeout=5) == b"after"
        print(
            f"\n{h.scheme}: remote stopped -> look-up failed after {failed_after:.2f} s "
            "(--connect-timeout 2)"
        )


def test_remote_killed_mid_session(
    two_hosts: TwoHosts, monkeypatch: pytest.MonkeyPatch, procs: Processes, pki: Pki
) -> None:
    h = two_hosts
    monkeypatch.setenv("IPC_NETWORK", h.network())
    with Context(rundir_path=h.rundir_a) as ctx:
        fds = [ctx.connect_service("pong") for _ in range(3)]
        for fd in fds:
            ctx.write(fd, b"x" * 1000)
            assert ctx.read(fd, timeout=5) == b"x" * 1000
        h.remote.proc.kill()  # type: ignore[attr-defined]
        t0 = time.monotonic()
        for fd in fds:
            # write() answers False once the loss is known; else read() raises.
            if ctx.write(fd, b"into the void"):
                with pytest.raises(PeerClosed):
                    ctx.read(fd, timeout=5)
        assert time.monotonic() - t0 < 5
        with pytest.raises(ServiceUnavailable):
            ctx.connect_service("pong")
        assert h.local.alive()
        # The remote comes back on the same port: reachable again.
        kind = "tcpd" if h.scheme == "tcp" else "tlsd"
        start_daemon(procs, kind, h.remote.rundir, pki, port=h.remote.port)
        fd = ctx.connect_service("pong")
        ctx.write(fd, b"back")
        assert ctx.read(fd, timeout=5) == b"back"


# ==============================================================================================
# A peer that stops reading while the other side keeps sending
# ==============================================================================================


class Flooder(threading.Thread):
    """Sends big messages on ``peer`` and never reads, until it has been
    blocked for ``stall`` seconds (back-pressure reached it) or sent ``cap``."""

    def __init__(self, peer: Peer, message: bytes, stall: float = 2.0, cap: int = 512 * MiB):
        super().__init__(daemon=True)
        self.peer, self.data, self.stall, self.cap = peer, peer.wrap(message), stall, cap
        self.sent = 0
        self.blocked = False

    def run(self) -> None:
        self.peer.sock.settimeout(self.stall)
        try:
            while self.sent < self.cap:
                self.peer.sock.sendall(self.data)
                self.sent += len(self.data)
        except TimeoutError:
            self.blocked = True
        except OSError:
            pass


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_peer_that_stops_reading(rundir: Path, procs: Processes, pki: Pki, pong) -> None:
    """For each daemon: a peer floods echoes it never reads. Back-pressure
    must reach it (its sends block) with the daemon's memory bounded by its
    queue limits, while another pair keeps flowing."""
    figures = []
    for kind in KINDS:
        d = start_daemon(procs, kind, rundir, pki, "--max-message-size", str(MiB))
        good = connect_peer(kind, d.port, pki)
        good.echo(b"warm-up" * 1000)
        slow = connect_peer(kind, d.port, pki)
        slow.echo(b"warm-up" * 1000)
        base = rss_kib(d.pid)
        peak = base
        flooder = Flooder(slow, os.urandom(256 * 1024))
        flooder.start()
        trips = 0
        while flooder.is_alive():
            good.echo(os.urandom(1000))  # the other pair keeps flowing meanwhile
            trips += 1
            peak = max(peak, rss_kib(d.pid))
        assert flooder.blocked, f"{kind}: {flooder.sent} bytes sent without back-pressure"
        for _ in range(20):
            good.echo(b"during the stall")
            peak = max(peak, rss_kib(d.pid))
        growth = peak - base
        figures.append((kind, flooder.sent, growth, trips))
        print(
            f"\n{kind}: flooder blocked after {flooder.sent / MiB:.1f} MiB; daemon RSS "
            f"+{growth / 1024:.1f} MiB (peak {peak / 1024:.1f} MiB); {trips} round trips of "
            "another pair meanwhile"
        )
        # Queue high-water 1 MiB per end, hard limit 8 MiB: the growth stays
        # well under the hard limit of one connection.
        assert growth < 8 * 1024, f"{kind}: RSS grew by {growth} KiB"
        assert flooder.sent < 64 * MiB
        slow.close()
        good.echo(b"after the slow peer left")
        assert d.alive()
        procs.stop_all()
        procs.procs.clear()
        procs.pongd(rundir)


def test_ipcd_clients_that_never_read(
    rundir: Path, procs: Processes, pong, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ipcd is not in the data path, so its 'slow peer' is a client that asks
    and never reads the answer, or keeps writing after its look-up: neither
    grows the router nor delays the others."""
    proc = procs.start(BIN / "ipcd", "--timeout", "2", env={"RUNDIR": str(rundir)})
    wait_for(lambda: connectable(rundir / "ipc"), what="ipcd")
    silent = socket.socket(socket.AF_UNIX)  # a "protocol daemon" that never answers
    silent.bind(str(rundir / "slow"))
    silent.listen()
    base = rss_kib(proc.pid)
    lookup = encode(b"pong;pong unix://pong")
    mute = []
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(rundir / "ipc"))
        s.sendall(lookup)
        mute.append(s)
    flooder = socket.socket(socket.AF_UNIX)
    flooder.connect(str(rundir / "ipc"))
    flooder.sendall(encode(b"far;far slow://h/far"))
    flooder.settimeout(0.5)
    junk = encode(b"j" * 60000)
    sent = 0
    with contextlib.suppress(TimeoutError, OSError):
        while sent < 64 * MiB:
            flooder.sendall(junk)
            sent += len(junk)
    monkeypatch.setenv("IPC_NETWORK", "pong unix://pong")
    with Context(rundir_path=rundir) as ctx:
        for _ in range(20):
            fd = ctx.connect_service("pong")
            ctx.write(fd, b"served")
            assert ctx.read(fd, timeout=5) == b"served"
            ctx.close(fd)
    growth = rss_kib(proc.pid) - base
    print(
        f"\nipcd: 200 clients not reading + {sent / MiB:.0f} MiB of junk after a look-up: "
        f"RSS +{growth / 1024:.1f} MiB, 20 other look-ups served"
    )
    assert growth < 8 * 1024
    assert proc.poll() is None
    for s in [*mute, flooder, silent]:
        s.close()


# ==============================================================================================
# The daemon runs out of descriptors
# ==============================================================================================


def start_with_fd_limit(procs: Processes, kind: str, rundir: Path, pki: Pki, limit: int) -> Running:
    import resource

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    flags = ["--listen", "127.0.0.1:0", "--handshake-timeout", "1"]
    if kind == "tlsd":
        flags += ["--cert", str(pki.cert), "--key", str(pki.key)]
    proc = procs.start(BIN / COMMANDS[kind], *flags, env={"RUNDIR": str(rundir)}, preexec_fn=lower)
    logs = LogReader(proc)
    line = logs.wait_for("listening on")
    port = int(line.rsplit(":", 1)[1].split()[0])
    return Running(kind, proc, logs, port, rundir)


def try_peer(kind: str, port: int, pki: Pki) -> Peer | None:
    """A peer if the daemon lets it through within 2 s, else None."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        if kind == "tlsd":
            ctx = ssl.create_default_context(cafile=pki.ca)
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
        if kind == "websocketd":
            head, rest = ws_upgrade(sock, "/pong", port)
            return WsPeer(sock, rest) if head.startswith(b"HTTP/1.1 101 ") else None
        sock.sendall(b"pong")
        return Peer(sock) if recv_exact(sock, 2) == b"ok" else None
    except (OSError, EOFError, ssl.SSLError):
        return None


@pytest.mark.parametrize("kind", KINDS)
def test_daemon_out_of_descriptors_keeps_serving(
    rundir: Path, procs: Processes, pki: Pki, pong, kind: str
) -> None:
    """RLIMIT_NOFILE 64: beyond ~25 pairs, new peers are refused or wait; the
    daemon survives, the pairs it has keep flowing, and once some leave it
    takes new ones again."""
    d = start_with_fd_limit(procs, kind, rundir, pki, 64)
    with concurrent.futures.ThreadPoolExecutor(40) as pool:  # all at once: 2 s in all
        tries = list(pool.map(lambda _: try_peer(kind, d.port, pki), range(40)))
    peers = [p for p in tries if p is not None]
    assert 5 <= len(peers) < 40, len(peers)  # the limit bites; how many fit varies
    assert d.alive()
    for p in peers:
        p.echo(b"still flowing")
    for p in peers[:10]:
        p.close()
    time.sleep(0.3)
    again = wait_for(lambda: try_peer(kind, d.port, pki), timeout=10, what="a new peer served")
    again.echo(b"descriptors back")
    assert d.alive()
    print(
        f"\n{kind}: with 64 descriptors, {len(peers)} pairs served, the rest refused or "
        "kept waiting; daemon alive and serving again once pairs left"
    )


def test_out_of_descriptors_is_a_clean_refusal(
    rundir: Path, procs: Processes, pki: Pki, pong
) -> None:
    d = start_with_fd_limit(procs, "tcpd", rundir, pki, 64)
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        list(pool.map(lambda _: try_peer("tcpd", d.port, pki), range(40)))
    time.sleep(1.0)
    text = d.logs.text()
    assert "internal error" not in text and "Traceback" not in text, text[-2000:]
    # At the limit the listener is retried every 100 ms: the log must not flood.
    assert text.count("accept failed") <= 1, text.count("accept failed")


def test_socket_from_the_router_behaves_like_a_direct_one(
    rundir: Path, procs: Processes, pong, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ipc_core.routing import connect

    procs.start(BIN / "ipcd", env={"RUNDIR": str(rundir)})
    wait_for(lambda: connectable(rundir / "ipc"), what="ipcd")
    direct = connect("pong", rundir, timeout=5)
    monkeypatch.setenv("IPC_NETWORK", "pong unix://pong")
    routed = connect("pong", rundir, timeout=5)
    assert direct.gettimeout() is None  # the timeout was for connecting only
    for s in (direct, routed):  # as a caller would use them: no settimeout of ours
        s.sendall(encode(b"plain recv"))
        assert recv_exact(s, 14) == encode(b"plain recv")
        s.close()
    assert routed.gettimeout() == direct.gettimeout()
