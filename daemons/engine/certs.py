"""A private CA for ipc-tlsd: make certificates, name and match peers by them.

Why a built-in tool: mutual TLS between two LibIPC hosts needs a CA, a server
certificate and client certificates, and the ``openssl`` incantations for
correct extensions (SANs, EKUs, key identifiers) are error-prone. Here one
command makes each, with sane defaults:

* keys are EC P-256 (every TLS stack supports it; Ed25519 certificates are
  still refused by some clients), unencrypted PKCS#8 PEM, mode 0600;
* certificates are PEM, mode 0644, SHA-256 signed, with key identifiers and
  the EKU of their role (server auth / client auth);
* nothing is overwritten unless asked (``force`` / ``--force``).

Peers are then named by :class:`CertIdentity` and matched against
``--allow-client`` patterns with :func:`matches_allow`; a certificate is
revoked by adding it to the CA's CRL (:func:`make_crl`, ``cert crl``), which
the daemons load with ``--crl``.

A file that is not what it should be (a key where a certificate is
expected, an encrypted CA key, DER garbage) is a ValueError with one
readable line, so the CLI prints ``Error: FILE: reason`` and never a
traceback or the ASN.1 parser's message.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_DAYS",
    "CRL_DAYS",
    "LEAF_DAYS",
    "CertAndKey",
    "CertIdentity",
    "allow_pattern_error",
    "describe",
    "describe_crl",
    "fingerprint",
    "generate_key",
    "identity",
    "is_expired",
    "load_ca",
    "load_cert",
    "load_crl",
    "load_key",
    "make_ca",
    "make_cert",
    "make_crl",
    "matches_allow",
    "normalize_fingerprint",
    "parse_serial",
    "write_cert",
    "write_crl",
    "write_key",
    "write_pair",
]

StrPath = str | os.PathLike[str]
PrivateKey = ec.EllipticCurvePrivateKey
CertSource = x509.Certificate | bytes | StrPath
CertAndKey = tuple[x509.Certificate, PrivateKey]

CA_DAYS = 3650
LEAF_DAYS = 825
CRL_DAYS = 365
#: Backdating of notBefore, so peers with a slightly slow clock accept new certs.
_SKEW = _dt.timedelta(minutes=5)

# --------------------------------------------------------------------------
# Making certificates
# --------------------------------------------------------------------------


def generate_key() -> PrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _validity(
    days: int, not_before: _dt.datetime | None, not_after: _dt.datetime | None
) -> tuple[_dt.datetime, _dt.datetime]:
    """Default: valid from a few minutes ago for ``days``. Negative ``days``
    give a certificate that expired ``-days`` days ago (for tests)."""
    now = _dt.datetime.now(_dt.UTC)
    if not_after is None:
        try:
            not_after = now + _dt.timedelta(days=days)
        except OverflowError:
            raise ValueError(f"{days} days is out of range") from None
    if not_before is None:
        not_before = min(now - _SKEW, not_after - _dt.timedelta(days=1))
    if not_before >= not_after:
        raise ValueError(f"not_before {not_before} is not before not_after {not_after}")
    return not_before, not_after


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _general_name(name: str) -> x509.GeneralName:
    """An IP address SAN if ``name`` parses as one, else a DNS SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or any(c.isspace() or c in "/\\@:" for c in name):
        raise ValueError(f"not a host name or IP address: {name!r}")
    return x509.DNSName(name.encode("idna").decode() if not name.isascii() else name)


