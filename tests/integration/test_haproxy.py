"""ipc-tcpd and ipc-tlsd behind the real HAProxy, configured as docs/examples/haproxy.cfg.

The example the docs show is the configuration under test, byte for byte:
its addresses are environment variables (``"${IPC_TCPD-10.0.0.5:9000}"``),
which the test sets to loopback ports. HAProxy (Debian's, /usr/sbin/haproxy)
runs in the foreground (``-db``) as a child of the test, never as the
system's service, and is stopped in a ``finally``.

HAProxy connects to the daemons from 127.0.0.1 (listed in
``--proxy-protocol``) and writes a PROXY v2 header naming the client; the
client's socket is bound to 127.0.0.2, so a log line naming 127.0.0.2 can
only come from the header.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemons.engine import certs
from ipc_core import encode
from tests.helpers import (
    ROOT,
    LogReader,
    recv_exact,
    recv_msg,
    start_listening_daemon,
    tcp_connectable,
    wait_for,
)

HAPROXY = Path("/usr/sbin/haproxy")
EXAMPLE = ROOT / "docs" / "examples" / "haproxy.cfg"
CLIENT_IP = "127.0.0.2"

pytestmark = [
    pytest.mark.skipif(not HAPROXY.exists(), reason="needs Debian's haproxy (/usr/sbin/haproxy)"),
    pytest.mark.timeout(90),
]


@dataclass(frozen=True)
class TlsFiles:
    """A CA, a server certificate for localhost and a client certificate
    with SANs (the session's ``pki`` has no client certificate)."""

    ca: Path
    cert: Path
    key: Path
    client: tuple[Path, Path]


def make_tls_files(d: Path) -> TlsFiles:
    ca, ca_key = certs.make_ca("Test CA")
    certs.write_cert(d / "ca.pem", ca)
    pairs = {
        "server": certs.make_cert(ca, ca_key, "localhost", ["localhost", "127.0.0.1"]),
        "carol": certs.make_cert(
            ca, ca_key, "carol", ["carol.example", "192.0.2.77"], usage="client"
        ),
    }
    for stem, (cert, key) in pairs.items():
        certs.write_cert(d / f"{stem}.pem", cert)
        certs.write_key(d / f"{stem}.key", key)
    return TlsFiles(
        d / "ca.pem", d / "server.pem", d / "server.key", (d / "carol.pem", d / "carol.key")
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("pki"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_example_uses_the_variables_the_test_sets() -> None:
    """The test substitutes nothing in the file: if the example stops reading
    these variables (or stops sending PROXY v2), this fails first."""
    text = EXAMPLE.read_text()
    for name in ("IPC_TCP_FRONTEND", "IPC_TCPD", "IPC_TLS_FRONTEND", "IPC_TLSD", "HAPROXY_LOG"):
        assert f'"${{{name}-' in text, name
    assert "mode tcp" in text
    servers = [line for line in text.splitlines() if line.strip().startswith("server ")]
    assert len(servers) == 2 and all("send-proxy-v2" in line for line in servers), servers


def test_the_docs_show_the_example_as_it_is() -> None:
    """docs/ipc-tcpd.md includes docs/examples/haproxy.cfg verbatim, and
    docs/ipc-tlsd.md links it: the page, the file and this test agree."""
    page = (ROOT / "docs" / "ipc-tcpd.md").read_text()
    assert "```\n" + EXAMPLE.read_text() + "```\n" in page
    assert "(examples/haproxy.cfg)" in (ROOT / "docs" / "ipc-tlsd.md").read_text()


@contextlib.contextmanager
def haproxy(tcpd_port: int, tlsd_port: int) -> Iterator[tuple[int, int, LogReader]]:
    """The real HAProxy in the foreground with the example configuration;
    yields its TCP and TLS frontend ports and its log."""
    for attempt in range(3):  # a free port may be taken before HAProxy binds it
        tcp_front, tls_front = free_port(), free_port()
        env = dict(
            os.environ,
            HAPROXY_LOG="stderr",
            IPC_TCP_FRONTEND=f"127.0.0.1:{tcp_front}",
            IPC_TCPD=f"127.0.0.1:{tcpd_port}",
            IPC_TLS_FRONTEND=f"127.0.0.1:{tls_front}",
            IPC_TLSD=f"127.0.0.1:{tlsd_port}",
        )
        proc = subprocess.Popen(
            [str(HAPROXY), "-db", "-f", str(EXAMPLE)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        logs = LogReader(proc)
        try:
            _wait_up(proc, tcp_front, tls_front)
        except BaseException:
            _stop(proc)
            raise
        if proc.poll() is None:
            break
        _stop(proc)
        if "Address already in use" not in logs.text() or attempt == 2:
            raise AssertionError(f"haproxy exited {proc.returncode}: {logs.text()}")
    try:
        yield tcp_front, tls_front, logs
    finally:
        _stop(proc)


def _wait_up(proc: subprocess.Popen[bytes], *ports: int) -> None:
    """Until HAProxy accepts on every port, or exits."""
    wait_for(
        lambda: (
            proc.poll() is not None or all(tcp_connectable("127.0.0.1", port) for port in ports)
        ),
        15,
        what="haproxy up",
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def client(port: int) -> socket.socket:
    """A client on 127.0.0.2 (its socket bound there) connecting to HAProxy."""
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(CLIENT_IP, 0))


def echo(s: socket.socket, payload: bytes) -> None:
    s.sendall(encode(payload))
    assert recv_msg(s) == payload


@pytest.fixture
def daemons(rundir: Path, procs, pki: TlsFiles) -> tuple[LogReader, int, LogReader, int]:
    """pongd, ipc-tcpd and ipc-tlsd, both trusting HAProxy's 127.0.0.1 only."""
    procs.pongd(rundir)
    env = {"RUNDIR": str(rundir)}
    _p, tcpd_logs, tcpd_port = start_listening_daemon(
        procs, "ipc-tcpd", "--listen", "127.0.0.1:0", "--proxy-protocol", "127.0.0.1", env=env
    )
    _p, tlsd_logs, tlsd_port = start_listening_daemon(
        procs,
        "ipc-tlsd",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        str(pki.cert),
        "--key",
        str(pki.key),
        "--client-ca",
        str(pki.ca),
        "--proxy-protocol",
        "127.0.0.1",
        env=env,
    )
    return tcpd_logs, tcpd_port, tlsd_logs, tlsd_port


def switched_line(logs: LogReader, service: str = "pong") -> str:
    return logs.wait_for(f"-> {service!r}")


def test_through_haproxy_ipc_tcpd_names_the_real_client(daemons) -> None:
    tcpd_logs, tcpd_port, _tlsd_logs, tlsd_port = daemons
    with haproxy(tcpd_port, tlsd_port) as (tcp_front, _tls_front, _haproxy_logs):
        s = client(tcp_front)
        client_port = s.getsockname()[1]
        s.sendall(b"pong")
        assert recv_exact(s, 2) == b"ok"
        echo(s, b"through haproxy")
        line = switched_line(tcpd_logs)
        # The client as HAProxy saw it (its own address and port), then the proxy.
        assert re.search(rf": {re.escape(CLIENT_IP)}:{client_port}\b.*-> 'pong'", line), line
        assert not re.search(r": 127\.0\.0\.1:\d+ -> 'pong'", line), line
        s.close()


def test_through_haproxy_ipc_tlsd_names_the_real_client(daemons, pki: TlsFiles) -> None:
    _tcpd_logs, tcpd_port, tlsd_logs, tlsd_port = daemons
    with haproxy(tcpd_port, tlsd_port) as (_tcp_front, tls_front, _haproxy_logs):
        raw = client(tls_front)
        client_port = raw.getsockname()[1]
        ctx = ssl.create_default_context(cafile=pki.ca)
        ctx.load_cert_chain(*pki.client)
        s = ctx.wrap_socket(raw, server_hostname="localhost")  # TLS end to end, mutual
        s.sendall(b"pong")
        assert recv_exact(s, 2) == b"ok"
        echo(s, b"tls through haproxy")
        line = switched_line(tlsd_logs)
        assert re.search(rf": {re.escape(CLIENT_IP)}:{client_port}\b.*-> 'pong'", line), line
        # The client certificate's line comes before the switch: it names the client too.
        tls_line = tlsd_logs.wait_for(f"{CLIENT_IP}:{client_port} (via 127.0.0.1:")
        assert "client CN=carol SHA256:" in tls_line
        s.close()


def test_haproxy_health_checks_do_not_break_service(daemons) -> None:
    """HAProxy's checks (a LOCAL header, then a reset) come every 2 s; the
    daemon stays healthy for clients in between."""
    tcpd_logs, tcpd_port, _tlsd_logs, tlsd_port = daemons
    with haproxy(tcpd_port, tlsd_port) as (tcp_front, _tls_front, haproxy_logs):
        for n in range(3):
            s = client(tcp_front)
            s.sendall(b"pong\n")
            assert recv_exact(s, 2) == b"ok"
            echo(s, b"check %d" % n)
            s.close()
        assert "Server ipc_tcpd/tcpd is DOWN" not in haproxy_logs.text()


def test_a_client_that_bypasses_haproxy_cannot_claim_an_address(daemons) -> None:
    """127.0.0.2 is not HAProxy: its header is refused, and named as it is."""
    tcpd_logs, tcpd_port, _tlsd_logs, _tlsd_port = daemons
    s = client(tcpd_port)
    s.sendall(b"PROXY TCP4 10.6.6.6 127.0.0.1 1111 9000\r\npong")
    s.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(10) == b""
    line = tcpd_logs.wait_for("not listed in --proxy-protocol")
    assert f"{CLIENT_IP}:" in line and "10.6.6.6" not in line
