"""ipc-udpd with real processes and real UDP clients on loopback: Python
sockets, ``socat`` and ``nc -u`` (Debian's netcat-openbsd).

Services are ``ipc pongd`` (echo) or :data:`SERVICE`, a subprocess that
numbers its connections and counts each one's messages, so a reply says which
LibIPC connection (which flow) it came from. Counters are read from the
daemon's control service ``udp.ctl`` (what ``ipc status`` reads).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ipc_core import encode
from tests.helpers import (
    BIN,
    ROOT,
    LogReader,
    Processes,
    connectable,
    recv_msg,
    start_listening_daemon,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

#: A service that numbers its connections: every message is answered
#: ``CONN:COUNT:MESSAGE`` (COUNT: messages on that connection so far); ``big``
#: is answered with 70000 bytes (over any UDP datagram). Modes: ``plain``,
#: ``lonely`` (local-only mark), ``who`` (peer information: answers the JSON
#: of its PeerInfo), ``refuse`` (peer information, refuses everyone).
SERVICE = r"""
import sys
from ipc_core import Context, EventType, peerinfo

name, mode = sys.argv[1], sys.argv[2]
with Context() as ctx:
    ctx.service_init(name, peer_info=mode in ("who", "refuse"), local_only=mode == "lonely")
    ctx.handle_signals()
    numbers, counts, made = {}, {}, 0
    for event in ctx:
        if event.type is EventType.CONNECTION:
            if mode == "refuse" and event.peer is not None:
                ctx.refuse(event.fd, "not you")
                continue
            numbers[event.fd], counts[event.fd] = made, 0
            made += 1
        elif event.type is EventType.MESSAGE_RX:
            fd = event.fd
            counts[fd] += 1
            if event.message == b"big":
                ctx.schedule(fd, b"x" * 70000)
            elif mode == "who":
                ctx.schedule(fd, peerinfo.encode(ctx.peer_info(fd)))
            else:
                ctx.schedule(fd, b"%d:%d:%s" % (numbers[fd], counts[fd], event.message))
