"""Peer information, the service's side (issue 14): a Context that asked for it
gets who its client is from whoever speaks the door protocol, and believes
only trusted writers. Real Unix sockets; real processes under another uid
(setpriv) where the uid matters."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ipc_core import (
    Context,
    Event,
    EventType,
    InvalidServiceName,
    PeerInfo,
    UsageError,
    door,
    encode,
    list_services,
    service_alive,
    service_marks,
)
from tests.helpers import ROOT, pump, recv_exact, recv_msg, wait_for

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to act as another user",
)

INFO = PeerInfo(
    transport="wss",
    client_address="203.0.113.5",
    client_port=51000,
    local_address="192.0.2.1",
    local_port=443,
    tls_version="TLSv1.3",
    path="/chat",
    query=(("room", "1"),),
    token_name="alice",
)
ACCEPT = door.accept_frame()


# ------------------------------------------------------------------ helpers


def door_client(directory: Path, name: str = "chat", info: PeerInfo = INFO, extra: bytes = b""):
    """A daemon's side of the door: connect, send the offer (and ``extra``)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(directory / f"{name}.door"))
    s.sendall(door.offer_frame(info) + extra)
    return s


def read_verdict(sock: socket.socket) -> tuple[door.Verdict, bytes]:
    reader = door.VerdictReader()
    while True:
        verdict = reader.feed(sock.recv(65536))
        if verdict is not None:
            return verdict, reader.leftover


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def nothing_more(sock: socket.socket, wait: float = 0.2) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""  # EOF is "nothing more" too
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)


@contextmanager
def door_service(
    directory: Path, name: str = "chat", *, refuse: frozenset[str] = frozenset(), **init
) -> Iterator[tuple[Context, list[Event], int]]:
    """A peer-information echo service running its loop in a thread. It
    refuses clients whose address is in ``refuse``, greets the others only
    when they send something (so the accept is the automatic one)."""
    ctx = Context(rundir_path=directory)
    init.setdefault("peer_info", True)
    fd = ctx.service_init(name, **init)
    seen: list[Event] = []

    def run() -> None:
        for ev in ctx:
            seen.append(ev)
            if ev.type == EventType.CONNECTION and ev.peer is not None:
                assert ctx.peer_info(ev.fd) == ev.peer
                if ev.peer.client_address in refuse:
                    ctx.refuse(ev.fd, f"{ev.peer.client_address} is not welcome\nhere")
            elif ev.type == EventType.MESSAGE_RX:
                assert ev.message is not None
                ctx.write(ev.fd, ev.message)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield ctx, seen, fd
    finally:
        ctx.call_soon_threadsafe(ctx.stop)
        thread.join(5)
        assert not thread.is_alive()


def connections(seen: list[Event]) -> list[Event]:
    return [ev for ev in list(seen) if ev.type == EventType.CONNECTION]


@pytest.fixture
def shared(rundir) -> Iterator[Path]:
    """A run directory shared with the group nogroup (setgid, 02770), as a
    team's run directory is: nobody may connect to its sockets, root owns it."""
    path = Path(tempfile.mkdtemp(prefix="ipc-shared-", dir="/tmp"))
    os.chown(path, 0, NOBODY)
    os.chmod(path, 0o2770)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# A daemon's side of the door run as another user: connect to argv[1] (or use
# the inherited descriptor "fd:N"), send the hex bytes of argv[2], print in
# hex what comes back until EOF or argv[3] bytes. No ipc_core import: it must
# run as nobody, whatever the source tree's permissions.
CHILD = r"""
import socket, sys
where, frame, want = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
if where.startswith("fd:"):
    s = socket.socket(fileno=int(where[3:]))
else:
    s = socket.socket(socket.AF_UNIX)
    s.connect(where)
s.settimeout(15)
s.sendall(frame)
data = b""
while len(data) < want:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.hex())
"""


