"""Half-close (issue 11, item 10): a peer that sends its requests and then
shuts down its write side gets every reply before the pair is closed."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import suppress

from ipc_core import Context, Event, EventType, encode
from tests.helpers import pair_with_switch, pump, recv_exact, recv_msg, start_listening_daemon


def _disconnections(events: list[Event]) -> set[int]:
    return {e.fd for e in events if e.type == EventType.DISCONNECTION}


def test_switch_relays_replies_after_a_half_close():
    ctx, net, local, nfd, lfd = pair_with_switch()
    with ctx:
        requests = [f"request {i}".encode() for i in range(50)]
        net.sendall(b"".join(encode(r) for r in requests))
        net.shutdown(socket.SHUT_WR)
        got: list[bytes] = []
        # The local side gets every request, then EOF (the half-close is passed on).
        pump(ctx, lambda _s: local_has_data(local))
        local.settimeout(0.05)
        buf = b""
        deadline = time.monotonic() + 5
        while True:
            ctx.wait_event(timeout=0.01)
            try:
                chunk = local.recv(65536)
            except TimeoutError:
                assert time.monotonic() < deadline, "no EOF passed on to the local side"
                continue
            if not chunk:
                break
            buf += chunk
        assert buf == b"".join(encode(r) for r in requests)
        # The pair is still open: the local side answers everything.
        assert nfd in ctx and lfd in ctx
        local.sendall(b"".join(encode(b"re: " + r) for r in requests))
        local.close()
        events = pump(ctx, lambda s: _disconnections(s) == {nfd, lfd})
        assert _disconnections(events) == {nfd, lfd}
        got = [recv_msg(net) for _ in requests]
        assert got == [b"re: " + r for r in requests]
        assert net.recv(1) == b""
        assert ctx.descriptors == []


def local_has_data(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def test_half_close_in_the_other_direction_too():
    """The local service shuts its write side first: the network peer gets
    EOF after the last reply and may still send; the pair closes when it does."""
    ctx, net, local, nfd, lfd = pair_with_switch()
    with ctx:
        local.sendall(encode(b"bye soon"))
        local.shutdown(socket.SHUT_WR)
        pump(ctx, lambda _s: local_has_data(net))
        assert recv_msg(net) == b"bye soon"
        pump(ctx, lambda _s: local_has_data(net))
        assert net.recv(1) == b""  # EOF passed on
        net.sendall(encode(b"late request"))
        pump(ctx, lambda _s: local_has_data(local))
        assert recv_msg(local) == b"late request"
        net.close()
        pump(ctx, lambda s: _disconnections(s) == {nfd, lfd})


def test_full_close_of_a_unix_peer_still_closes_both_at_once():
    ctx, net, local, nfd, lfd = pair_with_switch()
    with ctx:
        net.sendall(encode(b"last words"))
        net.close()  # not a half-close: POLLHUP on our end
        pump(ctx, lambda s: _disconnections(s) == {nfd, lfd})
        assert recv_msg(local) == b"last words"
        assert local.recv(1) == b""


def test_half_closed_peer_that_never_reads_is_bounded():
    """The network peer half-closes and never reads while the local side
    floods: the relay pauses the local side, its queue stays bounded."""
    high = 128 * 1024
    ctx, net, local, nfd, lfd = pair_with_switch(queue_high_water=high, switch_events=False)
    net.shutdown(socket.SHUT_WR)
    local.setblocking(False)
    blob = encode(b"r" * 60_000)
    sent = 0
    with ctx:
        for _ in range(1000):
            with suppress(BlockingIOError):
                sent += local.send(blob)
            ctx.wait_event(timeout=0.001)
        assert nfd in ctx  # still open: the peer may read later
        queued = ctx.pending_bytes(nfd)
        assert queued <= high + 256 * 1024 + len(blob), queued
        assert sent < 1000 * len(blob)  # the local side was paused, not buffered
        # The peer reads at last: everything arrives.
        net.setblocking(False)
        received = 0
        deadline = time.monotonic() + 10
        while received < sent and time.monotonic() < deadline:
            with suppress(BlockingIOError):
                received += len(net.recv(1 << 20))
            ctx.wait_event(timeout=0.001)
        assert received == sent


def test_service_writes_queued_replies_to_a_half_closed_client(rundir):
    """A Context service whose replies are queued when its client half-closes
    writes them before closing (it used to drop them)."""
    ctx = Context()
    ctx.service_init("pong")
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            ev = ctx.wait_event(timeout=0.05)
            if ev.type == EventType.MESSAGE_RX:
                ctx.write(ev.fd, ev.message)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(10)
        c.connect(str(rundir / "pong"))
        requests = [bytes([i % 256]) * 1000 for i in range(600)]  # 600 KB, under the mark
        c.sendall(b"".join(encode(r) for r in requests))
        time.sleep(0.3)  # the replies fill the socket and queue in the service
        c.shutdown(socket.SHUT_WR)
        assert [recv_msg(c) for _ in requests] == requests
        assert c.recv(1) == b""
        c.close()
    finally:
        stop.set()
        thread.join(5)
        ctx.close_all()


def test_tcpd_client_half_close_gets_ok_and_every_reply(rundir, procs):
    """End to end: sendall(name + frames), shutdown(SHUT_WR), then read `ok`
    and every reply from a real ipc-tcpd relaying to ipc pongd."""
    procs.pongd(rundir)
    _proc, _logs, port = start_listening_daemon(
        procs, "ipc-tcpd", "--listen", "127.0.0.1:0", env={"RUNDIR": str(rundir)}
    )
    for count in (1, 200):
        requests = [f"message {i}".encode() * (1 + i % 7) for i in range(count)]
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"pong" + b"".join(encode(r) for r in requests))
        s.shutdown(socket.SHUT_WR)
        assert recv_exact(s, 2) == b"ok"
        assert [recv_msg(s) for _ in requests] == requests
        assert s.recv(1) == b""  # and then the pair is closed
        s.close()
