"""systemd integration for real, without systemd as PID 1.

* Socket activation: ``systemd-socket-activate`` (Debian's systemd package)
  binds the port, waits for the first client, then execs the daemon with the
  socket as fd 3 (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES); the client must be
  served through it. Every daemon also gets a ``--listen`` that cannot work,
  so serving at all proves the inherited socket was used.
* Readiness: the test is the service manager: it binds a datagram socket,
  passes it as NOTIFY_SOCKET, and checks READY=1 arrives when the daemon
  accepts (checked at once, no retry), RELOADING=1 around a reload,
  WATCHDOG=1 with WATCHDOG_USEC, and STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipc_core import encode
from tests.helpers import BIN, LogReader, Processes, connectable, recv_exact, recv_msg

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate not installed (Debian package: systemd)"
)
# A --listen address that cannot be bound: a daemon that ignored the inherited
# socket would exit with an error instead of serving.
UNUSABLE_LISTEN = "unix:/nonexistent-libipc-dir/never"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_command(name: str) -> bool:
    return (BIN / name).exists() and subprocess.run(
        [BIN / name, "--help"], capture_output=True, timeout=30, check=False
    ).returncode == 0


def tcpd_client(sock: socket.socket, name: bytes = b"pong") -> socket.socket:
    sock.sendall(name)
    assert recv_exact(sock, 2) == b"ok"
    return sock


def echo(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(encode(payload))
    assert recv_msg(sock) == payload


def socket_activate(
    procs: Processes,
    command: str,
    listens: list[tuple[int, str]],
    *args: str,
    env: dict[str, str],
) -> tuple[subprocess.Popen[bytes], LogReader]:
    """Run ``command`` under systemd-socket-activate, one socket per
    ``(port, fdname)``; return once every socket is bound (the daemon itself
    starts on the first connection). ``env`` is all the daemon gets."""
    assert ACTIVATE is not None
    argv: list[str] = [ACTIVATE]
    for port, _name in listens:
        argv += ["-l", f"127.0.0.1:{port}"]
    argv.append("--fdname=" + ":".join(name for _port, name in listens))
    for key, value in env.items():
        argv += ["-E", f"{key}={value}"]
    proc = procs.start(*argv, str(BIN / command), *args)
    logs = LogReader(proc)
    for port, _name in listens:
        logs.wait_for(f"Listening on 127.0.0.1:{port}")
    return proc, logs


# -- socket activation -----------------------------------------------------------


@needs_activate
def test_tcpd_socket_activated(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    port, metrics_port = free_port(), free_port()
    proc, logs = socket_activate(
        procs,
        "ipc-tcpd",
        [(port, "tcpd"), (metrics_port, "metrics")],
        "--listen",
        UNUSABLE_LISTEN,
        env={"RUNDIR": str(rundir)},
    )
    # The first client triggers the exec; it waits in the inherited backlog.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        tcpd_client(sock)
        for payload in (b"hello", b"", b"x" * 100_000):
            echo(sock, payload)
    logs.wait_for(f"listening on 127.0.0.1:{port}")
    # The socket named "metrics" serves HTTP, not the TCPd handshake.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        body = r.read().decode()
    assert "ipc_switched_total 1" in body
    # A second client: the same daemon (no second exec), still the same socket.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        echo(tcpd_client(sock), b"again")
    assert logs.text().count("Execing") == 1
    assert proc.poll() is None


def test_tcpd_ignores_activation_meant_for_another_process(rundir: Path, procs: Processes) -> None:
    """LISTEN_PID names someone else (inherited variables): fall back to --listen."""
    procs.pongd(rundir)
    port = free_port()
    proc = procs.start(
        BIN / "ipc-tcpd",
        "--listen",
        f"127.0.0.1:{port}",
        env={"RUNDIR": str(rundir), "LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "tcpd"},
    )
    logs = LogReader(proc)
    logs.wait_for(f"listening on 127.0.0.1:{port}")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        echo(tcpd_client(sock), b"fallback")


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) for localhost, made with ``ipc cert``."""
    d = tmp_path_factory.mktemp("pki")
    for args in (
        ["ca", "--out", d],
        ["server", "--ca-dir", d, "--out", d, "localhost", "127.0.0.1"],
    ):
        out = subprocess.run(
            [BIN / "ipc", "cert", *map(str, args)], capture_output=True, timeout=30, check=False
        )
        assert out.returncode == 0, out.stderr.decode()
    return d / "ca.pem", d / "localhost.pem", d / "localhost.key"


