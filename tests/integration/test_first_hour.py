"""What a new user reads in the logs, with real processes (issue 12).

The start-up line of the allow/deny policy and the warning for a listener
other hosts reach with no ``--allow``; peers written as the addresses they
are (no ``::ffff:``); "1 connection"; an oversize "length" that is really a
text client named as such; a failed outbound connect called a connect
failure; a ``unix://`` route to a missing service not blamed on a daemon;
no open-file-limit line on a normal start. Traffic goes to 127.0.0.1 only
(a wildcard listener is reached through it).
"""

from __future__ import annotations

import re
import resource
import socket
import subprocess
import time

from ipc_core import Context
from tests.helpers import BIN, LogReader, recv_exact, wait_for
from tests.helpers import start_listening_daemon as start

POLICY = "network peers may reach"
WARNING = "reachable from other hosts"


def named_peer(port: int, name: bytes = b"pong") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(name + b"\n")
    assert recv_exact(s, 2) == b"ok"
    return s


def settle(logs: LogReader) -> str:
    """The log once the daemon has said what it says at start (the policy
    line and its warning are written together)."""
    logs.wait_for(POLICY)
    time.sleep(0.3)
    return logs.text()


def test_loopback_listener_logs_the_policy_and_no_warning(rundir, procs) -> None:
    _, logs, _ = start(procs, "ipc-tcpd", "--listen", "127.0.0.1:0")
    text = settle(logs)
    line = logs.wait_for(POLICY)
    assert "every local service except the protected ones (ipc, tcp, tls, ws, wss)" in line
    assert WARNING not in text
    assert "open-file limit" not in text


def test_allow_list_is_in_the_policy_line(rundir, procs) -> None:
    _, logs, _ = start(procs, "ipc-tcpd", "--listen", "127.0.0.1:0", "--allow", "pong")
    assert "network peers may reach only pong" in logs.wait_for(POLICY)


def test_wildcard_listener_warns_and_peers_are_plain_ipv4(rundir, procs) -> None:
    """``--listen :0`` (every interface, dual stack) with no --allow: a
    warning; an IPv4 client through it is logged as 127.0.0.1, not
    [::ffff:127.0.0.1]."""
    procs.pongd(rundir)
    _, logs, port = start(procs, "ipc-tcpd", "--listen", ":0")
    warning = logs.wait_for(WARNING)
    assert "(every interface)" in warning and "--allow NAME" in warning
    with named_peer(port) as s:
        client_port = s.getsockname()[1]
        line = logs.wait_for(f":{client_port} -> 'pong'")
    assert f"127.0.0.1:{client_port} -> 'pong'" in line
    assert "::ffff:" not in logs.text()


def test_wildcard_listener_with_an_allow_list_does_not_warn(rundir, procs) -> None:
    _, logs, _ = start(procs, "ipc-tcpd", "--listen", ":0", "--allow", "pong")
    assert WARNING not in settle(logs)


def test_one_connection_is_singular(rundir, procs) -> None:
    _, logs, port = start(
        procs, "ipc-tcpd", "--listen", "127.0.0.1:0", "--max-connections-per-ip", "1"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as second:
            second.settimeout(5)
            assert second.recv(10) == b""
        line = logs.wait_for("(--max-connections-per-ip)")
    assert "1 connection open from 127.0.0.1" in line
    assert "1 connections" not in line


def test_text_sent_as_a_message_is_named_as_text(rundir, procs) -> None:
    """An HTTP request line after the name: the oversize warning names the
    peer and says the four "length" bytes are text."""
    procs.pongd(rundir)
    _, logs, port = start(procs, "ipc-tcpd", "--listen", "127.0.0.1:0")
    with named_peer(port) as s:
        client_port = s.getsockname()[1]
        s.sendall(b"GET / HTTP/1.1\r\n")
        s.settimeout(5)
        assert s.recv(10) == b""
    line = logs.wait_for("limit is")
    assert f"peer 127.0.0.1:{client_port}" in line
    assert "the bytes 'GET ' look like text" in line


def test_text_sent_to_a_local_service_is_named_as_text(rundir, procs) -> None:
    """The same on a plain LibIPC service (the Context's own check)."""
    pongd = procs.pongd(rundir)
    logs = LogReader(pongd)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(rundir / "pong"))
        s.sendall(b"hello there\n")
        s.settimeout(5)
        assert s.recv(10) == b""
    line = logs.wait_for("limit is")
    assert "local pid" in line and "the bytes 'hell' look like text" in line


