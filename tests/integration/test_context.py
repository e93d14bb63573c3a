"""The Context loop over real Unix sockets: services, clients, limits, switching."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest

from ipc_core import (
    Context,
    ContextStopped,
    Event,
    EventType,
    PeerClosed,
    SwitchResult,
    UsageError,
    encode,
    recv_fd,
    send_fd,
)
from ipc_core.framing import FrameDecoder
from tests.helpers import connectable, pair_with_switch, pump, recv_msg


def client(rundir, name="pong", timeout=5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(rundir / name))
    return s


@contextmanager
def echo_service(rundir, name="pong", **ctx_kwargs) -> Iterator[Context]:
    """An echo service running its loop in a thread; stopped at exit."""
    ctx = Context(**ctx_kwargs)
    ctx.service_init(name)
    log: list[Event] = []

    def run() -> None:
        for ev in ctx:
            log.append(ev)
            if ev.type == EventType.MESSAGE_RX:
                ctx.write(ev.fd, ev.message)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ctx.events_seen = log  # type: ignore[attr-defined]
    try:
        yield ctx
    finally:
        ctx.call_soon_threadsafe(ctx.stop)
        thread.join(5)
        assert not thread.is_alive()


def test_echo_and_empty_payload(rundir):
    with echo_service(rundir):
        s = client(rundir)
        for payload in (b"hello", b"", b"x" * 100_000, bytes(range(256))):
            s.sendall(encode(payload))
            assert recv_msg(s) == payload
        s.close()


def test_connection_and_disconnection_events(rundir):
    with Context() as ctx:
        lfd = ctx.service_init("pong")
        s = client(rundir)
        ev = ctx.wait_event(timeout=2)
        assert ev.type == EventType.CONNECTION and ev.origin == lfd
        s.sendall(encode(b"a") + encode(b"b"))
        got = [ctx.wait_event(timeout=2), ctx.wait_event(timeout=2)]
        assert [(e.type, e.fd, e.message) for e in got] == [
            (EventType.MESSAGE_RX, ev.fd, b"a"),
            (EventType.MESSAGE_RX, ev.fd, b"b"),
        ]
        s.close()
        ev2 = ctx.wait_event(timeout=2)
        assert ev2.type == EventType.DISCONNECTION and ev2.fd == ev.fd and ev2.reason is None
        match ev2:
            case Event(EventType.DISCONNECTION, fd):
                assert fd == ev.fd
            case _:
                pytest.fail("match on Event failed")


def test_replies_to_a_peer_gone_mid_batch_return_false_not_raise(rundir):
    """Three messages read in one go, then the client is gone: the reply to
    the first fails (EPIPE), and the replies to the two still-queued messages
    must report the loss (False), not raise: `ipc pongd` died of this."""
    with Context() as ctx:
        ctx.service_init("pong")
        s = client(rundir)
        conn = ctx.wait_event(timeout=2)
        s.sendall(encode(b"a" * 70_000) * 3)
        s.close()
        messages = [ctx.wait_event(timeout=2) for _ in range(3)]
        assert [e.type for e in messages] == [EventType.MESSAGE_RX] * 3
        results = [ctx.write(conn.fd, e.message) for e in messages]
        assert results == [False, False, False]
        assert ctx.send_raw(conn.fd, b"raw") is False
        with pytest.raises(PeerClosed):
            ctx.pending_bytes(conn.fd)
        ctx.close(conn.fd)  # a no-op, like any close of a closed descriptor
        gone = ctx.wait_event(timeout=2)
        assert (gone.type, gone.fd) == (EventType.DISCONNECTION, conn.fd)
        assert "write failed" in (gone.reason or "")
        assert ctx.wait_event(timeout=0.01).type == EventType.TIMER  # the number is freed
        with pytest.raises(UsageError):  # now a plain misuse
            ctx.write(conn.fd, b"late")


def test_oversize_header_closes_only_that_connection(rundir, caplog):
    with echo_service(rundir, max_message_size=1024) as ctx:
        good = client(rundir)
        bad = client(rundir)
        bad.sendall(struct.pack(">I", 2**31))
        assert bad.recv(10) == b""  # closed by the service
        good.sendall(encode(b"still here"))
        assert recv_msg(good) == b"still here"
        reasons = [e.reason for e in ctx.events_seen if e.type == EventType.DISCONNECTION]
        assert any(r and "limit is 1024" in r for r in reasons)


def test_split_and_merged_writes(rundir):
    with echo_service(rundir):
        s = client(rundir)
        stream = b"".join(encode(b"m%d" % i) for i in range(2000))
        pos = 0
        rng = random.Random(7)
        while pos < len(stream):
            step = rng.randint(1, 7)
            s.sendall(stream[pos : pos + step])
            pos += step
        for i in range(2000):
            assert recv_msg(s) == b"m%d" % i


def test_200_clients_byte_exact(rundir, procs):
    procs.pongd(rundir)
    rng = random.Random(1)
    clients = [client(rundir) for _ in range(200)]
    sent: list[list[bytes]] = []
    for s in clients:
        msgs = [rng.randbytes(rng.randint(0, 2000)) for _ in range(10)]
        sent.append(msgs)
        s.sendall(b"".join(encode(m) for m in msgs))
    for s, msgs in zip(clients, sent, strict=True):
        assert [recv_msg(s) for _ in msgs] == msgs
        s.close()


def test_sigterm_removes_socket_and_lock(rundir, procs):
    proc = procs.pongd(rundir)
    assert (rundir / "pong.lock").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert not (rundir / "pong").exists()
    assert not (rundir / "pong.lock").exists()


def test_sigint_stops_too(rundir, procs):
    proc = procs.pongd(rundir)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(5) == 0
    assert not (rundir / "pong").exists()


def test_double_start_of_a_process_fails_clearly(rundir, procs):
    procs.pongd(rundir)
    second = procs.ipc("pongd", env={"RUNDIR": str(rundir)})
    assert second.wait(5) == 1
    assert b"already running" in second.stderr.read()
    assert connectable(rundir / "pong")


def test_schedule_from_another_thread_wakes_the_loop(rundir):
    with Context() as ctx:
        ctx.service_init("svc")
        s = client(rundir, "svc")
        conn = ctx.wait_event(timeout=2)
        assert conn.type == EventType.CONNECTION
        threading.Timer(0.2, lambda: ctx.schedule(conn.fd, b"from thread")).start()
        t0 = time.monotonic()
        ev = ctx.wait_event(timeout=5)  # blocked in epoll when the thread schedules
        assert ev.type == EventType.MESSAGE_TX and ev.fd == conn.fd
        assert time.monotonic() - t0 < 2
        assert recv_msg(s) == b"from thread"


def test_client_that_never_reads_is_bounded(rundir):
    high = 64 * 1024
    with echo_service(rundir, queue_high_water=high) as ctx:
        s = client(rundir, timeout=0.5)
        chunk = b"".join(encode(b"y" * 1000) for _ in range(64))
        sent = 0
        with pytest.raises(TimeoutError):
            for _ in range(20_000):  # 1.3 GB if nothing pushed back
                s.sendall(chunk)
                sent += len(chunk)
        assert sent < 32 * 1024 * 1024  # back-pressure reached the client
        fd = next(e.fd for e in ctx.events_seen if e.type == EventType.CONNECTION)
        queued = ctx.pending_bytes(fd)
        assert queued <= high + 300 * 1024, queued
        # Reading resumes the flow: everything sent comes back, in order.
        s.settimeout(5)
        total = 0
        while total < sent:
            total += len(recv_msg(s)) + 4
        assert total == sent


def test_busy_client_does_not_starve_others(rundir, procs):
    procs.pongd(rundir)
    hog = client(rundir)
    stop = threading.Event()
    blob = b"".join(encode(b"z" * 100) for _ in range(500))

    def flood() -> None:
        hog.settimeout(0.2)
        while not stop.is_set():
            try:
                hog.sendall(blob)
                hog.recv(1 << 20)
            except OSError:
                pass

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        s = client(rundir)
        worst = 0.0
        for _ in range(200):
            t0 = time.perf_counter()
            s.sendall(encode(b"ping"))
            assert recv_msg(s) == b"ping"
            worst = max(worst, time.perf_counter() - t0)
        assert worst < 0.25, worst
    finally:
        stop.set()
        t.join(2)


def test_timer_and_call_later(rundir):
    with Context() as ctx:
        ctx.set_timer(0.05)
        t0 = time.monotonic()
        assert ctx.wait_event().type == EventType.TIMER
        assert 0.04 < time.monotonic() - t0 < 1
        fired = []
        ctx.call_later(0.01, lambda: fired.append(1))
        h = ctx.call_later(0.01, lambda: fired.append(2))
        h.cancel()
        assert ctx.wait_event(timeout=0.1).type == EventType.TIMER
        assert fired == [1]


def test_external_pipe_events(rundir):
    r, w = os.pipe()
    with Context() as ctx:
        ctx.add_external(r)
        assert ctx.wait_event(timeout=0.05).type == EventType.TIMER
        os.write(w, b"x")
        ev = ctx.wait_event(timeout=2)
        assert ev.type == EventType.EXTERNAL and ev.fd == r
        assert os.read(r, 10) == b"x"
        ctx.remove_external(r)
    os.close(w)
    os.close(r)  # still ours: remove_external does not close an int fd


def test_iteration_ends_on_stop_and_context_manager_cleans_up(rundir):
    ctx = Context()
    ctx.service_init("a")
    ctx.service_init("b")
    ctx.call_later(0.05, ctx.stop)
    assert list(ctx) == []
    assert list(rundir.iterdir()) == []
    with pytest.raises(ContextStopped):
        ctx.wait_event()


def test_read_blocks_for_one_message(rundir):
    with echo_service(rundir), Context() as ctx:
        fd = ctx.connect_service("pong")
        ctx.write(fd, b"one")
        ctx.write(fd, b"two")
        assert ctx.read(fd, timeout=2) == b"one"
        assert ctx.read(fd, timeout=2) == b"two"
        with pytest.raises(TimeoutError):
            ctx.read(fd, timeout=0.05)


def test_read_reports_peer_closed(rundir):
    with Context() as srv, Context() as ctx:
        srv.service_init("x")
        fd = ctx.connect_service("x")
        conn = srv.wait_event(timeout=2)
        srv.close(conn.fd)
        with pytest.raises(PeerClosed):
            ctx.read(fd, timeout=2)


def test_descriptor_passing():
    a, b = socket.socketpair()
    r, w = os.pipe()
    send_fd(a, b"ok", w)
    data, fd = recv_fd(b)
    assert data == b"ok" and fd is not None
    os.write(fd, b"through")
    assert os.read(r, 10) == b"through"
    for x in (fd, r, w):
        os.close(x)
    a.close()
    b.close()


# ---------------------------------------------------------------- switching


def test_plain_switch_forwards_both_ways_with_events():
    ctx, net, local, nfd, _lfd = pair_with_switch()
    with ctx:
        net.sendall(encode(b"to local"))
        evs = pump(ctx, lambda s: any(e.type == EventType.SWITCH_TX for e in s))
        assert (EventType.SWITCH_RX, nfd) in [(e.type, e.fd) for e in evs]
        assert recv_msg(local) == b"to local"
        local.sendall(encode(b"to net"))
        pump(ctx, lambda s: any(e.type == EventType.SWITCH_TX for e in s))
        assert recv_msg(net) == b"to net"


def test_switch_closes_both_ends_when_one_closes():
    ctx, net, local, nfd, lfd = pair_with_switch()
    with ctx:
        net.sendall(encode(b"last words"))
        net.close()
        evs = pump(ctx, lambda s: sum(e.type == EventType.DISCONNECTION for e in s) == 2)
        assert {e.fd for e in evs if e.type == EventType.DISCONNECTION} == {nfd, lfd}
        assert recv_msg(local) == b"last words"  # flushed before closing
        assert local.recv(1) == b""
        assert ctx.descriptors == []


def test_switch_refuses_oversize_frame():
    ctx, net, local, _nfd, _lfd = pair_with_switch(max_message_size=100)
    with ctx:
        net.sendall(encode(b"fine") + struct.pack(">I", 101))
        pump(ctx, lambda s: sum(e.type == EventType.DISCONNECTION for e in s) == 2)
        assert recv_msg(local) == b"fine"
        assert local.recv(1) == b""


def test_switch_reference_callbacks():
    ctx, net, local, nfd, _lfd = pair_with_switch()
    lines = {"buf": b""}

    def line_in(fd: int):
        data = os.read(fd, 4096)
        if not data:
            return SwitchResult.FD_CLOSING, None
        if data == b"ping\n":
            return SwitchResult.IGNORE, None
        return SwitchResult.NO_ERROR, data.rstrip(b"\n")

    def line_out(fd: int, payload: bytes):
        os.write(fd, payload + b"\n")
        return SwitchResult.NO_ERROR

    with ctx:
        ctx.set_switch_callbacks(nfd, line_in, line_out)
        net.sendall(b"ping\n")
        assert ctx.wait_event(timeout=0.2).type == EventType.TIMER  # ignored
        assert ctx.wait_event(timeout=0.05).type == EventType.TIMER
        net.sendall(b"hello\n")
        pump(ctx, lambda s: any(e.type == EventType.SWITCH_TX for e in s))
        assert recv_msg(local) == b"hello"
        local.sendall(encode(b"a") + encode(b"b"))
        pump(ctx, lambda s: sum(e.type == EventType.SWITCH_TX for e in s) >= 1)
        got = b""
        while got.count(b"\n") < 2:
            got += net.recv(100)
        assert got == b"a\nb\n" and lines["buf"] == b""


class LineLayer:
    """A toy Sans-I/O layer: newline-terminated text on the network side."""

    def __init__(self) -> None:
        self.buf = b""
        self.out = b""
        self.decoder = FrameDecoder()

    def receive_data(self, data: bytes) -> bytes:
        if not data:
            raise PeerClosed("eof")
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return b"".join(encode(line) for line in lines)

    def send(self, data: bytes) -> None:
        for payload in self.decoder.feed(data):
            self.out += payload + b"\n"

    def data_to_send(self) -> bytes:
        out, self.out = self.out, b""
        return out

    def close(self) -> None:
        self.out += b"bye\n"


def test_switch_with_sans_io_layer():
    ctx, net, local, nfd, _lfd = pair_with_switch(switch_events=False)
    with ctx:
        ctx.set_switch_codec(nfd, LineLayer())
        net.sendall(b"one\ntw")
        net.sendall(b"o\n")
        pump(ctx, lambda s: local_ready(local))
        assert recv_msg(local) == b"one"
        assert recv_msg(local) == b"two"
        local.sendall(encode(b"reply"))
        pump(ctx, lambda s: net_ready(net))
        assert net.recv(100) == b"reply\n"
        local.close()  # the layer's close bytes reach the network end
        pump(ctx, lambda s: any(e.type == EventType.DISCONNECTION for e in s))
        data = b""
        while chunk := net.recv(100):
            data += chunk
        assert data == b"bye\n"


class FastLineLayer(LineLayer):
    """LineLayer with the optional fast hooks; they decline anything but one
    whole line / one whole message without "slow" in it, and count calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = {"in": 0, "out": 0}

    def fast_receive(self, data) -> bytes | None:
        data = bytes(data)
        if self.buf or data.count(b"\n") != 1 or not data.endswith(b"\n") or b"slow" in data:
            return None
        self.fast["in"] += 1
        return encode(data[:-1])

    def fast_send(self, data) -> bytes | None:
        if self.decoder.pending or self.out or b"slow" in bytes(data):
            return None
        self.fast["out"] += 1
        return bytes(data[4:]) + b"\n"