@needs_activate
def test_tlsd_socket_activated(
    rundir: Path, procs: Processes, server_cert: tuple[Path, Path, Path]
) -> None:
    if not has_command("ipc-tlsd"):
        pytest.skip("ipc-tlsd is not installed yet")
    ca, cert, key = server_cert
    procs.pongd(rundir)
    port = free_port()
    socket_activate(
        procs,
        "ipc-tlsd",
        [(port, "tlsd")],
        "--listen",
        UNUSABLE_LISTEN,
        "--cert",
        str(cert),
        "--key",
        str(key),
        env={"RUNDIR": str(rundir)},
    )
    ctx = ssl.create_default_context(cafile=ca)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
        echo(tcpd_client(sock), b"hello over TLS")


@needs_activate
def test_websocketd_socket_activated(rundir: Path, procs: Processes) -> None:
    if not has_command("ipc-websocketd"):
        pytest.skip("ipc-websocketd is not installed yet")
    from websockets.sync.client import connect

    procs.pongd(rundir)
    port = free_port()
    _proc, logs = socket_activate(
        procs,
        "ipc-websocketd",
        [(port, "websocketd")],
        "--listen",
        UNUSABLE_LISTEN,
        env={"RUNDIR": str(rundir)},
    )
    with connect(f"ws://127.0.0.1:{port}/pong", open_timeout=10) as ws:
        ws.send(b"hello over WebSocket")
        assert ws.recv(timeout=5) == b"hello over WebSocket"
    logs.wait_for(f"listening on 127.0.0.1:{port}")


# -- the notify protocol ---------------------------------------------------------


class Manager:
    """The service manager's end of sd_notify: a datagram socket."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ipc-notify-", dir="/tmp"))
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))

    def receive(self, timeout: float = 10.0) -> dict[str, str]:
        """The next notification as ``{KEY: VALUE}`` (or fail after ``timeout``)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no notification within {timeout} s") from None
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def expect(self, key: str, timeout: float = 10.0, skip: tuple[str, ...] = ()) -> dict[str, str]:
        """The next notification carrying ``key``; others are allowed only if
        they carry one of ``skip`` (e.g. WATCHDOG)."""
        while True:
            message = self.receive(timeout)
            if key in message:
                return message
            assert any(k in message for k in skip), f"expected {key}, got {message}"

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def manager() -> Iterator[Manager]:
    m = Manager()
    yield m
    m.close()


def _stop_and_expect_stopping(
    proc: subprocess.Popen[bytes], manager: Manager, skip: tuple[str, ...] = ()
) -> None:
    proc.send_signal(signal.SIGTERM)
    assert manager.expect("STOPPING", skip=skip)["STOPPING"] == "1"
    assert proc.wait(timeout=10) == 0


def test_tcpd_ready_when_accepting_then_stopping(
    rundir: Path, procs: Processes, manager: Manager
) -> None:
    procs.pongd(rundir)
    port = free_port()
    proc = procs.start(
        BIN / "ipc-tcpd",
        "--listen",
        f"127.0.0.1:{port}",
        env={"RUNDIR": str(rundir), "NOTIFY_SOCKET": str(manager.path)},
    )
    ready = manager.expect("READY")
    assert ready["READY"] == "1"
    # Right now, with no retry: the port accepts and both local services exist.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        echo(tcpd_client(sock), b"ready means ready")
    assert connectable(rundir / "tcp") and connectable(rundir / "tcp.ctl")
    _stop_and_expect_stopping(proc, manager)