def test_outbound_connect_failure_says_connect(rundir, procs) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _, logs, _ = start(procs, "ipc-tcpd", "--listen", "127.0.0.1:0")
    with Context(rundir_path=rundir) as ctx:
        fd = ctx.connect_service("tcp")
        ctx.write(fd, f"tcp://127.0.0.1:{port}/pong".encode())
        answer = ctx.read(fd, timeout=5).decode()
    assert f"connect to 127.0.0.1:{port}: Connection refused" in answer, answer
    assert "write failed" not in answer
    assert "write failed" not in logs.wait_for("cannot reach")


def test_unix_route_to_a_missing_service_blames_no_daemon(rundir, procs) -> None:
    ipcd = procs.start(BIN / "ipcd")
    logs = LogReader(ipcd)
    logs.wait_for("serving 'ipc'")
    out = subprocess.run(
        [str(BIN / "ipc"), "send", "db", "hi", "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "RUNDIR": str(rundir), "IPC_NETWORK": "db unix://db-2"},
    )
    assert out.returncode == 1
    assert f"no local service 'db-2' in {rundir}" in out.stderr, out.stderr
    assert "daemon" not in out.stderr


def _low_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def test_no_open_file_limit_line_on_a_normal_start(rundir, procs) -> None:
    """With a hard limit below what --max-connections's default would need,
    neither ipcd (which has no such flag) nor ipc-tcpd talks about it."""
    ipcd = procs.start(BIN / "ipcd", preexec_fn=_low_file_limit)
    ipcd_logs = LogReader(ipcd)
    ipcd_logs.wait_for("serving 'ipc'")
    tcpd = procs.start(BIN / "ipc-tcpd", "--listen", "127.0.0.1:0", preexec_fn=_low_file_limit)
    tcpd_logs = LogReader(tcpd)
    tcpd_logs.wait_for(POLICY)
    time.sleep(0.3)
    for text in (ipcd_logs.text(), tcpd_logs.text()):
        assert "open-file limit" not in text
        assert not re.search(r"allows about \d+ connections", text)
    wait_for(lambda: ipcd.poll() is None and tcpd.poll() is None, what="both still running")


def test_websocketd_vv_logs_every_data_frame(rundir, procs) -> None:
    """-vv promises every frame: a data frame each way is logged, also the
    ones the fast path would carry without websockets' parser."""
    from websockets.sync.client import connect

    procs.pongd(rundir)
    proc = procs.start(BIN / "ipc-websocketd", "--listen", "127.0.0.1:0", "-vv")
    logs = LogReader(proc)
    line = logs.wait_for("ipc-websocketd: listening on 127.0.0.1:")
    port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
    with connect(f"ws://127.0.0.1:{port}/pong", open_timeout=5) as ws:
        for _ in range(3):  # the first frames of a connection, and the steady state
            ws.send("frame-probe")
            assert ws.recv(timeout=5) == b"frame-probe"
    received = logs.wait_for("< TEXT 'frame-probe'")
    assert "[11 bytes]" in received
    logs.wait_for("> BINARY 'frame-probe'")
    assert logs.text().count("< TEXT 'frame-probe'") == 3
    assert logs.text().count("> BINARY 'frame-probe'") == 3


def test_a_silent_preconnect_is_not_a_warning(rundir, procs) -> None:
    """A browser preconnects to the demo page's port and closes without a
    byte: counted, but no warning under -q. A peer that closes mid-request
    still gets its warning."""
    procs.pongd(rundir)
    _, logs, port = start(procs, "ipc-websocketd", "-l", "127.0.0.1:0", env={"RUNDIR": str(rundir)})
    for _ in range(3):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /pong HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        client = s.getsockname()[1]
    line = logs.wait_for(f":{client}: closed the connection during the handshake")
    assert "WARNING" in line
    # The three silent ones came first and were handled first: no warning.
    warnings = [x for x in logs.lines if "WARNING" in x]
    assert warnings == [line], warnings
