"""ipc-websocketd over TLS takes ipc-tlsd's server policy: ``--crl`` (a
revoked browser certificate is refused before any service byte),
``--min-tls`` and ``--ciphers`` (issue 11, items 19 and 20, for wss)."""

from __future__ import annotations

import gc
import socket
import ssl
import subprocess
import weakref
from pathlib import Path

import pytest

from daemons.engine import certs
from daemons.websocketd import WebSocketHandshake, WebSocketOptions, _secure
from tests.helpers import BIN, start_listening_daemon

UPGRADE = (
    "GET /pong HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1, clients alice and bob, and a
    CRL that revokes alice."""
    ca_cert, ca_key = certs.make_ca("wss test CA")
    certs.write_cert(tmp_path / "ca.pem", ca_cert)
    server, server_key = certs.make_cert(ca_cert, ca_key, "localhost", ["127.0.0.1"])
    certs.write_cert(tmp_path / "server.pem", server)
    certs.write_key(tmp_path / "server.key", server_key)
    serials = {}
    for name in ("alice", "bob"):
        leaf, key = certs.make_cert(ca_cert, ca_key, name, usage="client")
        certs.write_cert(tmp_path / f"{name}.pem", leaf)
        certs.write_key(tmp_path / f"{name}.key", key)
        serials[name] = leaf.serial_number
    certs.write_crl(tmp_path / "crl.pem", certs.make_crl(ca_cert, ca_key, [serials["alice"]]))
    return tmp_path


def _client(ca: Path, name: str | None, *, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca / "ca.pem"))
    if name:
        ctx.load_cert_chain(str(ca / f"{name}.pem"), str(ca / f"{name}.key"))
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _upgrade(port: int, ctx: ssl.SSLContext) -> str:
    """The first line of the answer to a WebSocket upgrade, or the TLS alert."""
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(UPGRADE.encode())
            return s.recv(4096).split(b"\r\n", 1)[0].decode()
    except ssl.SSLError as exc:
        return str(exc.reason)


def _wss(procs, rundir: Path, ca: Path, *extra: object):
    procs.pongd(rundir)
    return start_listening_daemon(
        procs,
        "ipc-websocketd",
        "-l",
        "127.0.0.1:0",
        "--cert",
        str(ca / "server.pem"),
        "--key",
        str(ca / "server.key"),
        *map(str, extra),
        env={"RUNDIR": str(rundir)},
    )


def test_a_revoked_browser_certificate_is_refused(rundir: Path, procs, ca: Path) -> None:
    _, logs, port = _wss(procs, rundir, ca, "--client-ca", ca / "ca.pem", "--crl", ca / "crl.pem")
    assert _upgrade(port, _client(ca, "alice")) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    logs.wait_for("certificate revoked")
    assert _upgrade(port, _client(ca, "bob")) == "HTTP/1.1 101 Switching Protocols"


def test_min_tls_1_3_refuses_a_tls12_browser(rundir: Path, procs, ca: Path) -> None:
    _, _, port = _wss(procs, rundir, ca, "--min-tls", "1.3")
    assert "101" not in _upgrade(port, _client(ca, None, tls12=True))
    assert _upgrade(port, _client(ca, None)) == "HTTP/1.1 101 Switching Protocols"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--crl", "x.pem"], "--crl needs --client-ca"),
        (["--min-tls", "1.3"], "need --cert/--key"),
    ],
)
def test_tls_policy_flags_without_tls_are_refused(args: list[str], message: str) -> None:
    result = subprocess.run(
        [BIN / "ipc-websocketd", *args], capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr.decode()


def test_a_wss_handshake_is_freed_without_the_cyclic_gc(ca: Path) -> None:
    """A class made per connection (as before) is a cycle that kept the inner
    WebSocket handshake, and its buffers, until the GC ran."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(ca / "server.pem"), str(ca / "server.key"))
    gc.collect()
    gc.disable()
    try:
        for mtls in (False, True):
            inner = WebSocketHandshake("127.0.0.1:1", WebSocketOptions())
            handshake = _secure(inner, context, (), mtls)
            refs = [weakref.ref(handshake), weakref.ref(inner)]
            del handshake, inner
            assert [r() for r in refs] == [None, None], "kept alive by a reference cycle"
    finally:
        gc.enable()