"""


def start_service(procs: Processes, rundir: Path, name: str, mode: str = "plain") -> None:
    proc = procs.start(sys.executable, "-c", SERVICE, name, mode, env={"RUNDIR": str(rundir)})
    wait_for(lambda: connectable(rundir / name) or proc.poll() is not None, what=f"{name} up")
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""


def start_udpd(procs: Processes, rundir: Path, *args: str) -> tuple[Any, LogReader, int]:
    return start_listening_daemon(procs, "ipc-udpd", *args, env={"RUNDIR": str(rundir)})


def start_outbound_only(procs: Processes, rundir: Path) -> LogReader:
    """ipc-udpd without --listen: only its local services."""
    proc = procs.start(BIN / "ipc-udpd", env={"RUNDIR": str(rundir)})
    logs = LogReader(proc)
    wait_for(lambda: connectable(rundir / "udp.ctl") or proc.poll() is not None, what="udp.ctl")
    assert proc.poll() is None, logs.text()
    return logs


def client(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(5)
    return s


def ask(s: socket.socket, port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    s.sendto(payload, (host, port))
    data, addr = s.recvfrom(70000)
    assert addr[1] == port
    return data


def silent(s: socket.socket, seconds: float = 0.5) -> bool:
    """True if nothing arrives on ``s`` for ``seconds``."""
    s.settimeout(seconds)
    try:
        s.recvfrom(70000)
    except TimeoutError:
        return True
    finally:
        s.settimeout(5)
    return False


def status(rundir: Path, service: str = "udp") -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(rundir / f"{service}.ctl"))
        s.sendall(encode(b"status"))
        answer: dict[str, Any] = json.loads(recv_msg(s))
    return answer


def metric(rundir: Path, name: str, **labels: str) -> float:
    value = status(rundir)["metrics"].get(name, 0)
    if isinstance(value, list):
        return sum(
            s["value"] for s in value if all(s["labels"].get(k) == v for k, v in labels.items())
        )
    return float(value)


def dropped(rundir: Path, reason: str) -> float:
    return metric(rundir, "ipc_udp_dropped_total", reason=reason)


# --------------------------------------------------------------------------
# Inbound
# --------------------------------------------------------------------------


def test_echo_through_pongd(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    _proc, logs, port = start_udpd(procs, rundir, "--listen", "127.0.0.1:0=pong")
    s = client()
    for payload in (b"hello", b"", b"x" * 65507, bytes(range(256))):
        assert ask(s, port, payload) == payload
    assert metric(rundir, "ipc_udp_datagrams_total", direction="in") == 4
    assert metric(rundir, "ipc_udp_datagrams_total", direction="out") == 4
    assert metric(rundir, "ipc_udp_flows_open") == 1
    # ipc status reads the engine's counters: one flow, 4 messages each way.
    assert metric(rundir, "ipc_connections_total") == 1
    assert metric(rundir, "ipc_messages_total", direction="in") == 4
    assert "listening on 127.0.0.1" in logs.text()


def test_ipv6_and_dual_stack(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    _proc, _logs, port = start_udpd(procs, rundir, "--listen", ":0=pong")
    assert ask(client("::1"), port, b"six", "::1") == b"six"
    assert ask(client(), port, b"four") == b"four"  # IPv4-mapped on the dual-stack socket


def test_socat_client(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    _proc, _logs, port = start_udpd(procs, rundir, "--listen", "127.0.0.1:0=pong")
    assert shutil.which("socat"), "socat is needed (Debian package socat)"
    out = subprocess.run(
        ["socat", "-T", "2", "-", f"UDP:127.0.0.1:{port}"],
        input=b"hello socat\n",
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert out.stdout == b"hello socat\n", out.stderr


def test_nc_client(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    _proc, _logs, port = start_udpd(procs, rundir, "--listen", "127.0.0.1:0=pong")
    assert shutil.which("nc"), "nc is needed (Debian package netcat-openbsd)"
    out = subprocess.run(
        ["nc", "-u", "-w", "1", "127.0.0.1", str(port)],
        input=b"hello nc",
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert out.stdout == b"hello nc", out.stderr


def test_two_flows_are_two_connections(rundir: Path, procs: Processes) -> None:
    start_service(procs, rundir, "count")
    _proc, _logs, port = start_udpd(procs, rundir, "--listen", "127.0.0.1:0=count")
    a, b = client(), client()
    na, _, rest = ask(a, port, b"a").partition(b":")
    assert rest == b"1:a"
    nb, _, rest = ask(b, port, b"b").partition(b":")
    assert rest == b"1:b" and na != nb
    assert ask(a, port, b"a") == na + b":2:a"
    assert ask(b, port, b"b") == nb + b":2:b"
    # Interleaved without waiting: each reply goes back to its own sender.
    for _ in range(20):
        a.sendto(b"A", ("127.0.0.1", port))
        b.sendto(b"B", ("127.0.0.1", port))
    got_a = {a.recvfrom(100)[0] for _ in range(20)}
    got_b = {b.recvfrom(100)[0] for _ in range(20)}
    assert got_a == {na + b":%d:A" % n for n in range(3, 23)}
    assert got_b == {nb + b":%d:B" % n for n in range(3, 23)}
    assert metric(rundir, "ipc_udp_flows_open") == 2


def test_idle_flows_expire(rundir: Path, procs: Processes) -> None:
    start_service(procs, rundir, "count")
    _proc, _logs, port = start_udpd(
        procs, rundir, "--listen", "127.0.0.1:0=count", "--flow-timeout", "0.5"
    )
    a = client()
    first, _, rest = ask(a, port, b"x").partition(b":")
    assert rest == b"1:x"
    wait_for(lambda: metric(rundir, "ipc_udp_flows_expired_total") == 1, what="expiry")
    assert metric(rundir, "ipc_udp_flows_open") == 0
    second, _, rest = ask(a, port, b"x").partition(b":")
    assert rest == b"1:x" and second != first  # a new flow: a new connection


def test_a_busy_flow_does_not_expire(rundir: Path, procs: Processes) -> None:
    start_service(procs, rundir, "count")
    _proc, _logs, port = start_udpd(
        procs, rundir, "--listen", "127.0.0.1:0=count", "--flow-timeout", "1"
    )
    a = client()
    for n in range(1, 8):
        assert ask(a, port, b"x").split(b":", 1)[1] == b"%d:x" % n
        time.sleep(0.3)
    assert metric(rundir, "ipc_udp_flows_expired_total") == 0


def test_flows_per_ip_and_in_total(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    _proc, logs, port = start_udpd(
        procs,
        rundir,
        "--listen",
        "127.0.0.1:0=pong",
        "--max-flows-per-ip",
        "2",
        "--max-flows",
        "3",
    )
    first, second, third = client(), client(), client()
    assert ask(first, port, b"1") == b"1"
    assert ask(second, port, b"2") == b"2"
    third.sendto(b"3", ("127.0.0.1", port))
    assert silent(third)
    assert dropped(rundir, "too many flows from one address") == 1
    assert ask(first, port, b"still") == b"still"  # open flows are unaffected
    other = client("127.0.0.2")  # another source: one more flow fits in total
    assert ask(other, port, b"4") == b"4"
    last = client("127.0.0.3")
    last.sendto(b"5", ("127.0.0.1", port))
    assert silent(last)
    assert dropped(rundir, "too many flows") == 1
    logs.wait_for("--max-flows 3")


def test_drops_when_the_service_does_not_read(rundir: Path, procs: Processes) -> None:
    """A service that never reads: the flow's queue reaches the high-water
    mark, then datagrams are dropped, counted, and logged at a bounded rate."""
    sink = socket.socket(socket.AF_UNIX)
    sink.bind(str(rundir / "sink"))
    sink.listen(1)  # never accepted, never read
    try:
        _proc, logs, port = start_udpd(procs, rundir, "--listen", "127.0.0.1:0=sink")
        s = client()
        payload = b"x" * 60000
        for _ in range(60):  # ~3.6 MB, paced so the daemon's receive buffer keeps up
            s.sendto(payload, ("127.0.0.1", port))
            time.sleep(0.01)
        wait_for(lambda: dropped(rundir, "queue full") >= 10, what="queue-full drops")
        logs.wait_for("dropped (queue full)")
        time.sleep(0.2)
        lines = [line for line in logs.text().splitlines() if "dropped (queue full)" in line]
        assert len(lines) <= 2, lines  # one line per few seconds, not one per datagram
    finally:
        sink.close()


def test_oversize_datagrams_are_dropped(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    _proc, logs, port = start_udpd(
        procs, rundir, "--listen", "127.0.0.1:0=pong", "--max-message-size", "1000"
    )
    s = client()
    s.sendto(b"y" * 1001, ("127.0.0.1", port))
    assert silent(s)
    assert dropped(rundir, "oversize") == 1
    assert "1001-byte datagram" in logs.wait_for("dropped (oversize)")
    assert ask(s, port, b"y" * 1000) == b"y" * 1000


def test_a_reply_over_the_largest_datagram_is_refused(rundir: Path, procs: Processes) -> None:
    start_service(procs, rundir, "count")
    _proc, logs, port = start_udpd(procs, rundir, "--listen", "127.0.0.1:0=count")
    s = client()
    assert ask(s, port, b"before").endswith(b":1:before")
    s.sendto(b"big", ("127.0.0.1", port))
    assert silent(s)
    assert dropped(rundir, "too large for udp") == 1
    line = logs.wait_for("dropped (too large for udp)")
    assert "70000-byte message is over the largest UDP datagram (65507 bytes)" in line
    assert ask(s, port, b"after").endswith(b":3:after")  # the flow lives on


def test_policy_refusals(rundir: Path, procs: Processes) -> None:
    start_service(procs, rundir, "lonely", "lonely")
    procs.pongd(rundir)
    _proc, logs, port = start_udpd(
        procs,
        rundir,
        "--listen",
        "127.0.0.1:0=lonely",
        "--listen",
        "127.0.0.1:0=nothere",
    )
    ports = [int(m) for m in re.findall(r"listening on 127\.0\.0\.1:(\d+)/udp", logs.text())]
    wait_for(lambda: len(re.findall(r"listening on 127", logs.text())) == 2, what="2 ports")
    ports = [int(m) for m in re.findall(r"listening on 127\.0\.0\.1:(\d+)/udp", logs.text())]
    s = client()
    s.sendto(b"hi", ("127.0.0.1", ports[0]))
    assert silent(s)
    assert dropped(rundir, "refused") == 1
    assert "local-only" in logs.wait_for("dropped (refused)")
    s.sendto(b"hi", ("127.0.0.1", ports[1]))
    assert silent(s)
    assert dropped(rundir, "no service") == 1
    assert metric(rundir, "ipc_udp_flows_open") == 0


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--listen", "127.0.0.1:0=pong", "--deny", "p*"], "is denied (--deny p*)"),
        (["--listen", "127.0.0.1:0=udp.ctl"], "never reachable"),
        (["--listen", "127.0.0.1:0=tcp"], "is protected"),
    ],
)
def test_static_policy_refused_at_start(
    rundir: Path, procs: Processes, args: list[str], reason: str
) -> None:
    out = subprocess.run(
        [BIN / "ipc-udpd", *args, "--rundir", str(rundir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("ipc-udpd: --listen 127.0.0.1:0=") and reason in out.stderr
    assert "Traceback" not in out.stderr
    assert not (rundir / "udp").exists()


def test_bad_listen_is_a_usage_error(rundir: Path) -> None:
    for value, words in (("127.0.0.1:5140", "ADDRESS=SERVICE"), ("unix:/x=pong", "Unix")):
        out = subprocess.run(
            [BIN / "ipc-udpd", "--listen", value, "--rundir", str(rundir)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 2 and words in out.stderr, out.stderr


def test_double_start_is_refused_clearly(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    _proc, _logs, port = start_udpd(procs, rundir, "--listen", "127.0.0.1:0=pong")
    again = subprocess.run(
        [BIN / "ipc-udpd", "--listen", f"127.0.0.1:{port}=pong", "--rundir", str(rundir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert again.returncode == 1
    assert again.stderr.startswith("ipc-udpd: ") and "--service-name" in again.stderr
    # Another name, the same port: the port is in use (no SO_REUSEADDR on UDP).
    other = subprocess.run(
        [
            BIN / "ipc-udpd",
            "--listen",
            f"127.0.0.1:{port}=pong",
            "--service-name",
            "udp2",
            "--rundir",
            str(rundir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert other.returncode == 1
    assert other.stderr.endswith(f"\nipc-udpd: --listen 127.0.0.1:{port}=pong: address in use\n")
    assert not (rundir / "udp2").exists()  # nothing left behind
    assert ask(client(), port, b"first one serves") == b"first one serves"


# --------------------------------------------------------------------------
# Peer information
# --------------------------------------------------------------------------


def test_peer_information_through_the_door(rundir: Path, procs: Processes) -> None:
    start_service(procs, rundir, "who", "who")
    _proc, _logs, port = start_udpd(procs, rundir, "--listen", "127.0.0.1:0=who")
    s = client()
    info = json.loads(ask(s, port, b"who am i"))
    assert info["transport"] == "udp"
    assert (info["client_address"], info["client_port"]) == s.getsockname()
    assert (info["local_address"], info["local_port"]) == ("127.0.0.1", port)
    # Datagrams sent while the service decides wait for its verdict, in order.
    t = client()
    for _ in range(5):
        t.sendto(b"x", ("127.0.0.1", port))
    for _ in range(5):
        assert json.loads(t.recvfrom(2000)[0])["client_port"] == t.getsockname()[1]


def test_a_refusing_service(rundir: Path, procs: Processes) -> None:
    start_service(procs, rundir, "nobody", "refuse")
    _proc, logs, port = start_udpd(procs, rundir, "--listen", "127.0.0.1:0=nobody")
    s = client()
    s.sendto(b"let me in", ("127.0.0.1", port))
    assert "refused: not you" in logs.wait_for("refused")
    s.sendto(b"again", ("127.0.0.1", port))  # remembered: not offered again
    assert silent(s)
    wait_for(lambda: dropped(rundir, "service refused") >= 2, what="refusals counted")
    assert metric(rundir, "ipc_udp_flows_total") == 1


# --------------------------------------------------------------------------
# Outbound
# --------------------------------------------------------------------------


def outbound(rundir: Path, request: bytes) -> tuple[socket.socket, bytes]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(rundir / "udp"))
    s.sendall(encode(request))
    return s, recv_msg(s)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_outbound_to_a_local_udp_echo(rundir: Path, procs: Processes, host: str) -> None:
    start_udpd(procs, rundir, "--listen", "127.0.0.1:0=pong")
    echo = client("::1" if host == "::1" else "127.0.0.1")
    port = echo.getsockname()[1]
    where = f"[{host}]" if ":" in host else host
    s, answer = outbound(rundir, f"udp://{where}:{port}".encode())
    assert answer == b"ok"
    for payload in (b"ping", b"", b"z" * 60000):
        s.sendall(encode(payload))
        data, addr = echo.recvfrom(70000)
        assert data == payload
        echo.sendto(data, addr)  # the remote answers: one message back
        assert recv_msg(s) == payload
    s.sendall(encode(b"q" * 65528))  # over any UDP datagram: dropped, counted
    assert silent(echo)
    assert dropped(rundir, "too large for udp") == 1
    assert metric(rundir, "ipc_udp_associations_open") == 1
    s.close()
    wait_for(lambda: metric(rundir, "ipc_udp_associations_open") == 0, what="closed")


def test_outbound_with_a_service_path_and_errors(rundir: Path, procs: Processes) -> None:
    start_outbound_only(procs, rundir)
    echo = client()
    port = echo.getsockname()[1]
    s, answer = outbound(rundir, f"udp://127.0.0.1:{port}/pong".encode())
    assert answer == b"ok"
    for request, words in (
        (b"tcp://127.0.0.1:9000/pong", "expected udp://HOST:PORT"),
        (b"udp://127.0.0.1", "missing port"),
        (b"udp://no-such-host.invalid:53", "cannot resolve"),
    ):
        _s, answer = outbound(rundir, request)
        assert answer.startswith(b"error: ") and words.encode() in answer, answer


def test_outbound_is_local_only(rundir: Path, procs: Processes) -> None:
    """The outbound side is never a network peer's service (an open relay)."""
    start_outbound_only(procs, rundir)
    from ipc_core import service_marks

    assert "local-only" in service_marks("udp", rundir)


