"""ipc_core.asyncio through the daemons (issue 17): a client reaching a remote
service through ipcd and ipc-tcpd (the descriptor ipcd passes over
SCM_RIGHTS received on the event loop), the routing fallbacks, and peer
information for an asyncio service behind a real ipc-tcpd. Two run
directories stand for two hosts; everything on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipc_core import FrameDecoder, PeerClosed, ServiceUnavailable, door, encode, peerinfo
from ipc_core.asyncio import Connection, MessageProtocol, connect
from tests.helpers import (
    BIN,
    connectable,
    recv_exact,
    recv_msg,
    start_listening_daemon,
    wait_for,
)
from tests.integration.test_asyncio import run, service_in_thread
from tests.integration.test_peer_info_core import (
    ACCEPT,
    INFO,
    NOBODY,
    as_nobody,
    door_client,
    needs_root,
    read_to_eof,
    read_verdict,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def remote(rundir: Path, procs) -> Iterator[tuple[Path, int]]:
    """Host B (``rundir``): pongd behind ipc-tcpd; host A: ipcd and an
    ipc-tcpd for the outbound `tcp` service. Yields (A's run directory, B's port)."""
    procs.pongd(rundir)
    _p, _logs, port = start_listening_daemon(
        procs,
        "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        "--max-connections-per-ip",
        "0",
        env={"RUNDIR": str(rundir)},
    )
    host_a = Path(str(rundir) + "-a")
    host_a.mkdir()
    env = {"RUNDIR": str(host_a)}
    procs.start(BIN / "ipcd", env=env)
    procs.start(BIN / "ipc-tcpd", "--listen", "127.0.0.1:0", env=env)
    wait_for(
        lambda: connectable(host_a / "ipc") and connectable(host_a / "tcp"), what="host A daemons"
    )
    yield host_a, port
    shutil.rmtree(host_a, ignore_errors=True)


def test_a_remote_service_through_ipcd_and_ipc_tcpd(remote, monkeypatch) -> None:
    host_a, port = remote
    monkeypatch.setenv("RUNDIR", str(host_a))
    monkeypatch.setenv("IPC_NETWORK", f"audio tor://x/audio ; pong tcp://127.0.0.1:{port}/pong")
    rng = random.Random(17)

    async def one(i: int) -> None:
        async with connect("pong") as conn:
            for _ in range(10):
                payload = rng.randbytes(rng.randint(0, 5000))
                await conn.send(payload)
                assert await conn.recv() == payload

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(30)))
        async with connect("pong") as conn:
            big = rng.randbytes(2 * 1024 * 1024)
            await conn.send(big)
            assert await conn.recv() == big

    run(main())
    assert not (host_a / "pong").exists()  # it really went over the network


def test_router_failures_are_service_unavailable(remote, monkeypatch) -> None:
    host_a, _port = remote
    monkeypatch.setenv("RUNDIR", str(host_a))

    async def main() -> None:
        for network, reason in {
            "pong tcp://127.0.0.1:1/pong": "refused",
            "pong unix://absent": "no local service 'absent'",
        }.items():
            monkeypatch.setenv("IPC_NETWORK", network)
            with pytest.raises(ServiceUnavailable, match=reason):
                await connect("pong")

    run(main())


def test_a_silent_router_is_bounded_by_the_timeout(rundir: Path, monkeypatch) -> None:
    """An `ipc` that accepts and never answers: connect gives up after its
    timeout with ServiceUnavailable, as Context does."""
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(rundir / "ipc"))
    silent.listen()
    monkeypatch.setenv("IPC_NETWORK", "pong tcp://127.0.0.1:1/pong")

    async def main() -> None:
        with pytest.raises(ServiceUnavailable, match="router gave no answer for 'pong'"):
            await connect("pong", timeout=0.5)

    run(main())
    silent.close()


def test_no_router_falls_back_to_the_local_service_or_says_start_ipcd(
    rundir: Path, procs, monkeypatch
) -> None:
    monkeypatch.setenv("IPC_NETWORK", "pong tcp://127.0.0.1:1/pong")

    async def missing() -> None:
        with pytest.raises(ServiceUnavailable) as info:
            await connect("pong")
        assert str(info.value) == (
            f"route for 'pong' via tcp://127.0.0.1:1/pong but no router at {rundir}/ipc: start ipcd"
        )

    run(missing())
    procs.pongd(rundir)

    async def fallback() -> None:
        async with connect("pong") as conn:
            await conn.send(b"fallback")
            assert await conn.recv() == b"fallback"

    run(fallback())


# ---------------------------------------------------------- peer information


async def who(conn: Connection) -> None:
    """Refuse 127.0.0.4; tell the others who they are, then echo."""
    if conn.peer is not None and conn.peer.client_address == "127.0.0.4":
        await conn.refuse("127.0.0.4 is not welcome")
        return
    await conn.send(b"null" if conn.peer is None else peerinfo.encode(conn.peer))
    async for message in conn:
        await conn.send(message)


def test_peer_information_behind_ipc_tcpd(rundir: Path, procs, caplog) -> None:
    caplog.set_level(logging.INFO)
    with service_in_thread("who", who, peer_info=True):
        assert (rundir / "who.door").exists()
        _p, logs, port = start_listening_daemon(
            procs, "ipc-tcpd", "--listen", "127.0.0.1:0", env={"RUNDIR": str(rundir)}
        )
        s = socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=("127.0.0.3", 0)
        )
        s.sendall(b"who")
        assert recv_exact(s, 2) == b"ok"
        info: dict[str, Any] = json.loads(recv_msg(s))
        assert info == {
            "v": list(peerinfo.VERSION),
            "transport": "tcp",
            "client_address": "127.0.0.3",
            "client_port": s.getsockname()[1],
            "local_address": "127.0.0.1",
            "local_port": port,
        }
        s.sendall(encode(b"echo"))
        assert recv_msg(s) == b"echo"
        # A refused client is closed without "ok"; the daemon logs the reason.
        refused = socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=("127.0.0.4", 0)
        )
        refused.sendall(b"who")
        assert refused.recv(10) == b""
        logs.wait_for("127.0.0.4 is not welcome")
        # A local client of the name itself has no peer information.
        local = socket.socket(socket.AF_UNIX)
        local.settimeout(5)
        local.connect(str(rundir / "who"))
        assert recv_msg(local) == b"null"
        s.sendall(encode(b"still"))
        assert recv_msg(s) == b"still"
    assert not (rundir / "who.door").exists()


def test_the_door_verdict_rule(rundir: Path) -> None:
    """Accept goes out once the handler's first step is over (Context's
    next-wait_event rule), before its first send; a message sent right
    behind it follows it; refuse before that sends the refusal."""
    order: list[str] = []

    async def handler(conn: Connection) -> None:
        assert conn.peer is not None
        if conn.peer.path == "/refuse":
            await conn.refuse("no\nway")
            return
        assert conn.peer == INFO
        order.append("handler started")
        await asyncio.sleep(0)
        order.append("after the first await")
        try:
            await conn.refuse("too late")
        except Exception as exc:  # a UsageError: the accept is out
            order.append(type(exc).__name__)
        await conn.send(b"hello")
        async for message in conn:
            await conn.send(message)

    with service_in_thread("chat", handler, peer_info=True):
        client = door_client(rundir, extra=encode(b"early"))
        verdict, leftover = read_verdict(client)
        assert verdict == door.Verdict(True, None)
        decoder = FrameDecoder()
        messages = decoder.feed(leftover)
        while len(messages) < 2:
            messages += decoder.feed(client.recv(65536))
        # "hello" first, then the echo of what was sent right behind the offer
        assert messages == [b"hello", b"early"]
        assert order == ["handler started", "after the first await", "UsageError"]

        import dataclasses

        refused = door_client(rundir, info=dataclasses.replace(INFO, path="/refuse"))
        verdict, _ = read_verdict(refused)
        assert verdict == door.Verdict(False, "no\ufffdway")
        assert read_to_eof(refused) == b""
        assert ACCEPT  # the same frames as Context's


def test_bad_offers_and_the_offer_deadline(rundir: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="ipc_core")
    started: list[Connection] = []

    async def handler(conn: Connection) -> None:
        started.append(conn)
        async for message in conn:
            await conn.send(message)

    with service_in_thread("chat", handler, peer_info=True) as server:
        server.offer_seconds = 0.3
        good = door_client(rundir)
        assert read_verdict(good)[0].accepted
        bad = socket.socket(socket.AF_UNIX)
        bad.settimeout(5)
        bad.connect(str(rundir / "chat.door"))
        bad.sendall(encode(b"not json"))
        assert read_to_eof(bad) == b""
        silent = socket.socket(socket.AF_UNIX)
        silent.settimeout(5)
        silent.connect(str(rundir / "chat.door"))
        assert read_to_eof(silent) == b""  # closed at the deadline
        wait_for(lambda: "no peer information within 0.3 s" in caplog.text, what="log")
        assert "bad peer information" in caplog.text
        assert len(started) == 1
        good.sendall(encode(b"still here"))
        assert recv_msg(good) == b"still here"


def test_a_protocol_service_on_the_door_refuses_or_accepts(rundir: Path) -> None:
    """The callback shape behind a door: ``connection_made`` sees
    ``conn.peer`` and may refuse; otherwise the accept goes out before the
    first reply, and the bytes sent right behind the offer are delivered."""
    import dataclasses

    peers: list[Any] = []

    class Gate(MessageProtocol):
        def connection_made(self, conn: Connection) -> None:
            self.conn = conn
            peers.append(conn.peer)
            assert conn.peer is not None
            if conn.peer.path == "/refuse":
                conn.refuse("not\nyou")

        def message_received(self, message: bytes) -> None:
            self.conn.send(message)

    with service_in_thread("gate", None, protocol=Gate, peer_info=True):
        client = door_client(rundir, "gate", extra=encode(b"early"))
        verdict, leftover = read_verdict(client)
        assert verdict == door.Verdict(True, None)
        decoder = FrameDecoder()
        messages = decoder.feed(leftover)
        while not messages:
            messages += decoder.feed(client.recv(65536))
        assert messages == [b"early"]
        client.sendall(encode(b"later"))
        assert recv_msg(client) == b"later"

        refused = door_client(rundir, "gate", info=dataclasses.replace(INFO, path="/refuse"))
        verdict, _ = read_verdict(refused)
        assert verdict == door.Verdict(False, "not\ufffdyou")
        assert read_to_eof(refused) == b""
        assert peers[0] == INFO


def test_descriptors_on_the_door_are_refused(rundir: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with service_in_thread("chat", lambda conn: conn.recv(), peer_info=True):
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(5)
        client.connect(str(rundir / "chat.door"))
        r, w = os.pipe()
        socket.send_fds(client, [door.offer_frame(INFO)], [r, w])
        os.close(r)
        os.close(w)
        assert read_to_eof(client) == b""
        wait_for(lambda: "descriptors" in caplog.text, what="the warning")


def test_a_door_client_that_leaves_ends_its_handler(rundir: Path) -> None:
    ended: list[str] = []

    async def handler(conn: Connection) -> None:
        try:
            await conn.recv()
        except PeerClosed:
            ended.append("closed")

    with service_in_thread("chat", handler, peer_info=True):
        client = door_client(rundir)
        assert read_verdict(client)[0].accepted
        client.close()
        wait_for(lambda: ended == ["closed"], what="the handler's end")


@needs_root
def test_an_untrusted_uid_on_the_door_is_refused(rundir: Path, monkeypatch, caplog) -> None:
    """The door believes root, us, the run directory's owner and
    trusted_uids: nobody's offer is closed without a verdict, unless listed."""
    caplog.set_level(logging.WARNING, logger="ipc_core")
    shared = Path(tempfile.mkdtemp(prefix="ipc-shared-", dir="/tmp"))
    os.chown(shared, 0, NOBODY)
    os.chmod(shared, 0o2770)
    monkeypatch.setenv("RUNDIR", str(shared))
    started: list[Connection] = []

    async def handler(conn: Connection) -> None:
        started.append(conn)
        await conn.recv()

    try:
        with service_in_thread("chat", handler, peer_info=True):
            out = as_nobody(str(shared / "chat.door"), door.offer_frame(INFO), len(ACCEPT))
            assert out.returncode == 0, out.stderr
            assert out.stdout == ""  # closed without a verdict
            wait_for(lambda: "not trusted" in caplog.text, what="the warning")
            assert "uid 65534" in caplog.text and started == []
        with service_in_thread("chat", handler, peer_info=True, trusted_uids=(NOBODY,)):
            out = as_nobody(str(shared / "chat.door"), door.offer_frame(INFO), len(ACCEPT))
            assert bytes.fromhex(out.stdout) == ACCEPT, out.stderr
            wait_for(lambda: len(started) == 1, what="the handler")
    finally:
        shutil.rmtree(shared, ignore_errors=True)
