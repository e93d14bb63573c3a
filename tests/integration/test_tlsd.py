"""ipc-tlsd with real processes on 127.0.0.1: openssl, Python TLS clients, two hosts.

Every certificate is made with the ``ipc cert`` commands (what the docs tell
users to run); two run directories stand for two hosts.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemons.engine import certs
from daemons.tlsd import main as tlsd_main
from ipc_core import Context, encode
from tests.helpers import (
    BIN,
    LogReader,
    connectable,
    recv_exact,
    recv_msg,
    start_listening_daemon,
    wait_for,
)

# -- certificates, made once per module with `ipc cert` ------------------------


@dataclass(frozen=True)
class PKI:
    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def ca(self) -> Path:
        return self.dir / "ca" / "ca.pem"

    def pair(self, stem: str) -> tuple[Path, Path]:
        """(cert, key) of a leaf under ``dir``: ``"ca/alice"``, ``"other/alice"``."""
        return self.dir / f"{stem}.pem", self.dir / f"{stem}.key"


def _ipc_cert(*args: str | Path) -> None:
    out = subprocess.run([BIN / "ipc", "cert", *map(str, args)], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr.decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, other, renewed = d / "ca", d / "other", d / "renewed"
    _ipc_cert("ca", "--out", ca)
    _ipc_cert("ca", "--out", other, "--name", "Other CA")
    _ipc_cert("server", "--ca-dir", ca, "--out", ca, "localhost", "127.0.0.1")
    _ipc_cert("server", "--ca-dir", ca, "--out", ca, "other.example")  # wrong name for us
    _ipc_cert("server", "--ca-dir", ca, "--out", renewed, "localhost", "127.0.0.1")
    for cn in ("alice", "bob", "carol"):
        _ipc_cert("client", "--ca-dir", ca, "--out", ca, cn)
    _ipc_cert("client", "--ca-dir", ca, "--out", d / "expired", "--days", "-1", "alice")
    _ipc_cert("client", "--ca-dir", other, "--out", other, "alice")  # right CN, wrong CA
    return PKI(d)


# -- small blocking clients ----------------------------------------------------


def client_ctx(pki: PKI, cert: str | None = None, **kwargs: object) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        ctx.load_cert_chain(*pki.pair(cert))
    for name, value in kwargs.items():
        setattr(ctx, name, value)
    return ctx


def tls_connect(port: int, ctx: ssl.SSLContext, hostname: str = "localhost") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname=hostname)


def tls_client(port: int, ctx: ssl.SSLContext, name: bytes = b"pong") -> ssl.SSLSocket:
    s = tls_connect(port, ctx)
    s.sendall(name)
    assert recv_exact(s, 2) == b"ok"
    return s


def echo(s: socket.socket, payload: bytes = b"hello") -> None:
    s.sendall(encode(payload))
    assert recv_msg(s) == payload


def refused(port: int, ctx: ssl.SSLContext, name: bytes = b"pong") -> bool:
    """True if the server closes on us (alert or EOF) instead of answering ``ok``.

    With TLS 1.3 the client finishes its handshake before the server has
    checked the client certificate, so the refusal shows on the first read.
    """
    try:
        with tls_connect(port, ctx) as s:
            s.sendall(name)
            return s.recv(100) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def read_until_closed(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (fails after ``timeout``)."""
    s.settimeout(timeout)
    got = b""
    with contextlib.suppress(ssl.SSLError, ConnectionResetError):
        while chunk := s.recv(4096):
            got += chunk
    return got


def server_fingerprint(s: ssl.SSLSocket) -> str:
    der = s.getpeercert(binary_form=True)
    assert der is not None
    return certs.fingerprint(der)


# -- daemons -----------------------------------------------------------------


def start_tlsd(
    procs, rundir: Path, *args: str | Path
) -> tuple[subprocess.Popen[bytes], LogReader, int]:
    return start_listening_daemon(
        procs,
        "ipc-tlsd",
        "--listen",
        "127.0.0.1:0",
        *map(str, args),
        env={"RUNDIR": str(rundir)},
    )


@pytest.fixture
def host_b(rundir: Path, procs, pki: PKI):
    """pongd and an ipc-tlsd serving localhost.pem (no client certificates)."""
    procs.pongd(rundir)
    cert, key = pki.pair("ca/localhost")
    proc, logs, port = start_tlsd(
        procs, rundir, "--cert", cert, "--key", key, "--handshake-timeout", "1"
    )
    return proc, logs, port


