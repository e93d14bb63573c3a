"""ipc-websocketd behind the real nginx, configured as docs/examples/nginx.conf.

The example the deployment guide shows is the configuration under test:
the test only substitutes its addresses, ports and certificate paths, and
wraps it in a minimal main configuration (pid file, error log and temporary
paths in a temporary prefix). nginx runs in the foreground as a child of the
test (never the system's nginx service) and is stopped in a ``finally``.

A client connecting from 127.0.0.2 (its socket bound there) reaches pong
through nginx over TLS; ipc-websocketd, trusting 127.0.0.1/32 (where nginx
connects from), names 127.0.0.2 as the client, even when the client sends
an X-Forwarded-For of its own. A client connecting directly cannot claim an
address with X-Forwarded-For, because its address is not trusted. A
service asking for peer information (examples/whoami_service.py) learns the
client nginx saw, the proxy that said so, and the token's name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from tests.helpers import BIN, ROOT, Pki, Processes, connectable, tcp_connectable, wait_for

NGINX = Path("/usr/sbin/nginx")
EXAMPLE = ROOT / "docs" / "examples" / "nginx.conf"

pytestmark = [
    pytest.mark.skipif(not NGINX.exists(), reason="needs Debian's nginx-light (/usr/sbin/nginx)"),
    pytest.mark.timeout(60),
]

MAIN_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
{user}
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/libipc.conf;
}}
"""


def site_config(listen_port: int, daemon_port: int, pki: Pki) -> str:
    """docs/examples/nginx.conf with this test's addresses: each replaced
    text must be there exactly once, so the example cannot drift away."""
    text = EXAMPLE.read_text()
    for old, new in [
        ("listen 443 ssl;", f"listen 127.0.0.1:{listen_port} ssl;"),
        ("listen [::]:443 ssl;", ""),  # loopback only
        ("server_name ipc.example.com;", "server_name localhost;"),
        ("/etc/ssl/libipc/ipc.example.com.pem;", f"{pki.cert};"),
        ("/etc/ssl/libipc/ipc.example.com.key;", f"{pki.key};"),
        ("proxy_pass http://127.0.0.1:8080;", f"proxy_pass http://127.0.0.1:{daemon_port};"),
    ]:
        assert text.count(old) == 1, f"{EXAMPLE} no longer holds {old!r} once"
        text = text.replace(old, new)
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(prefix: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(NGINX), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
         "-e", str(prefix / "error.log"), "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def _up(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Wait until nginx accepts on ``port`` (True) or exits (False)."""
    wait_for(
        lambda: proc.poll() is not None or tcp_connectable("127.0.0.1", port), 15, what="nginx up"
    )
    return proc.poll() is None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)  # graceful: the workers finish
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # master and workers, whatever is left
    proc.wait(timeout=10)


@contextlib.contextmanager
def nginx(tmp_path: Path, daemon_port: int, pki: Pki) -> Iterator[int]:
    """The real nginx in the foreground on 127.0.0.1; yields its port."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    user = "user root root;" if os.geteuid() == 0 else ""  # workers reach the prefix
    (prefix / "nginx.conf").write_text(MAIN_CONF.format(prefix=prefix, user=user))
    for attempt in range(3):  # a free port may be taken before nginx binds it
        port = free_port()
        (prefix / "libipc.conf").write_text(site_config(port, daemon_port, pki))
        proc = _launch(prefix)
        try:
            if _up(proc, port):
                break
        except BaseException:
            _stop(proc)
            raise
        _stop(proc)
        log = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
        if "Address already in use" not in log or attempt == 2:
            raise AssertionError(f"nginx exited {proc.returncode}: {log}")
    try:
        yield port
    finally:
        _stop(proc)


def start_websocketd(procs: Processes, rundir: Path, log_path: Path, *args: str) -> int:
    with log_path.open("wb") as log:
        proc = procs.start(
            BIN / "ipc-websocketd",
            "--listen",
            "127.0.0.1:0",
            *args,
            env={"RUNDIR": str(rundir)},
            stderr=log,
        )

    def port() -> int | None:
        assert proc.poll() is None, log_path.read_text()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
        return int(match.group(1)) if match else None

    return wait_for(port, what="ipc-websocketd up")


def client(
    source: str,
    port: int,
    *,
    ca: Path | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/pong",
    subprotocol: str | None = None,
) -> ClientConnection:
    """A WebSocket to ``path`` from ``source`` (the socket bound there)."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    context = None
    if ca is not None:
        context = ssl.create_default_context(cafile=str(ca))
    scheme = "wss" if context else "ws"
    return connect(
        f"{scheme}://localhost:{port}{path}",
        sock=sock,
        ssl=context,
        server_hostname="localhost" if context else None,
        additional_headers=headers,
        subprotocols=[Subprotocol(subprotocol)] if subprotocol else None,
        open_timeout=10,
    )


def echo(ws: ClientConnection, message: bytes) -> str:
    """Send ``message``, see it echoed; the address the client connected from."""
    with ws:
        source = ws.local_address[0]
        ws.send(message)
        assert ws.recv(timeout=10) == message
    return source