def make_ca(
    name: str = "LibIPC CA",
    days: int = CA_DAYS,
    *,
    key: PrivateKey | None = None,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed CA that may sign leaf certificates only (pathlen 0)."""
    key = key or generate_key()
    start, end = _validity(days, not_before, not_after)
    public = key.public_key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return ca, key


def make_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    cn: str,
    sans: Iterable[str] = (),
    *,
    usage: Literal["server", "client"] = "server",
    days: int = LEAF_DAYS,
    key: PrivateKey | None = None,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A leaf certificate signed by the CA, for TLS server or client auth.

    ``sans`` are host names or IP addresses (each becomes a DNS or IP SAN);
    a server needs at least one, since TLS clients ignore the CN.
    """
    if usage not in ("server", "client"):
        raise ValueError(f"usage must be 'server' or 'client', got {usage!r}")
    if not cn:
        raise ValueError("empty common name")
    names = [_general_name(n) for n in dict.fromkeys(sans)]
    if usage == "server" and not names:
        raise ValueError("a server certificate needs at least one host name or IP address")
    key = key or generate_key()
    start, end = _validity(days, not_before, not_after)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create ``path`` with exactly ``mode``; never follow a symlink, never
    overwrite unless ``force`` (then atomically, via a temporary file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if force else path
    fd = os.open(target, flags, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (0644)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)
    if force:
        os.replace(target, path)


def write_key(path: StrPath, key: PrivateKey, *, force: bool = False) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(Path(path), data, 0o600, force)


def write_cert(path: StrPath, certificate: x509.Certificate, *, force: bool = False) -> None:
    """Write ``certificate`` as PEM, mode 0644."""
    _write(Path(path), certificate.public_bytes(serialization.Encoding.PEM), 0o644, force)


def write_pair(
    out: Path, stem: str, certificate: x509.Certificate, key: PrivateKey, force: bool
) -> tuple[Path, Path]:
    """Write STEM.pem and STEM.key, checking both are free before writing either."""
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    if not force:
        for p in (cert_path, key_path):
            if os.path.lexists(p):
                raise FileExistsError(f"refusing to overwrite {p} (use --force)")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_key(key_path, key, force=force)
    write_cert(cert_path, certificate, force=force)
    return cert_path, key_path


_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


def load_cert(source: CertSource) -> x509.Certificate:
    """A certificate from an object, PEM or DER bytes, or a PEM/DER file
    (the first certificate of a bundle).

    Anything else is a ValueError with one readable line (what the file
    holds instead, if it is PEM), never the ASN.1 parser's own message.
    """
    if isinstance(source, x509.Certificate):
        return source
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    where = "" if isinstance(source, bytes) else f"{source}: "
    labels = _PEM_LABEL.findall(data)
    if not labels:
        try:
            return x509.load_der_x509_certificate(data)
        except ValueError:
            raise ValueError(f"{where}not a certificate (neither PEM nor DER)") from None
    if b"CERTIFICATE" not in labels:
        found = ", ".join(dict.fromkeys(label.decode() for label in labels))
        raise ValueError(f"{where}no certificate in it (it holds: {found})")
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise ValueError(f"{where}a damaged PEM certificate") from None


def load_key(path: StrPath) -> PrivateKey:
    """An unencrypted PEM EC private key (ValueError with a readable line if not)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except TypeError:
        raise ValueError(
            f"{path}: the private key is encrypted; decrypt it first "
            f"(openssl pkey -in {path} -out plain.key)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key


def load_ca(ca_dir: StrPath) -> tuple[x509.Certificate, PrivateKey]:
    """The CA written by ``cert ca``: ``ca.pem`` and ``ca.key`` in ``ca_dir``."""
    return load_cert(Path(ca_dir) / "ca.pem"), load_key(Path(ca_dir) / "ca.key")


# --------------------------------------------------------------------------
# Revocation
# --------------------------------------------------------------------------


def make_crl(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    revoked: Iterable[int] = (),
    *,
    previous: x509.CertificateRevocationList | None = None,
    days: int = CRL_DAYS,
) -> x509.CertificateRevocationList:
    """A CRL signed by the CA: ``previous``'s entries (dates kept) plus the
    ``revoked`` serial numbers, valid ``days`` from now, numbered one more.

    Past its next update OpenSSL refuses *every* client of the CA, so the
    CRL must be re-made before then (with no new serial, it is just renewed).
    """
    if days <= 0:
        raise ValueError("a CRL needs a next update in the future (--days >= 1)")
    last_update, next_update = _validity(days, None, None)
    entries: dict[int, _dt.datetime] = {}
    number = 1
    if previous is not None:
        if previous.issuer != ca_cert.subject:
            raise ValueError("the existing CRL was issued by another CA")
        entries = {r.serial_number: r.revocation_date_utc for r in previous}
        with contextlib.suppress(x509.ExtensionNotFound):
            number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            number += 1
    for serial in revoked:
        entries.setdefault(serial, last_update + _SKEW)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for serial, date in sorted(entries.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(date).build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def load_crl(path: StrPath) -> x509.CertificateRevocationList:
    """A CRL from a PEM or DER file (ValueError with a readable line if not)."""
    data = Path(path).read_bytes()
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise ValueError(f"{path}: not a certificate revocation list") from None


def write_crl(path: StrPath, crl: x509.CertificateRevocationList) -> None:
    """Write ``crl`` as PEM (what ``--crl`` loads), mode 0644, atomically."""
    _write(Path(path), crl.public_bytes(serialization.Encoding.PEM), 0o644, True)


def describe_crl(crl: x509.CertificateRevocationList) -> str:
    """``2 revoked, next update 2027-05-01`` for logs and ``cert crl``."""
    when = crl.next_update_utc
    return f"{len(crl)} revoked, next update {when:%Y-%m-%d}" if when else f"{len(crl)} revoked"


def parse_serial(text: str) -> int:
    """A serial number as ``cert inspect`` (hex) or openssl (hex with colons) prints it."""
    digits = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return int(digits, 16)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a certificate file nor a hex serial number"
        ) from None


# --------------------------------------------------------------------------
# Identities and matching
# --------------------------------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")


def fingerprint(source: CertSource) -> str:
    """SHA-256 of the DER certificate as ``SHA256:AB:CD:...`` (openssl's hex form)."""
    digest = load_cert(source).fingerprint(hashes.SHA256()).hex().upper()
    return "SHA256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def normalize_fingerprint(text: str) -> str | None:
    """64 lowercase hex digits if ``text`` is a SHA-256 fingerprint in any
    usual spelling (``SHA256:`` prefix or not, colons or not, any case)."""
    text = text.strip().lower()
    for prefix in ("sha256:", "sha256="):
        text = text.removeprefix(prefix)
    text = text.replace(":", "")
    return text if _HEX64.fullmatch(text) else None


@dataclass(frozen=True)
class CertIdentity:
    """What names a peer: CN, SANs (``DNS:x``, ``IP:1.2.3.4``, ``URI:``, ``email:``)
    and fingerprint (``SHA256:AB:...``)."""

    cn: str | None
    sans: tuple[str, ...]
    fingerprint: str


def _sans(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    out: list[str] = []
    for gn in ext.value:
        if isinstance(gn, x509.DNSName):
            out.append(f"DNS:{gn.value}")
        elif isinstance(gn, x509.IPAddress):
            out.append(f"IP:{gn.value}")
        elif isinstance(gn, x509.UniformResourceIdentifier):
            out.append(f"URI:{gn.value}")
        elif isinstance(gn, x509.RFC822Name):
            out.append(f"email:{gn.value}")
    return tuple(out)


def identity(source: CertSource) -> CertIdentity:
    """The identity of a certificate (e.g. ``TLSLayer.peer_certificate_der()``)."""
    certificate = load_cert(source)
    cns = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    return CertIdentity(
        cn if isinstance(cn, str) else None, _sans(certificate), fingerprint(certificate)
    )


#: ``--allow-client`` kinds; ``KIND:value`` or ``KIND=value`` (the form the logs print).
_ALLOW_KINDS = ("CN", "DNS", "IP", "SHA256")
_KIND_PREFIX = re.compile(r"([A-Za-z0-9]+)[:=](.*)", re.DOTALL)


def _parse_pattern(pattern: str) -> tuple[str, str]:
    """``(kind, value)`` of an ``--allow-client`` pattern; ValueError if malformed.

    A SHA-256 fingerprint in any usual spelling is ``SHA256``; a bare name
    (no ``:`` or ``=``) is a ``CN``. Any other ``PREFIX:``/``PREFIX=`` is
    refused rather than taken as a CN that no certificate will ever have.
    """
    if not pattern.strip():
        raise ValueError("empty pattern")
    wanted = normalize_fingerprint(pattern)
    if wanted is not None:
        return "SHA256", wanted
    match = _KIND_PREFIX.fullmatch(pattern)
    kind = match.group(1).upper() if match else ""
    if kind not in _ALLOW_KINDS:
        if ":" in pattern or "=" in pattern:
            raise ValueError(
                f"unknown prefix in {pattern!r}: use CN:, DNS:, IP: or SHA256: "
                "(or CN:NAME for a name holding ':' or '=')"
            )
        return "CN", pattern
    value = match.group(2) if match else ""
    if not value:
        raise ValueError(f"empty value in {pattern!r}")
    if kind == "IP":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"bad IP address in {pattern!r}") from None
    if kind == "SHA256":
        raise ValueError(f"bad SHA-256 fingerprint {pattern!r} (expected 64 hex digits)")
    return kind, value


def allow_pattern_error(pattern: str) -> str | None:
    """Why an ``--allow-client`` pattern is malformed, or None (check at start-up)."""
    try:
        _parse_pattern(pattern)
    except ValueError as exc:
        return str(exc)
    return None


def _matches(ident: CertIdentity, pattern: str) -> bool:
    try:
        kind, value = _parse_pattern(pattern)
    except ValueError:
        return False  # refused at start; never a fallback to a CN
    if kind == "DNS":
        want = value.rstrip(".").lower()
        return any(s.startswith("DNS:") and s[4:].rstrip(".").lower() == want for s in ident.sans)
    if kind == "IP":
        want_ip = ipaddress.ip_address(value)
        for s in ident.sans:
            if s.startswith("IP:"):
                with contextlib.suppress(ValueError):
                    if ipaddress.ip_address(s[3:]) == want_ip:
                        return True
        return False
    if kind == "SHA256":
        return value == normalize_fingerprint(ident.fingerprint)
    return ident.cn == value


def matches_allow(ident: CertIdentity, patterns: Iterable[str]) -> bool:
    """True if any pattern names this peer.

    A pattern is ``DNS:name`` (case-insensitive) or ``IP:addr`` (any
    spelling) matched against the SANs; a SHA-256 fingerprint (``SHA256:``
    prefix optional, colons optional, any case); ``CN:name``, ``CN=name``
    (as the logs print it) or a bare ``name``, matched exactly against the
    CN. ``=`` may replace ``:`` after any kind. Exact matches only, no globs:
    this is authentication. A malformed pattern matches nothing.
    """
    return any(_matches(ident, p) for p in patterns)


def is_expired(source: CertSource, now: _dt.datetime | None = None) -> bool:
    """True outside the validity period (not yet valid counts as expired)."""
    certificate = load_cert(source)
    now = now or _dt.datetime.now(_dt.UTC)
    return not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def describe(source: CertSource) -> str:
    """The human summary printed by ``cert inspect``."""
    certificate = load_cert(source)
    try:
        bc = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    rows = [
        ("subject", certificate.subject.rfc4514_string()),
        ("issuer", certificate.issuer.rfc4514_string()),
        ("SANs", ", ".join(_sans(certificate)) or "(none)"),
        ("not before", certificate.not_valid_before_utc.isoformat()),
        ("not after", certificate.not_valid_after_utc.isoformat()),
        ("serial", f"{certificate.serial_number:x}"),
        ("fingerprint", fingerprint(certificate)),
        ("CA", "yes" if is_ca else "no"),
        ("expired", "yes" if is_expired(certificate) else "no"),
    ]
    return "\n".join(f"{label + ':':<13}{value}" for label, value in rows)
