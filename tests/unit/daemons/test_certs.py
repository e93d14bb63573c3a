"""Tests for daemons.engine.certs and `ipc cert`: files, modes, TLS handshakes, identities."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from daemons.engine import certs
from daemons.engine.certs import (
    CertIdentity,
    allow_pattern_error,
    describe,
    fingerprint,
    identity,
    is_expired,
    load_ca,
    load_cert,
    make_ca,
    make_cert,
    matches_allow,
    normalize_fingerprint,
    write_cert,
    write_key,
)
from daemons.ipc_cert import cert as cert_cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _run(*args: str) -> str:
    result = CliRunner().invoke(cert_cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server cert for localhost/127.0.0.1/::1, a good and an expired client,
    all made through the CLI."""
    d = tmp_path_factory.mktemp("pki")
    _run("ca", "--out", str(d / "ca"), "--name", "Test CA")
    _run(
        "server",
        "--ca-dir",
        str(d / "ca"),
        "--out",
        str(d / "srv"),
        "localhost",
        "127.0.0.1",
        "::1",
    )
    _run(
        "client",
        "--ca-dir",
        str(d / "ca"),
        "--out",
        str(d / "cli"),
        "alice",
        "--san",
        "alice.example",
    )
    _run("client", "--ca-dir", str(d / "ca"), "--out", str(d / "cli"), "--days", "-1", "old")
    return d


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def test_files_and_modes(pki: Path) -> None:
    expected = {
        "ca/ca.pem": 0o644,
        "ca/ca.key": 0o600,
        "srv/localhost.pem": 0o644,
        "srv/localhost.key": 0o600,
        "cli/alice.pem": 0o644,
        "cli/alice.key": 0o600,
        "cli/old.pem": 0o644,
        "cli/old.key": 0o600,
    }
    for name, mode in expected.items():
        assert _mode(pki / name) == mode, name
    assert _mode(pki / "srv") == 0o700
    assert sorted(p.name for p in (pki / "srv").iterdir()) == ["localhost.key", "localhost.pem"]


def test_modes_ignore_umask(tmp_path: Path) -> None:
    ca, key = make_ca()
    old = os.umask(0o077)
    try:
        write_cert(tmp_path / "c.pem", ca)
        write_key(tmp_path / "c.key", key)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "c.pem") == 0o644
    assert _mode(tmp_path / "c.key") == 0o600


def test_refuses_to_overwrite(pki: Path) -> None:
    before = (pki / "ca" / "ca.key").read_bytes()
    result = CliRunner().invoke(cert_cli, ["ca", "--out", str(pki / "ca")])
    assert result.exit_code == 1
    assert "refusing to overwrite" in result.output and "--force" in result.output
    assert (pki / "ca" / "ca.key").read_bytes() == before


def test_refuses_to_follow_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "k.key").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_key(tmp_path / "k.key", certs.generate_key())
    assert victim.read_text() == "precious"


def test_no_half_written_pair(tmp_path: Path) -> None:
    """If NAME.pem exists, NAME.key must not be created either."""
    _run("ca", "--out", str(tmp_path))
    (tmp_path / "srv.pem").write_text("existing")
    result = CliRunner().invoke(
        cert_cli, ["server", "--ca-dir", str(tmp_path), "--out", str(tmp_path), "srv"]
    )
    assert result.exit_code == 1
    assert not (tmp_path / "srv.key").exists()


def test_force_overwrites(tmp_path: Path) -> None:
    _run("ca", "--out", str(tmp_path))
    first = fingerprint(tmp_path / "ca.pem")
    _run("ca", "--out", str(tmp_path), "--force")
    assert fingerprint(tmp_path / "ca.pem") != first
    assert _mode(tmp_path / "ca.key") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem"]  # no temp left


def test_cli_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cert_cli, ["server", "--ca-dir", str(tmp_path), "x"])
    assert result.exit_code == 1 and "ca.pem" in result.output
    _run("ca", "--out", str(tmp_path))
    result = runner.invoke(cert_cli, ["server", "--ca-dir", str(tmp_path), "a/b"])
    assert result.exit_code == 2 and "file name" in result.output
    result = runner.invoke(cert_cli, ["server", "--ca-dir", str(tmp_path)])
    assert result.exit_code == 2


