"""What a network peer may reach, tried as an attacker would (issue 11, items 1, 2, 8).

A second outbound daemon (``ipc-tcpd --service-name tcp2``) or a second
router (``ipcd --service-name router2``) in the same run directory must not be
reachable from the network under any name (else: an open relay and a port
scanner); refused names must look exactly like names that do not exist (same
answer, same time), so a peer cannot probe what runs on the host.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.helpers import BIN, connectable, recv_exact, start_listening_daemon, wait_for

#: Names a peer must not tell apart from a missing service.
HIDDEN = ["tcp2", "router2", "tcp2.ctl", "router2.ctl", "pong.lock", "secret", "tcp", "ipc"]


@pytest.fixture
def host(rundir, procs):
    """pong and secret (denied), a second tcpd and a second router, and the
    ipc-tcpd under attack with ``--allow '*' --deny secret``."""
    env = {"RUNDIR": str(rundir)}
    procs.pongd(rundir)
    procs.pongd(rundir, "secret")
    start_listening_daemon(
        procs, "ipc-tcpd", "--service-name", "tcp2", "-l", "127.0.0.1:0", env=env
    )
    router = procs.start(BIN / "ipcd", "--service-name", "router2", env=env)
    wait_for(lambda: connectable(rundir / "router2"), what="router2 up")
    assert router.poll() is None
    _, logs, port = start_listening_daemon(
        procs, "ipc-tcpd", "-l", "127.0.0.1:0", "--allow", "*", "--deny", "secret", env=env
    )
    return rundir, logs, port


def _answer(port: int, name: bytes) -> tuple[bytes, float]:
    """Send ``name`` (no terminator, as the reference does); return what came
    back before the close and how long the close took."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        started = time.monotonic()
        s.sendall(name)
        got = b""
        try:
            while chunk := s.recv(100):
                got += chunk
                if got.startswith(b"ok"):
                    break
        except ConnectionResetError:
            pass
        return got, time.monotonic() - started


def test_outbound_sides_and_routers_are_unreachable_under_any_name(host):
    _, logs, port = host
    for name in ("tcp2", "router2", "tcp2.ctl", "router2.ctl"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(name.encode() + b"\n")
            assert s.recv(100) == b"", name  # closed, never "ok"
        logs.wait_for(f"{name!r}")
    assert "local-only" in logs.wait_for("'tcp2' is local-only")
    # The open relay of the review: tcp2 then a URI to anywhere. Never "ok".
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"tcp2\n\x00\x00\x00\x1ctcp://127.0.0.1:9/whatever")
        assert s.recv(100) == b""


def test_refused_names_look_like_missing_ones(host):
    _, _, port = host
    got, missing = _answer(port, b"no-such-service")
    assert got == b""
    for name in HIDDEN:
        got, took = _answer(port, name.encode())
        assert got == b"", name
        # Same path as a missing name: the name is only taken when the peer
        # pauses (200 ms), never at once because "it exists" (0.2 ms before).
        assert took >= 0.15 and took < missing + 1.0, (name, took, missing)
    got, took = _answer(port, b"pong")
    assert got == b"ok" and took < 0.15  # a reachable name is still taken at once


def test_only_the_exact_name_unlocks_an_outbound_side(rundir, procs):
    env = {"RUNDIR": str(rundir)}
    start_listening_daemon(
        procs, "ipc-tcpd", "--service-name", "tcp2", "-l", "127.0.0.1:0", env=env
    )
    for allow in (["t*"], ["?*"], ["[a-z]*"], ["*c*"], ["*"]):
        args = [a for glob in allow for a in ("--allow", glob)]
        proc, _, port = start_listening_daemon(
            procs, "ipc-tcpd", "-l", "127.0.0.1:0", *args, env=env
        )
        for name in (b"tcp2", b"tcp", b"tcp.ctl", b"tcp2.ctl"):
            assert _answer(port, name + b"\n")[0] == b"", (allow, name)
        proc.terminate()
        proc.wait(timeout=5)
    _, _, port = start_listening_daemon(
        procs, "ipc-tcpd", "-l", "127.0.0.1:0", "--allow", "tcp2", env=env
    )
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"tcp2\n")
    assert recv_exact(s, 2) == b"ok"
    s.close()


def _ws_status(port: int, path: str) -> int:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request.encode())
        head = s.recv(4096)
    return int(head.split(b" ", 2)[1])


def test_websocket_peers_get_the_same_404_for_refused_and_missing_names(host, procs):
    rundir, _, _ = host
    env = {"RUNDIR": str(rundir)}
    _, _, port = start_listening_daemon(
        procs, "ipc-websocketd", "-l", "127.0.0.1:0", "--allow", "*", "--deny", "secret", env=env
    )
    for name in [*HIDDEN, "no-such-service"]:
        assert _ws_status(port, f"/{name}") == 404, name
    assert _ws_status(port, "/pong") == 101