def test_switch_uses_a_layers_fast_hooks_and_falls_back_in_order():
    ctx, net, local, nfd, lfd = pair_with_switch()
    layer = FastLineLayer()
    with ctx:
        ctx.set_switch_codec(nfd, layer)
        for line in (b"one", b"slow two", b"three"):
            net.sendall(line + b"\n")
            pump(ctx, lambda s: local_ready(local))
            assert recv_msg(local) == line
        net.sendall(b"four\nfi")  # two units in one read: the general path
        net.sendall(b"ve\n")
        pump(ctx, lambda s: local_ready(local))
        assert [recv_msg(local), recv_msg(local)] == [b"four", b"five"]
        assert layer.fast["in"] == 2  # "one" and "three"
        for payload in (b"a", b"slow b", b"c"):
            local.sendall(encode(payload))
            pump(ctx, lambda s: net_ready(net))
            assert net.recv(100) == payload + b"\n"
        assert layer.fast["out"] == 2
        local.sendall(encode(b"d")[:3])  # a partial message: the general path
        pump(ctx, lambda s: len(s) >= 3)
        local.sendall(encode(b"d")[3:])
        pump(ctx, lambda s: net_ready(net))
        assert net.recv(100) == b"d\n" and layer.fast["out"] == 2
        assert ctx.stats["switched"].messages == 5 + 4  # messages counted on both paths


