"""TLS configuration for the daemons: server and client contexts, the server
policy flags (``--min-tls``, ``--ciphers``, ``--crl``), and start-up errors
that name the flag and the file (:class:`TLSConfigError`).
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .certs import allow_pattern_error

__all__ = [
    "INTERMEDIATE_CIPHERS",
    "MIN_TLS_VERSIONS",
    "ServerPolicy",
    "ServerTLS",
    "TLSConfigError",
    "client_context",
    "server_context",
    "server_policy_options",
    "server_tls_options",
]

StrPath = str | os.PathLike[str]
F = TypeVar("F", bound=Callable[..., Any])

# --------------------------------------------------------------------------
# Contexts: what a server offers, and start-up errors that name the file
# --------------------------------------------------------------------------

#: The TLS 1.2 suites a server offers by default: the ECDHE suites of
#: Mozilla's "intermediate" profile (AEAD only: AES-GCM and ChaCha20-Poly1305,
#: forward secrecy, no CBC). Its DHE suites are left out: the ssl module sets
#: no DH parameters, so OpenSSL could never pick them. TLS 1.3 suites are
#: OpenSSL's (all AEAD) and not affected by ``--ciphers``.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

#: ``--min-tls`` values.
MIN_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(ValueError):
    """A certificate, key, CA or CRL file, or a TLS setting, that cannot be used.

    The message is one line naming the flag and the file (``--key k.pem does
    not match --cert c.pem``): OpenSSL's own errors say neither, and an
    operator reading a failed start or reload needs both.
    """


def server_context(
    cert: StrPath,
    key: StrPath | None,
    client_ca: StrPath | None = None,
    *,
    require_client_cert: bool = False,
    min_tls: str = "1.2",
    ciphers: str | None = None,
    crl: StrPath | None = None,
) -> ssl.SSLContext:
    """Build a server context: TLS 1.2 (AEAD suites only) and TLS 1.3.

    ``client_ca`` makes the server ask for (and verify) a client certificate;
    ``require_client_cert`` turns the request into a requirement (mTLS).
    ``min_tls`` (``"1.2"`` or ``"1.3"``) and ``ciphers`` (OpenSSL syntax, TLS
    1.2 suites; default :data:`INTERMEDIATE_CIPHERS`) tighten what is offered.
    ``crl`` (PEM, one CRL per CA of ``client_ca``) refuses revoked client
    certificates during the handshake. Anything unusable raises
    :class:`TLSConfigError` naming the flag and file.

    We start from ``SSLContext(PROTOCOL_TLS_SERVER)`` rather than
    ``create_default_context(CLIENT_AUTH)`` on purpose: the latter loads the
    system CA store as trust anchors for *client* certificates, so any
    certificate from a public CA would pass our mTLS check.
    """
    if require_client_cert and client_ca is None:
        raise ValueError("require_client_cert needs client_ca to verify against")
    if crl is not None and client_ca is None:
        raise TLSConfigError("--crl needs --client-ca (it revokes client certificates)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _min_version(min_tls)
    # Client-initiated renegotiation (TLS 1.2) only serves CPU-exhaustion attacks.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    _set_ciphers(ctx, ciphers)
    _load_chain(ctx, cert, key, "--cert", "--key")
    if ciphers is not None and ctx.minimum_version < ssl.TLSVersion.TLSv1_3:
        _check_suites_fit_key(ctx, cert, ciphers)
    if client_ca is not None:
        _load_ca(ctx, client_ca, "--client-ca")
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    if crl is not None and client_ca is not None:
        _load_crl(ctx, crl, client_ca)
    return ctx


def client_context(
    *,
    ca: StrPath | None = None,
    insecure: bool = False,
    cert: StrPath | None = None,
    key: StrPath | None = None,
) -> ssl.SSLContext:
    """Build a client context: TLS >= 1.2, verification and hostname checks on.

    ``ca`` replaces the system trust store (a private CA); ``insecure``
    disables every check (for tests against self-signed servers only);
    ``cert``/``key`` present a client certificate for mTLS. Files that do not
    load raise :class:`TLSConfigError` naming ``--ca``, ``--client-cert`` or
    ``--client-key``.
    """
    if key is not None and cert is None:
        raise ValueError("a client key needs a client certificate")
    if ca is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # what create_default_context(cafile=) does
        _load_ca(ctx, ca, "--ca")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        _load_chain(ctx, cert, key, "--client-cert", "--client-key")
    return ctx


def _min_version(min_tls: str) -> ssl.TLSVersion:
    try:
        return MIN_TLS_VERSIONS[min_tls]
    except KeyError:
        choices = ", ".join(MIN_TLS_VERSIONS)
        raise TLSConfigError(f"--min-tls {min_tls!r}: expected one of {choices}") from None


def _set_ciphers(ctx: ssl.SSLContext, ciphers: str | None) -> None:
    spec = INTERMEDIATE_CIPHERS if ciphers is None else ciphers
    try:
        ctx.set_ciphers(spec)
    except ssl.SSLError:
        raise TLSConfigError(
            f"--ciphers {spec!r}: OpenSSL selects no TLS 1.2 cipher suite from it "
            "(OpenSSL syntax, e.g. ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE+CHACHA20)"
        ) from None


def _check_suites_fit_key(ctx: ssl.SSLContext, cert: StrPath, ciphers: str) -> None:
    """Refuse ``--ciphers`` whose TLS 1.2 suites all need another key type
    (RSA suites with an EC certificate): no TLS 1.2 client could connect."""
    public = _read_pem_certs(cert)[0].public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        kind = "ecdsa"
    elif isinstance(public, rsa.RSAPublicKey):
        kind = "rsa"
    else:
        return  # Ed25519 & co: leave it to OpenSSL
    auths = {c.get("auth") for c in ctx.get_ciphers() if c.get("protocol") == "TLSv1.2"}
    if f"auth-{kind}" not in auths and "auth-any" not in auths:
        raise TLSConfigError(
            f"--ciphers {ciphers!r}: none of its TLS 1.2 suites works with the "
            f"{kind.upper()} key of --cert {cert}"
        )


def _readable(flag: str, path: StrPath) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSConfigError(f"{flag} {path}: {exc.strerror or exc}") from None


def _load_chain(
    ctx: ssl.SSLContext, cert: StrPath, key: StrPath | None, cert_flag: str, key_flag: str
) -> None:
    """``load_cert_chain``, with a reason that names the file at fault."""
    _readable(cert_flag, cert)
    if key is not None:
        _readable(key_flag, key)
    try:
        # A password (empty) keeps OpenSSL from prompting on the terminal for
        # an encrypted key; an unencrypted one ignores it.
        ctx.load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as exc:
        raise TLSConfigError(_chain_problem(cert, key, cert_flag, key_flag, exc)) from None


def _chain_problem(
    cert: StrPath, key: StrPath | None, cert_flag: str, key_flag: str, exc: ssl.SSLError
) -> str:
    """Why OpenSSL refused a certificate and key, in the operator's terms."""
    try:
        leaf = _read_pem_certs(cert)[0]
    except ValueError:
        return f"{cert_flag} {cert}: not a PEM certificate"
    key_path, flag = (key, key_flag) if key is not None else (cert, cert_flag)
    try:
        private = serialization.load_pem_private_key(_readable(flag, key_path), password=None)
    except TypeError:
        return f"{flag} {key_path}: the private key is encrypted; an unencrypted key is needed"
    except (ValueError, UnsupportedAlgorithm):
        return f"{flag} {key_path}: not a PEM private key"
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        return (
            f"{flag} {key_path} does not match {cert_flag} {cert} (the key of another certificate)"
        )
    return f"{cert_flag} {cert}, {flag} {key_path}: {_reason(exc)}"