def as_nobody(
    where: str, frame: bytes, want: int, pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    return subprocess.run(
        [*AS_NOBODY, sys.executable, "-I", "-c", CHILD, where, frame.hex(), str(want)],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        pass_fds=pass_fds,
        stdin=subprocess.DEVNULL,
    )


# ------------------------------------------------------------ the good path


def test_door_client_gets_its_peer_info_to_the_service_and_is_accepted(rundir):
    with door_service(rundir) as (ctx, seen, service_fd):
        client = door_client(rundir)
        verdict, leftover = read_verdict(client)
        assert verdict == door.Verdict(True, None) and leftover == b""
        (conn,) = connections(seen)
        assert conn.peer == INFO
        assert conn.origin == service_fd  # the service's own listener, not the door's
        # now an ordinary LibIPC connection, both ways
        client.sendall(encode(b"hello") + encode(b""))
        assert recv_msg(client) == b"hello"
        assert recv_msg(client) == b""
        client.close()
        wait_for(lambda: any(ev.type == EventType.DISCONNECTION for ev in list(seen)))


def test_automatic_accept_at_the_next_wait_event_not_before(rundir):
    with Context() as ctx:
        service_fd = ctx.service_init("chat", peer_info=True)
        client = door_client(rundir)
        (conn,) = pump(ctx, lambda seen: seen and seen[-1].type == EventType.CONNECTION)[-1:]
        assert conn.peer == INFO and ctx.peer_info(conn.fd) == INFO
        assert conn.origin == service_fd
        assert nothing_more(client)  # the application has not decided yet
        ctx.wait_event(timeout=0.05)  # its next call: it did not refuse
        verdict, leftover = read_verdict(client)
        assert verdict.accepted and leftover == b""
        assert ctx.peer_info(conn.fd) == INFO  # still known afterwards
        with pytest.raises(UsageError, match="no verdict"):
            ctx.refuse(conn.fd, "too late")


def test_the_accept_goes_before_the_first_write(rundir):
    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        client = door_client(rundir)
        (conn,) = pump(ctx, lambda seen: seen and seen[-1].type == EventType.CONNECTION)[-1:]
        ctx.write(conn.fd, b"welcome")
        ctx.write(conn.fd, b"second")
        verdict, leftover = read_verdict(client)
        assert verdict.accepted
        rest = leftover + recv_exact(client, 2 * 4 + len(b"welcomesecond") - len(leftover))
        assert rest == encode(b"welcome") + encode(b"second")  # one accept, then the messages
        assert nothing_more(client)


def test_the_accept_goes_before_the_first_schedule(rundir):
    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        client = door_client(rundir)
        (conn,) = pump(ctx, lambda seen: seen and seen[-1].type == EventType.CONNECTION)[-1:]
        ctx.schedule(conn.fd, b"queued")
        verdict, leftover = read_verdict(client)
        assert verdict.accepted
        assert leftover + recv_exact(client, 10 - len(leftover)) == encode(b"queued")


def test_a_message_right_after_the_offer_comes_after_the_connection(rundir):
    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        client = door_client(rundir, extra=encode(b"first") + encode(b"second"))
        seen = pump(ctx, lambda seen: sum(ev.type == EventType.MESSAGE_RX for ev in seen) == 2)
        mine = [ev for ev in seen if ev.type != EventType.TIMER]
        assert [ev.type for ev in mine] == [
            EventType.CONNECTION,
            EventType.MESSAGE_RX,
            EventType.MESSAGE_RX,
        ]
        assert mine[0].peer == INFO
        assert [ev.message for ev in mine[1:]] == [b"first", b"second"]
        assert all(ev.peer is None for ev in mine[1:])
        # The accept went at the call that returned the first message (the
        # application had seen the CONNECTION and not refused).
        verdict, _ = read_verdict(client)
        assert verdict.accepted


def test_an_accept_waits_while_the_connection_event_is_still_queued(rundir):
    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        first = socket.socket(socket.AF_UNIX)
        first.connect(str(rundir / "chat"))
        first.sendall(encode(b"a") + encode(b"b"))
        time.sleep(0.05)
        client = door_client(rundir)
        time.sleep(0.05)
        # The plain peer's CONNECTION, then one poll reads its 2 messages and
        # the door's offer: [a, b, door CONNECTION] queued. The calls that
        # return a and b must not accept an offer the application has not seen.
        got: list[Event] = []
        while not got or got[-1].peer is None:
            got.append(ctx.wait_event(timeout=1))
            if got[-1].peer is None:
                assert nothing_more(client, 0.05)
        assert [(ev.type, ev.message) for ev in got] == [
            (EventType.CONNECTION, None),
            (EventType.MESSAGE_RX, b"a"),
            (EventType.MESSAGE_RX, b"b"),
            (EventType.CONNECTION, None),
        ]
        assert got[-1].peer == INFO
        ctx.wait_event(timeout=0.05)
        assert read_verdict(client)[0].accepted


def test_a_big_offer_in_several_writes(rundir):
    big = PeerInfo(transport="ws", cookie="c" * 15000, user_agent="u" * 1000)
    frame = door.offer_frame(big)
    with door_service(rundir) as (_ctx, seen, _fd):
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(5)
        client.connect(str(rundir / "chat.door"))
        for i in range(0, len(frame), 4000):
            client.sendall(frame[i : i + 4000])
            time.sleep(0.02)
        assert read_verdict(client)[0].accepted
        assert connections(seen)[0].peer == big


# ------------------------------------------------------------------ refusal


def test_refuse_sends_the_reason_then_closes(rundir):
    refused = PeerInfo(transport="tcp", client_address="198.51.100.9")
    with door_service(rundir, refuse=frozenset({"198.51.100.9"})) as (_ctx, seen, _fd):
        client = door_client(rundir, info=refused)
        verdict, leftover = read_verdict(client)
        assert verdict == door.Verdict(False, "198.51.100.9 is not welcome\ufffdhere")
        assert leftover == b"" and read_to_eof(client) == b""
        fd = connections(seen)[0].fd
        wait_for(
            lambda: any(ev.type == EventType.DISCONNECTION and ev.fd == fd for ev in list(seen))
        )
        # the others are served
        other = door_client(rundir)
        assert read_verdict(other)[0].accepted


def test_refuse_of_a_connection_without_a_door_is_a_usage_error(rundir):
    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        plain = socket.socket(socket.AF_UNIX)
        plain.connect(str(rundir / "chat"))
        (conn,) = pump(ctx, lambda seen: seen and seen[-1].type == EventType.CONNECTION)[-1:]
        assert conn.peer is None and ctx.peer_info(conn.fd) is None
        with pytest.raises(UsageError, match="no verdict"):
            ctx.refuse(conn.fd, "no")
        with pytest.raises(UsageError):
            ctx.refuse(12345, "no")


def test_closing_without_a_verdict_sends_none(rundir):
    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        client = door_client(rundir)
        (conn,) = pump(ctx, lambda seen: seen and seen[-1].type == EventType.CONNECTION)[-1:]
        ctx.close(conn.fd)
        ctx.wait_event(timeout=0.05)
        assert read_to_eof(client) == b""


# ------------------------------------------------------- who is believed


def offer_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "door of service" in r.getMessage()]