@pytest.fixture
def mtls_b(rundir: Path, procs, pki: PKI):
    """pongd and an ipc-tlsd requiring client certificates: alice by CN, bob by fingerprint."""
    procs.pongd(rundir)
    cert, key = pki.pair("ca/localhost")
    bob = certs.fingerprint(pki.pair("ca/bob")[0])
    return start_tlsd(
        procs,
        rundir,
        "--cert",
        cert,
        "--key",
        key,
        "--client-ca",
        pki.ca,
        "--allow-client",
        "alice",
        "--allow-client",
        bob,
    )


@pytest.fixture
def rundir_a(rundir: Path) -> Iterator[Path]:
    """Host A's run directory (host B has ``rundir``)."""
    path = Path(str(rundir) + "-a")
    path.mkdir(mode=0o770)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_outbound(procs, rundir_a: Path, *args: str | Path) -> LogReader:
    """Host A's ipc-tlsd: outbound only, the local service ``tls``."""
    proc = procs.start(
        BIN / "ipc-tlsd", "--no-listen", *map(str, args), env={"RUNDIR": str(rundir_a)}
    )
    logs = LogReader(proc)
    logs.wait_for("outbound service 'tls' ready")
    wait_for(lambda: connectable(rundir_a / "tls"), what="tls service")
    return logs


def ask_tls_service(rundir_a: Path, uri: str) -> tuple[Context, int, bytes]:
    """Send ``uri`` to host A's ``tls`` service; return the context, fd and answer."""
    ctx = Context(rundir_path=rundir_a)
    fd = ctx.connect_service("tls")
    ctx.write(fd, uri.encode())
    return ctx, fd, ctx.read(fd, timeout=10)


# -- inbound -------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool")
def test_openssl_s_client_speaks_to_pongd(host_b, pki: PKI) -> None:
    _, logs, port = host_b
    proc = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-quiet",
            "-verify_return_error",
            "-CAfile",
            str(pki.ca),
            "-servername",
            "localhost",
            "-connect",
            f"127.0.0.1:{port}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"pong\n")  # what a person types; the newline ends the name
        proc.stdin.flush()
        got = _read_for(proc.stdout, 2)
        assert got == b"ok"
        proc.stdin.write(encode(b"hello from openssl"))
        proc.stdin.flush()
        assert _read_for(proc.stdout, 22) == encode(b"hello from openssl")
    finally:
        proc.kill()
        proc.communicate(timeout=5)
    logs.wait_for("-> 'pong'")


def _read_for(stream, n: int, timeout: float = 10.0) -> bytes:
    """Read exactly ``n`` bytes from a pipe, failing after ``timeout``."""
    buf = b""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    while len(buf) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {buf!r} after {timeout} s"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, n - len(buf))
            assert chunk, f"EOF after {buf!r}"
            buf += chunk
    return buf


def test_name_and_first_messages_in_one_record_then_large_messages(host_b, pki: PKI) -> None:
    _, _, port = host_b
    with tls_connect(port, client_ctx(pki)) as s:
        assert s.version() == "TLSv1.3"
        s.sendall(b"pong" + encode(b"first") + encode(b""))
        assert recv_exact(s, 2) == b"ok"
        assert recv_msg(s) == b"first"
        assert recv_msg(s) == b""
        echo(s, os.urandom(300_000))  # many TLS records each way


def test_tls_1_2_client_is_served(host_b, pki: PKI) -> None:
    _, _, port = host_b
    ctx = client_ctx(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    with tls_client(port, ctx) as s:
        assert s.version() == "TLSv1.2"
        echo(s)


def test_same_service_rules_as_tcpd(host_b, pki: PKI) -> None:
    """Protected (the daemons themselves) and unknown services are refused, logged."""
    _, logs, port = host_b
    assert refused(port, client_ctx(pki), b"tls")
    logs.wait_for("service 'tls' is protected")
    assert refused(port, client_ctx(pki), b"nosuch\n")
    logs.wait_for("no local service 'nosuch'")
    with tls_client(port, client_ctx(pki)) as s:
        echo(s)


def test_plain_tcpd_client_is_refused(host_b) -> None:
    _, logs, port = host_b
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"pong" + encode(b"plaintext"))
        answer = read_until_closed(s)
    assert answer[:1] in (b"", b"\x15")  # nothing, or a TLS alert record; never "ok"
    line = logs.wait_for("tls: wrong version number")
    assert "127.0.0.1" in line