class StreamFastLayer(LineLayer):
    """fast_receive returns whatever the lines decode to: several messages,
    or a header announcing more than the limit (as TLS plaintext can)."""

    def fast_receive(self, data) -> bytes | None:
        data = bytes(data)
        if data.startswith(b"BIG"):
            return encode(b"ok") + struct.pack(">I", 10_000)
        return self.receive_data(data) or None


def test_fast_receive_output_is_scanned_like_the_general_paths():
    ctx, net, local, nfd, _lfd = pair_with_switch(max_message_size=1000)
    with ctx:
        ctx.set_switch_codec(nfd, StreamFastLayer())
        net.sendall(b"one\ntwo\nthree\n")
        pump(ctx, lambda s: local_ready(local))
        assert [recv_msg(local) for _ in range(3)] == [b"one", b"two", b"three"]
        assert ctx.stats["switched"].messages == 3
        net.sendall(b"BIG\n")
        pump(ctx, lambda s: any(e.type == EventType.DISCONNECTION for e in s))
        assert recv_msg(local) == b"ok"  # the good message before the oversize header
        assert local.recv(1) == b""


def test_switch_fast_hooks_not_used_when_the_partner_has_callbacks():
    ctx, net, local, nfd, lfd = pair_with_switch()
    layer = FastLineLayer()

    def out_cb(fd: int, payload: bytes):
        os.write(fd, encode(payload.upper()))
        return SwitchResult.NO_ERROR

    with ctx:
        ctx.set_switch_codec(nfd, layer)
        ctx.set_switch_callbacks(lfd, None, out_cb)
        net.sendall(b"shout\n")
        pump(ctx, lambda s: local_ready(local))
        assert recv_msg(local) == b"SHOUT"
        assert layer.fast == {"in": 0, "out": 0}


