"""WebSocket hand-offs, the service's side: ``Context.service_init(...,
handoff_websocket=True)`` and ``take_handoff``.

The daemon's side is played by the test, as ipc-websocketd plays it: a real
TCP connection on 127.0.0.1 stands for the browser's, and its server socket
goes through the service's door with the offer and the hand-off frame
(``SCM_RIGHTS``; the kernel adds the credentials the door checks). What is
checked is what a daemon and a client would see: the verdict on the door,
the socket shut in the service when it is not taken, and nothing at all
(no event, no verdict) for a hand-off the service did not ask for.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ipc_core import (
    Context,
    Event,
    EventType,
    HandedOver,
    PeerInfo,
    UsageError,
    door,
    encode,
    service_marks,
)
from tests.integration.test_peer_info_core import read_to_eof, read_verdict

pytestmark = pytest.mark.timeout(60)

WS = PeerInfo(
    transport="ws",
    client_address="203.0.113.7",
    client_port=50123,
    local_address="127.0.0.1",
    local_port=8080,
    path="/chat",
    query=(("room", "1"),),
    subprotocol="chat.v2",
    token_name="alice",
)
TCP = PeerInfo(transport="tcp", client_address="203.0.113.8", client_port=50124)
REQUEST = (
    b"GET /chat?room=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


@contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server): a real TCP connection; the server end is the one a
    daemon hands over."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def hand_over(
    directory: Path,
    name: str,
    sock: socket.socket,
    info: PeerInfo = WS,
    early: bytes = REQUEST,
    reply: bytes = b"",
) -> socket.socket:
    """What a daemon does: connect to the door, send the offer and the
    hand-off frame with ``sock`` attached. Returns the door connection."""
    gate = socket.socket(socket.AF_UNIX)
    gate.settimeout(5)
    gate.connect(str(directory / f"{name}.door"))
    frame = door.offer_frame(info) + door.handoff_frame(reply, early)
    rights = array.array("i", [sock.fileno()]).tobytes()
    assert gate.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]) == len(frame)
    return gate


def next_event(ctx: Context, kind: EventType = EventType.CONNECTION, turns: int = 100) -> Event:
    """Run the loop until an event of ``kind`` (or fail)."""
    for _ in range(turns):
        event = ctx.wait_event(timeout=0.05)
        if event.type is kind:
            return event
    raise AssertionError(f"no {kind.name} event")


def quiet_turns(ctx: Context, turns: int = 5) -> list[Event]:
    """A few turns of the loop; the events they gave, timers aside."""
    seen = [ctx.wait_event(timeout=0.02) for _ in range(turns)]
    return [ev for ev in seen if ev.type is not EventType.TIMER]


def closed_by_service(client: socket.socket, server: socket.socket) -> bool:
    """With the daemon's copy closed too, does the client see the end?"""
    server.close()
    client.settimeout(5)
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