# --------------------------------------------------------------------------
# Certificate contents
# --------------------------------------------------------------------------


def test_contents(pki: Path) -> None:
    ca_cert, ca_key = load_ca(pki / "ca")
    assert isinstance(ca_key.curve, ec.SECP256R1)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    srv = load_cert(pki / "srv" / "localhost.pem")
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert srv.issuer == ca_cert.subject
    cli = load_cert(pki / "cli" / "alice.pem")
    eku = cli.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_identity(pki: Path) -> None:
    srv = identity(pki / "srv" / "localhost.pem")
    assert srv.cn == "localhost"
    assert srv.sans == ("DNS:localhost", "IP:127.0.0.1", "IP:::1")
    assert srv.fingerprint == fingerprint(pki / "srv" / "localhost.pem")
    assert srv.fingerprint.startswith("SHA256:") and len(srv.fingerprint) == 7 + 95
    der = load_cert(pki / "cli" / "alice.pem").public_bytes(serialization.Encoding.DER)
    assert identity(der) == identity(pki / "cli" / "alice.pem")
    assert identity(der).sans == ("DNS:alice.example",)


def test_expiry(pki: Path) -> None:
    assert not is_expired(pki / "cli" / "alice.pem")
    assert is_expired(pki / "cli" / "old.pem")
    old = load_cert(pki / "cli" / "old.pem")
    assert old.not_valid_after_utc < dt.datetime.now(dt.UTC)
    ca, key = make_ca()
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    future, _ = make_cert(
        ca, key, "later", usage="client", not_before=start, not_after=start + dt.timedelta(days=1)
    )
    assert is_expired(future)
    assert not is_expired(future, now=start + dt.timedelta(hours=1))
    with pytest.raises(ValueError, match="not before"):
        make_cert(ca, key, "x", usage="client", not_before=start, not_after=start)


def test_make_cert_validation() -> None:
    ca, key = make_ca()
    with pytest.raises(ValueError, match="at least one"):
        make_cert(ca, key, "srv")
    with pytest.raises(ValueError, match="not a host name"):
        make_cert(ca, key, "srv", ["bad name"])
    with pytest.raises(ValueError, match="usage"):
        make_cert(ca, key, "srv", ["srv"], usage="both")  # type: ignore[arg-type]
    cert, _ = make_cert(ca, key, "w", ["*.example.com", "bücher.example"])
    assert identity(cert).sans == ("DNS:*.example.com", "DNS:xn--bcher-kva.example")


def test_describe(pki: Path) -> None:
    text = describe(pki / "cli" / "old.pem")
    lines = dict(line.split(":", 1) for line in text.splitlines())
    assert lines["subject"].strip() == "CN=old"
    assert lines["issuer"].strip() == "CN=Test CA"
    assert lines["expired"].strip() == "yes"
    assert lines["CA"].strip() == "no"
    assert set(lines) == {
        "subject",
        "issuer",
        "SANs",
        "not before",
        "not after",
        "serial",
        "fingerprint",
        "CA",
        "expired",
    }
    out = _run("inspect", str(pki / "srv" / "localhost.pem"))
    assert "DNS:localhost, IP:127.0.0.1, IP:::1" in out
    assert "expired:     no" in out


def test_fingerprint_cli(pki: Path) -> None:
    out = _run("fingerprint", str(pki / "ca" / "ca.pem"))
    assert out == fingerprint(pki / "ca" / "ca.pem") + "\n"
    result = CliRunner().invoke(cert_cli, ["fingerprint", str(pki / "ca" / "ca.key")])
    assert result.exit_code == 1


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl CLI not installed")
def test_fingerprint_matches_openssl(pki: Path) -> None:
    path = pki / "srv" / "localhost.pem"
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    label, _, hexpart = out.partition("=")
    assert label.lower() == "sha256 fingerprint"
    assert fingerprint(path) == "SHA256:" + hexpart