def _read_pem_certs(path: StrPath) -> list[x509.Certificate]:
    """Every certificate of a PEM file; ValueError if there is none."""
    data = _readable("--cert", path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path}: no PEM certificate") from None


def _load_ca(ctx: ssl.SSLContext, path: StrPath, flag: str) -> None:
    _readable(flag, path)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{flag} {path}: not PEM CA certificates ({_reason(exc)})") from None


def _load_crl(ctx: ssl.SSLContext, path: StrPath, client_ca: StrPath) -> None:
    """Load the CRLs and turn on revocation checks of client certificates.

    Checked first, so the operator hears it at start (or reload) rather than
    from every client: OpenSSL refuses *all* clients of a CA whose CRL is
    missing, badly signed or past its next update.
    """
    crls = _read_pem_crls(path)
    cas = x509.load_pem_x509_certificates(_readable("--client-ca", client_ca))
    now = _dt.datetime.now(_dt.UTC)
    for ca in cas:
        crl = next((c for c in crls if c.issuer == ca.subject), None)
        if crl is None:
            raise TLSConfigError(
                f"--crl {path} has no CRL of {ca.subject.rfc4514_string()} (a CA of "
                f"--client-ca {client_ca}): every client it signed would be refused"
            )
        if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            raise TLSConfigError(
                f"--crl {path}: the CRL of {ca.subject.rfc4514_string()} is not signed by it"
            )
        if crl.next_update_utc is not None and crl.next_update_utc < now:
            raise TLSConfigError(
                f"--crl {path}: the CRL of {ca.subject.rfc4514_string()} expired on "
                f"{crl.next_update_utc:%Y-%m-%d}; every client would be refused "
                "(renew it: ipc cert crl)"
            )
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"--crl {path}: {_reason(exc)}") from None
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _read_pem_crls(path: StrPath) -> list[x509.CertificateRevocationList]:
    data = _readable("--crl", path)
    marker = b"-----BEGIN X509 CRL-----"
    blocks = [marker + part for part in data.split(marker)[1:]]
    try:
        crls = [x509.load_pem_x509_crl(block) for block in blocks]
    except ValueError:
        crls = []
    if not crls:
        raise TLSConfigError(
            f"--crl {path}: not a PEM CRL (a DER one converts with "
            "openssl crl -inform DER -in FILE -out FILE.pem)"
        )
    return crls


