"""server_context: what a server offers (issue 11, item 19), revocation (item 20)
and start-up errors that name the flag and the file (item 14). No sockets:
handshakes are TLSLayer objects pumped against each other."""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from daemons.codecs.tls import TLSLayer
from daemons.engine import certs
from daemons.engine.tlsconfig import (
    ServerPolicy,
    TLSConfigError,
    client_context,
    server_context,
    server_policy_options,
)
from ipc_core.errors import IPCError


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path
    other_ca: Path
    server: tuple[Path, Path]
    alice: tuple[Path, Path]
    bob: tuple[Path, Path]
    crl_none: Path  # nothing revoked
    crl_alice: Path  # alice revoked
    crl_other: Path  # by the other CA
    crl_expired: Path


def _crl(ca: x509.Certificate, key: certs.PrivateKey, serials: list[int], days: int) -> bytes:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - dt.timedelta(days=abs(days) + 1))
        .next_update(now + dt.timedelta(days=days))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = certs.make_ca("Test CA")
    other, other_key = certs.make_ca("Other CA")
    certs.write_cert(d / "ca.pem", ca)
    certs.write_cert(d / "other.pem", other)
    pairs = {
        "server": certs.make_cert(ca, ca_key, "localhost", ["localhost"]),
        "alice": certs.make_cert(ca, ca_key, "alice", usage="client"),
        "bob": certs.make_cert(ca, ca_key, "bob", usage="client"),
    }
    for stem, (cert, key) in pairs.items():
        certs.write_cert(d / f"{stem}.pem", cert)
        certs.write_key(d / f"{stem}.key", key)
    alice_serial = pairs["alice"][0].serial_number
    (d / "none.crl").write_bytes(_crl(ca, ca_key, [], 30))
    (d / "alice.crl").write_bytes(_crl(ca, ca_key, [alice_serial], 30))
    (d / "other.crl").write_bytes(_crl(other, other_key, [], 30))
    (d / "expired.crl").write_bytes(_crl(ca, ca_key, [], -1))
    return PKI(
        d,
        d / "ca.pem",
        d / "other.pem",
        (d / "server.pem", d / "server.key"),
        (d / "alice.pem", d / "alice.key"),
        (d / "bob.pem", d / "bob.key"),
        d / "none.crl",
        d / "alice.crl",
        d / "other.crl",
        d / "expired.crl",
    )


def handshake(sctx: ssl.SSLContext, cctx: ssl.SSLContext) -> tuple[TLSLayer, str]:
    """Pump a handshake (and one byte, so TLS 1.3 client checks are done);
    return the client layer and "" or the first error either side raised."""
    server = TLSLayer(sctx, server_side=True)
    client = TLSLayer(cctx, server_side=False, server_hostname="localhost")
    client.send(b"x")
    try:
        for _ in range(10):
            if data := client.data_to_send():
                server.receive_data(data)
            if data := server.data_to_send():
                client.receive_data(data)
    except IPCError as exc:
        return client, str(exc)
    assert server.handshake_complete and client.handshake_complete
    return client, ""