# --------------------------------------------------------------------------
# Fingerprints and --allow-client matching
# --------------------------------------------------------------------------


def test_normalize_fingerprint() -> None:
    hexes = "ab" * 32
    colon = ":".join(["AB"] * 32)
    for text in (
        hexes,
        hexes.upper(),
        colon,
        "SHA256:" + colon,
        "sha256:" + hexes,
        " " + colon + "\n",
    ):
        assert normalize_fingerprint(text) == hexes
    for text in ("ab" * 31, "zz" * 32, "SHA1:" + colon, ""):
        assert normalize_fingerprint(text) is None


IDENT = CertIdentity(
    cn="alice",
    sans=("DNS:Alice.Example", "IP:2001:db8::1", "IP:192.0.2.1"),
    fingerprint="SHA256:" + ":".join(["0F"] * 32),
)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("alice", True),
        ("CN:alice", True),
        ("Alice", False),
        ("bob", False),
        ("DNS:alice.example", True),
        ("dns:ALICE.EXAMPLE.", True),
        ("DNS:alice", False),
        ("IP:192.0.2.1", True),
        ("IP:2001:0db8:0:0::1", True),
        ("IP:192.0.2.2", False),
        ("IP:nonsense", False),
        ("0f" * 32, True),
        (":".join(["0f"] * 32), True),
        ("SHA256:" + ":".join(["0F"] * 32), True),
        ("SHA256:" + "0f" * 31, False),
        ("1f" * 32, False),
        ("DNS:192.0.2.1", False),
        ("CN=alice", True),  # the form the daemon logs
        ("cn=alice", True),
        ("CN=bob", False),
        ("DNS=alice.example", True),
        ("URI:alice", False),
        ("foo:alice", False),
    ],
)
def test_matches_allow(pattern: str, expected: bool) -> None:
    assert matches_allow(IDENT, [pattern]) is expected


def test_matches_allow_lists() -> None:
    assert not matches_allow(IDENT, [])
    assert matches_allow(IDENT, ["bob", "IP:192.0.2.1"])
    nocn = CertIdentity(cn=None, sans=(), fingerprint=IDENT.fingerprint)
    assert not matches_allow(nocn, ["alice", "CN:"])


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [
        ("alice", True),
        ("CN:alice", True),
        ("DNS:a.b", True),
        ("IP:::1", True),
        ("IP:x", False),
        ("DNS:", False),
        ("", False),
        ("SHA256:abc", False),
        ("SHA256:" + "ab" * 32, True),
        ("ab" * 32, True),
        ("CN=host-a", True),
        ("CN:a:b", True),
        ("CN=", False),
        ("XYZ:foo", False),
        ("URI:https://x", False),
        ("host=a", False),
        ("email:a@example.org", False),
    ],
)
def test_allow_pattern_error(pattern: str, ok: bool) -> None:
    assert (allow_pattern_error(pattern) is None) is ok


def test_unknown_prefix_is_named() -> None:
    reason = allow_pattern_error("XYZ:foo")
    assert reason is not None and "unknown prefix" in reason and "CN:" in reason


# --------------------------------------------------------------------------
# No traceback from the CLI: one line, exit status 1 (issue 11, item 13)
# --------------------------------------------------------------------------