def test_stalled_handshakes_time_out_while_others_are_served(host_b, pki: PKI) -> None:
    _, logs, port = host_b
    # One peer stops in the middle of its ClientHello, one after TLS without a name.
    hello = _client_hello(client_ctx(pki))
    mid = socket.create_connection(("127.0.0.1", port), timeout=5)
    mid.sendall(hello[: len(hello) // 2])
    quiet = tls_connect(port, client_ctx(pki))
    started = time.monotonic()
    for _ in range(5):
        with tls_client(port, client_ctx(pki)) as s:
            echo(s)
    assert time.monotonic() - started < 1.0  # served while the others hang
    for s in (mid, quiet):
        read_until_closed(s)
        s.close()
    assert time.monotonic() - started < 4.0
    logs.wait_for("handshake not finished after 1.0 s")


def _client_hello(ctx: ssl.SSLContext) -> bytes:
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


# -- mutual TLS ------------------------------------------------------------------


def test_mtls_allowed_clients_by_cn_and_fingerprint(mtls_b, pki: PKI) -> None:
    _, logs, port = mtls_b
    with tls_client(port, client_ctx(pki, "ca/alice")) as s:
        echo(s)
    fp_alice = certs.fingerprint(pki.pair("ca/alice")[0])
    assert fp_alice in logs.wait_for("client CN=alice")
    with tls_client(port, client_ctx(pki, "ca/bob")) as s:
        echo(s)
    logs.wait_for("client CN=bob")


@pytest.mark.parametrize(
    ("cert", "reason"),
    [
        (None, "peer did not return a certificate"),
        ("expired/alice", "certificate verify failed: certificate has expired"),
        ("other/alice", "certificate verify failed: unable to get local issuer certificate"),
        ("ca/carol", "is not in --allow-client"),
    ],
    ids=["missing", "expired", "wrong-ca", "not-allowed"],
)
def test_mtls_refusals_are_logged(mtls_b, pki: PKI, cert: str | None, reason: str) -> None:
    _, logs, port = mtls_b
    assert refused(port, client_ctx(pki, cert))
    line = logs.wait_for(reason)
    assert "127.0.0.1:" in line
    if cert == "ca/carol":
        assert "CN=carol SHA256:" in line
    with tls_client(port, client_ctx(pki, "ca/alice")) as s:  # others unaffected
        echo(s)


def test_allow_client_in_the_form_the_log_prints(rundir: Path, procs, pki: PKI) -> None:
    """``--allow-client CN=alice``: what the daemon logs for alice lets alice in."""
    procs.pongd(rundir)
    cert, key = pki.pair("ca/localhost")
    _, logs, port = start_tlsd(
        procs, rundir, "--cert", cert, "--key", key, "--client-ca", pki.ca,
        "--allow-client", "CN=alice",
    )  # fmt: skip
    with tls_client(port, client_ctx(pki, "ca/alice")) as s:
        echo(s)
    assert "client CN=alice SHA256:" in logs.wait_for("client CN=alice")
    assert refused(port, client_ctx(pki, "ca/carol"))
    logs.wait_for("client CN=carol SHA256:")


# -- what is offered: Mozilla intermediate (item 19) ------------------------------


def tls12_only(pki: PKI, suite: str) -> ssl.SSLContext:
    ctx = client_ctx(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers(suite)
    return ctx


def handshake_fails(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        with tls_connect(port, ctx):
            return False
    except ssl.SSLError:
        return True


def test_tls12_offers_aead_suites_only(host_b, pki: PKI) -> None:
    _, logs, port = host_b
    for cbc in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA"):
        assert handshake_fails(port, tls12_only(pki, cbc)), cbc
    for aead in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        with tls_client(port, tls12_only(pki, aead)) as s:
            assert s.version() == "TLSv1.2" and s.cipher()[0] == aead
            echo(s)
    logs.wait_for("no shared cipher")


def test_min_tls_1_3_and_ciphers(rundir: Path, procs, pki: PKI) -> None:
    procs.pongd(rundir)
    cert, key = pki.pair("ca/localhost")
    _, _, port = start_tlsd(procs, rundir, "--cert", cert, "--key", key, "--min-tls", "1.3")
    assert handshake_fails(port, tls12_only(pki, "ECDHE-ECDSA-AES128-GCM-SHA256"))
    with tls_client(port, client_ctx(pki)) as s:
        assert s.version() == "TLSv1.3"
        echo(s)
    _, _, port = start_tlsd(
        procs, rundir, "--cert", cert, "--key", key, "--service-name", "tls2",
        "--ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305",
    )  # fmt: skip
    assert handshake_fails(port, tls12_only(pki, "ECDHE-ECDSA-AES128-GCM-SHA256"))
    with tls_client(port, tls12_only(pki, "ECDHE-ECDSA-CHACHA20-POLY1305")) as s:
        echo(s)


# -- revocation (item 20) -----------------------------------------------------------


def revoked_alert(port: int, ctx: ssl.SSLContext) -> str:
    """Connect, name pong, read: the TLS alert the server answered with, or what it sent."""
    try:
        with tls_connect(port, ctx) as s:
            s.sendall(b"pong")
            return repr(s.recv(100))
    except ssl.SSLError as exc:
        return str(exc.reason)


def test_crl_refuses_revoked_clients_and_is_reloaded_on_sighup(
    rundir: Path, procs, tmp_path: Path
) -> None:
    ca = tmp_path / "ca"
    _ipc_cert("ca", "--out", ca)
    _ipc_cert("server", "--ca-dir", ca, "--out", ca, "localhost", "127.0.0.1")
    _ipc_cert("client", "--ca-dir", ca, "--out", ca, "alice")
    _ipc_cert("client", "--ca-dir", ca, "--out", ca, "bob")
    _ipc_cert("crl", "--ca-dir", ca, ca / "alice.pem")
    crl = ca / "crl.pem"
    procs.pongd(rundir)
    proc, logs, port = start_tlsd(
        procs, rundir, "--cert", ca / "localhost.pem", "--key", ca / "localhost.key",
        "--client-ca", ca / "ca.pem", "--crl", crl,
    )  # fmt: skip
    logs.wait_for("1 revoked, next update")
    pki = PKI(tmp_path)  # pki.ca is tmp_path/ca/ca.pem

    assert revoked_alert(port, client_ctx(pki, "ca/alice")) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    line = logs.wait_for("certificate verify failed: certificate revoked")
    assert "127.0.0.1:" in line
    bob_before = tls_client(port, client_ctx(pki, "ca/bob"))
    echo(bob_before)

    _ipc_cert("crl", "--ca-dir", ca, ca / "bob.pem")
    proc.send_signal(signal.SIGHUP)
    logs.wait_for("2 revoked, next update")
    assert revoked_alert(port, client_ctx(pki, "ca/bob")) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    echo(bob_before, b"verified at its handshake: an open connection stays")
    bob_before.close()

    crl.write_text("not a CRL\n")  # a botched update: the old CRL stays in force
    proc.send_signal(signal.SIGHUP)
    line = logs.wait_for("reload failed, keeping the previous certificates")
    assert f"--crl {crl}: not a PEM CRL" in line
    assert revoked_alert(port, client_ctx(pki, "ca/bob")) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    assert revoked_alert(port, client_ctx(pki, "ca/alice")) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    assert proc.poll() is None


# -- reload ------------------------------------------------------------------------


def test_sighup_switches_certificates_for_new_connections_only(
    rundir: Path, procs, pki: PKI, tmp_path: Path
) -> None:
    procs.pongd(rundir)
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pki.pair("ca/localhost")[0], cert)
    shutil.copy(pki.pair("ca/localhost")[1], key)
    proc, logs, port = start_tlsd(procs, rundir, "--cert", cert, "--key", key)
    old_fp = certs.fingerprint(cert)
    new_fp = certs.fingerprint(pki.pair("renewed/localhost")[0])
    assert old_fp != new_fp

    before = tls_client(port, client_ctx(pki))
    assert server_fingerprint(before) == old_fp

    shutil.copy(pki.pair("renewed/localhost")[0], cert)
    shutil.copy(pki.pair("renewed/localhost")[1], key)
    proc.send_signal(signal.SIGHUP)
    logs.wait_for("reloaded certificates")
    echo(before, b"still here")  # the open connection is not dropped
    with tls_client(port, client_ctx(pki)) as after:
        assert server_fingerprint(after) == new_fp
        echo(after)

    cert.write_text("not a certificate\n")  # a botched renewal
    proc.send_signal(signal.SIGHUP)
    logs.wait_for("reload failed, keeping the previous certificates")
    with tls_client(port, client_ctx(pki)) as again:
        assert server_fingerprint(again) == new_fp
        echo(again)
    echo(before, b"and still")
    before.close()
    assert proc.poll() is None


# -- outbound ------------------------------------------------------------------------


def test_outbound_tls_service_directly(host_b, rundir_a: Path, procs, pki: PKI) -> None:
    _, _, port = host_b
    logs_a = start_outbound(procs, rundir_a, "--ca", pki.ca)
    ctx, fd, answer = ask_tls_service(rundir_a, f"tls://127.0.0.1:{port}/pong")
    with ctx:
        assert answer == b"ok"
        for payload in (b"hello", b"", os.urandom(200_000)):
            ctx.write(fd, payload)
            assert ctx.read(fd, timeout=10) == payload
    logs_a.wait_for(f"connected to tls://127.0.0.1:{port}/pong")


def test_two_hosts_through_ipcd(host_b, rundir_a: Path, procs, pki: PKI, monkeypatch) -> None:
    _, _, port = host_b
    if not (Path(__file__).parents[2] / "daemons" / "ipcd.py").exists():
        pytest.skip("ipcd not written yet")
    procs.start(BIN / "ipcd", env={"RUNDIR": str(rundir_a)})
    wait_for(lambda: connectable(rundir_a / "ipc"), what="ipcd")
    start_outbound(procs, rundir_a, "--ca", pki.ca)
    network = f"pong tls://localhost:{port}/pong"  # by name: SNI and a DNS SAN check
    monkeypatch.setenv("RUNDIR", str(rundir_a))
    monkeypatch.setenv("IPC_NETWORK", network)
    with Context() as ctx:
        fd = ctx.connect_service("pong")
        for i in range(20):
            ctx.write(fd, b"x" * i)
            assert ctx.read(fd, timeout=10) == b"x" * i
    assert not (rundir_a / "pong").exists()  # it really went over the network
    env = dict(os.environ, RUNDIR=str(rundir_a), IPC_NETWORK=network)
    out = subprocess.run(
        [BIN / "ipc", "send", "pong", "hi over TLS"], env=env, capture_output=True, timeout=20
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hi over TLS\n"


@pytest.mark.parametrize(
    ("server", "ca", "reason"),
    [
        ("ca/other.example", "ca/ca.pem", "IP address mismatch"),
        ("ca/localhost", "other/ca.pem", "unable to get local issuer certificate"),
    ],
    ids=["wrong-name", "unknown-ca"],
)
def test_outbound_refuses_a_server_that_does_not_match(
    rundir: Path, rundir_a: Path, procs, pki: PKI, server: str, ca: str, reason: str
) -> None:
    procs.pongd(rundir)
    _, _, port = start_tlsd(
        procs, rundir, "--cert", pki.pair(server)[0], "--key", pki.pair(server)[1]
    )
    logs_a = start_outbound(procs, rundir_a, "--ca", pki.path(ca))
    ctx, _fd, answer = ask_tls_service(rundir_a, f"tls://127.0.0.1:{port}/pong")
    ctx.close_all()
    assert answer.startswith(b"error:"), answer
    assert b"certificate verify failed" in answer and reason.encode() in answer
    logs_a.wait_for(reason)


def test_outbound_client_certificate(mtls_b, rundir_a: Path, procs, pki: PKI) -> None:
    _, logs_b, port = mtls_b
    uri = f"tls://127.0.0.1:{port}/pong"
    alice, alice_key = pki.pair("ca/alice")
    start_outbound(
        procs, rundir_a, "--ca", pki.ca, "--client-cert", alice, "--client-key", alice_key
    )
    ctx, fd, answer = ask_tls_service(rundir_a, uri)
    with ctx:
        assert answer == b"ok"
        ctx.write(fd, b"mtls")
        assert ctx.read(fd, timeout=10) == b"mtls"
    logs_b.wait_for("client CN=alice")


def test_outbound_without_client_certificate_is_refused(mtls_b, rundir_a, procs, pki) -> None:
    _, logs_b, port = mtls_b
    start_outbound(procs, rundir_a, "--ca", pki.ca)
    ctx, _fd, answer = ask_tls_service(rundir_a, f"tls://127.0.0.1:{port}/pong")
    ctx.close_all()
    assert answer.startswith(b"error:"), answer
    logs_b.wait_for("peer did not return a certificate")


def test_insecure_skip_verify_is_loud(rundir: Path, rundir_a: Path, procs, pki: PKI) -> None:
    procs.pongd(rundir)
    cert, key = pki.pair("ca/other.example")
    _, _, port = start_tlsd(procs, rundir, "--cert", cert, "--key", key)
    logs_a = start_outbound(procs, rundir_a, "--insecure-skip-verify")
    line = logs_a.wait_for("--insecure-skip-verify: outbound servers are NOT verified")
    assert "WARNING" in line
    ctx, fd, answer = ask_tls_service(rundir_a, f"tls://127.0.0.1:{port}/pong")
    with ctx:
        assert answer == b"ok"
        ctx.write(fd, b"unverified")
        assert ctx.read(fd, timeout=10) == b"unverified"
    logs_a.wait_for(f"NOT verifying the certificate of 127.0.0.1:{port}")


# -- flags ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--cert and --key are required"),
        (["--cert", "x.pem"], "--cert and --key are required"),
        (["--no-listen", "--cert", "x.pem"], "make no sense with --no-listen"),
        (["--cert", "c", "--key", "k", "--allow-client", "alice"], "needs --client-ca"),
        (
            ["--cert", "c", "--key", "k", "--client-ca", "ca", "--allow-client", "SHA256:12"],
            "bad SHA-256 fingerprint",
        ),
        (["--no-listen", "--ca", "ca", "--insecure-skip-verify"], "contradict"),
        (["--no-listen", "--client-cert", "c"], "go together"),
        (
            ["--cert", "c", "--key", "k", "--client-ca", "ca", "--allow-client", "XYZ:host-a"],
            "unknown prefix in 'XYZ:host-a'",
        ),
        (["--cert", "c", "--key", "k", "--crl", "crl.pem"], "--crl needs --client-ca"),
        (["--no-listen", "--min-tls", "1.3"], "make no sense with --no-listen"),
        (["--cert", "c", "--key", "k", "--min-tls", "1.0"], "'1.0' is not one of"),
    ],
)
def test_bad_flags_are_refused_before_starting(args: list[str], message: str) -> None:
    result = CliRunner().invoke(tlsd_main, args)
    assert result.exit_code == 2
    assert message in result.output


def test_unreadable_files_are_reported(tmp_path: Path, pki: PKI) -> None:
    cert, _key = pki.pair("ca/localhost")
    _, wrong_key = pki.pair("ca/alice")
    missing = tmp_path / "missing.key"
    result = CliRunner().invoke(tlsd_main, ["--cert", str(cert), "--key", str(missing)])
    assert result.exit_code == 1
    assert f"--key {missing}: No such file or directory" in result.output
    result = CliRunner().invoke(tlsd_main, ["--cert", str(cert), "--key", str(wrong_key)])
    assert result.exit_code == 1
    assert f"--key {wrong_key} does not match --cert {cert}" in result.output


# -- a failed start names the file and leaves nothing behind (item 14) ---------------


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("key-of-another-cert", "--key {alice_key} does not match --cert {cert}"),
        ("cert-is-a-key", "--cert {key}: not a PEM certificate"),
        ("key-is-a-cert", "--key {cert}: not a PEM private key"),
        ("client-ca-is-a-key", "--client-ca {key}: not PEM CA certificates"),
        ("crl-is-a-cert", "--crl {cert}: not a PEM CRL"),
        ("bad-ciphers", "--ciphers 'NOPE': OpenSSL selects no TLS 1.2 cipher suite"),
    ],
    ids=lambda value: value if " " not in value else "",
)
def test_failed_start_is_one_line_and_leaves_no_socket_or_lock(
    tmp_path: Path, pki: PKI, case: str, expected: str
) -> None:
    cert, key = map(str, pki.pair("ca/localhost"))
    alice_key = str(pki.pair("ca/alice")[1])
    ca = str(pki.ca)
    args = {
        "key-of-another-cert": ["--cert", cert, "--key", alice_key],
        "cert-is-a-key": ["--cert", key, "--key", key],
        "key-is-a-cert": ["--cert", cert, "--key", cert],
        "client-ca-is-a-key": ["--cert", cert, "--key", key, "--client-ca", key],
        "crl-is-a-cert": ["--cert", cert, "--key", key, "--client-ca", ca, "--crl", cert],
        "bad-ciphers": ["--cert", cert, "--key", key, "--ciphers", "NOPE"],
    }[case]
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o770)
    out = subprocess.run(
        [BIN / "ipc-tlsd", "--listen", "127.0.0.1:0", *args],
        env=dict(os.environ, RUNDIR=str(rundir)),
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 1
    message = expected.format(cert=cert, key=key, alice_key=alice_key)
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ipc-tlsd: {message}"), lines
    assert list(rundir.iterdir()) == []  # no tls socket, no tls.lock
