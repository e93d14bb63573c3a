"""Resource limits of the daemon engine with real processes (issue 11, items 6 and 11).

One remote source cannot hold all of a daemon's descriptors
(--max-connections-per-ip), a relayed connection that carries nothing is
closed (--idle-timeout), the descriptor limit does not flood the log, and the
metrics listener has a connection cap.
"""

from __future__ import annotations

import contextlib
import re
import resource
import select
import socket
import time
import urllib.request

from daemons.engine.control import MAX_HTTP_CONNECTIONS
from daemons.ipc_status import query
from ipc_core import Context, encode
from tests.helpers import BIN, LogReader, connectable, recv_exact, recv_msg, wait_for
from tests.helpers import start_listening_daemon as start


def tcp_client(port: int, source: str | None = None) -> socket.socket:
    """A switched TCPd peer of ``pong`` (from ``source`` if given)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    if source is not None:
        s.bind((source, 0))  # Linux routes all of 127/8 to lo
    s.connect(("127.0.0.1", port))
    s.sendall(b"pong\n")
    assert recv_exact(s, 2) == b"ok"
    return s


def echo(s: socket.socket, payload: bytes = b"ping") -> None:
    s.sendall(encode(payload))
    assert recv_msg(s) == payload


def closed_within(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_max_connections_per_ip_refuses_the_sixth_from_one_address(rundir, procs):
    procs.pongd(rundir)
    _, logs, port = start(
        procs,
        "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        "--max-connections-per-ip",
        "5",
        env={"RUNDIR": str(rundir)},
    )
    held = [tcp_client(port) for _ in range(3)]  # switched
    held += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    sixth = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert closed_within(sixth, 3)  # handshaking + switched count alike
    logs.wait_for("5 connections open from 127.0.0.1 (--max-connections-per-ip)")
    other = tcp_client(port, source="127.0.0.2")  # another source is served
    echo(other)
    for s in held[:3]:
        echo(s)  # the five are unaffected
    held[0].close()  # a freed slot is usable again

    def reconnect() -> socket.socket | None:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"pong\n")
        try:
            return s if recv_exact(s, 2) == b"ok" else None
        except (EOFError, ConnectionResetError):
            s.close()
            return None

    again = wait_for(reconnect, timeout=5, what="a slot from 127.0.0.1")
    echo(again)
    with Context(rundir_path=rundir) as ctx:
        failures = query(ctx, "tcp.ctl", 5)["metrics"]["ipc_handshake_failures_total"]
    counted = {s["labels"]["reason"]: s["value"] for s in failures}
    assert counted.get("too many from one address", 0) >= 1, counted
    for s in [*held, sixth, other, again]:
        s.close()


def test_idle_timeout_closes_a_silent_relayed_connection_not_an_active_one(rundir, procs):
    procs.pongd(rundir)
    _, logs, port = start(
        procs,
        "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        "--idle-timeout",
        "1",
        env={"RUNDIR": str(rundir)},
    )
    idle, active = tcp_client(port), tcp_client(port)
    t0 = time.monotonic()
    closed_at = None
    while time.monotonic() - t0 < 2.5:
        echo(active)  # a message every 0.2 s keeps it open
        ready, _, _ = select.select([idle], [], [], 0.2)
        if ready and closed_at is None:
            assert idle.recv(100) == b""
            closed_at = time.monotonic() - t0
    assert closed_at is not None, "the idle connection was not closed"
    assert 0.9 <= closed_at <= 2.0, closed_at
    echo(active)
    line = logs.wait_for("idle for")
    assert "--idle-timeout 1" in line, line
    print(f"\nidle connection closed after {closed_at:.2f} s (--idle-timeout 1)")
    active.close()


def test_descriptor_limit_is_logged_seldom_and_survived(rundir, procs):
    """At RLIMIT_NOFILE the accept errors (network listener and the local
    `tcp` service both retried every 100 ms) are logged at most every 5 s."""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    procs.pongd(rundir)
    proc, logs, port = start(
        procs,
        "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "30",
        env={"RUNDIR": str(rundir)},
    )
    proc.terminate()  # restart it with the low limit (start() has no preexec_fn)
    proc.wait(5)
    proc = procs.start(
        BIN / "ipc-tcpd",
        "--listen",
        f"127.0.0.1:{port}",
        "--handshake-timeout",
        "30",
        env={"RUNDIR": str(rundir)},
        preexec_fn=low_limit,
    )
    logs = LogReader(proc)
    logs.wait_for("listening on")
    wait_for(lambda: connectable(rundir / "tcp"), what="tcp service")
    peers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(80)]
    local = socket.socket(socket.AF_UNIX)
    local.connect(str(rundir / "tcp"))  # waits in the backlog of a full daemon
    time.sleep(3)
    accept_lines = [line for line in logs.lines if "accept" in line]
    assert 1 <= len(accept_lines) <= 2, "".join(accept_lines)
    for s in [*peers, local]:
        s.close()
    s = wait_for(lambda: _try_client(port), timeout=5, what="service after the limit")
    echo(s)
    assert proc.poll() is None
    print(f"\n3 s at the descriptor limit: {len(accept_lines)} log line(s) about accept")
    s.close()


def _try_client(port: int) -> socket.socket | None:
    try:
        return tcp_client(port)
    except (OSError, EOFError, AssertionError):
        return None


def test_metrics_listener_caps_its_connections(rundir, procs):
    _, logs, _port = start(
        procs,
        "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--handshake-timeout",
        "3",
        env={"RUNDIR": str(rundir)},
    )
    line = logs.wait_for("metrics on http://")
    mport = int(re.search(r"http://[^:]+:(\d+)/", line).group(1))
    extra = 8
    idle = [
        socket.create_connection(("127.0.0.1", mport), timeout=5)
        for _ in range(MAX_HTTP_CONNECTIONS + extra)
    ]
    time.sleep(0.5)
    readable, _, _ = select.select(idle, [], [], 0)
    closed = [s for s in readable if closed_within(s, 0)]
    assert len(closed) == extra, len(closed)  # beyond the cap: closed at once
    for s in idle:
        s.close()

    def scrape() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None

    text = wait_for(scrape, timeout=5, what="a scrape")
    assert f'ipc_errors_total{{kind="metrics busy"}} {extra}' in text, text
    logs.wait_for("refusing metrics client")


def test_idle_timeout_applies_to_tls_relays_too(rundir, procs, pki):
    import ssl

    procs.pongd(rundir)
    _, logs, port = start(
        procs,
        "ipc-tlsd",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        str(pki.cert),
        "--key",
        str(pki.key),
        "--idle-timeout",
        "1",
        env={"RUNDIR": str(rundir)},
    )
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(b"pong\n")
    assert recv_exact(s, 2) == b"ok"
    echo(s)
    t0 = time.monotonic()
    s.settimeout(4)
    with contextlib.suppress(ssl.SSLError, ConnectionResetError):  # EOF or a reset
        assert s.recv(100) == b""
    assert 0.9 <= time.monotonic() - t0 <= 2.5
    logs.wait_for("(--idle-timeout 1); closing")
    s.close()


def test_source_key_groups_ipv6_per_64_and_maps_ipv4() -> None:
    from daemons.engine.daemon import source_key

    assert source_key(("192.0.2.7", 4000)) == "192.0.2.7"
    assert source_key(("::ffff:192.0.2.7", 4000, 0, 0)) == "192.0.2.7"
    assert source_key(("2001:db8:1:2::5", 1, 0, 0)) == source_key(("2001:db8:1:2:ffff::1", 2, 0, 0))
    assert source_key(("2001:db8:1:2::5", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert source_key(("2001:db8:1:3::5", 1, 0, 0)) != "2001:db8:1:2::/64"
    assert source_key(("fe80::1%lo", 1, 0, 1)) == "fe80::/64"
    assert source_key("") is None  # a Unix peer: not limited


def test_log_throttle_counts_what_it_held_back() -> None:
    from daemons.engine.log import LogThrottle

    throttle = LogThrottle(interval=60)
    assert throttle.due() == ""
    assert [throttle.due() for _ in range(3)] == [None, None, None]
    throttle._last -= 61
    assert throttle.due() == " (3 more since the last report)"
