"""Peer information over TCP and TLS: what a service that opted in
(``service_init(name, peer_info=True)``) learns of a client of ipc-tcpd,
ipc-tlsd (with a client certificate) and of both behind the real HAProxy
with the PROXY protocol.

The service (a subprocess, :data:`SERVICE`) answers every new client with
one message, the JSON of the PeerInfo its CONNECTION event carried, then
echoes; the test compares it with what it knows of its own sockets.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest

from daemons.codecs.proxy import Endpoint, encode_v2
from daemons.engine import certs
from ipc_core import encode
from tests.helpers import (
    LogReader,
    connectable,
    recv_exact,
    recv_msg,
    start_listening_daemon,
    wait_for,
)
from tests.integration.test_haproxy import CLIENT_IP, HAPROXY, TlsFiles, haproxy, make_tls_files

pytestmark = pytest.mark.timeout(90)

#: A service that tells each client its peer information, then echoes.
SERVICE = r"""
import sys
from ipc_core import Context, EventType, peerinfo

with Context() as ctx:
    ctx.service_init(sys.argv[1], peer_info=True)
    ctx.handle_signals()
    for event in ctx:
        if event.type is EventType.CONNECTION:
            info = b"null" if event.peer is None else peerinfo.encode(event.peer)
            ctx.schedule(event.fd, info)
        elif event.type is EventType.MESSAGE_RX:
            ctx.schedule(event.fd, event.message)
"""


@pytest.fixture
def who(rundir: Path, procs) -> str:
    proc = procs.start(sys.executable, "-c", SERVICE, "who", env={"RUNDIR": str(rundir)})
    wait_for(lambda: connectable(rundir / "who") or proc.poll() is not None, what="who up")
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    assert (rundir / "who.door").exists()
    return "who"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA, a server certificate and a client certificate with SANs."""
    return make_tls_files(tmp_path_factory.mktemp("pki"))


def told(s: socket.socket) -> dict[str, Any]:
    """The handshake's ``ok``, then the service's first message: the PeerInfo."""
    assert recv_exact(s, 2) == b"ok"
    info = json.loads(recv_msg(s))
    assert isinstance(info, dict), info
    s.sendall(encode(b"echo"))
    assert recv_msg(s) == b"echo"
    return info


def test_ipc_tcpd_tells_the_socket_addresses(rundir: Path, procs, who: str) -> None:
    _p, _logs, port = start_listening_daemon(
        procs, "ipc-tcpd", "--listen", "127.0.0.1:0", env={"RUNDIR": str(rundir)}
    )
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.3", 0))
    s.sendall(who.encode())
    info = told(s)
    assert info == {
        "v": [1, 1],
        "transport": "tcp",
        "client_address": "127.0.0.3",
        "client_port": s.getsockname()[1],
        "local_address": "127.0.0.1",
        "local_port": port,
    }


def test_ipc_tcpd_with_a_proxy_header(rundir: Path, procs, who: str) -> None:
    _p, _logs, port = start_listening_daemon(
        procs,
        "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        "--proxy-protocol",
        "127.0.0.1",
        env={"RUNDIR": str(rundir)},
    )
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(encode_v2(Endpoint("203.0.113.5", 40123), Endpoint("192.0.2.10", 9000)) + b"who")
    info = told(s)
    assert info == {
        "v": [1, 1],
        "transport": "tcp",
        "client_address": "203.0.113.5",
        "client_port": 40123,
        "local_address": "192.0.2.10",
        "local_port": 9000,
        "via": "proxy-protocol",
        "proxy_address": "127.0.0.1",
    }


def start_tlsd(
    procs, rundir: Path, pki: TlsFiles, *args: str, mtls: bool = True
) -> tuple[LogReader, int]:
    _p, logs, port = start_listening_daemon(
        procs,
        "ipc-tlsd",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        str(pki.cert),
        "--key",
        str(pki.key),
        *(["--client-ca", str(pki.ca)] if mtls else []),
        *args,
        env={"RUNDIR": str(rundir)},
    )
    return logs, port


