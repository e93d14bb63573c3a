"""Tests for daemons.engine.systemd: sd_notify over a real datagram socket, and socket
activation in a child process that inherits listening sockets at fd 3+."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemons.engine import systemd

ROOT = Path(__file__).resolve().parents[3]

# --------------------------------------------------------------------------
# notify
# --------------------------------------------------------------------------


@pytest.fixture
def manager(tmp_path):
    """A fake service manager: a bound AF_UNIX datagram socket."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, {"NOTIFY_SOCKET": str(path)}
    sock.close()


def test_notify_sends_datagram(manager) -> None:
    sock, env = manager
    assert systemd.notify("READY=1\nSTATUS=hi", env) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=hi"


def test_notify_abstract_socket() -> None:
    name = f"libipc-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"


def test_notify_uses_os_environ(manager, monkeypatch) -> None:
    sock, env = manager
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert systemd.stopping()
    assert sock.recv(100) == b"STOPPING=1"


@pytest.mark.parametrize("value", [None, "", "vsock:2:1234", "relative/path"])
def test_notify_not_under_systemd(value) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    assert systemd.notify("READY=1", env) is False
    assert systemd.ready(environ=env) is False


def test_notify_failure_is_false(tmp_path) -> None:
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "missing")}) is False


def test_convenience_messages(manager) -> None:
    sock, env = manager
    assert systemd.ready(environ=env)
    assert sock.recv(100) == b"READY=1"
    assert systemd.ready("serving 2 listeners", env)
    assert sock.recv(100) == b"READY=1\nSTATUS=serving 2 listeners"
    assert systemd.stopping(env)
    assert sock.recv(100) == b"STOPPING=1"
    assert systemd.status("42 connections", env)
    assert sock.recv(100) == b"STATUS=42 connections"
    assert systemd.watchdog(env)
    assert sock.recv(100) == b"WATCHDOG=1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading(env)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = sock.recv(100).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env, expected) -> None:
    assert systemd.watchdog_interval(env) == expected


# --------------------------------------------------------------------------
# listen_fds, in-process (no descriptors needed)
# --------------------------------------------------------------------------


def test_listen_fds_without_activation() -> None:
    env: dict[str, str] = {}
    assert systemd.listen_fds(environ=env) == []


def test_listen_fds_for_another_pid_is_empty_and_unsets() -> None:
    env = {
        "LISTEN_PID": str(os.getpid() + 1),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "a:b",
        "OTHER": "x",
    }
    assert systemd.listen_fds(environ=env) == []
    assert env == {"OTHER": "x"}


def test_listen_fds_keeps_environment_on_request() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert systemd.listen_fds(unset_environment=False, environ=env) == []
    assert env == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}


def test_listen_fds_zero() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert systemd.listen_fds(environ=env) == []


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_PID": "me", "LISTEN_FDS": "1"},
        {"LISTEN_PID": "PID", "LISTEN_FDS": "two"},
        {"LISTEN_PID": "PID", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "only-one"},
    ],
)
def test_listen_fds_malformed(env) -> None:
    env = {k: v.replace("PID", str(os.getpid())) for k, v in env.items()}
    with pytest.raises(ValueError):
        systemd.listen_fds(environ=env)
    assert env == {}  # unset even on error


# --------------------------------------------------------------------------
# listen_fds, for real: a child inherits sockets at fd 3 and 4
# --------------------------------------------------------------------------

# Runs in the child: what an activated daemon would do.
CHILD = r"""
import json, os, sys
from daemons.engine import systemd
fds = systemd.listen_fds()
report = {
    "socks": [[s.fileno(), name, int(s.family), s.getblocking(), os.get_inheritable(s.fileno())]
              for s, name in fds],
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
print(json.dumps(report), flush=True)
for sock, _name in fds:
    sock.setblocking(True)
    conn, _ = sock.accept()
    conn.sendall(b"hello from " + _name.encode())
    conn.close()
"""

# Plays systemd's part: move the given descriptors to 3, 4, ... then set
# LISTEN_PID to our own pid and exec, so the pid is the one the child sees.
WRAPPER = r"""
import fcntl, os, sys
n = int(sys.argv[1])
src = [int(x) for x in sys.argv[2:2 + n]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in src]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
for fd in high + [fd for fd in src if fd >= 3 + n]:
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable] + sys.argv[2 + n:])
"""


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_socket_activation_in_child(tmp_path) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    unix_path = tmp_path / "activated.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(unix_path))
    unix.listen()
    fds = (tcp.fileno(), unix.fileno())
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, "2", *map(str, fds), "-c", CHILD],
        pass_fds=fds,
        env=_child_env(LISTEN_FDS="2", LISTEN_FDNAMES="web:local"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        report = json.loads(line)
        assert report["socks"] == [
            [3, "web", int(socket.AF_INET), False, False],
            [4, "local", int(socket.AF_UNIX), False, False],
        ]
        assert report["env_left"] == []
        with socket.create_connection(tcp.getsockname(), timeout=5) as c:
            assert c.recv(100) == b"hello from web"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            c.connect(str(unix_path))
            assert c.recv(100) == b"hello from local"
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
        tcp.close()
        unix.close()


def test_socket_activation_ignores_inherited_pid(tmp_path) -> None:
    """LISTEN_PID of another process (e.g. our parent): nothing is taken."""
    code = "from daemons.engine import systemd; print(systemd.listen_fds())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_child_env(LISTEN_PID="1", LISTEN_FDS="1"),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="systemd-socket-activate not installed"
)
def test_with_systemd_socket_activate(tmp_path) -> None:
    """The real tool from systemd: it binds, waits for a client, then execs us."""
    path = tmp_path / "sa.sock"
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(path),
            "--fdname=ipc",
            "-E",
            "PYTHONPATH",
            sys.executable,
            "-c",
            CHILD,
        ],
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"systemd-socket-activate did not start: {proc.stderr.read()!r}")
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(str(path))
            assert c.recv(100) == b"hello from ipc"
        assert proc.stdout is not None
        report = json.loads(proc.stdout.readline())
        assert report["socks"] == [[3, "ipc", int(socket.AF_UNIX), False, False]]
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
