"""The engine's structure, driven in-process over real sockets: one owner per
descriptor, one deadline helper, the on_stop hook, one way to reach a local
service, error kinds carried with the error (issue 13, item 3)."""

from __future__ import annotations

import socket
import time

import pytest

from daemons.codecs.tcp import TcpdClient, TcpdHandshake
from daemons.engine.daemon import Daemon
from daemons.engine.deadlines import Deadlines
from daemons.engine.errors import Failure, LocalRefused
from daemons.engine.listeners import open_listener, parse_listen
from daemons.engine.local import connect_local
from daemons.engine.outbound import Outbound
from daemons.engine.policy import ServiceAccess
from ipc_core import Context, EventType, ProtocolError, encode
from tests.helpers import recv_exact, recv_msg


def pump(ctx: Context, daemon: Daemon, seconds: float = 0.3) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        event = ctx.wait_event(timeout=0.02)
        if event.type != EventType.TIMER:
            daemon.serve_event(event)


def test_each_descriptor_has_one_owner_until_it_closes(rundir, procs):
    procs.pongd(rundir)
    with Context() as ctx:
        daemon = Daemon("test", ctx, ServiceAccess(), handshake_timeout=5)
        listener = open_listener(parse_listen("127.0.0.1:0"))
        daemon.listen(listener, lambda _peer: TcpdHandshake(daemon.reachable))
        daemon.serve_control("test.ctl")
        peer = socket.create_connection(listener.getsockname()[:2], timeout=5)
        pump(ctx, daemon, 0.1)
        (fd,) = daemon._pending
        assert daemon.owner_of(fd) == daemon._on_pending
        peer.sendall(b"pong")
        pump(ctx, daemon, 0.1)
        assert recv_exact(peer, 2) == b"ok"
        assert not daemon._pending
        assert daemon.owner_of(fd) == daemon.relayed  # switched: the engine's no-op owner
        peer.sendall(encode(b"hi"))
        pump(ctx, daemon, 0.1)
        assert recv_msg(peer) == b"hi"
        peer.close()
        pump(ctx, daemon, 0.2)
        assert daemon.owner_of(fd) is None
        assert daemon.metrics.connections_open.value() == 0
        assert not hasattr(daemon, "handlers")  # no ordered chain to fall through


@pytest.mark.parametrize("remote_does", ["refuse", "close"])
def test_outbound_forgets_a_remote_that_fails_during_the_attempt(rundir, remote_does):
    """The remote refuses the connection (reported by the Context as a
    DISCONNECTION) or accepts and closes: the client gets an error and the
    outbound side keeps nothing (the old handler chain left a refused
    remote's entry behind, keyed by a descriptor number soon reused)."""
    remote = socket.create_server(("127.0.0.1", 0))
    port = remote.getsockname()[1]
    if remote_does == "refuse":
        remote.close()
    with Context() as ctx:
        daemon = Daemon("test", ctx, ServiceAccess(), handshake_timeout=5)
        outbound = Outbound(daemon, "tcp", {"tcp": lambda uri: TcpdClient(uri.service)})
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(str(rundir / "tcp"))
        client.sendall(encode(f"tcp://127.0.0.1:{port}/pong".encode()))
        pump(ctx, daemon, 0.2)
        if remote_does == "close":
            accepted, _ = remote.accept()
            accepted.close()
            pump(ctx, daemon, 0.3)
        answer = recv_msg(client)
        assert answer.startswith(f"error: cannot reach tcp://127.0.0.1:{port}/pong".encode())
        if remote_does == "refuse":
            assert b"Connection refused" in answer
        assert outbound._by_remote == {} and outbound._by_client == {}
        assert len(outbound._deadlines) == 0
        outbound.close()
        client.close()
    remote.close()


def test_on_stop_runs_once_before_the_loop_ends(rundir):
    with Context() as ctx:
        daemon = Daemon("test", ctx, ServiceAccess())
        calls = []
        daemon.on_stop = lambda: calls.append(ctx.wait_event(timeout=0).type)
        daemon.stop()
        daemon.stop()
        assert calls == [EventType.TIMER]  # the loop still ran when on_stop did
        assert list(ctx) == []  # then the loop stopped


def test_a_restarted_or_finished_deadline_never_fires_late(rundir):
    with Context() as ctx:
        deadlines: Deadlines[int] = Deadlines(ctx)
        fired: list[str] = []
        deadlines.start(1, 0.05, lambda: fired.append("old"))
        deadlines.start(1, 0.2, lambda: fired.append("new"))
        deadlines.start(2, 0.05, lambda: fired.append("done"))
        assert deadlines.done(2) and not deadlines.done(2)
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            ctx.wait_event(timeout=0.02)
        assert fired == ["new"]
        assert 1 not in deadlines and len(deadlines) == 0


def test_connect_local_failures_carry_their_kind(rundir):
    with pytest.raises(LocalRefused) as missing:
        connect_local("nobody", rundir)
    assert missing.value.failure is Failure.UNKNOWN_SERVICE
    with pytest.raises(LocalRefused) as bad:
        connect_local("x" * 200, rundir)
    assert bad.value.failure is Failure.REFUSED
    assert bad.value.failure.status == 404
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(rundir / "full"))
    server.listen(0)
    held = []
    try:
        with pytest.raises(LocalRefused) as full:
            for _ in range(64):
                held.append(connect_local("full", rundir))
        assert full.value.failure is Failure.SERVICE_UNAVAILABLE
        assert full.value.failure.status == 503
        assert "backlog is full" in full.value.reason
    finally:
        for sock in held:
            sock.close()
        server.close()


class _StrictLayer:
    """A codec that refuses the byte 0xFF, with a reason that names no
    protocol (the old engine found kinds by searching "tls"/"websocket")."""

    closed = False

    def receive_data(self, data: bytes) -> bytes:
        if b"\xff" in data:
            raise ProtocolError("bad byte")
        return data

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self._out = bytes(data)

    def data_to_send(self) -> bytes:
        out, self._out = getattr(self, "_out", b""), b""
        return out

    def close(self) -> None:
        self.closed = True


class _LayeredHandshake(TcpdHandshake):
    def accept(self):  # type: ignore[override]
        _layer, early = super().accept()
        return _StrictLayer(), early


@pytest.mark.parametrize(
    ("sent", "kind"),
    [
        (b"\x00\x10\x00\x00", "oversize"),  # announces 1 MiB, the limit is 1 KiB
        (b"\xff", "protocol"),
    ],
)
def test_error_kinds_are_the_error_class_not_its_text(rundir, procs, sent, kind):
    procs.pongd(rundir)
    with Context(max_message_size=1024) as ctx:
        daemon = Daemon("test", ctx, ServiceAccess(), handshake_timeout=5)
        listener = open_listener(parse_listen("127.0.0.1:0"))
        daemon.listen(listener, lambda _peer: _LayeredHandshake(daemon.reachable))
        peer = socket.create_connection(listener.getsockname()[:2], timeout=5)
        peer.sendall(b"pong\n")
        pump(ctx, daemon, 0.1)
        assert recv_exact(peer, 2) == b"ok"
        peer.sendall(sent)
        pump(ctx, daemon, 0.3)
        assert daemon.metrics.errors.value(kind=kind) == 1
        assert daemon.metrics.errors.value(kind="io") == 0
        assert daemon.metrics.connections_open.value() == 0
        peer.close()
