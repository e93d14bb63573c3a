"""Local clients of the daemons' own services, with real processes (issue 11,
items 9 and 17): a client that never sends its request is closed after the
handshake timeout, and ipcd's failure answers are framed LibIPC messages."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from ipc_core import Context, ServiceUnavailable, encode
from tests.helpers import BIN, LogReader, connectable, recv_msg, start_listening_daemon, wait_for

N = 25  # silent clients per service


def start_ipcd(procs, rundir, *args: str) -> LogReader:
    proc = procs.start(BIN / "ipcd", *args, env={"RUNDIR": str(rundir)})
    wait_for(lambda: connectable(rundir / "ipc.ctl") or proc.poll() is not None, what="ipcd")
    assert proc.poll() is None
    return LogReader(proc)


def silent_clients(path, n: int = N) -> list[socket.socket]:
    clients = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        clients.append(s)
    return clients


def seconds_until_all_closed(clients: list[socket.socket], limit: float) -> float:
    """recv() == b"" on every client; returns how long the slowest took."""
    t0 = time.monotonic()
    for s in clients:
        s.settimeout(max(0.01, limit - (time.monotonic() - t0)))
        try:
            assert s.recv(10) == b"", "a silent client got data"
        except TimeoutError:
            pytest.fail(f"a silent client was still open after {limit} s")
        s.close()
    return time.monotonic() - t0


def test_silent_local_clients_are_closed_after_the_handshake_timeout(rundir, procs):
    start_ipcd(procs, rundir, "--handshake-timeout", "1")
    _, logs, _ = start_listening_daemon(
        procs,
        "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "1",
        env={"RUNDIR": str(rundir)},
    )
    wait_for(lambda: connectable(rundir / "tcp"), what="tcp service")
    t0 = time.monotonic()
    clients = {name: silent_clients(rundir / name) for name in ("ipc", "ipc.ctl", "tcp", "tcp.ctl")}
    # A control client that asks, then falls silent, is closed too.
    with Context(rundir_path=rundir) as ctx:
        fd = ctx.connect_service("tcp.ctl")
        ctx.write(fd, b"status")
        assert b'"daemon":"ipc-tcpd"' in ctx.read(fd, timeout=5)
        ctx.close(fd)
    for name, group in clients.items():
        took = seconds_until_all_closed(group, 4)
        assert time.monotonic() - t0 >= 0.9, name  # not before the deadline
        print(f"\n{N} silent clients of {name} closed ({took:.2f} s after the previous group)")
    logs.wait_for("a local client of 'tcp' sent nothing within 1 s")
    with Context(rundir_path=rundir) as ctx:  # still serving
        fd = ctx.connect_service("tcp.ctl")
        ctx.write(fd, b"status")
        assert b"ipc_local_timeouts_total" in ctx.read(fd, timeout=5)


def test_ipcd_failure_answer_is_one_framed_message(rundir, procs):
    start_ipcd(procs, rundir)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(rundir / "ipc"))
    s.sendall(encode(b"pong;other unix://pong"))
    data, fds, _, _ = socket.recv_fds(s, 4096, 1)
    assert not fds
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4 and data[4:].startswith(b"error: no route for 'pong'"), data
    s.close()
    # A LibIPC framed reader sees one whole message.
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(rundir / "ipc"))
    s.sendall(encode(b"no separator"))
    assert recv_msg(s).startswith(b"error: bad look-up message")
    s.close()


def test_ipc_scheme_loop_fails_with_the_inner_reason(rundir, procs, monkeypatch):
    """pong -> ipc://...: ipcd asks itself (the local daemon named 'ipc'); the
    inner answer used to be raw, read by the outer ipcd as a 1.7 GB length."""
    logs = start_ipcd(procs, rundir)
    monkeypatch.setenv("IPC_NETWORK", "pong ipc://127.0.0.1:1/pong")
    with Context(rundir_path=rundir) as ctx, pytest.raises(ServiceUnavailable) as info:
        ctx.connect_service("pong")
    message = str(info.value)
    assert "bad look-up message" in message, message
    assert "\x00" not in message and "answered" not in message, message
    logs.wait_for("bad look-up message")