def _reason(exc: ssl.SSLError) -> str:
    return (exc.reason or str(exc)).lower().replace("_", " ")


@dataclass(frozen=True)
class ServerPolicy:
    """What a TLS server offers and whom it refuses beyond its certificate:
    ``--min-tls``, ``--ciphers``, ``--crl`` (see :func:`server_policy_options`)."""

    min_tls: str = "1.2"
    ciphers: str | None = None
    crl: Path | None = None

    def context(
        self, cert: StrPath, key: StrPath | None, client_ca: StrPath | None = None
    ) -> ssl.SSLContext:
        """:func:`server_context` with this policy; mTLS required with a client CA."""
        return server_context(
            cert,
            key,
            client_ca,
            require_client_cert=client_ca is not None,
            min_tls=self.min_tls,
            ciphers=self.ciphers,
            crl=self.crl,
        )

    def usage_error(self, client_ca: StrPath | None) -> str | None:
        """Why these flags contradict the others (for ``click.UsageError``), or None."""
        if self.crl is not None and client_ca is None:
            return "--crl needs --client-ca (it revokes client certificates)"
        return None


_POLICY_NAMES = ("min_tls", "ciphers", "crl")


def server_policy_options(func: F) -> F:
    """Add ``--min-tls``, ``--ciphers`` and ``--crl``; pass them as
    ``tls_policy: ServerPolicy``. Files are loaded (and checked) by
    :meth:`ServerPolicy.context`, so a reload re-reads the CRL."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in _POLICY_NAMES}
        values["min_tls"] = values["min_tls"] or "1.2"
        return func(*args, tls_policy=ServerPolicy(**values), **kwargs)

    options = [
        click.option(
            "--min-tls",
            type=click.Choice(list(MIN_TLS_VERSIONS)),
            default=None,
            help="Oldest TLS version served. Default: 1.2.",
        ),
        click.option(
            "--ciphers",
            default=None,
            metavar="LIST",
            help="TLS 1.2 cipher suites, OpenSSL syntax. Default: Mozilla "
            "intermediate (ECDHE with AES-GCM or ChaCha20-Poly1305).",
        ),
        click.option(
            "--crl",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            metavar="FILE",
            help="Refuse client certificates revoked in this PEM CRL (needs "
            "--client-ca; re-read on SIGHUP).",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class ServerTLS:
    """A TLS server's flags, declared once for ipc-tlsd and ipc-websocketd
    (wss): ``--cert``, ``--key``, ``--client-ca``, ``--allow-client`` and the
    :class:`ServerPolicy` (see :func:`server_tls_options`)."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    allow_client: tuple[str, ...] = ()
    policy: ServerPolicy = field(default_factory=ServerPolicy)

    @property
    def mtls(self) -> bool:
        """Client certificates are required (a client CA is given)."""
        return self.client_ca is not None

    @property
    def given(self) -> bool:
        """Any server-side TLS flag was given."""
        return (
            bool(self.cert or self.key or self.client_ca or self.allow_client)
            or self.policy != ServerPolicy()
        )

    def context(self) -> ssl.SSLContext:
        """The server context (files read now: a reload calls it again)."""
        if self.cert is None:
            raise TLSConfigError("no --cert/--key to serve TLS with")
        return self.policy.context(self.cert, self.key, self.client_ca)

    def check_optional(self, secure_scheme: str) -> None:
        """For a daemon where TLS is optional (ipc-websocketd, ipc-httpd): the
        certificate and key go together, the other TLS flags need them
        (``secure_scheme`` names what they would serve: wss, https), then
        :meth:`check`."""
        if (self.cert is None) != (self.key is None):
            raise click.UsageError("--cert and --key go together")
        self.check()
        if self.cert is None and self.given:
            raise click.UsageError(
                "--client-ca, --allow-client, --min-tls, --ciphers and --crl need "
                f"--cert/--key ({secure_scheme})"
            )

    def check(self) -> None:
        """Refuse contradictory flags (``click.UsageError``/``BadParameter``),
        before anything is bound: the rules both daemons share."""
        problem = self.policy.usage_error(self.client_ca)
        if problem:
            raise click.UsageError(problem)
        if self.allow_client and self.client_ca is None:
            raise click.UsageError(
                "--allow-client needs --client-ca (client certificates "
                "are only asked for with mutual TLS)"
            )
        for pattern in self.allow_client:
            reason = allow_pattern_error(pattern)
            if reason:
                raise click.BadParameter(reason, param_hint="--allow-client")