# --------------------------------------------------------------------------
# systemd, metrics, help
# --------------------------------------------------------------------------


def test_metrics_endpoint(rundir: Path, procs: Processes) -> None:
    import urllib.request

    procs.pongd(rundir)
    _proc, logs, port = start_udpd(
        procs, rundir, "--listen", "127.0.0.1:0=pong", "--metrics", "127.0.0.1:0"
    )
    line = logs.wait_for("metrics on http://")
    url = re.search(r"http://\S+/metrics", line)
    assert url
    assert ask(client(), port, b"m") == b"m"
    text = urllib.request.urlopen(url.group(0), timeout=5).read().decode()
    assert 'ipc_udp_datagrams_total{direction="in"} 1' in text
    assert "ipc_udp_flows_open 1" in text


ACTIVATE = shutil.which("systemd-socket-activate")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_socket_activated(rundir: Path, procs: Processes) -> None:
    """systemd-socket-activate --datagram holds the port and starts the daemon
    at the first datagram, which must be served through the inherited socket
    (a daemon binding the port itself would fail: it is in use)."""
    assert ACTIVATE, "systemd-socket-activate is needed (Debian package systemd)"
    procs.pongd(rundir)
    port = free_udp_port()
    proc = procs.start(
        ACTIVATE,
        "--datagram",
        "-l",
        f"127.0.0.1:{port}",
        "--fdname=udpd",
        BIN / "ipc-udpd",
        "--listen",
        f"127.0.0.1:{port}=pong",
        "--rundir",  # systemd-socket-activate passes no environment
        str(rundir),
    )
    logs = LogReader(proc)
    logs.wait_for("Listening on")
    s = client()
    assert ask(s, port, b"activated") == b"activated"
    logs.wait_for(f"listening on 127.0.0.1:{port}/udp")


