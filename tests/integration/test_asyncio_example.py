"""examples/asyncio_http_bridge.py runs as its docstring shows (issue 17): HTTP
requests answered by a local LibIPC service (a Context one, or the asyncio
one it runs itself), 503 without the service, recovery after a restart,
clean stop on SIGTERM."""

from __future__ import annotations

import http.client
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, LogReader, connectable, wait_for

pytestmark = pytest.mark.timeout(90)
EXAMPLE = ROOT / "examples" / "asyncio_http_bridge.py"


def start_bridge(procs, rundir: Path, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    env = {"RUNDIR": str(rundir), "PYTHONPATH": str(ROOT)}
    proc = procs.start(
        sys.executable, EXAMPLE, "--listen", "127.0.0.1:0", *args, env=env, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    match = re.match(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert match, line + (proc.stderr.read().decode() if proc.stderr else "")
    return proc, int(match.group(1))


def ask(port: int, body: bytes, path: str = "/ask", method: str = "POST") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def test_the_bridge_asks_a_context_service(rundir: Path, procs) -> None:
    bridge, port = start_bridge(procs, rundir)
    assert ask(port, b"", "/health", "GET") == (200, b"ok")
    status, body = ask(port, b"hello")
    assert status == 503 and b"no service 'upper'" in body  # not started yet
    env = {"RUNDIR": str(rundir), "PYTHONPATH": str(ROOT)}
    service = procs.start(sys.executable, ROOT / "examples" / "upper_service.py", env=env)
    wait_for(lambda: connectable(rundir / "upper"), what="upper service")
    assert ask(port, b"hello") == (200, b"HELLO")
    # keep-alive: several requests on one HTTP connection
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    for word in (b"one", b"two", b"x" * 100_000):
        conn.request("POST", "/ask", body=word)
        reply = conn.getresponse()
        assert (reply.status, reply.read()) == (200, word.upper())
    conn.close()
    # the service restarts: the bridge reconnects
    service.terminate()
    assert service.wait(5) == 0
    service = procs.start(sys.executable, ROOT / "examples" / "upper_service.py", env=env)
    wait_for(lambda: connectable(rundir / "upper"), what="upper service again")
    assert ask(port, b"again") == (200, b"AGAIN")
    assert ask(port, b"", "/nope", "GET")[0] == 404
    assert ask(port, b"", "/ask", "GET")[0] == 405
    bridge.send_signal(signal.SIGTERM)
    assert bridge.wait(10) == 0


def test_the_bridge_with_its_own_asyncio_service(rundir: Path, procs) -> None:
    bridge, port = start_bridge(procs, rundir, "--with-service", "--service", "shout")
    assert (rundir / "shout").exists() and (rundir / "shout.lock").exists()
    assert ask(port, b"quiet please") == (200, b"QUIET PLEASE")
    logs = LogReader(bridge)
    bridge.send_signal(signal.SIGINT)
    assert bridge.wait(10) == 0, logs.text()
    assert bridge.stdout is not None and bridge.stdout.read() == b"stopped\n"
    assert not (rundir / "shout").exists() and not (rundir / "shout.lock").exists()