@needs_root
def test_another_uid_is_refused_while_the_service_serves_others(shared, caplog):
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with door_service(shared) as (_ctx, seen, _fd):
        assert os.stat(shared / "chat.door").st_gid == NOBODY  # nobody may connect
        out = as_nobody(str(shared / "chat.door"), door.offer_frame(INFO), len(ACCEPT))
        assert out.returncode == 0, out.stderr
        assert out.stdout == ""  # closed without a verdict
        wait_for(lambda: offer_log(caplog), what="the warning")
        (line,) = offer_log(caplog)
        assert "uid 65534" in line and "not trusted" in line
        assert connections(seen) == []  # no event for it
        trusted = door_client(shared)  # root is trusted: served as usual
        assert read_verdict(trusted)[0].accepted
        assert len(connections(seen)) == 1


@needs_root
def test_trusted_uids_are_believed(shared):
    with door_service(shared, trusted_uids=(NOBODY,)) as (_ctx, seen, _fd):
        out = as_nobody(str(shared / "chat.door"), door.offer_frame(INFO), len(ACCEPT))
        assert out.returncode == 0, out.stderr
        assert bytes.fromhex(out.stdout) == ACCEPT
        assert connections(seen)[0].peer == INFO


@needs_root
def test_a_trusted_connection_handed_to_an_untrusted_writer_is_refused(shared, caplog):
    # SO_PEERCRED would name root, who connected; the writer is nobody.
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with door_service(shared) as (_ctx, seen, _fd):
        handed = socket.socket(socket.AF_UNIX)
        handed.connect(str(shared / "chat.door"))
        out = as_nobody(
            f"fd:{handed.fileno()}",
            door.offer_frame(INFO),
            len(ACCEPT),
            pass_fds=(handed.fileno(),),
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == ""
        wait_for(lambda: offer_log(caplog), what="the warning")
        assert "uid 65534" in offer_log(caplog)[0]
        assert connections(seen) == []
        handed.close()


@needs_root
def test_every_write_of_the_offer_must_be_trusted(shared, caplog):
    # root starts the offer, nobody finishes it on the same connection
    caplog.set_level(logging.WARNING, logger="ipc_core")
    frame = door.offer_frame(INFO)
    with door_service(shared) as (_ctx, seen, _fd):
        handed = socket.socket(socket.AF_UNIX)
        handed.connect(str(shared / "chat.door"))
        handed.sendall(frame[:10])
        time.sleep(0.1)
        out = as_nobody(
            f"fd:{handed.fileno()}", frame[10:], len(ACCEPT), pass_fds=(handed.fileno(),)
        )
        assert out.stdout == "", out.stderr
        wait_for(lambda: offer_log(caplog), what="the warning")
        assert "uid 65534" in offer_log(caplog)[0]
        assert connections(seen) == []


def test_descriptors_sent_on_the_door_are_closed_and_refused(rundir, caplog):
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with door_service(rundir) as (_ctx, seen, _fd):
        wait_for(lambda: True)
        before = len(os.listdir("/proc/self/fd"))
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(5)
        client.connect(str(rundir / "chat.door"))
        r, w = os.pipe()
        socket.send_fds(client, [door.offer_frame(INFO)], [r, w])
        os.close(r)
        os.close(w)
        assert read_to_eof(client) == b""
        client.close()
        wait_for(lambda: offer_log(caplog), what="the warning")
        assert "descriptors" in offer_log(caplog)[0]
        assert connections(seen) == []
        wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before, what="no descriptor kept")