def test_activation_without_a_matching_listen(rundir: Path, procs: Processes) -> None:
    assert ACTIVATE, "systemd-socket-activate is needed (Debian package systemd)"
    port = free_udp_port()
    proc = procs.start(
        ACTIVATE,
        "--datagram",
        "-l",
        f"127.0.0.1:{port}",
        BIN / "ipc-udpd",
        "--rundir",
        str(rundir),
    )
    logs = LogReader(proc)
    logs.wait_for("Listening on")
    client().sendto(b"wake up", ("127.0.0.1", port))
    line = logs.wait_for("no --listen names its service")
    assert line.startswith("ipc-udpd: systemd passed a UDP socket on 127.0.0.1:")
    assert proc.wait(timeout=10) == 1


def test_notifies_ready_and_stopping(rundir: Path, procs: Processes, tmp_path: Path) -> None:
    procs.pongd(rundir)
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(10)
    try:
        proc = procs.start(
            BIN / "ipc-udpd",
            "--listen",
            "127.0.0.1:0=pong",
            env={"RUNDIR": str(rundir), "NOTIFY_SOCKET": str(tmp_path / "notify")},
        )
        assert manager.recv(4096).startswith(b"READY=1")
        assert connectable(rundir / "udp") and connectable(rundir / "udp.ctl")
        proc.send_signal(signal.SIGTERM)
        assert b"STOPPING=1" in manager.recv(4096)
        assert proc.wait(timeout=10) == 0
        assert not (rundir / "udp").exists()
    finally:
        manager.close()


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    from tests.integration.test_systemd_units import parse_unit as parse

    return parse(path)


