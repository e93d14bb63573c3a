"""ipc-websocketd's memory under clients that misbehave on purpose: real
processes on 127.0.0.1, RSS read from /proc. Each test prints its figures."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from websockets.utils import apply_mask

from tests.helpers import wait_for
from tests.integration.test_websocketd import WsDaemon, echo, websocketd  # noqa: F401

KiB = 1024
MiB = 1024 * KiB
CONNECTIONS = 10
#: What the attacks may add to the daemon's RSS (issue 11, item 4 and 7).
LIMIT = 10 * MiB


def rss(daemon: WsDaemon) -> int:
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()  # type: ignore[attr-defined]
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * KiB  # type: ignore[union-attr]


@contextlib.contextmanager
def peak_rss(daemon: WsDaemon) -> Iterator[list[int]]:
    """Sample the daemon's RSS every 10 ms; yields [baseline, peak]."""
    figures = [rss(daemon), 0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            with contextlib.suppress(OSError, AttributeError):
                figures[1] = max(figures[1], rss(daemon))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield figures
    finally:
        done.set()
        sampler.join(2)
        figures[1] = max(figures[1], rss(daemon))


def frame(opcode: int, payload: bytes, *, fin: bool = True, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


def upgraded(port: int, rcvbuf: int = 4 * KiB) -> socket.socket:
    """A raw client after its 101, with a small receive buffer: it reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /pong HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


def attack(port: int, send: Callable[[socket.socket], None]) -> list[str]:
    """Run ``send`` on CONNECTIONS clients at once; how each ended."""
    socks = [upgraded(port) for _ in range(CONNECTIONS)]
    outcomes = [""] * CONNECTIONS

    def run(i: int) -> None:
        try:
            send(socks[i])
            outcomes[i] = "sent all"
        except OSError as exc:
            outcomes[i] = f"cut ({type(exc).__name__})"

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    time.sleep(0.3)  # let the daemon finish what it read
    for sock in socks:
        sock.close()
    return outcomes


def report(what: str, figures: list[int], outcomes: list[str]) -> int:
    added = figures[1] - figures[0]
    print(
        f"\n{what}: RSS {figures[0] / MiB:.1f} -> peak {figures[1] / MiB:.1f} MiB"
        f" (+{added / MiB:.1f} MiB); clients: {sorted(set(outcomes))}"
    )
    return added


def warm_up(daemon: WsDaemon) -> None:
    for _ in range(3):
        with daemon.connect() as ws:
            assert echo(ws, b"w" * 100_000) == b"w" * 100_000


def test_ping_flood_from_clients_that_do_not_read(websocketd) -> None:  # noqa: F811
    daemon = websocketd("--ping-interval", "0")
    warm_up(daemon)
    pings = frame(0x9, b"p" * 125) * 512  # 64 KiB of pings per write

    def flood(sock: socket.socket) -> None:
        for _ in range(12 * MiB // len(pings)):  # the old code queued every pong
            sock.sendall(pings)

    with peak_rss(daemon) as figures:
        outcomes = attack(daemon.port, flood)
    added = report(f"ping flood, {CONNECTIONS} clients not reading", figures, outcomes)
    daemon.wait_log(r"pings faster than it reads the pongs")
    assert added < LIMIT
    warm_up(daemon)  # still serving


def test_unfinished_fragmented_messages(websocketd) -> None:  # noqa: F811
    daemon = websocketd()
    warm_up(daemon)
    piece = os.urandom(64 * KiB)

    def fragments(sock: socket.socket) -> None:
        sock.sendall(frame(0x2, piece, fin=False))
        for _ in range(6 * MiB // len(piece)):  # never the final fragment
            sock.sendall(frame(0x0, piece, fin=False))
        time.sleep(1)  # hold it open while RSS is sampled

    with peak_rss(daemon) as figures:
        outcomes = attack(daemon.port, fragments)
    added = report(f"unfinished fragmented messages, {CONNECTIONS} clients", figures, outcomes)
    daemon.wait_log(r"unfinished message of \d+ bytes")
    assert added < LIMIT
    warm_up(daemon)


def test_unfinished_big_frames_are_streamed(websocketd) -> None:  # noqa: F811
    daemon = websocketd()
    warm_up(daemon)
    piece = os.urandom(64 * KiB)

    def big_frame(sock: socket.socket) -> None:
        sock.sendall(frame(0x2, piece, length=15 * MiB)[: 14 + len(piece)])
        for _ in range(4 * MiB // len(piece)):  # 4 of the 15 MiB announced
            sock.sendall(apply_mask(piece, b"\0\0\0\0"))
        time.sleep(1)

    with peak_rss(daemon) as figures:
        outcomes = attack(daemon.port, big_frame)
    added = report(f"unfinished 15 MiB frames, {CONNECTIONS} clients", figures, outcomes)
    assert added < LIMIT
    warm_up(daemon)


def test_large_static_file_for_clients_that_never_read(websocketd, tmp_path: Path) -> None:  # noqa: F811
    site = tmp_path / "site"
    site.mkdir()
    (site / "big.bin").write_bytes(os.urandom(4 * MiB - 1))
    (site / "index.html").write_text("<p>hi</p>")
    daemon = websocketd("--static", str(site), "--max-connections-per-ip", "1000")
    warm_up(daemon)
    clients = []
    with peak_rss(daemon) as figures:
        for _ in range(60):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
            sock.connect(("127.0.0.1", daemon.port))
            sock.sendall(f"GET /big.bin HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\n\r\n".encode())
            clients.append(sock)
        time.sleep(1.5)  # inside the 5 s the daemon waits for them to read
    added = report("60 clients of a 4 MiB file, not reading", figures, ["waiting"])
    # The answer is right for a client that does read.
    reader = clients[0]
    reader.settimeout(10)
    data = b""
    while chunk := reader.recv(MiB):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 4194303" in head and body == (site / "big.bin").read_bytes()
    for sock in clients:
        sock.close()
    assert added < LIMIT
    wait_for(lambda: rss(daemon) < figures[1] + MiB, 10, what="RSS to settle")


def test_large_static_file_over_tls_is_streamed(websocketd, tmp_path: Path, pki) -> None:  # noqa: F811
    """Over https each answer is encrypted for its client: held whole, 60
    clients that never read cost 60 copies of the file. Streamed, one piece
    each (the engine asks for the next piece as the socket drains)."""
    import ssl

    site = tmp_path / "site"
    site.mkdir()
    (site / "big.bin").write_bytes(os.urandom(4 * MiB - 1))
    daemon = websocketd(
        "--static", str(site), "--max-connections-per-ip", "1000",
        "--cert", str(pki.cert), "--key", str(pki.key),
    )  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    request = f"GET /big.bin HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\n\r\n".encode()
    clients = []
    with peak_rss(daemon) as figures:
        for _ in range(60):
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
            raw.settimeout(10)
            raw.connect(("127.0.0.1", daemon.port))
            sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(request)
            clients.append(sock)
        time.sleep(1.5)
    added = report("60 https clients of a 4 MiB file, not reading", figures, ["waiting"])
    reader = clients[0]
    data = b""
    with contextlib.suppress(ssl.SSLEOFError):
        while chunk := reader.recv(MiB):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 4194303" in head and body == (site / "big.bin").read_bytes()
    for sock in clients:
        sock.close()
    assert added < LIMIT