# ---------------------------------------------------------- bad offers, time


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (encode(b"not json"), "not JSON"),
        (encode(b'{"v":[2,0],"transport":"tcp"}'), "version 2.0"),
        (encode(b'{"v":[1,0]}'), "without a transport"),
        (struct.pack(">I", 16 * 1024 + 1), "16385 bytes announced"),
        (b"GET / HTTP/1.1\r\n\r\n", "bytes announced"),
    ],
)
def test_a_bad_offer_closes_that_connection_only(rundir, caplog, data, why):
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with door_service(rundir) as (_ctx, seen, _fd):
        good = door_client(rundir)
        assert read_verdict(good)[0].accepted
        bad = socket.socket(socket.AF_UNIX)
        bad.settimeout(5)
        bad.connect(str(rundir / "chat.door"))
        bad.sendall(data)
        assert read_to_eof(bad) == b""
        wait_for(lambda: offer_log(caplog), what="the warning")
        (line,) = offer_log(caplog)
        assert "bad peer information" in line and why in line
        assert len(connections(seen)) == 1
        good.sendall(encode(b"still here"))
        assert recv_msg(good) == b"still here"


def test_the_offer_has_a_deadline(rundir, caplog):
    caplog.set_level(logging.WARNING, logger="ipc_core")
    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        ctx._offer_seconds = 0.3
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(str(rundir / "chat.door"))
        partial = socket.socket(socket.AF_UNIX)
        partial.connect(str(rundir / "chat.door"))
        partial.sendall(door.offer_frame(INFO)[:-1])
        good = door_client(rundir)
        started = time.monotonic()
        seen = pump(ctx, lambda seen: len(offer_log(caplog)) == 2, timeout=3)
        assert 0.25 <= time.monotonic() - started < 2
        assert [ev.peer for ev in seen if ev.type == EventType.CONNECTION] == [INFO]
        assert all("no peer information within 0.3 s" in line for line in offer_log(caplog))
        for s in (silent, partial):
            s.settimeout(2)
            assert read_to_eof(s) == b""
        assert read_verdict(good)[0].accepted  # unaffected


def test_a_connection_that_closes_before_its_offer_is_dropped_quietly(rundir):
    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        gone = socket.socket(socket.AF_UNIX)
        gone.connect(str(rundir / "chat.door"))
        gone.sendall(door.offer_frame(INFO)[:5])
        gone.close()
        seen = pump(ctx, lambda seen: len(seen) >= 10)
        assert all(ev.type == EventType.TIMER for ev in seen)
        assert len(ctx.descriptors) == 2  # the service and its door, nothing else


