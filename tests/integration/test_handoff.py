"""Hand-off: ipc-tcpd passes the TCP socket itself to a service that takes it.

Real daemons and services: ``ipc pongd`` (hand-offs on), services on
``ipc_core.Context`` in a thread (refusing, asking for peer information),
ipc-tcpd as a subprocess. What is checked is what a client and an operator
see: the same bytes as through the relay, no descriptor left in the daemon,
a refusal or a failure closing the client with the reason in the log.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipc_core import Context, EventType, PeerInfo, encode
from tests.helpers import (
    BIN,
    LogReader,
    connectable,
    recv_exact,
    recv_msg,
    start_listening_daemon,
    wait_for,
)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcpd(procs, rundir: Path, *extra: str):
    return start_listening_daemon(
        procs,
        "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "2",
        "--max-connections-per-ip",
        "0",
        *extra,
        env={"RUNDIR": str(rundir)},
    )


def client(port: int, name: bytes = b"pong\n") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(name)
    assert recv_exact(s, 2) == b"ok"
    return s


def closed(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        return s.recv(10) == b""
    except ConnectionResetError:
        return True


class ServiceThread:
    """A Context service in a thread: echoes, records peers, may refuse."""

    def __init__(
        self, rundir: Path, name: str, *, peer_info: bool = False, refuse: str | None = None
    ) -> None:
        self.peers: list[PeerInfo | None] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._refuse = refuse
        self._thread = threading.Thread(
            target=self._run, args=(rundir, name, peer_info), daemon=True
        )
        self._thread.start()
        assert self._ready.wait(5)

    def _run(self, rundir: Path, name: str, peer_info: bool) -> None:
        with Context(rundir_path=rundir) as ctx:
            ctx.service_init(name, handoff=True, peer_info=peer_info)
            self._ready.set()
            while not self._stop.is_set():
                event = ctx.wait_event(timeout=0.05)
                if event.type is EventType.CONNECTION:
                    self.peers.append(event.peer)
                    if self._refuse is not None and event.peer is not None:
                        ctx.refuse(event.fd, self._refuse)
                elif event.type is EventType.MESSAGE_RX:
                    assert event.message is not None
                    ctx.write(event.fd, event.message)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def service(rundir: Path) -> Iterator[list[ServiceThread]]:
    made: list[ServiceThread] = []
    yield made
    for s in made:
        s.stop()


def test_the_service_gets_the_socket_and_the_daemon_keeps_none(rundir, procs):
    pongd = procs.pongd(rundir, handoff=True)
    proc, logs, port = tcpd(procs, rundir)
    first = client(port)
    first.sendall(encode(b"warm"))
    assert recv_msg(first) == b"warm"
    logs.wait_for("handed over")
    daemon_fds, service_fds = fd_count(proc.pid), fd_count(pongd.pid)
    clients = [client(port) for _ in range(40)]
    for i, s in enumerate(clients):
        s.sendall(encode(b"m%d" % i))
        assert recv_msg(s) == b"m%d" % i
    # No descriptor per connection in the daemon; one each in the service.
    assert fd_count(proc.pid) <= daemon_fds + 2
    assert fd_count(pongd.pid) >= service_fds + 40
    big = os.urandom(300_000)
    clients[0].sendall(encode(big))
    assert recv_msg(clients[0]) == big
    # The daemon is out of the path: stopping it leaves the connections up.
    proc.terminate()
    proc.wait(5)
    clients[1].sendall(encode(b"still here"))
    assert recv_msg(clients[1]) == b"still here"


def test_bytes_sent_with_the_name_reach_the_service(rundir, procs):
    procs.pongd(rundir, handoff=True)
    _proc, logs, port = tcpd(procs, rundir)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"pong\n" + encode(b"early") + encode(b"bird"))
    assert recv_exact(s, 2) == b"ok"
    assert recv_msg(s) == b"early"
    assert recv_msg(s) == b"bird"
    logs.wait_for("handed over")


def test_no_handoff_relays(rundir, procs):
    procs.pongd(rundir, handoff=True)
    proc, logs, port = tcpd(procs, rundir, "--no-handoff")
    before = fd_count(proc.pid)
    clients = [client(port) for _ in range(10)]
    for s in clients:
        s.sendall(encode(b"x"))
        assert recv_msg(s) == b"x"
    assert fd_count(proc.pid) >= before + 20  # two descriptors per relayed pair
    logs.wait_for("-> 'pong' (")
    assert "handed over" not in logs.text()


def test_a_service_without_the_mark_is_relayed(rundir, procs):
    pongd = procs.pongd(rundir)  # --no-handoff
    proc, logs, port = tcpd(procs, rundir)
    s = client(port)
    s.sendall(encode(b"relayed"))
    assert recv_msg(s) == b"relayed"
    assert not (rundir / "pong.door").exists()
    assert "handed over" not in logs.text()
    assert pongd.poll() is None and proc.poll() is None


def test_a_refusal_closes_the_client_without_ok(rundir, procs, service):
    service.append(ServiceThread(rundir, "guard", refuse="not today"))
    _proc, logs, port = tcpd(procs, rundir)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"guard\n")
    assert closed(s)
    logs.wait_for("refused: not today")


def test_peer_information_comes_with_the_socket(rundir, procs, service):
    svc = ServiceThread(rundir, "who", peer_info=True)
    service.append(svc)
    _proc, logs, port = tcpd(procs, rundir)
    s = client(port, b"who\n")
    s.sendall(encode(b"hi"))
    assert recv_msg(s) == b"hi"
    (peer,) = svc.peers
    assert peer is not None
    assert peer.transport == "tcp"
    assert peer.client_address == "127.0.0.1"
    assert peer.client_port == s.getsockname()[1]
    assert peer.local_port == port
    logs.wait_for("handed over")


def test_behind_a_proxy_header_the_service_gets_the_real_client(rundir, procs, service):
    svc = ServiceThread(rundir, "who", peer_info=True)
    service.append(svc)
    _proc, logs, port = tcpd(procs, rundir, "--proxy-protocol", "127.0.0.1/32")
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    header = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 %d\r\n" % port
    s.sendall(header + b"who\n" + encode(b"after the header"))
    assert recv_exact(s, 2) == b"ok"
    assert recv_msg(s) == b"after the header"
    (peer,) = svc.peers
    assert peer is not None
    assert (peer.client_address, peer.client_port, peer.via) == (
        "203.0.113.9",
        5555,
        "proxy-protocol",
    )
    logs.wait_for("handed over")


def test_tls_keeps_relaying(rundir, procs, pki):
    import ssl

    procs.pongd(rundir, handoff=True)
    _proc, logs, port = start_listening_daemon(
        procs,
        "ipc-tlsd",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        str(pki.cert),
        "--key",
        str(pki.key),
        env={"RUNDIR": str(rundir)},
    )
    ctx = ssl.create_default_context(cafile=pki.ca)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(b"pong\n")
    assert recv_exact(s, 2) == b"ok"
    s.sendall(encode(b"secret"))
    assert recv_msg(s) == b"secret"
    logs.wait_for("-> 'pong' (")
    assert "handed over" not in logs.text()


def test_a_service_gone_between_the_mark_and_the_door(rundir, procs):
    """A lock that says handoff with no door behind it: the client is closed
    with the reason, nothing hangs."""
    (rundir / "ghost.lock").write_bytes(b"handoff\n")
    _proc, logs, port = tcpd(procs, rundir)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"ghost\n")
    assert closed(s)
    logs.wait_for("no door for local service 'ghost'")


def test_many_connect_close_cycles_leave_nothing_behind(rundir, procs):
    pongd = procs.pongd(rundir, handoff=True)
    proc, _logs, port = tcpd(procs, rundir)
    s = client(port)
    s.close()
    wait_for(lambda: True, what="settle")
    daemon_fds, service_fds = fd_count(proc.pid), fd_count(pongd.pid)
    for i in range(300):
        c = client(port)
        c.sendall(encode(struct.pack(">I", i)))
        assert recv_msg(c) == struct.pack(">I", i)
        c.close()
    wait_for(lambda: fd_count(pongd.pid) <= service_fds + 2, what="service descriptors back")
    assert fd_count(proc.pid) <= daemon_fds + 2


# -- outbound: ipcd gives the client the TCP socket itself ----------------------------


@pytest.fixture
def two_hosts(rundir, procs):
    """Host B: ipc-tcpd + pongd (hand-offs on); host A: ipcd + ipc-tcpd."""
    procs.pongd(rundir, handoff=True)
    _proc_b, logs_b, port = tcpd(procs, rundir)
    rundir_a = Path(str(rundir) + "-a")
    rundir_a.mkdir(mode=0o700)
    env = {"RUNDIR": str(rundir_a)}
    procs.start(Path(BIN) / "ipcd", env=env)
    tcpd_a = procs.start(Path(BIN) / "ipc-tcpd", "--listen", "127.0.0.1:0", env=env)
    logs_a = LogReader(tcpd_a)
    wait_for(
        lambda: connectable(rundir_a / "ipc") and connectable(rundir_a / "tcp"),
        what="host A daemons",
    )
    yield rundir_a, port, logs_a, logs_b
    import shutil

    shutil.rmtree(rundir_a, ignore_errors=True)


def test_a_routed_client_gets_the_tcp_connection_itself(two_hosts, monkeypatch):
    rundir_a, port, logs_a, logs_b = two_hosts
    from ipc_core import service_marks

    assert "hands-over" in service_marks("tcp", rundir_a)
    monkeypatch.setenv("RUNDIR", str(rundir_a))
    monkeypatch.setenv("IPC_NETWORK", f"pong tcp://127.0.0.1:{port}/pong")
    with Context() as ctx:
        fd = ctx.connect_service("pong")
        sock = ctx.socket_of(fd)
        assert sock.family == socket.AF_INET  # not a Unix socket to a relay
        assert sock.getpeername()[1] == port
        for i in range(20):
            ctx.write(fd, b"n%d" % i)
            assert ctx.read(fd, timeout=5) == b"n%d" % i
    logs_a.wait_for("handed over")  # host A's outbound side left the path
    logs_b.wait_for("handed over")  # host B's inbound side too


def test_an_outbound_request_without_the_option_is_relayed(two_hosts):
    """What the reference's ipcd sends (the bare URI) gets the relay as before."""
    rundir_a, port, logs_a, _ = two_hosts
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(rundir_a / "tcp"))
    s.sendall(encode(b"tcp://127.0.0.1:%d/pong" % port))
    assert recv_msg(s) == b"ok"
    s.sendall(encode(b"through the relay"))
    assert recv_msg(s) == b"through the relay"
    logs_a.wait_for("connected to tcp://127.0.0.1")
    assert "handed over" not in "".join(line for line in logs_a.lines if "connected to" in line)
