"""The shared daemon engine, driven in-process with a deliberately buggy handshake."""

from __future__ import annotations

import socket

from daemons.codecs.tcp import TcpdHandshake
from daemons.engine.daemon import Daemon
from daemons.engine.listeners import open_listener, parse_listen
from daemons.engine.policy import ServiceAccess
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

    from daemons.engine.listeners import raise_fd_limit

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


def pump_for(ctx: Context, daemon: Daemon, seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        event = ctx.wait_event(timeout=0.02)
        if event.type != EventType.TIMER:
            daemon.serve_event(event)


def test_a_failing_handshake_factory_leaves_the_counters_true(rundir, caplog):
    """ipc_connections_open read 5 with nothing open after 5 such failures."""

    def broken(_peer: str) -> TcpdHandshake:
        raise ValueError("no --cert/--key to serve TLS with")

    with Context() as ctx:
        daemon = Daemon("test", ctx, ServiceAccess())
        listener = open_listener(parse_listen("127.0.0.1:0"))
        daemon.listen(listener, broken)
        port = listener.getsockname()[1]
        peers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        pump(ctx, daemon)
        for s in peers:
            assert s.recv(10) == b""
        m = daemon.metrics
        assert m.connections_open.value() == 0
        assert m.handshake_failures.value(reason="internal") == 5
        assert m.errors.value(kind="internal") == 5
        assert "no --cert/--key" in caplog.text and "Traceback" not in caplog.text


def test_a_metrics_timer_never_closes_a_newer_connection_on_the_same_descriptor(rundir):
    with Context() as ctx:
        daemon = Daemon("test", ctx, ServiceAccess(), handshake_timeout=1.0)
        listener = open_listener(parse_listen("127.0.0.1:0"))
        daemon.serve_metrics(listener)
        port = listener.getsockname()[1]
        first = socket.create_connection(("127.0.0.1", port), timeout=5)
        pump_for(ctx, daemon, 0.1)
        (old_fd,) = daemon.metrics_http.clients
        first.close()  # EOF: the daemon closes its end; the timer stays armed
        pump_for(ctx, daemon, 0.4)
        assert not daemon.metrics_http.clients
        second = socket.create_connection(("127.0.0.1", port), timeout=5)
        pump_for(ctx, daemon, 0.1)
        assert list(daemon.metrics_http.clients) == [old_fd]  # the number was reused
        pump_for(ctx, daemon, 0.7)  # the first connection's deadline passes
        second.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        pump_for(ctx, daemon, 0.1)
        assert second.recv(4096).startswith(b"HTTP/1.1 200 OK")


def test_a_probe_that_resets_at_once_is_not_a_warning(rundir, caplog):
    """HAProxy's health check connects and resets: counted, debug-logged only."""
    import logging
    import struct as _struct

    with Context() as ctx:
        daemon = Daemon("test", ctx, ServiceAccess(), handshake_timeout=5)
        listener = open_listener(parse_listen("127.0.0.1:0"))
        daemon.listen(listener, lambda _peer: TcpdHandshake())
        port = listener.getsockname()[1]
        with caplog.at_level(logging.DEBUG, logger="ipc.daemon"):
            for _ in range(3):
                probe = socket.create_connection(("127.0.0.1", port), timeout=5)
                pump(ctx, daemon, rounds=3)  # accepted: the handshake is waiting
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _struct.pack("ii", 1, 0))
                probe.close()  # RST
                pump(ctx, daemon, rounds=5)
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == []
        assert "without sending anything" in caplog.text
        assert daemon.metrics.handshake_failures.value(reason="peer closed") == 3


def test_a_refusal_with_its_own_kind_is_counted_under_it(rundir):
    """A token refusal is not a protocol error: HandshakeRefused carries its kind."""
    from daemons.engine.errors import Failure, HandshakeRefused

    class TokenHandshake(TcpdHandshake):
        def receive_data(self, data: bytes) -> None:
            raise HandshakeRefused(Failure.UNAUTHORIZED, "no token")

    with Context() as ctx:
        daemon = Daemon("test", ctx, ServiceAccess(), handshake_timeout=5)
        listener = open_listener(parse_listen("127.0.0.1:0"))
        daemon.listen(listener, lambda _peer: TokenHandshake())
        client = socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=5)
        client.sendall(b"pong\n")
        pump(ctx, daemon)
        assert client.recv(10) == b""
        assert daemon.metrics.handshake_failures.value(reason="unauthorized") == 1
        assert daemon.metrics.handshake_failures.value(reason="protocol error") == 0