_SERVER_TLS_NAMES = ("cert", "key", "client_ca", "allow_client")
_FILE = click.Path(dir_okay=False, path_type=Path)


def server_tls_options(*, purpose: str) -> Callable[[F], F]:
    """Add the TLS server flags and pass them as ``server_tls: ServerTLS``;
    ``purpose`` ends the help of --cert and --key (``required to listen``,
    ``serves wss://``)."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in _SERVER_TLS_NAMES}
            policy = kwargs.pop("tls_policy")
            return func(*args, server_tls=ServerTLS(**values, policy=policy), **kwargs)

        options = [
            click.option(
                "--cert",
                type=_FILE,
                default=None,
                metavar="FILE",
                help=f"Server certificate (PEM, chain allowed); {purpose}.",
            ),
            click.option(
                "--key",
                type=_FILE,
                default=None,
                metavar="FILE",
                help=f"Private key of --cert (PEM); {purpose}.",
            ),
            click.option(
                "--client-ca",
                type=_FILE,
                default=None,
                metavar="FILE",
                help="Mutual TLS: require client certificates signed by these CAs.",
            ),
            click.option(
                "--allow-client",
                multiple=True,
                metavar="PATTERN",
                help="Only these client certificates (name, CN:name or CN=name, "
                "DNS:name, IP:addr or a SHA-256 fingerprint). Repeatable; needs "
                "--client-ca.",
            ),
        ]
        wrapped: Any = server_policy_options(wrapper)
        for option in reversed(options):
            wrapped = option(wrapped)
        return cast(F, wrapped)

    return decorate
