"""The examples the docs show must run as shown."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import BIN, ROOT, connectable, wait_for


def test_upper_service_and_client(rundir, procs):
    env = {"RUNDIR": str(rundir), "PYTHONPATH": str(ROOT)}
    service = procs.start(sys.executable, ROOT / "examples" / "upper_service.py", env=env)
    wait_for(lambda: connectable(rundir / "upper") or service.poll() is not None, what="upper")
    out = subprocess.run(
        [sys.executable, ROOT / "examples" / "upper_client.py", "hello", "world"],
        env=dict(os.environ, **env),
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"HELLO\nWORLD\n"
    service.terminate()
    assert service.wait(5) == 0
    assert not (rundir / "upper").exists()


# -- examples/whoami_service.py behind ipc-websocketd --token-secret ----------------


def _websocketd(procs, rundir: Path, log_path: Path, *args: str) -> int:
    with log_path.open("wb") as log:
        proc = procs.start(
            BIN / "ipc-websocketd", "--listen", "127.0.0.1:0", *args,
            env={"RUNDIR": str(rundir)}, stderr=log,
        )  # fmt: skip

    def port() -> int | None:
        assert proc.poll() is None, log_path.read_text()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
        return int(match.group(1)) if match else None

    return wait_for(port, what="ipc-websocketd up")


def _token(secret: Path, name: str, service: str) -> str:
    out = subprocess.run(
        [str(BIN / "ipc"), "token", "new", "--secret-file", str(secret),
         "--name", name, "--service", service, "--ttl", "10m"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def _open(port: int, service: str, token: str | None = None, source: str = "127.0.0.1"):
    from websockets.sync.client import connect
    from websockets.typing import Subprotocol

    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    protocols = [Subprotocol(f"ipc.token.{token}")] if token else None
    return connect(
        f"ws://127.0.0.1:{port}/{service}", sock=sock, subprotocols=protocols, open_timeout=10
    )


def _refused_with(port: int, service: str, token: str | None, source: str = "127.0.0.1") -> int:
    from websockets.exceptions import InvalidStatus

    try:
        _open(port, service, token, source).close()
    except InvalidStatus as exc:
        return exc.response.status_code
    raise AssertionError(f"{service}: the connection was accepted")


def test_whoami_service_greets_and_refuses(rundir, procs, tmp_path):
    """The example of docs/who-is-calling.md: a token's name and the client's
    address reach the service, which greets or refuses (403) on them."""
    env = {"RUNDIR": str(rundir), "PYTHONPATH": str(ROOT)}
    service_log = tmp_path / "whoami.log"
    with service_log.open("wb") as log:
        service = procs.start(
            sys.executable, ROOT / "examples" / "whoami_service.py",
            "--network", "127.0.0.1/32", env=env, stderr=log,
        )  # fmt: skip
    wait_for(lambda: connectable(rundir / "whoami") or service.poll() is not None, what="whoami")
    assert service.poll() is None, service_log.read_text()
    assert (rundir / "whoami.door").exists(), "peer_info=True listens on the door too"

    secret = tmp_path / "token.secret"
    subprocess.run([str(BIN / "ipc"), "token", "secret", str(secret)], check=True, timeout=30)
    log_path = tmp_path / "websocketd.log"
    port = _websocketd(procs, rundir, log_path, "--token-secret", str(secret))
    alice = _token(secret, "alice", "whoami")

    with _open(port, "whoami", alice) as ws:
        greeting = ws.recv(timeout=10)
        local_port = ws.local_address[1]
        ws.send(b"hi")
        assert ws.recv(timeout=10) == b"alice said: hi"
    assert greeting == (
        f"hello alice: ws from 127.0.0.1 port {local_port} asking for /whoami".encode()
    )
    # From an address outside --network: the service refuses, the browser gets 403.
    assert _refused_with(port, "whoami", alice, source="127.0.0.2") == 403
    wait_for(
        lambda: "127.0.0.2 is not in the allowed networks" in log_path.read_text(),
        5,
        what="the service's reason in the daemon's log",
    )
    # No token: the daemon itself refuses (401) before the service is asked.
    assert _refused_with(port, "whoami", None) == 401

    # A daemon without token checking lets anonymous clients reach the
    # service, which refuses them itself: no token name.
    open_log = tmp_path / "websocketd-open.log"
    open_port = _websocketd(procs, rundir, open_log, "--control-name", "ws-open", "--no-static")
    assert _refused_with(open_port, "whoami", None) == 403
    wait_for(lambda: "a token is required" in open_log.read_text(), 5, what="the reason")

    # A local client (the Unix socket itself, no daemon vouching) is not served.
    with socket.socket(socket.AF_UNIX) as local:
        local.settimeout(5)
        local.connect(str(rundir / "whoami"))
        assert local.recv(1) == b""
    service.terminate()
    assert service.wait(5) == 0
    assert not (rundir / "whoami").exists() and not (rundir / "whoami.door").exists()


def test_who_is_calling_shows_the_whole_example():
    """docs/who-is-calling.md includes examples/whoami_service.py as it is."""
    page = (ROOT / "docs" / "who-is-calling.md").read_text()
    code = (ROOT / "examples" / "whoami_service.py").read_text()
    assert f"```python\n{code}```\n" in page