# ------------------------------------------------ the name itself, unchanged


def exchange(directory: Path, payloads: list[bytes]) -> bytes:
    """Everything a plain client on NAME gets back for ``payloads``."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(directory / "chat"))
    for p in payloads:
        s.sendall(encode(p))
    want = sum(4 + len(p) for p in payloads)
    data = recv_exact(s, want)
    assert nothing_more(s)
    s.close()
    return data


def test_an_ordinary_connection_to_the_name_sees_the_same_bytes(rundir):
    # Even a frame that looks like an offer is only a message on NAME: a
    # local client cannot pass for a relayed one.
    forged = door.offer_frame(INFO)[4:]
    payloads = [forged, b"hello", b""]
    with door_service(rundir) as (_ctx, seen, _fd):
        with_info = exchange(rundir, payloads)
        conn = connections(seen)[0]
        assert conn.peer is None
        wait_for(lambda: len([e for e in list(seen) if e.type == EventType.MESSAGE_RX]) == 3)
        messages = [e.message for e in list(seen) if e.type == EventType.MESSAGE_RX]
        assert messages == payloads
    other = rundir / "plain"
    other.mkdir()
    with door_service(other, peer_info=False) as (_ctx, seen, _fd):
        assert not (other / "chat.door").exists()
        assert exchange(other, payloads) == with_info
        assert connections(seen)[0].peer is None
    assert with_info == b"".join(encode(p) for p in payloads)


# ------------------------------------------------ the door in the run directory


def test_marks_door_and_close(rundir):
    with Context() as ctx:
        fd = ctx.service_init("chat", peer_info=True, local_only=True)
        assert service_marks("chat", rundir) == {"local-only", "peer-info"}
        assert list_services(rundir) == [("chat", True)]
        client = door_client(rundir)
        pump(ctx, lambda seen: seen and seen[-1].peer is not None)
        ctx.close(fd)
        assert sorted(p.name for p in rundir.iterdir()) == []
        # the accepted door connection outlives its listener, like any peer
        ctx.wait_event(timeout=0.05)
        assert read_verdict(client)[0].accepted
        with pytest.raises(InvalidServiceName, match="reserved"):
            ctx.service_init("chat.door")


def test_a_crashed_instance_leaves_a_door_that_the_next_one_replaces(rundir):
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from ipc_core import Context; c = Context();"
        "c.service_init('chat', peer_info=True); print('up', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(ROOT)],
        stdout=subprocess.PIPE,
        env=dict(os.environ, RUNDIR=str(rundir)),
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        assert service_alive("chat", rundir)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # what the crash left: both sockets, dead, and the marked lock
    assert sorted(p.name for p in rundir.iterdir()) == ["chat", "chat.door", "chat.lock"]
    assert not service_alive("chat", rundir)
    assert service_marks("chat", rundir) == {"peer-info"}
    with pytest.raises(ConnectionRefusedError):
        door_client(rundir)
    with door_service(rundir) as (_ctx, seen, _fd):
        assert read_verdict(door_client(rundir))[0].accepted
        assert connections(seen)[0].peer == INFO
    # and a plain instance taking the name over leaves no door and no mark
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(ROOT)],
        stdout=subprocess.PIPE,
        env=dict(os.environ, RUNDIR=str(rundir)),
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    with Context() as ctx:
        ctx.service_init("chat")
        assert sorted(p.name for p in rundir.iterdir()) == ["chat", "chat.lock"]
        assert service_marks("chat", rundir) == frozenset()


def test_verdict_json_is_as_documented_on_the_wire(rundir):
    # what another implementation of the daemon's side would parse
    with door_service(rundir, refuse=frozenset({"198.51.100.9"})):
        accepted = door_client(rundir)
        assert json.loads(recv_msg(accepted)) == {"v": [1, 0], "accept": True}
        refused = door_client(rundir, info=PeerInfo(transport="tcp", client_address="198.51.100.9"))
        assert json.loads(recv_msg(refused)) == {
            "v": [1, 0],
            "accept": False,
            "reason": "198.51.100.9 is not welcome\ufffdhere",
        }