def warnings_of(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ---------------------------------------------------------------- taking


def test_take_handoff_gives_the_socket_the_request_and_the_peer(rundir) -> None:
    with Context() as ctx, tcp_pair() as (client, server):
        ctx.service_init("web", handoff_websocket=True)
        early = (
            REQUEST
            + b"\x82\x85abcd"
            + bytes(c ^ m for c, m in zip(b"hello", b"abcd" * 2, strict=False))
        )
        gate = hand_over(rundir, "web", server, early=early)
        event = next_event(ctx)
        assert event.peer == WS
        fd = event.fd
        assert ctx.peer_info(fd) == WS  # while it waits to be taken
        taken = ctx.take_handoff(fd)
        assert isinstance(taken, HandedOver)
        assert taken.early == early and taken.peer == WS
        assert taken.sock.fileno() == fd and taken.sock.gettimeout() == 0.0
        # The daemon gets the accept, then the door closes.
        verdict, leftover = read_verdict(gate)
        assert verdict.accepted and leftover == b""
        assert read_to_eof(gate) == b""
        assert ctx.take_handoff(fd) is None  # taken once only
        # The socket is the client's connection: both ways.
        server.close()  # the daemon's copy, closed on the verdict
        taken.sock.setblocking(True)
        taken.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        assert client.recv(100).startswith(b"HTTP/1.1 101")
        client.sendall(b"ping")
        assert taken.sock.recv(4) == b"ping"
        # The Context keeps no hold on it: many turns, no event for it, no refusal.
        assert quiet_turns(ctx) == []
        taken.sock.close()
        assert client.recv(1) == b""
        gate.close()


def test_take_handoff_is_none_for_anything_else(rundir) -> None:
    with Context() as ctx:
        listener = ctx.service_init("web", handoff_websocket=True)
        assert ctx.take_handoff(listener) is None
        assert ctx.take_handoff(12345) is None
        # An ordinary local client: a CONNECTION without peer, served as usual.
        plain = socket.socket(socket.AF_UNIX)
        plain.settimeout(5)
        plain.connect(str(rundir / "web"))
        event = next_event(ctx)
        assert event.peer is None and ctx.take_handoff(event.fd) is None
        plain.sendall(encode(b"hi"))
        message = next_event(ctx, EventType.MESSAGE_RX)
        assert message.fd == event.fd and message.message == b"hi"
        plain.close()


def test_two_handoffs_queued_one_taken_one_left(rundir, caplog) -> None:
    """The one whose event the application saw and left is refused at the
    next wait_event; the one whose event is still queued is not."""
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with Context() as ctx, tcp_pair() as (c1, s1), tcp_pair() as (c2, s2):
        ctx.service_init("web", handoff_websocket=True)
        g1 = hand_over(rundir, "web", s1)
        g2 = hand_over(rundir, "web", s2)
        first = next_event(ctx)
        second = next_event(ctx)  # the first is refused here, the second given
        assert first.fd != second.fd
        verdict, _ = read_verdict(g1)
        assert not verdict.accepted
        assert verdict.reason == "the service did not take the connection"
        assert "not taken" in warnings_of(caplog)
        assert ctx.take_handoff(first.fd) is None
        taken = ctx.take_handoff(second.fd)
        assert taken is not None and read_verdict(g2)[0].accepted
        assert closed_by_service(c1, s1)
        taken.sock.close()
        g1.close()
        g2.close()


# --------------------------------------------------------------- refusing


def test_an_untaken_handoff_is_refused_and_its_socket_closed(rundir, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with Context() as ctx, tcp_pair() as (client, server):
        ctx.service_init("web", handoff_websocket=True)
        gate = hand_over(rundir, "web", server)
        event = next_event(ctx)
        ctx.wait_event(timeout=0.05)  # the application moved on without taking it
        verdict, leftover = read_verdict(gate)
        assert verdict == door.Verdict(False, "the service did not take the connection")
        assert leftover == b"" and read_to_eof(gate) == b""
        assert f"descriptor {event.fd}: WebSocket hand-off not taken" in warnings_of(caplog)
        assert ctx.take_handoff(event.fd) is None
        # The daemon answers the client (403) with its copy, then closes it:
        # the service's copy is gone already.
        assert closed_by_service(client, server)


def test_refuse_on_a_held_handoff_sends_the_reason(rundir) -> None:
    with Context() as ctx, tcp_pair() as (client, server):
        ctx.service_init("web", handoff_websocket=True)
        gate = hand_over(rundir, "web", server)
        event = next_event(ctx)
        ctx.refuse(event.fd, "too many clients\nof web")
        verdict, _ = read_verdict(gate)
        assert verdict == door.Verdict(False, "too many clients\ufffdof web")
        assert read_to_eof(gate) == b""
        assert ctx.take_handoff(event.fd) is None
        with pytest.raises(UsageError):
            ctx.refuse(event.fd, "twice")
        assert quiet_turns(ctx) == []  # nothing more: no event, no second verdict
        assert closed_by_service(client, server)


def test_closing_the_context_closes_held_handoffs(rundir) -> None:
    with tcp_pair() as (client, server):
        ctx = Context()
        try:
            ctx.service_init("web", handoff_websocket=True)
            gate = hand_over(rundir, "web", server)
            next_event(ctx)
        finally:
            ctx.close_all()
        assert read_to_eof(gate) == b""  # no verdict: the daemon sees EOF
        assert closed_by_service(client, server)
        gate.close()


# ------------------------------------------------------ doors and marks


def test_the_lock_mark_and_the_door(rundir) -> None:
    with Context() as ctx:
        ctx.service_init("web", handoff_websocket=True)
        assert service_marks("web", rundir) == {"handoff-websocket"}
        assert (rundir / "web.door").exists()
        ctx.service_init("both", handoff_websocket=True, handoff=True, peer_info=True)
        assert service_marks("both", rundir) == {"handoff-websocket", "handoff", "peer-info"}
        ctx.service_init("plain", handoff=True)
        assert "handoff-websocket" not in service_marks("plain", rundir)


@pytest.mark.parametrize(
    ("flags", "info", "why"),
    [
        ({"handoff": True}, WS, "a WebSocket connection handed over; this service takes none"),
        ({"peer_info": True, "handoff": True}, WS, "a WebSocket connection handed over"),
        ({"handoff_websocket": True}, TCP, "a 'tcp' connection handed over"),
    ],
    ids=["ws-to-handoff", "ws-to-peer-info-handoff", "tcp-to-handoff-websocket"],
)
def test_a_handoff_the_door_does_not_take_is_dropped(
    rundir, caplog, flags: dict[str, bool], info: PeerInfo, why: str
) -> None:
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with Context() as ctx, tcp_pair() as (client, server):
        ctx.service_init("web", **flags)
        gate = hand_over(rundir, "web", server, info=info, early=REQUEST if info is WS else b"")
        assert quiet_turns(ctx) == []  # no CONNECTION
        assert read_to_eof(gate) == b""  # no verdict at all: the door is closed
        assert why in warnings_of(caplog)
        assert not ctx._doors.held
        assert closed_by_service(client, server)  # the passed socket was closed
        gate.close()
        # The service goes on: a hand-off it does take.
        with tcp_pair() as (c2, s2):
            good = WS if info is TCP else TCP
            gate = hand_over(rundir, "web", s2, info=good, early=b"")
            event = next_event(ctx)
            assert event.peer == good
            if good is WS:
                taken = ctx.take_handoff(event.fd)
                assert taken is not None
                taken.sock.close()
            else:
                ctx.refuse(event.fd, "no")
            assert read_verdict(gate)[0].accepted is (good is WS)
            gate.close()


def test_a_door_taking_both_kinds_holds_ws_and_adopts_tcp(rundir) -> None:
    with Context() as ctx, tcp_pair() as (wc, ws_), tcp_pair() as (tc, ts):
        ctx.service_init("both", handoff=True, handoff_websocket=True)
        g_ws = hand_over(rundir, "both", ws_)
        g_tcp = hand_over(rundir, "both", ts, info=TCP, early=encode(b"early"), reply=b"ok")
        by_transport = {}
        taken = None
        for _ in range(2):  # in either order; a ws one taken before the next wait
            event = next_event(ctx)
            assert event.peer is not None
            by_transport[event.peer.transport] = event
            if event.peer.transport == "ws":
                taken = ctx.take_handoff(event.fd)
        assert set(by_transport) == {"ws", "tcp"}
        assert taken is not None and taken.early == REQUEST
        assert ctx.take_handoff(by_transport["tcp"].fd) is None  # an ordinary peer
        message = next_event(ctx, EventType.MESSAGE_RX)
        assert message.fd == by_transport["tcp"].fd and message.message == b"early"
        assert read_verdict(g_ws)[0].accepted and read_verdict(g_tcp)[0].accepted
        ts.close()
        tc.settimeout(5)
        assert tc.recv(2) == b"ok"  # the tcp hand-off's reply, written by the Context
        taken.sock.close()
        for gate in (g_ws, g_tcp):
            gate.close()


def test_a_taken_socket_is_not_inherited_by_programs(rundir: Path) -> None:
    """MSG_CMSG_CLOEXEC on the door: a handed-over socket never leaks into a
    child the service starts (ipc exec starts one per client)."""
    with Context() as ctx, tcp_pair() as (_client, server):
        ctx.service_init("web", handoff_websocket=True)
        gate = hand_over(rundir, "web", server)
        taken = ctx.take_handoff(next_event(ctx).fd)
        assert taken is not None
        assert not os.get_inheritable(taken.sock.fileno())
        taken.sock.close()
        gate.close()


def test_a_handoff_the_daemon_withdraws_is_not_given(rundir, caplog) -> None:
    """The daemon closes the door before the verdict (its deadline passed and
    it answered the client itself): ``take_handoff`` gives nothing and the
    held socket goes."""
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with Context() as ctx, tcp_pair() as (client, server):
        ctx.service_init("web", handoff_websocket=True)
        gate = hand_over(rundir, "web", server)
        event = next_event(ctx)
        gate.close()
        assert ctx.take_handoff(event.fd) is None
        assert "withdrew" in warnings_of(caplog)
        assert closed_by_service(client, server)


def test_closing_a_held_handoff_refuses_it(rundir) -> None:
    with Context() as ctx, tcp_pair() as (client, server):
        ctx.service_init("web", handoff_websocket=True)
        gate = hand_over(rundir, "web", server)
        event = next_event(ctx)
        ctx.close(event.fd)
        verdict, _ = read_verdict(gate)
        assert not verdict.accepted and verdict.reason == "closed by the service"
        assert ctx.take_handoff(event.fd) is None
        assert closed_by_service(client, server)
        gate.close()