@needs_activate
def test_activated_tcpd_notifies(rundir: Path, procs: Processes, manager: Manager) -> None:
    """The unit's combination: socket activation and Type=notify together."""
    procs.pongd(rundir)
    port = free_port()
    proc, _logs = socket_activate(
        procs,
        "ipc-tcpd",
        [(port, "tcpd")],
        env={"RUNDIR": str(rundir), "NOTIFY_SOCKET": str(manager.path)},
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert manager.expect("READY")["READY"] == "1"
        echo(tcpd_client(sock), b"activated")
    _stop_and_expect_stopping(proc, manager)


def test_ipcd_ready_and_stopping(rundir: Path, procs: Processes, manager: Manager) -> None:
    proc = procs.start(
        BIN / "ipcd", env={"RUNDIR": str(rundir), "NOTIFY_SOCKET": str(manager.path)}
    )
    assert manager.expect("READY")["READY"] == "1"
    assert connectable(rundir / "ipc") and connectable(rundir / "ipc.ctl")
    _stop_and_expect_stopping(proc, manager)


def test_watchdog_pings(rundir: Path, procs: Processes, manager: Manager) -> None:
    """WATCHDOG_USEC=0.4 s: a ping at least every 0.2 s, for as long as it runs."""
    proc = procs.start(
        BIN / "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        env={"RUNDIR": str(rundir), "NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "400000"},
    )
    manager.expect("READY")
    for _ in range(4):
        assert manager.expect("WATCHDOG", timeout=1.0)["WATCHDOG"] == "1"
    _stop_and_expect_stopping(proc, manager, skip=("WATCHDOG",))


def test_watchdog_for_another_pid_is_ignored(
    rundir: Path, procs: Processes, manager: Manager
) -> None:
    proc = procs.start(
        BIN / "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        env={
            "RUNDIR": str(rundir),
            "NOTIFY_SOCKET": str(manager.path),
            "WATCHDOG_USEC": "200000",
            "WATCHDOG_PID": "1",
        },
    )
    manager.expect("READY")
    with pytest.raises(AssertionError, match="no notification"):
        manager.receive(timeout=0.6)
    _stop_and_expect_stopping(proc, manager)


def test_tlsd_reload_notifies_reloading_then_ready(
    rundir: Path, procs: Processes, manager: Manager, server_cert: tuple[Path, Path, Path]
) -> None:
    if not has_command("ipc-tlsd"):
        pytest.skip("ipc-tlsd is not installed yet")
    _ca, cert, key = server_cert
    proc = procs.start(
        BIN / "ipc-tlsd",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        cert,
        "--key",
        key,
        env={"RUNDIR": str(rundir), "NOTIFY_SOCKET": str(manager.path)},
    )
    manager.expect("READY")
    proc.send_signal(signal.SIGHUP)
    reloading = manager.expect("RELOADING")
    assert reloading["RELOADING"] == "1" and reloading["MONOTONIC_USEC"].isdigit()
    assert manager.expect("READY")["READY"] == "1"
    _stop_and_expect_stopping(proc, manager)


def test_websocketd_ready_and_stopping(rundir: Path, procs: Processes, manager: Manager) -> None:
    if not has_command("ipc-websocketd"):
        pytest.skip("ipc-websocketd is not installed yet")
    port = free_port()
    proc = procs.start(
        BIN / "ipc-websocketd",
        "--listen",
        f"127.0.0.1:{port}",
        env={"RUNDIR": str(rundir), "NOTIFY_SOCKET": str(manager.path)},
    )
    assert manager.expect("READY")["READY"] == "1"
    with contextlib.closing(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
        s.sendall(b"GET /healthz-not-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(12).startswith(b"HTTP/1.1 ")
    _stop_and_expect_stopping(proc, manager)