def connection_lines(log_path: Path) -> list[str]:
    """The daemon's log lines about connections to pong."""
    return [line for line in log_path.read_text().splitlines() if "'pong'" in line]


@pytest.mark.parametrize("header", ["x-forwarded-for", "forwarded"])
def test_through_nginx_the_daemon_names_the_real_client(
    rundir: Path, procs: Processes, tmp_path: Path, pki: Pki, header: str
) -> None:
    """The example sets both headers; either one the daemon is told to read
    names the client nginx saw."""
    procs.pongd(rundir)
    log_path = tmp_path / "websocketd.log"
    daemon_port = start_websocketd(
        procs, rundir, log_path, "--trust-proxy", "127.0.0.1/32", "--forwarded-header", header
    )
    with nginx(tmp_path, daemon_port, pki) as port:
        assert echo(client("127.0.0.2", port, ca=pki.ca), b"through nginx") == "127.0.0.2"
        wait_for(lambda: connection_lines(log_path), 5, what="the daemon's connection log")
        # A client's own X-Forwarded-For is kept by nginx, which appends the
        # address it saw: the rightmost untrusted hop is still the client.
        spoof = {"X-Forwarded-For": "198.51.100.7", "Forwarded": "for=198.51.100.8"}
        echo(client("127.0.0.2", port, ca=pki.ca, headers=spoof), b"claims another address")
        wait_for(lambda: len(connection_lines(log_path)) >= 2, 5, what="the second connection")
        error_log = (tmp_path / "nginx" / "error.log").read_text()
    lines = connection_lines(log_path)
    assert len(lines) == 2, lines
    for line in lines:  # the client, and the proxy that named it
        assert re.search(r"ipc-websocketd: 127\.0\.0\.2 \(via 127\.0\.0\.1:\d+\) -> 'pong'", line)
    text = log_path.read_text()
    assert "198.51.100.7" not in text and "198.51.100.8" not in text, text
    assert "[emerg]" not in error_log and "[alert]" not in error_log, error_log


def test_a_direct_client_cannot_claim_an_address(
    rundir: Path, procs: Processes, tmp_path: Path
) -> None:
    """X-Forwarded-For is believed only from --trust-proxy's networks."""
    procs.pongd(rundir)
    log_path = tmp_path / "websocketd.log"
    port = start_websocketd(procs, rundir, log_path, "--trust-proxy", "127.0.0.1/32")
    claim = {"X-Forwarded-For": "203.0.113.9"}
    assert echo(client("127.0.0.2", port, headers=claim), b"direct, untrusted") == "127.0.0.2"
    wait_for(lambda: connection_lines(log_path), 5, what="the daemon's connection log")
    (line,) = connection_lines(log_path)
    assert re.search(r"ipc-websocketd: 127\.0\.0\.2:\d+ -> 'pong'", line), line
    assert "203.0.113.9" not in line and "via" not in line, line
    # The control: from inside --trust-proxy the same header is believed.
    echo(client("127.0.0.1", port, headers=claim), b"direct, trusted")
    wait_for(lambda: len(connection_lines(log_path)) >= 2, 5, what="the second connection")
    trusted = connection_lines(log_path)[1]
    assert re.search(r"ipc-websocketd: 203\.0\.113\.9 \(via 127\.0\.0\.1:\d+\)", trusted), trusted


def test_a_service_behind_nginx_learns_the_real_client(
    rundir: Path, procs: Processes, tmp_path: Path, pki: Pki
) -> None:
    """examples/whoami_service.py behind nginx and ipc-websocketd: its peer
    information names the client nginx saw, the proxy, and the token's name."""
    env = {"RUNDIR": str(rundir), "PYTHONPATH": str(ROOT)}
    service_log = tmp_path / "whoami.log"
    with service_log.open("wb") as log:
        service = procs.start(
            sys.executable, ROOT / "examples" / "whoami_service.py",
            "--network", "127.0.0.2/32", env=env, stderr=log,
        )  # fmt: skip
    wait_for(lambda: connectable(rundir / "whoami") or service.poll() is not None, what="whoami")
    assert service.poll() is None, service_log.read_text()
    secret = tmp_path / "token.secret"
    subprocess.run([str(BIN / "ipc"), "token", "secret", str(secret)], check=True, timeout=30)
    token = subprocess.run(
        [str(BIN / "ipc"), "token", "new", "--secret-file", str(secret),
         "--name", "alice", "--service", "whoami"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    log_path = tmp_path / "websocketd.log"
    daemon_port = start_websocketd(
        procs, rundir, log_path, "--trust-proxy", "127.0.0.1/32", "--token-secret", str(secret)
    )
    protocol = f"ipc.token.{token}"
    with nginx(tmp_path, daemon_port, pki) as port:
        ws = client("127.0.0.2", port, ca=pki.ca, path="/whoami", subprotocol=protocol)
        with ws:
            greeting = ws.recv(timeout=10)
    assert greeting == (
        b"hello alice: ws from 127.0.0.2 (said by 127.0.0.1 with x-forwarded-for)"
        b" asking for /whoami"
    )
