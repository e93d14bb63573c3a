"""The shared daemon engine, driven in-process with a deliberately buggy handshake."""

from __future__ import annotations

import socket

from daemons.common import ServiceAccess, open_listener, parse_listen
from daemons.server import Daemon
from daemons.tcp import TcpdHandshake
from ipc_core import Context, EventType
from tests.helpers import recv_exact, recv_msg


class BuggyHandshake(TcpdHandshake):
    """Raises a non-protocol exception when the peer names 'crash'."""

    def receive_data(self, data: bytes) -> None:
        if data.startswith(b"crash"):
            raise RuntimeError("a bug in a handshake")
        super().receive_data(data)


def pump(ctx: Context, daemon: Daemon, rounds: int = 20) -> None:
    for _ in range(rounds):
        event = ctx.wait_event(timeout=0.02)
        if event.type != EventType.TIMER:
            daemon.serve_event(event)


def test_a_handler_exception_costs_one_connection_not_the_daemon(rundir, procs, caplog):
    procs.pongd(rundir)
    with Context() as ctx:
        daemon = Daemon("test", ctx, ServiceAccess(), handshake_timeout=5)
        listener = open_listener(parse_listen("127.0.0.1:0"))
        daemon.listen(listener, lambda _peer: BuggyHandshake())
        port = listener.getsockname()[1]
        bad = socket.create_connection(("127.0.0.1", port), timeout=5)
        bad.sendall(b"crash")
        pump(ctx, daemon)
        assert bad.recv(10) == b""  # closed, not left hanging
        assert "internal error" in caplog.text and "a bug in a handshake" in caplog.text
        assert daemon.metrics.errors.value(kind="internal") == 1
        good = socket.create_connection(("127.0.0.1", port), timeout=5)
        good.sendall(b"pong")
        pump(ctx, daemon)
        assert recv_exact(good, 2) == b"ok"
        good.sendall(b"\x00\x00\x00\x02hi")
        pump(ctx, daemon)
        assert recv_msg(good) == b"hi"
        assert daemon.metrics.connections_open.value() == 1


def test_daemon_raises_its_soft_descriptor_limit(rundir):
    import resource

    from daemons.server import raise_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        with Context() as ctx:
            Daemon("test", ctx, ServiceAccess(), max_connections=1000)
            now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            assert now == min(2064, hard)
        assert raise_fd_limit(10) >= 10
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
