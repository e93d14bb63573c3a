"""The engine's side of peer information and real clients, in-process.

The service here is a hand-written door (a lock with the ``peer-info`` mark,
``NAME.door`` speaking raw frames), so these tests pin the engine's wire
behaviour independently of ``ipc_core``'s service side: what it sends, when
it switches, what a refusal, a silence or a broken door cost the peer.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons.codecs.tcp import TcpdHandshake
from daemons.engine.daemon import Daemon
from daemons.engine.listeners import open_listener, parse_listen
from daemons.engine.policy import ServiceAccess
from daemons.engine.trust import TrustedNetworks
from ipc_core import Context, EventType
from ipc_core.peerinfo import VERSION
from tests.helpers import recv_exact, recv_msg


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def read_frame(sock: socket.socket) -> bytes:
    (length,) = struct.unpack(">I", recv_exact(sock, 4))
    return recv_exact(sock, length)


ACCEPT = frame(b'{"v":[1,0],"accept":true}')


def refusal(reason: str) -> bytes:
    return frame(json.dumps({"v": [1, 0], "accept": False, "reason": reason}).encode())


class DoorService:
    """A service that asked for peer information, by hand: its lock carries
    the mark, and it listens on NAME (for plain clients) and NAME.door."""

    def __init__(self, rundir: Path, name: str) -> None:
        (rundir / f"{name}.lock").write_bytes(b"peer-info\n")
        self.plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.plain.bind(str(rundir / name))
        self.plain.listen()
        self.door = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.door.bind(str(rundir / f"{name}.door"))
        self.door.listen()
        self.door.settimeout(5)

    def take(self) -> tuple[socket.socket, dict[str, object]]:
        conn, _ = self.door.accept()
        conn.settimeout(5)
        return conn, json.loads(read_frame(conn))

    def close(self) -> None:
        self.plain.close()
        self.door.close()


@pytest.fixture
def engine(rundir: Path) -> Iterator[tuple[Context, Daemon, int]]:
    with Context() as ctx:
        daemon = Daemon("test", ctx, ServiceAccess(), handshake_timeout=1.0)
        listener = open_listener(parse_listen("127.0.0.1:0"))
        daemon.listen(listener, lambda _peer: TcpdHandshake())
        yield ctx, daemon, listener.getsockname()[1]


def pump(ctx: Context, daemon: Daemon, seconds: float = 0.3) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        event = ctx.wait_event(timeout=0.02)
        if event.type != EventType.TIMER:
            daemon.serve_event(event)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def test_the_service_gets_the_peer_then_the_relay(rundir, engine):
    ctx, daemon, port = engine
    service = DoorService(rundir, "who")
    try:
        client = connect(port)
        client.sendall(b"who\n")
        pump(ctx, daemon)
        conn, info = service.take()
        assert info["v"] == list(VERSION)
        assert info["transport"] == "tcp"
        assert info["client_address"] == "127.0.0.1"
        assert info["client_port"] == client.getsockname()[1]
        assert info["local_address"] == "127.0.0.1"
        assert info["local_port"] == port
        # Nothing reached the peer yet: it waits for the verdict.
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(10)
        client.setblocking(True)
        # The verdict, and a greeting right behind it in the same write.
        conn.sendall(ACCEPT + frame(b"hello 127.0.0.1"))
        pump(ctx, daemon)
        assert recv_exact(client, 2) == b"ok"
        assert recv_msg(client) == b"hello 127.0.0.1"
        client.sendall(frame(b"ping"))
        pump(ctx, daemon)
        assert read_frame(conn) == b"ping"
        assert daemon.metrics.switched_total.value() == 1
    finally:
        service.close()


def test_bytes_the_peer_sent_while_the_service_decided_are_relayed(rundir, engine):
    ctx, daemon, port = engine
    service = DoorService(rundir, "who")
    try:
        client = connect(port)
        client.sendall(b"who\n")
        pump(ctx, daemon)
        conn, _info = service.take()
        client.sendall(frame(b"early"))
        pump(ctx, daemon, 0.1)
        conn.sendall(ACCEPT)
        pump(ctx, daemon)
        assert recv_exact(client, 2) == b"ok"
        assert read_frame(conn) == b"early"
    finally:
        service.close()


def test_a_refusal_closes_the_peer_and_logs_the_services_reason(rundir, engine, caplog):
    ctx, daemon, port = engine
    service = DoorService(rundir, "who")
    try:
        client = connect(port)
        client.sendall(b"who\n")
        pump(ctx, daemon)
        conn, _info = service.take()
        conn.sendall(refusal("not on the list"))
        with caplog.at_level(logging.WARNING):
            pump(ctx, daemon)
        assert client.recv(10) == b""  # closed without "ok"
        assert "refused: not on the list" in caplog.text
        assert daemon.metrics.handshake_failures.value(reason="service refused") == 1
        # Another client is served as usual.
        other = connect(port)
        other.sendall(b"who\n")
        pump(ctx, daemon)
        conn2, _ = service.take()
        conn2.sendall(ACCEPT)
        pump(ctx, daemon)
        assert recv_exact(other, 2) == b"ok"
    finally:
        service.close()


def test_a_silent_service_costs_the_handshake_deadline(rundir, engine, caplog):
    ctx, daemon, port = engine
    service = DoorService(rundir, "who")
    try:
        client = connect(port)
        client.sendall(b"who\n")
        pump(ctx, daemon)
        conn, _info = service.take()
        with caplog.at_level(logging.WARNING):
            pump(ctx, daemon, 1.3)
        assert client.recv(10) == b""
        assert "no verdict" in caplog.text
        assert conn.recv(10) == b""  # the door connection is closed too
        assert daemon.metrics.connections_open.value() == 0
    finally:
        service.close()


@pytest.mark.parametrize(
    "answer, why",
    [
        (b"", "closed its door"),
        (frame(b"not json"), "door protocol"),
        (struct.pack(">I", 1 << 20), "door protocol"),
    ],
)
def test_a_broken_door_closes_the_peer(rundir, engine, caplog, answer, why):
    ctx, daemon, port = engine
    service = DoorService(rundir, "who")
    try:
        client = connect(port)
        client.sendall(b"who\n")
        pump(ctx, daemon)
        conn, _info = service.take()
        if answer:
            conn.sendall(answer)
        else:
            conn.close()
        with caplog.at_level(logging.WARNING):
            pump(ctx, daemon)
        assert client.recv(10) == b""
        assert why in caplog.text
    finally:
        service.close()


def test_a_lock_with_the_mark_but_no_door_is_unknown(rundir, engine, caplog):
    ctx, daemon, port = engine
    (rundir / "ghost.lock").write_bytes(b"peer-info\n")
    client = connect(port)
    client.sendall(b"ghost\n")
    with caplog.at_level(logging.WARNING):
        pump(ctx, daemon)
    assert client.recv(10) == b""
    assert "no door" in caplog.text


def test_a_door_is_never_a_service_name(rundir, engine):
    ctx, daemon, port = engine
    service = DoorService(rundir, "who")
    try:
        client = connect(port)
        client.sendall(b"who.door\n")
        pump(ctx, daemon)
        assert client.recv(10) == b""
        service.door.settimeout(0.05)
        with pytest.raises(TimeoutError):
            service.door.accept()
    finally:
        service.close()


def test_a_plain_service_sees_no_extra_byte(rundir, engine, procs):
    ctx, daemon, port = engine
    procs.pongd(rundir)
    client = connect(port)
    client.sendall(b"pong\n")
    pump(ctx, daemon)
    assert recv_exact(client, 2) == b"ok"
    client.sendall(frame(b"x"))
    pump(ctx, daemon)
    assert recv_msg(client) == b"x"


# -- the real client, as a handshake names it ---------------------------------------


class NamedClientHandshake(TcpdHandshake):
    """A TCPd handshake whose first line names the real client (``IP PORT``),
    as a PROXY header or a trusted forwarding header would."""

    def __init__(self) -> None:
        super().__init__()
        self._client: tuple[str, int | None] | None = None
        self._line = b""

    @property
    def client(self) -> tuple[str, int | None] | None:
        return self._client

    def receive_data(self, data: bytes) -> None:
        if self._client is None:
            self._line += data
            head, sep, rest = self._line.partition(b"\n")
            if not sep:
                return
            ip, port = head.decode().split()
            self._client = (ip, int(port))
            data = rest
        super().receive_data(data)

    def describe(self, info):  # type: ignore[no-untyped-def]
        import dataclasses

        assert self._client is not None
        return dataclasses.replace(
            info,
            client_address=self._client[0],
            client_port=self._client[1],
            via="proxy-protocol",
            proxy_address=info.client_address,
        )


@pytest.fixture
def proxied(rundir: Path) -> Iterator[tuple[Context, Daemon, int]]:
    with Context() as ctx:
        daemon = Daemon(
            "test", ctx, ServiceAccess(), handshake_timeout=1.0, max_connections_per_ip=1
        )
        daemon.trusted_proxies = TrustedNetworks.parse(["127.0.0.1/32"])
        listener = open_listener(parse_listen("127.0.0.1:0"))
        daemon.listen(listener, lambda _peer: NamedClientHandshake())
        yield ctx, daemon, listener.getsockname()[1]


def test_limits_count_the_named_client_not_the_proxy(rundir, proxied, procs, caplog):
    ctx, daemon, port = proxied
    procs.pongd(rundir)
    caplog.set_level(logging.INFO, logger="ipc.daemon")
    first = connect(port)
    first.sendall(b"10.0.0.9 4000\npong\n")
    pump(ctx, daemon)
    assert recv_exact(first, 2) == b"ok"
    second = connect(port)  # the same client again: over its limit of 1
    second.sendall(b"10.0.0.9 4001\npong\n")
    pump(ctx, daemon)
    assert second.recv(10) == b""
    assert "from 10.0.0.9 (--max-connections-per-ip)" in caplog.text
    third = connect(port)  # another client through the same proxy: served
    third.sendall(b"10.0.0.8 4002\npong\n")
    pump(ctx, daemon)
    assert recv_exact(third, 2) == b"ok"
    assert "10.0.0.8:4002 (via 127.0.0.1:" in caplog.text  # the log names the client


def test_the_named_client_reaches_the_peer_information(rundir, proxied):
    ctx, daemon, port = proxied
    service = DoorService(rundir, "who")
    try:
        client = connect(port)
        client.sendall(b"203.0.113.5 5555\nwho\n")
        pump(ctx, daemon)
        conn, info = service.take()
        assert info["client_address"] == "203.0.113.5"
        assert info["client_port"] == 5555
        assert info["via"] == "proxy-protocol"
        assert info["proxy_address"] == "127.0.0.1"
        conn.sendall(ACCEPT)
        pump(ctx, daemon)
        assert recv_exact(client, 2) == b"ok"
    finally:
        service.close()


def test_without_trusted_proxies_the_socket_source_is_limited(rundir, procs):
    procs.pongd(rundir)
    with Context() as ctx:
        daemon = Daemon("test", ctx, ServiceAccess(), max_connections_per_ip=1)
        listener = open_listener(parse_listen("127.0.0.1:0"))
        daemon.listen(listener, lambda _peer: TcpdHandshake())
        port = listener.getsockname()[1]
        first = connect(port)
        first.sendall(b"pong\n")
        pump(ctx, daemon)
        assert recv_exact(first, 2) == b"ok"
        second = connect(port)
        pump(ctx, daemon)
        assert second.recv(10) == b""


def test_door_frames_are_sent_by_this_process(rundir, engine):
    """The service checks the credentials of the door frame: they must be the
    daemon's own (the kernel fills them in at send time)."""
    ctx, daemon, port = engine
    service = DoorService(rundir, "who")
    try:
        client = connect(port)
        client.sendall(b"who\n")
        pump(ctx, daemon)
        conn, _ = service.door.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        conn.settimeout(5)
        _data, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(12))
        creds = [d for level, kind, d in ancdata if kind == socket.SCM_CREDENTIALS]
        assert creds, "no credentials came with the offer"
        pid, uid, _gid = struct.unpack("iII", creds[0][:12])
        assert (pid, uid) == (os.getpid(), os.geteuid())
    finally:
        service.close()