def tls_context(pki: TlsFiles, client_cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if client_cert is not None:
        ctx.load_cert_chain(*client_cert)
    return ctx


def test_ipc_tlsd_tells_the_session_and_the_client_certificate(
    rundir: Path, procs, pki: TlsFiles, who: str
) -> None:
    _logs, port = start_tlsd(procs, rundir, pki)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = tls_context(pki, pki.client).wrap_socket(raw, server_hostname="localhost")
    s.sendall(who.encode())
    info = told(s)
    assert info["transport"] == "tls"
    assert (info["client_address"], info["client_port"]) == ("127.0.0.1", s.getsockname()[1])
    assert (info["local_address"], info["local_port"]) == ("127.0.0.1", port)
    assert info["tls_version"] == s.version()
    assert info["tls_cipher"] == s.cipher()[0]  # type: ignore[index]
    assert info["tls_sni"] == "localhost"
    assert info["cert_subject"] == "CN=carol"
    assert info["cert_sans"] == ["DNS:carol.example", "IP:192.0.2.77"]
    assert info["cert_sha256"] == certs.fingerprint(pki.client[0])
    assert info["cert_verified"] is True
    assert "via" not in info


def test_ipc_tlsd_without_a_client_certificate(
    rundir: Path, procs, pki: TlsFiles, who: str
) -> None:
    _logs, port = start_tlsd(procs, rundir, pki, mtls=False)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = tls_context(pki, None).wrap_socket(raw, server_hostname="localhost")
    s.sendall(who.encode())
    info = told(s)
    assert info["transport"] == "tls" and info["tls_sni"] == "localhost"
    assert not any(key.startswith("cert_") for key in info)


@pytest.mark.skipif(not HAPROXY.exists(), reason="needs Debian's haproxy (/usr/sbin/haproxy)")
def test_behind_haproxy_both_daemons_tell_the_real_client(
    rundir: Path, procs, pki: TlsFiles, who: str
) -> None:
    env = {"RUNDIR": str(rundir)}
    _p, _tcpd_logs, tcpd_port = start_listening_daemon(
        procs, "ipc-tcpd", "--listen", "127.0.0.1:0", "--proxy-protocol", "127.0.0.1", env=env
    )
    _tlsd_logs, tlsd_port = start_tlsd(procs, rundir, pki, "--proxy-protocol", "127.0.0.1")
    with haproxy(tcpd_port, tlsd_port) as (tcp_front, tls_front, _haproxy_logs):
        s = socket.create_connection(
            ("127.0.0.1", tcp_front), timeout=5, source_address=(CLIENT_IP, 0)
        )
        s.sendall(who.encode())
        info = told(s)
        assert info == {
            "v": [1, 1],
            "transport": "tcp",
            "client_address": CLIENT_IP,
            "client_port": s.getsockname()[1],
            "local_address": "127.0.0.1",
            "local_port": tcp_front,  # where the client connected: HAProxy's frontend
            "via": "proxy-protocol",
            "proxy_address": "127.0.0.1",
        }

        raw = socket.create_connection(
            ("127.0.0.1", tls_front), timeout=5, source_address=(CLIENT_IP, 0)
        )
        t = tls_context(pki, pki.client).wrap_socket(raw, server_hostname="localhost")
        t.sendall(who.encode())
        info = told(t)
        assert info["transport"] == "tls" and info["via"] == "proxy-protocol"
        assert (info["client_address"], info["client_port"]) == (CLIENT_IP, t.getsockname()[1])
        assert (info["local_address"], info["local_port"]) == ("127.0.0.1", tls_front)
        assert info["proxy_address"] == "127.0.0.1"
        assert info["tls_sni"] == "localhost" and info["tls_version"] == t.version()
        assert info["cert_subject"] == "CN=carol" and info["cert_verified"] is True
        assert info["cert_sha256"] == certs.fingerprint(pki.client[0])


def test_a_service_without_peer_info_is_reached_as_before(rundir: Path, procs) -> None:
    procs.pongd(rundir)
    _p, _logs, port = start_listening_daemon(
        procs, "ipc-tcpd", "--listen", "127.0.0.1:0", "--proxy-protocol", "127.0.0.1",
        env={"RUNDIR": str(rundir)},
    )  # fmt: skip
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(encode_v2(Endpoint("203.0.113.5", 1), Endpoint("192.0.2.10", 9000)) + b"pong")
    assert recv_exact(s, 2) == b"ok"
    s.sendall(encode(b"plain"))
    assert recv_msg(s) == b"plain"
