"""``make run`` (``python -m daemons.demo``) as a user runs it: the stack
comes up, pong answers over every path, and a signal stops everything,
leaving no process, socket file or port behind. Ports are free ephemeral
ones (``--tcp-port``/``--ws-port``/``--http-port``) so that the test never
meets a real 9000.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipc_core import encode
from tests.helpers import BIN, LogReader, Processes, recv_exact, recv_msg

READY_LINE = "Ctrl-C stops everything."
HAS_WEBSOCKETD = (BIN / "ipc-websocketd").exists() and (
    Path(__file__).resolve().parents[2] / "daemons" / "websocketd.py"
).exists()
HTTP_SELF_CHECK = "self-check: HTTP (ipc-httpd): pong answered 'hello over HTTP'"


class OutputReader(LogReader):
    """LogReader over the demo's stdout (stderr merged into it)."""

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    """A run directory path that does not exist yet (the demo creates it)."""
    path = Path(tempfile.mkdtemp(prefix="ipc-demo-", dir="/tmp"))
    path.rmdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_demo(
    procs: Processes, rundir: Path, *args: str
) -> tuple[subprocess.Popen[bytes], OutputReader, int, int, int]:
    tcp_port, ws_port, http_port = free_port(), free_port(), free_port()
    proc = procs.start(
        sys.executable,
        "-m",
        "daemons.demo",
        "--rundir",
        str(rundir),
        "--tcp-port",
        str(tcp_port),
        "--ws-port",
        str(ws_port),
        "--http-port",
        str(http_port),
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = OutputReader(proc)
    out.wait_for(READY_LINE, timeout=60)
    return proc, out, tcp_port, ws_port, http_port


def http_post(port: int, body: bytes, **headers: str) -> http.client.HTTPResponse:
    """``POST /pong`` to the demo's ipc-httpd; the answer, its body read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/pong", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


def curl_post(port: int, body: str) -> str:
    """What the printed instructions say to type."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--data-binary", body, f"http://127.0.0.1:{port}/pong"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def ipc_send(rundir: Path, message: str, **env: str) -> str:
    result = subprocess.run(
        [BIN / "ipc", "send", "pong", message],
        capture_output=True,
        timeout=30,
        check=False,
        env={"PATH": os.environ["PATH"], "RUNDIR": str(rundir), **env},
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_serves_pong_everywhere_and_stops_clean(
    procs: Processes, demo_dir: Path, sig: signal.Signals
) -> None:
    proc, out, tcp_port, ws_port, http_port = start_demo(procs, demo_dir)
    text = out.text()
    assert "self-check: TCP (ipc-tcpd): pong answered 'hello over TCP'" in text
    assert "self-check: router (ipcd -> ipc-tcpd)" in text
    assert HTTP_SELF_CHECK in text
    assert f'IPC_NETWORK="pong tcp://127.0.0.1:{tcp_port}/pong"' in text
    assert f"through HTTP:     curl --data-binary hello http://127.0.0.1:{http_port}/pong" in text
    assert re.search(rf"  HTTP +http://127\.0\.0\.1:{http_port}/ +\(ipc-httpd\)", text), text
    kids = children(proc.pid)
    assert len(kids) == (5 if HAS_WEBSOCKETD else 4)

    # Over TCP, by hand: the TCPd handshake, then LibIPC frames.
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=5) as sock:
        sock.sendall(b"pong")
        assert recv_exact(sock, 2) == b"ok"
        sock.sendall(encode(b"over TCP"))
        assert recv_msg(sock) == b"over TCP"
    # What the printed instructions say to type.
    assert ipc_send(demo_dir, "hello") == "hello"
    assert (
        ipc_send(demo_dir, "routed", IPC_NETWORK=f"pong tcp://127.0.0.1:{tcp_port}/pong")
        == "routed"
    )
    if HAS_WEBSOCKETD:
        from websockets.sync.client import connect

        assert f"http://127.0.0.1:{ws_port}/" in text
        assert "self-check: WebSocket (ipc-websocketd)" in text
        with connect(f"ws://127.0.0.1:{ws_port}/pong", open_timeout=5) as ws:
            ws.send(b"over WebSocket")
            assert ws.recv(timeout=5) == b"over WebSocket"
        # The page's address tells it where ipc-httpd is (not on 8000 here).
        assert f"open http://127.0.0.1:{ws_port}/?http={http_port} (service: pong)" in text
        # The page's origins (both spellings of this host) may fetch().
        for origin in (f"http://127.0.0.1:{ws_port}", f"http://localhost:{ws_port}"):
            answer = http_post(http_port, b"from the page", Origin=origin)
            assert answer.status == 200
            assert answer.getheader("Access-Control-Allow-Origin") == origin
        assert http_post(http_port, b"x", Origin="http://elsewhere.example").status == 403
    # Over HTTP, as the instructions say.
    assert curl_post(http_port, "hello") == "hello"

    proc.send_signal(sig)
    assert proc.wait(timeout=15) == 0
    out.wait_for("demo stopped")
    assert all(gone(pid) for pid in kids)
    assert not demo_dir.exists(), list(demo_dir.iterdir())
    assert port_free(tcp_port) and port_free(ws_port) and port_free(http_port)


def test_demo_without_http(procs: Processes, demo_dir: Path) -> None:
    """``--no-http``: no ipc-httpd, no HTTP self-check, no curl line, and the
    page's address carries no ``?http=``."""
    proc, out, _tcp, _ws, http_port = start_demo(procs, demo_dir, "--no-http")
    text = out.text()
    assert "self-check: TCP (ipc-tcpd)" in text
    assert "HTTP (ipc-httpd)" not in text
    assert "curl" not in text and "?http=" not in text
    kids = children(proc.pid)
    assert len(kids) == (4 if HAS_WEBSOCKETD else 3)
    assert not any(b"ipc-httpd" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in kids)
    assert port_free(http_port)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert all(gone(pid) for pid in kids)


def test_demo_stops_everything_when_a_child_dies(procs: Processes, demo_dir: Path) -> None:
    proc, out, _tcp, _ws, http_port = start_demo(procs, demo_dir, "--no-websocket")
    assert HTTP_SELF_CHECK in out.text()
    kids = children(proc.pid)
    assert len(kids) == 4  # pongd, ipcd, ipc-tcpd, ipc-httpd
    ipcd = next(pid for pid in kids if "ipcd" in Path(f"/proc/{pid}/cmdline").read_bytes().decode())
    os.kill(ipcd, signal.SIGKILL)
    assert proc.wait(timeout=15) == 1
    out.wait_for("ipcd exited unexpectedly")
    assert all(gone(pid) for pid in kids)
    # ipcd could not remove its sockets; the demo did (and then the directory).
    assert not demo_dir.exists(), list(demo_dir.iterdir())
    assert port_free(http_port)


def test_demo_refuses_a_busy_port(demo_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "daemons.demo",
                "--rundir",
                str(demo_dir),
                "--tcp-port",
                str(port),
                "--ws-port",
                str(free_port()),
                "--http-port",
                str(free_port()),
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr.decode()
    assert not demo_dir.exists()  # nothing was started


def test_demo_refuses_a_busy_http_port(demo_dir: Path) -> None:
    """ipc-httpd's port is checked before anything starts, and the hint
    names the option that moves it."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "daemons.demo",
                "--rundir",
                str(demo_dir),
                "--tcp-port",
                str(free_port()),
                "--ws-port",
                str(free_port()),
                "--http-port",
                str(port),
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"port {port} on 127.0.0.1 is already in use" in err
    assert "--http-port 8100" in err
    assert not demo_dir.exists()  # nothing was started


def test_demo_refuses_a_second_stack_in_the_same_rundir(rundir: Path, procs: Processes) -> None:
    procs.pongd(rundir)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemons.demo",
            "--rundir",
            str(rundir),
            "--tcp-port",
            str(free_port()),
            "--ws-port",
            str(free_port()),
            "--http-port",
            str(free_port()),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "a service 'pong' is already running" in result.stderr.decode()
    assert sorted(p.name for p in rundir.iterdir()) == ["pong", "pong.lock"]


def _start_demo_on_pipe(rundir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The demo with stdout and stderr on a pipe the test reads up to the
    ready line, as ``./dev.sh run | tee demo.log`` does; returns the read end."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemons.demo",
            "--rundir",
            str(rundir),
            "--tcp-port",
            str(free_port()),
            "--no-websocket",
            "--no-http",
        ],
        stdout=write_end,
        stderr=write_end,
        stdin=subprocess.DEVNULL,
    )
    os.close(write_end)
    seen = b""
    with os.fdopen(os.dup(read_end), "rb", buffering=0) as reader:
        while READY_LINE.encode() not in seen:
            chunk = reader.read(4096)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
    return proc, read_end


def test_demo_stops_everything_when_its_output_pipe_is_gone(demo_dir: Path) -> None:
    """Ctrl-C on ``./dev.sh run | tee``: tee dies first, so every later print
    meets a broken pipe. The stop must still run (it used not to)."""
    proc, read_end = _start_demo_on_pipe(demo_dir)
    try:
        kids = children(proc.pid)
        assert len(kids) == 3
        os.close(read_end)  # "tee" is gone
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        assert all(gone(pid) for pid in kids)
        assert not demo_dir.exists(), list(demo_dir.iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_demo_children_do_not_outlive_a_killed_demo(demo_dir: Path) -> None:
    """kill -9 of the demo itself: the kernel's parent-death signal stops the
    children, which remove their own sockets."""
    proc, read_end = _start_demo_on_pipe(demo_dir)
    try:
        kids = children(proc.pid)
        proc.kill()
        proc.wait(timeout=5)
        deadline = time.monotonic() + 15
        while not all(gone(pid) for pid in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(pid) for pid in kids)
    finally:
        os.close(read_end)
        for pid in children(proc.pid) if proc.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