def test_systemd_units() -> None:
    service = parse_unit(ROOT / "systemd/ipc-udpd.service")["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == ["/usr/local/bin/ipc-udpd"]
    assert service["EnvironmentFile"] == ["-/etc/libipc/ipc-udpd.env"]
    unit = parse_unit(ROOT / "systemd/ipc-udpd.service")["Unit"]
    assert "ipc-udpd.socket" in unit["Wants"][0]
    sock = parse_unit(ROOT / "systemd/ipc-udpd.socket")
    assert sock["Socket"]["ListenDatagram"] == ["127.0.0.1:5140"]
    assert sock["Install"]["WantedBy"] == ["sockets.target"]
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (Debian package systemd)"


def test_help_has_examples_env_vars_and_ranges() -> None:
    import click

    from daemons import udpd

    out = subprocess.run(
        [BIN / "ipc-udpd", "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    text = " ".join(out.stdout.split())
    assert "Examples:" in out.stdout and "ipc-udpd --listen 127.0.0.1:5140=pong" in out.stdout
    for option in udpd.main.params:
        if isinstance(option, click.Option) and option.name != "version":
            env = option.envvar or f"IPC_UDPD_{option.name.upper()}"
            assert (env if isinstance(env, str) else env[0]) in text, option.name
            assert option.help, option.name
    for flag in ("--flow-timeout", "--max-flows", "--max-flows-per-ip"):
        for bad in ("-1", "nan", "1" + "0" * 30):
            bad_run = subprocess.run(
                [BIN / "ipc-udpd", flag, bad], capture_output=True, text=True, timeout=30
            )
            assert bad_run.returncode == 2, (flag, bad, bad_run.stderr)
    assert os.access(BIN / "ipc-udpd", os.X_OK)


def test_two_hosts_through_ipcd(rundir: Path, procs: Processes) -> None:
    """Host A: ipcd and ipc-udpd (the local service udp); host B: pongd behind
    ipc-udpd. A client on A reaches pong on B with IPC_NETWORK, over UDP."""
    import tempfile

    host_b = Path(tempfile.mkdtemp(prefix="ipc-b-", dir="/tmp"))
    try:
        procs.pongd(host_b)
        _proc, _logs, port = start_udpd(procs, host_b, "--listen", "127.0.0.1:0=pong")
        procs.start(BIN / "ipcd", env={"RUNDIR": str(rundir)})
        wait_for(lambda: connectable(rundir / "ipc"), what="ipcd up")
        start_outbound_only(procs, rundir)
        out = subprocess.run(
            [BIN / "ipc", "send", "pong", "hello over udp"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={
                **os.environ,
                "RUNDIR": str(rundir),
                "IPC_NETWORK": f"pong udp://127.0.0.1:{port}/pong",
            },
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "hello over udp"
    finally:
        procs.stop_all()
        shutil.rmtree(host_b, ignore_errors=True)
