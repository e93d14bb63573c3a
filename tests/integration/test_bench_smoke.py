"""The benchmark harness still runs (not a benchmark: no figure is checked)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import serve

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "bench" / "c" / "build"


@pytest.fixture(scope="module")
def c_tools() -> None:
    if not ((BUILD / "loadgen").exists() and (BUILD / "echo_server").exists()):
        if shutil.which("gcc") is None or shutil.which("make") is None:
            pytest.skip("gcc/make missing: cannot build bench/c")
        out = subprocess.run(
            ["make", "-s", "-C", str(ROOT / "bench" / "c")], capture_output=True, timeout=120
        )
        if out.returncode != 0:
            pytest.skip(f"bench/c does not build here: {out.stderr.decode()[-300:]}")


@pytest.mark.timeout(100)
def test_quick_core_prints_a_table(c_tools, tmp_path):
    out_md, out_json = tmp_path / "perf.md", tmp_path / "last.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--only",
            "core",
            "--no-write",
            "--out",
            str(out_md),
            "--json",
            str(out_json),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # bench.run then stops every server it started
        stdout, stderr = proc.communicate(timeout=20)
        pytest.fail(f"bench.run --quick --only core took more than 60 s:\n{stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-2000:]
    assert "SKIPPED" not in stdout, stdout
    assert "== targets" in stdout
    for name in ("C echo_server", "ipc pongd", "100 clients", "pongd / C"):
        assert name in stdout, stdout
    assert not out_md.exists() and not out_json.exists()  # --no-write


@contextlib.contextmanager
def byte_bridge(unix_path: Path):
    """A websockify-like relay: WebSocket message payloads go to the Unix
    socket as they are, whatever the socket sends back goes out as messages."""

    def handler(ws) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(unix_path))

        def back() -> None:
            with contextlib.suppress(OSError, ConnectionClosed):
                while data := sock.recv(65536):
                    ws.send(data)

        threading.Thread(target=back, daemon=True).start()
        with contextlib.suppress(ConnectionClosed, OSError):
            for message in ws:
                sock.sendall(message)
        sock.close()

    with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.socket.getsockname()[1]
        finally:
            server.shutdown()
            thread.join(timeout=5)


@pytest.mark.timeout(60)
def test_loadgen_ws_ipc_frames_libipc_inside_websocket_messages(c_tools, rundir, procs):
    """--ws-ipc (the bench's websockify-to-pongd comparison): every byte
    verified through a relay that knows nothing of LibIPC framing."""
    procs.pongd(rundir)
    with byte_bridge(rundir / "pong") as port:
        for size in ("100", "70000"):
            out = subprocess.run(
                [BUILD / "loadgen", "--tcp", f"127.0.0.1:{port}", "--ws", "/", "--ws-ipc",
                 "-c", "2", "-s", size, "-i", "2", "-n", "40", "-w", "0", "--verify", "-q"],
                capture_output=True, timeout=30,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr.decode()[-1000:]
            result = json.loads(out.stdout)
            assert (result["messages"], result["mismatches"], result["errors"]) == (80, 0, 0)