def _fails_cleanly(*args: str) -> str:
    """Run ``ipc cert ARGS`` through click; it must exit 1 with one ``Error:`` line."""
    result = CliRunner().invoke(cert_cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_encrypted_ca_key_is_one_line(tmp_path: Path) -> None:
    _run("ca", "--out", str(tmp_path))
    key = certs.load_key(tmp_path / "ca.key")
    (tmp_path / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    out = str(tmp_path / "o")
    for command in (["client", "--out", out, "bob"], ["server", "--out", out, "host"], ["crl"]):
        line = _fails_cleanly(command[0], "--ca-dir", str(tmp_path), *command[1:])
        assert "ca.key: the private key is encrypted" in line


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (os.urandom(64) + b"\x00", "not a certificate (neither PEM nor DER)"),
        (b"hello\n", "not a certificate (neither PEM nor DER)"),
        (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "it holds: PRIVATE KEY",
        ),
        (
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "damaged PEM certificate",
        ),
    ],
    ids=["random", "text", "key", "damaged"],
)
def test_inspect_and_fingerprint_of_a_non_certificate(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "file.pem"
    path.write_bytes(content)
    for command in ("inspect", "fingerprint"):
        line = _fails_cleanly(command, str(path))
        assert line == f"Error: {path}: {reason}" or (reason in line and str(path) in line)
        assert "ParseError" not in line and "asn1" not in line.lower()


def test_days_out_of_range_is_one_line(tmp_path: Path) -> None:
    _run("ca", "--out", str(tmp_path))
    line = _fails_cleanly(
        "client", "--ca-dir", str(tmp_path), "--out", str(tmp_path), "--days", "99999999", "x"
    )
    assert "out of range" in line


def test_ipc_cert_subprocess_prints_no_traceback(tmp_path: Path) -> None:
    """The installed ``ipc`` command, as a user runs it."""
    ipc = shutil.which("ipc", path=str(Path(__file__).parents[3] / ".venv" / "bin"))
    if ipc is None:
        pytest.skip("ipc is not installed in .venv")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x30\x03\x02\x01")  # DER-looking garbage
    out = subprocess.run([ipc, "cert", "inspect", str(junk)], capture_output=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.decode().strip() == f"Error: {junk}: not a certificate (neither PEM nor DER)"


# --------------------------------------------------------------------------
# Revocation lists: ipc cert crl
# --------------------------------------------------------------------------


def test_crl_make_extend_and_renew(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    _run("ca", "--out", str(ca))
    _run("client", "--ca-dir", str(ca), "--out", str(tmp_path), "alice")
    _run("client", "--ca-dir", str(ca), "--out", str(tmp_path), "bob")
    alice = load_cert(tmp_path / "alice.pem")
    bob = load_cert(tmp_path / "bob.pem")
    ca_cert, ca_key = load_ca(ca)

    out = _run("crl", "--ca-dir", str(ca))
    assert "0 revoked" in out and _mode(ca / "crl.pem") == 0o644
    out = _run("crl", "--ca-dir", str(ca), str(tmp_path / "alice.pem"))
    assert f"revoked serial {alice.serial_number:x} (CN=alice)" in out
    first = certs.load_crl(ca / "crl.pem")
    assert [r.serial_number for r in first] == [alice.serial_number]
    out = _run(
        "crl",
        "--ca-dir",
        str(ca),
        "--days",
        "7",
        f"{bob.serial_number:x}",
        str(tmp_path / "alice.pem"),
    )
    assert "already revoked" in out and "2 revoked" in out
    crl = certs.load_crl(ca / "crl.pem")
    assert {r.serial_number for r in crl} == {alice.serial_number, bob.serial_number}
    assert crl.is_signature_valid(ca_key.public_key())
    assert crl.issuer == ca_cert.subject
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == 3
    assert first.get_revoked_certificate_by_serial_number(
        alice.serial_number
    ).revocation_date_utc == (
        crl.get_revoked_certificate_by_serial_number(alice.serial_number).revocation_date_utc
    )
    assert crl.next_update_utc is not None
    left = crl.next_update_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=6) < left <= dt.timedelta(days=7)


def test_crl_refuses_a_certificate_of_another_ca(tmp_path: Path) -> None:
    _run("ca", "--out", str(tmp_path / "ca"))
    _run("ca", "--out", str(tmp_path / "other"))
    _run("client", "--ca-dir", str(tmp_path / "other"), "--out", str(tmp_path), "eve")
    line = _fails_cleanly("crl", "--ca-dir", str(tmp_path / "ca"), str(tmp_path / "eve.pem"))
    assert "eve.pem: not issued by this CA" in line
    _run("crl", "--ca-dir", str(tmp_path / "other"), "--out", str(tmp_path / "other.crl"))
    line = _fails_cleanly(
        "crl", "--ca-dir", str(tmp_path / "ca"), "--out", str(tmp_path / "other.crl")
    )
    assert "another CA" in line
    assert "neither a certificate file nor a hex serial" in _fails_cleanly(
        "crl", "--ca-dir", str(tmp_path / "ca"), "missing.pem"
    )
    assert "--days >= 1" in _fails_cleanly("crl", "--ca-dir", str(tmp_path / "ca"), "--days", "0")


# --------------------------------------------------------------------------
# Real TLS handshakes over loopback
# --------------------------------------------------------------------------


def _handshake(
    pki: Path, server_host: str, *, client: str | None = None, family: int = socket.AF_INET
) -> tuple[Exception | None, Exception | None, bytes | None]:
    """Run a TLS server in a thread; return (server error, client error, client cert DER)."""
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(pki / "srv" / "localhost.pem", pki / "srv" / "localhost.key")
    srv_ctx.load_verify_locations(cafile=pki / "ca" / "ca.pem")
    srv_ctx.verify_mode = ssl.CERT_REQUIRED if client else ssl.CERT_NONE
    cli_ctx = ssl.create_default_context(cafile=str(pki / "ca" / "ca.pem"))
    if client:
        cli_ctx.load_cert_chain(pki / "cli" / f"{client}.pem", pki / "cli" / f"{client}.key")
    loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    listener = socket.create_server((loopback, 0), family=family)
    listener.settimeout(10)
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with srv_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(10)
                result["der"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"hi")
                tls.recv(1)
        except Exception as exc:  # reported to the test
            result["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    client_error: Exception | None = None
    try:
        with (
            socket.create_connection(listener.getsockname()[:2], timeout=10) as raw,
            cli_ctx.wrap_socket(raw, server_hostname=server_host) as tls,
        ):
            assert tls.recv(2) == b"hi"  # TLS 1.3 reports a client-cert refusal here
    except (ssl.SSLError, OSError) as exc:
        client_error = exc
    thread.join(timeout=15)
    listener.close()
    return result.get("error"), client_error, result.get("der")  # type: ignore[return-value]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tls_server_verified_by_ca(pki: Path, host: str) -> None:
    server_error, client_error, _ = _handshake(pki, host)
    assert server_error is None and client_error is None


def test_tls_ipv6_san(pki: Path) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    server_error, client_error, _ = _handshake(pki, "::1", family=socket.AF_INET6)
    assert server_error is None and client_error is None


def test_tls_wrong_hostname_fails(pki: Path) -> None:
    _, client_error, _ = _handshake(pki, "example.com")
    assert isinstance(client_error, ssl.SSLCertVerificationError)


def test_mutual_tls_and_identity(pki: Path) -> None:
    server_error, client_error, der = _handshake(pki, "localhost", client="alice")
    assert server_error is None and client_error is None
    assert der is not None
    peer = identity(der)
    assert peer.cn == "alice"
    assert matches_allow(peer, ["alice"])
    assert matches_allow(peer, [fingerprint(pki / "cli" / "alice.pem")])
    assert not matches_allow(peer, ["old", "DNS:localhost"])


def test_expired_client_refused(pki: Path) -> None:
    server_error, client_error, der = _handshake(pki, "localhost", client="old")
    assert isinstance(server_error, ssl.SSLError)
    assert "expired" in str(server_error)
    assert client_error is not None
    assert der is None


def test_client_cert_cannot_serve(pki: Path, tmp_path: Path) -> None:
    """The EKU matters: a client certificate is refused as a server certificate."""
    ca_cert, ca_key = load_ca(pki / "ca")
    cert, key = make_cert(ca_cert, ca_key, "localhost", ["localhost"], usage="client")
    write_cert(tmp_path / "localhost.pem", cert)
    write_key(tmp_path / "localhost.key", key)
    fake = tmp_path / "pki"
    (fake / "srv").mkdir(parents=True)
    (fake / "ca").symlink_to(pki / "ca")
    for name in ("localhost.pem", "localhost.key"):
        (fake / "srv" / name).symlink_to(tmp_path / name)
    _, client_error, _ = _handshake(fake, "localhost")
    assert isinstance(client_error, ssl.SSLCertVerificationError)