def local_ready(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


net_ready = local_ready


def test_switch_backpressure_bounds_memory():
    """The local reader stops reading: the net end must be paused, not buffered."""
    high = 128 * 1024
    ctx, net, local, _nfd, lfd = pair_with_switch(queue_high_water=high, switch_events=False)
    net.setblocking(False)
    blob = encode(b"q" * 60_000)
    sent = 0
    with ctx:
        for _ in range(2000):
            with suppress(BlockingIOError):
                sent += net.send(blob)
            ctx.wait_event(timeout=0.001)
        assert ctx.pending_bytes(lfd) <= high + 256 * 1024 + len(blob)
        assert sent < 2000 * len(blob)
        # Drain on the far side: everything arrives, nothing was dropped.
        local.setblocking(False)
        received = 0
        deadline = time.monotonic() + 10
        while received < sent and time.monotonic() < deadline:
            with suppress(BlockingIOError):
                received += len(local.recv(1 << 20))
            ctx.wait_event(timeout=0.001)
        assert received == sent


def test_accepting_app_never_gets_a_number_still_reported_as_leaving():
    """The daemon pattern: the application accepts on an EXTERNAL listener.
    If a peer's close and a new connection land in the same poll batch, the
    accepted socket must not reuse the number of the peer whose DISCONNECTION
    is still queued."""
    listener = socket.socket(socket.AF_INET)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    with Context() as ctx:
        lfd = ctx.add_external(listener)
        for _ in range(20):
            b = socket.create_connection(listener.getsockname())
            a_remote, a_local = socket.socketpair()
            afd = ctx.adopt(a_local)
            a_remote.close()
            # Take every free number below afd, so that afd is the lowest free
            # one once closed: what accept() would hand out next.
            placeholders = []
            while (d := os.open(os.devnull, os.O_RDONLY)) < afd:
                placeholders.append(d)
            os.close(d)
            time.sleep(0.02)
            pending_disconnect = {afd}
            accepted = []
            while (ev := ctx.wait_event(timeout=0.2)).type != EventType.TIMER:
                if ev.type == EventType.EXTERNAL and ev.fd == lfd:
                    sock, _ = listener.accept()
                    assert sock.fileno() not in pending_disconnect
                    accepted.append(sock)
                elif ev.type == EventType.DISCONNECTION:
                    pending_disconnect.discard(ev.fd)
            assert not pending_disconnect and accepted
            for d in placeholders:
                os.close(d)
            for s in accepted:
                s.close()
            b.close()


def test_close_with_refill_streams_a_long_answer_one_piece_at_a_time():
    """close(fd, flush=True, refill=...): the next piece is asked for only
    when the last one is written, so the queue holds one piece at most; the
    reader gets every byte in order, then the close."""
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pieces = [bytes([i]) * 50_000 for i in range(40)]
    queued: list[int] = []
    with Context() as ctx:
        fd = ctx.adopt(ours)

        def refill() -> bytes:
            queued.append(ctx.pending_bytes(fd))
            return pieces[len(queued) - 1] if len(queued) <= len(pieces) else b""

        ctx.close(fd, flush=True, refill=refill)
        got = bytearray()
        theirs.setblocking(False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with suppress(TimeoutError):
                ctx.wait_event(timeout=0.01)
            try:
                chunk = theirs.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            got += chunk
    theirs.close()
    assert bytes(got) == b"".join(pieces)
    assert max(queued) == 0  # asked only once the queue was written out
    assert len(queued) == len(pieces) + 1  # the last call ended it


def test_a_failing_refill_closes_only_that_connection():
    ours, theirs = socket.socketpair()
    with Context() as ctx:
        fd = ctx.adopt(ours)

        def refill() -> bytes:
            raise RuntimeError("disk gone")

        ctx.close(fd, flush=True, refill=refill)
        event = ctx.wait_event(timeout=5)
        assert event.type == EventType.DISCONNECTION and "streaming failed" in (event.reason or "")
    theirs.settimeout(5)
    assert theirs.recv(10) == b""
    theirs.close()


# ----------------------------------------------- paths that had no test (issue 13)


def _fill_until_refused(ctx: Context, fd: int, limit: int) -> int:
    """Write 16 KiB messages to a peer that does not read until the context
    refuses (write() returns False); return the bytes accepted."""
    payload = b"q" * 16 * 1024
    accepted = 0
    for _ in range(4 * limit // len(payload) + 1000):  # bounded: the kernel buffers too
        if not ctx.write(fd, payload):
            return accepted
        accepted += len(payload) + 4
    raise AssertionError(f"no hard limit after {accepted} bytes")


def test_hard_limit_disconnects_only_the_peer_that_does_not_read(rundir, caplog):
    """A peer whose send queue passes queue_hard_limit is disconnected with
    the reason (logged once, in one line); another peer is served as usual."""
    high, hard = 32 * 1024, 256 * 1024
    with Context(queue_high_water=high, queue_hard_limit=hard) as ctx:
        ctx.service_init("pong")
        sleeper, reader = client(rundir), client(rundir)
        fds = [ctx.wait_event(timeout=5) for _ in range(2)]
        assert [e.type for e in fds] == [EventType.CONNECTION] * 2
        slow, fast = fds[0].fd, fds[1].fd
        with caplog.at_level("WARNING", logger="ipc_core"):
            accepted = _fill_until_refused(ctx, slow, hard)
        assert accepted >= hard  # the kernel took some; the queue took the hard limit
        event = ctx.wait_event(timeout=5)
        assert event.type == EventType.DISCONNECTION and event.fd == slow
        assert event.reason == f"send queue over {hard} bytes: peer is not reading"
        lines = [r.getMessage() for r in caplog.records if "send queue over" in r.getMessage()]
        assert lines == [f"descriptor {slow}: {event.reason}; closing it"]
        assert slow not in ctx.descriptors and fast in ctx.descriptors
        # The other peer is unaffected: it talks both ways.
        reader.sendall(encode(b"still here"))
        event = ctx.wait_event(timeout=5)
        assert (event.type, event.fd, event.message) == (EventType.MESSAGE_RX, fast, b"still here")
        assert ctx.write(fast, b"yes")
        assert recv_msg(reader) == b"yes"
        # The disconnected peer reads what the kernel held, then the end.
        sleeper.settimeout(5)
        got = 0
        while chunk := sleeper.recv(1 << 20):
            got += len(chunk)
        assert got < accepted  # the queued part was dropped, not delivered
        sleeper.close()
        reader.close()


def _serve_until(ctx: Context, done, timeout: float) -> list[Event]:
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    while not done(seen):
        assert time.monotonic() < deadline, f"timed out; events: {seen}"
        with suppress(TimeoutError):
            seen.append(ctx.wait_event(timeout=0.02))
    return seen


def test_close_flush_writes_the_queue_before_closing():
    """close(fd, flush=True) with data queued: the peer reads every byte,
    then the end; the DISCONNECTION comes once the queue is written."""
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    messages = [bytes([i]) * 30_000 for i in range(40)]  # 1.2 MB: most of it queued
    with Context() as ctx:
        fd = ctx.adopt(ours)
        for m in messages:
            assert ctx.write(fd, m)
        assert ctx.pending_bytes(fd) > 500_000
        ctx.close(fd, flush=True)
        assert fd in ctx  # lingering, not closed yet
        got = bytearray()
        theirs.setblocking(False)
        disconnections: list[Event] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with suppress(TimeoutError):
                ev = ctx.wait_event(timeout=0.01)
                if ev.type == EventType.DISCONNECTION:
                    disconnections.append(ev)
            try:
                chunk = theirs.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            got += chunk
        assert [(e.fd, e.reason) for e in disconnections] == [(fd, None)]
    theirs.close()
    assert bytes(got) == b"".join(encode(m) for m in messages)


def test_close_flush_to_a_peer_that_never_reads_ends_at_the_linger_deadline(monkeypatch):
    """A peer that never reads cannot hold a flushing close open: at the
    linger deadline the connection closes with its reason; others go on."""
    import ipc_core._connections as connections

    monkeypatch.setattr(connections, "LINGER_SECONDS", 0.3)
    ours, theirs = socket.socketpair()
    other_ours, other_theirs = socket.socketpair()
    with Context() as ctx:
        fd = ctx.adopt(ours)
        other = ctx.adopt(other_ours)
        while ctx.pending_bytes(fd) == 0:  # fill the kernel's buffer, then queue
            assert ctx.write(fd, b"z" * 65536)
        start = time.monotonic()
        ctx.close(fd, flush=True)
        seen = _serve_until(ctx, lambda s: any(e.type == EventType.DISCONNECTION for e in s), 5)
        elapsed = time.monotonic() - start
        (event,) = [e for e in seen if e.type == EventType.DISCONNECTION]
        assert (event.fd, event.reason) == (fd, "linger timeout: peer not reading")
        assert 0.25 <= elapsed < 3, elapsed
        other_theirs.sendall(encode(b"ping"))
        event = ctx.wait_event(timeout=5)
        assert (event.type, event.fd, event.message) == (EventType.MESSAGE_RX, other, b"ping")
    for s in (theirs, other_theirs):
        s.close()


_EMFILE_CHILD = r"""
import os, resource, sys, time
from ipc_core import Context, EventType

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
with Context(rundir_path=sys.argv[1]) as ctx:
    ctx.service_init("pong")
    print("ready", flush=True)

    def wait(kind, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ev = ctx.wait_event(timeout=0.05)
            if ev.type == kind:
                return ev
        raise SystemExit(f"no {kind.name} within {seconds} s")

    # One descriptor left: the first client takes it, the second cannot be
    # accepted (EMFILE) until the limit is raised again.
    used = len(os.listdir("/proc/self/fd")) - 1  # listdir's own descriptor is gone
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 1, hard))
    print("limited", flush=True)
    wait(EventType.CONNECTION, 10)
    print("first", flush=True)
    sys.stdin.readline()  # the parent has connected the second client
    cpu = time.process_time()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        ev = ctx.wait_event(timeout=0.05)
        assert ev.type != EventType.CONNECTION, "accepted past the limit"
    print(f"cpu {time.process_time() - cpu:.3f}", flush=True)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    wait(EventType.CONNECTION, 5)
    print("second", flush=True)
"""


def test_accept_out_of_descriptors_pauses_the_listener_then_resumes(rundir):
    """accept() failing with EMFILE pauses the listener (100 ms, then a retry)
    instead of spinning on a listener that stays readable; the line is
    logged once; the waiting client is accepted once descriptors are free."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    child = subprocess.Popen(
        [sys.executable, "-c", _EMFILE_CHILD, str(rundir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    clients: list[socket.socket] = []
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "ready\n"
        assert child.stdout.readline() == "limited\n"
        clients.append(client(rundir))
        assert child.stdout.readline() == "first\n"
        clients.append(client(rundir))  # queued in the backlog; accept() gets EMFILE
        child.stdin.write("go\n")
        child.stdin.flush()
        cpu_line = child.stdout.readline()
        assert cpu_line.startswith("cpu "), cpu_line
        assert float(cpu_line.split()[1]) < 0.5  # a spinning loop burns ~1 s here
        assert child.stdout.readline() == "second\n"
        _, err = child.communicate(timeout=10)
    finally:
        for s in clients:
            s.close()
        if child.poll() is None:
            child.kill()
            child.wait(5)
    assert child.returncode == 0, err
    lines = [line for line in err.splitlines() if "cannot accept" in line]
    assert len(lines) == 1 and "Too many open files; pausing 100 ms" in lines[0], err


# ------------------------------------------------------------------ release


def _next(ctx: Context, kind: EventType, timeout: float = 5.0) -> Event:
    seen = _serve_until(ctx, lambda evs: bool(evs) and evs[-1].type is kind, timeout)
    return seen[-1]


def test_release_gives_the_peer_up_open_and_untouched(rundir):
    with Context() as ctx:
        ctx.service_init("rel")
        with client(rundir, "rel") as c:
            fd = _next(ctx, EventType.CONNECTION).fd
            sock = ctx.release(fd)
            assert fd not in ctx and sock.fileno() == fd
            assert not sock.getblocking()  # the open file's flag, as the context had it
            sock.setblocking(True)
            sock.settimeout(5)
            c.sendall(encode(b"direct"))
            assert recv_msg(sock) == b"direct"  # nothing read by the context
            # Closing one copy does not end the connection (no shutdown).
            copy = sock.dup()
            sock.close()
            copy.sendall(encode(b"still open"))
            assert recv_msg(c) == b"still open"
            # The context says nothing more about it, and closing it leaves it alone.
            c.sendall(encode(b"unseen"))
            assert ctx.wait_event(timeout=0.2).type is EventType.TIMER
            ctx.close_all()
            assert recv_msg(copy) == b"unseen"
            copy.close()
            assert c.recv(1) == b""  # the last copy closed: the client sees the end


def test_release_refuses_what_would_lose_bytes_and_keeps_the_connection(rundir):
    with Context() as ctx:
        listener = ctx.service_init("rel")
        with client(rundir, "rel") as c:
            fd = _next(ctx, EventType.CONNECTION).fd
            c.sendall(encode(b"a") + encode(b"b"))
            assert _next(ctx, EventType.MESSAGE_RX).message == b"a"
            with pytest.raises(UsageError, match="not yet delivered"):
                ctx.release(fd)  # "b" is queued as an event
            assert ctx.wait_event(timeout=1).message == b"b"
            c.sendall(encode(b"cd")[:3])  # part of a frame: in the decoder
            assert ctx.wait_event(timeout=0.3).type is EventType.TIMER
            with pytest.raises(UsageError, match="not yet delivered"):
                ctx.release(fd)
            c.sendall(encode(b"cd")[3:])
            assert ctx.wait_event(timeout=1).message == b"cd"
            ctx.write(fd, b"kept")
            assert recv_msg(c) == b"kept"
            with pytest.raises(UsageError, match="not a LibIPC peer"):
                ctx.release(listener)
            r, w = os.pipe()
            try:
                ctx.add_external(r)
                with pytest.raises(UsageError, match="not a LibIPC peer"):
                    ctx.release(r)
                ctx.remove_external(r)
            finally:
                os.close(r)
                os.close(w)
            sock = ctx.release(fd)  # nothing pending now
            sock.setblocking(True)
            sock.settimeout(5)
            c.sendall(encode(b"e"))
            assert recv_msg(sock) == b"e"
            sock.close()


def test_release_refuses_a_switched_end():
    with Context() as ctx:
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        try:
            ctx.add_switch(b, d)
            with pytest.raises(UsageError, match="not a LibIPC peer"):
                ctx.release(b.fileno())
            assert b.fileno() in ctx and d.fileno() in ctx  # still switched
        finally:
            for s in (a, c):
                s.close()


def test_release_of_a_door_connection_sends_the_accept_first(rundir):
    from tests.integration.test_peer_info_core import ACCEPT, INFO, door_client

    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        with door_client(rundir) as daemon:
            event = _next(ctx, EventType.CONNECTION)
            assert event.peer == INFO
            sock = ctx.release(event.fd)
            sock.setblocking(True)
            sock.settimeout(5)
            assert recv_exact_bytes(daemon, len(ACCEPT)) == ACCEPT  # the verdict, then ours
            daemon.sendall(encode(b"after the accept"))
            assert recv_msg(sock) == b"after the accept"
            sock.sendall(encode(b"reply"))
            assert recv_msg(daemon) == b"reply"
            with pytest.raises(UsageError):
                ctx.refuse(event.fd, "too late")  # not in the context any more
            sock.close()


def recv_exact_bytes(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed early"
        data += chunk
    return data