class HugeHeadersHandshake(TcpdHandshake):
    """Describes a peer whose request headers would not fit the record."""

    def describe(self, info):  # type: ignore[no-untyped-def]
        import dataclasses

        return dataclasses.replace(info, user_agent="x" * 20_000)


def test_peer_information_too_large_to_relay_closes_that_peer(rundir, caplog):
    with Context() as ctx:
        daemon = Daemon("test", ctx, ServiceAccess(), handshake_timeout=1.0)
        listener = open_listener(parse_listen("127.0.0.1:0"))
        daemon.listen(listener, lambda _peer: HugeHeadersHandshake())
        port = listener.getsockname()[1]
        service = DoorService(rundir, "who")
        try:
            client = connect(port)
            with caplog.at_level(logging.WARNING):
                client.sendall(b"who\n")
                pump(ctx, daemon)
            assert client.recv(10) == b""
            assert "limit is 16384" in caplog.text
            service.door.settimeout(0.05)
            with pytest.raises(TimeoutError):  # the service never saw it
                service.door.accept()
        finally:
            service.close()


def test_a_handoff_passes_the_socket_the_reply_and_the_early_bytes(rundir, engine):
    """The wire form of a hand-off, read by hand: one descriptor with the
    offer, then the hand-off frame (kind 1, the reply, the early bytes)."""
    import array

    ctx, daemon, port = engine
    service = DoorService(rundir, "who")
    (rundir / "who.lock").write_bytes(b"handoff\n")
    try:
        client = connect(port)
        client.sendall(b"who\n" + frame(b"early"))
        pump(ctx, daemon)
        conn, _ = service.door.accept()
        conn.settimeout(5)
        fds = array.array("i")
        data, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(4 * fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        assert len(fds) == 1
        (n,) = struct.unpack(">I", data[:4])
        info = json.loads(data[4 : 4 + n])
        assert info["transport"] == "tcp" and info["client_port"] == client.getsockname()[1]
        rest = data[4 + n :]
        (m,) = struct.unpack(">I", rest[:4])
        payload = rest[4 : 4 + m]
        assert payload[0] == 1
        (rlen,) = struct.unpack(">H", payload[1:3])
        assert payload[3 : 3 + rlen] == b"ok"
        assert payload[3 + rlen :] == frame(b"early")
        handed = socket.socket(fileno=fds[0])
        # Accept: the daemon forgets the connection, the service writes "ok".
        conn.sendall(ACCEPT)
        pump(ctx, daemon)
        assert conn.recv(10) == b""  # the daemon closed the door
        assert daemon.metrics.handoffs.value() == 1
        assert daemon.metrics.connections_open.value() == 0
        handed.sendall(b"ok" + frame(b"from the service"))
        assert recv_exact(client, 2) == b"ok"
        assert recv_msg(client) == b"from the service"
        handed.close()
        assert client.recv(10) == b""  # the daemon kept no copy
    finally:
        service.close()