def tls12_client(pki: PKI, ciphers: str) -> ssl.SSLContext:
    ctx = client_context(ca=pki.ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    return ctx


# -- what is offered (item 19) -------------------------------------------------


def test_tls12_suites_offered_are_aead_with_ecdhe_only(pki: PKI) -> None:
    offered = server_context(*pki.server).get_ciphers()
    tls12 = [c for c in offered if c["protocol"] == "TLSv1.2"]
    assert tls12, offered
    for suite in tls12:
        assert suite["aead"], suite["name"]
        assert suite["kea"] == "kx-ecdhe", suite["name"]
        assert "CBC" not in suite["description"] and "SHA1" not in suite["name"]
    names = {c["name"] for c in tls12}
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in names
    assert "ECDHE-ECDSA-CHACHA20-POLY1305" in names
    assert {c["name"] for c in offered if c["protocol"] == "TLSv1.3"} >= {
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    }


@pytest.mark.parametrize(
    ("suite", "served"),
    [
        ("ECDHE-ECDSA-AES128-SHA256", False),  # CBC: what a TLS scanner flagged
        ("ECDHE-ECDSA-AES256-SHA384", False),
        ("ECDHE-ECDSA-AES128-SHA", False),
        ("ECDHE-ECDSA-AES128-GCM-SHA256", True),
        ("ECDHE-ECDSA-AES256-GCM-SHA384", True),
        ("ECDHE-ECDSA-CHACHA20-POLY1305", True),
    ],
)
def test_a_tls12_client_gets_only_aead_suites(pki: PKI, suite: str, served: bool) -> None:
    client, error = handshake(server_context(*pki.server), tls12_client(pki, suite))
    if served:
        assert error == "" and client.version == "TLSv1.2"
        assert client.cipher is not None and client.cipher[0] == suite
    else:
        assert error  # no shared cipher: a handshake failure, never served


def test_min_tls_1_3_refuses_a_tls12_client(pki: PKI) -> None:
    sctx = server_context(*pki.server, min_tls="1.3")
    _, error = handshake(sctx, tls12_client(pki, "ECDHE-ECDSA-AES128-GCM-SHA256"))
    assert error
    client, error = handshake(sctx, client_context(ca=pki.ca))
    assert error == "" and client.version == "TLSv1.3"


def test_ciphers_narrow_the_tls12_suites(pki: PKI) -> None:
    sctx = server_context(*pki.server, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
    assert handshake(sctx, tls12_client(pki, "ECDHE-ECDSA-AES128-GCM-SHA256"))[1]
    client, error = handshake(sctx, tls12_client(pki, "ECDHE-ECDSA-AES256-GCM-SHA384"))
    assert error == "" and client.cipher is not None
    client, error = handshake(sctx, client_context(ca=pki.ca))
    assert error == "" and client.version == "TLSv1.3"  # TLS 1.3 suites are not affected


# -- revocation (item 20) --------------------------------------------------------


def mtls(pki: PKI, crl: Path) -> ssl.SSLContext:
    return server_context(*pki.server, pki.ca, require_client_cert=True, crl=crl)


def as_client(pki: PKI, who: tuple[Path, Path]) -> ssl.SSLContext:
    return client_context(ca=pki.ca, cert=who[0], key=who[1])


def test_revoked_client_is_refused_others_pass(pki: PKI) -> None:
    sctx = mtls(pki, pki.crl_alice)
    assert sctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    _, error = handshake(sctx, as_client(pki, pki.alice))
    assert error == "tls: certificate verify failed: certificate revoked"
    assert handshake(sctx, as_client(pki, pki.bob))[1] == ""
    assert handshake(mtls(pki, pki.crl_none), as_client(pki, pki.alice))[1] == ""


# -- errors naming the flag and the file (items 14, 19, 20) ------------------------


def _error(**kwargs: object) -> str:
    with pytest.raises(TLSConfigError) as info:
        server_context(**kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_start_errors_name_the_flag_and_the_file(pki: PKI, tmp_path: Path) -> None:
    cert, key = pki.server
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        certs.load_key(key).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    missing = tmp_path / "missing.pem"
    cases = {
        f"--key {pki.alice[1]} does not match --cert {cert}": dict(cert=cert, key=pki.alice[1]),
        f"--cert {key}: not a PEM certificate": dict(cert=key, key=key),
        f"--key {cert}: not a PEM private key": dict(cert=cert, key=cert),
        f"--key {encrypted}: the private key is encrypted": dict(cert=cert, key=encrypted),
        f"--cert {missing}: No such file or directory": dict(cert=missing, key=key),
        f"--key {missing}: No such file or directory": dict(cert=cert, key=missing),
        f"--client-ca {key}: not PEM CA certificates": dict(cert=cert, key=key, client_ca=key),
        "--ciphers 'NOPE': OpenSSL selects no TLS 1.2 cipher suite": dict(
            cert=cert, key=key, ciphers="NOPE"
        ),
        "--ciphers 'ECDHE-RSA-AES128-GCM-SHA256': none of its TLS 1.2 suites works with the "
        f"ECDSA key of --cert {cert}": dict(
            cert=cert, key=key, ciphers="ECDHE-RSA-AES128-GCM-SHA256"
        ),
        "--min-tls '1.1': expected one of 1.2, 1.3": dict(cert=cert, key=key, min_tls="1.1"),
        "--crl needs --client-ca": dict(cert=cert, key=key, crl=pki.crl_none),
        f"--crl {pki.alice[0]}: not a PEM CRL": dict(
            cert=cert, key=key, client_ca=pki.ca, crl=pki.alice[0]
        ),
        f"--crl {pki.crl_other} has no CRL of CN=Test CA": dict(
            cert=cert, key=key, client_ca=pki.ca, crl=pki.crl_other
        ),
        f"--crl {pki.crl_expired}: the CRL of CN=Test CA expired on": dict(
            cert=cert, key=key, client_ca=pki.ca, crl=pki.crl_expired
        ),
    }
    for expected, kwargs in cases.items():
        message = _error(**kwargs)
        assert message.startswith(expected), (expected, message)
        assert "\n" not in message


def test_a_crl_for_one_of_two_client_cas_is_refused(pki: PKI, tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(pki.ca.read_bytes() + pki.other_ca.read_bytes())
    message = _error(cert=pki.server[0], key=pki.server[1], client_ca=both, crl=pki.crl_none)
    assert "has no CRL of CN=Other CA" in message
    crls = tmp_path / "both.crl"
    crls.write_bytes(pki.crl_none.read_bytes() + pki.crl_other.read_bytes())
    server_context(*pki.server, both, require_client_cert=True, crl=crls)


def test_a_crl_with_a_forged_signature_is_refused(pki: PKI, tmp_path: Path) -> None:
    """Issuer name of our CA, signed by another key."""
    ca = certs.load_cert(pki.ca)
    _, stranger = certs.make_ca("Test CA")
    forged = tmp_path / "forged.crl"
    forged.write_bytes(_crl(ca, stranger, [], 30))
    message = _error(cert=pki.server[0], key=pki.server[1], client_ca=pki.ca, crl=forged)
    assert "the CRL of CN=Test CA is not signed by it" in message


def test_client_context_errors_name_the_flag(pki: PKI) -> None:
    with pytest.raises(TLSConfigError, match=r"^--client-key .* does not match --client-cert"):
        client_context(ca=pki.ca, cert=pki.alice[0], key=pki.bob[1])
    with pytest.raises(TLSConfigError, match=r"^--ca .*: not PEM CA certificates"):
        client_context(ca=pki.alice[1])


# -- the reusable click options ------------------------------------------------------


def test_server_policy_options(pki: PKI) -> None:
    seen: list[ServerPolicy] = []

    @click.command()
    @server_policy_options
    def command(tls_policy: ServerPolicy) -> None:
        seen.append(tls_policy)

    runner = CliRunner()
    assert runner.invoke(command, []).exit_code == 0
    assert seen[-1] == ServerPolicy()
    args = ["--min-tls", "1.3", "--ciphers", "ECDHE+AESGCM", "--crl", str(pki.crl_none)]
    assert runner.invoke(command, args).exit_code == 0
    assert seen[-1] == ServerPolicy("1.3", "ECDHE+AESGCM", pki.crl_none)
    assert runner.invoke(command, ["--min-tls", "1.0"]).exit_code == 2
    assert seen[-1].usage_error(None) == "--crl needs --client-ca (it revokes client certificates)"
    ctx = seen[-1].context(*pki.server, pki.ca)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
