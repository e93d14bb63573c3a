"""``ipc cert``: a private CA and certificates for ipc-tlsd and wss.

The commands over :mod:`daemons.engine.certs` (the library: make, load,
match, revoke); a bad file is one ``Error: FILE: reason`` line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from .engine.certs import (
    CA_DAYS,
    CRL_DAYS,
    LEAF_DAYS,
    CertAndKey,
    describe,
    describe_crl,
    fingerprint,
    identity,
    load_ca,
    load_cert,
    load_crl,
    make_ca,
    make_cert,
    make_crl,
    parse_serial,
    write_crl,
    write_pair,
)
from .engine.options import LibipcGroup, help_epilog

__all__ = ["cert"]

F = TypeVar("F", bound=Callable[..., Any])

# --------------------------------------------------------------------------
# click commands
# --------------------------------------------------------------------------

_out_option = click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    metavar="DIR",
    help="Directory to write into (created 0700 if missing).",
)
_force_option = click.option("--force", is_flag=True, help="Overwrite existing files.")
_ca_dir_option = click.option(
    "--ca-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    metavar="DIR",
    help="Directory holding ca.pem and ca.key (from `ipc cert ca`).",
)


def _days_option(default: int) -> Callable[[F], F]:
    return click.option(
        "--days",
        type=int,
        default=default,
        metavar="N",
        help="Validity in days (negative: already expired, for tests).",
    )


def _file_stem(name: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise click.BadParameter(f"{name!r} cannot be used as a file name")
    return name


def _issue(out: Path, stem: str, make: Callable[[], CertAndKey], force: bool) -> None:
    try:
        certificate, key = make()
        paths = write_pair(out, stem, certificate, key, force)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {paths[0]} and {paths[1]}")
    click.echo(fingerprint(certificate))


def _examples(*pairs: tuple[str, str]) -> str:
    return help_epilog(pairs)


@click.group(
    name="cert",
    cls=LibipcGroup,
    epilog=_examples(
        ("ipc cert ca --out ca", "a CA: ca/ca.pem, ca/ca.key"),
        ("ipc cert server --ca-dir ca --out tls localhost 127.0.0.1", "tls/localhost.pem, .key"),
        ("ipc cert client --ca-dir ca --out tls host-a", "tls/host-a.pem, .key"),
        ("ipc cert crl --ca-dir ca tls/host-a.pem", "revoke it: ca/crl.pem"),
    ),
)
def cert() -> None:
    """Make and inspect certificates for ipc-tlsd (a private CA)."""


@cert.command(
    name="ca",
    epilog=_examples(("ipc cert ca --out /etc/libipc/ca --name 'Example CA'", "")),
)
@_out_option
@click.option("--name", default="LibIPC CA", metavar="NAME", help="CA common name.")
@_days_option(CA_DAYS)
@_force_option
def ca_command(out: Path, name: str, days: int, force: bool) -> None:
    """Create a CA: ca.pem and ca.key (keep ca.key secret)."""
    _issue(out, "ca", lambda: make_ca(name, days), force)


@cert.command(
    name="server",
    epilog=_examples(
        ("ipc cert server --ca-dir ca b.example.org 192.0.2.7", "b.example.org.pem and .key"),
    ),
)
@_ca_dir_option
@_out_option
@_days_option(LEAF_DAYS)
@_force_option
@click.argument("names", nargs=-1, required=True)
def server_command(ca_dir: Path, out: Path, days: int, force: bool, names: Sequence[str]) -> None:
    """Create NAME.pem and NAME.key for a TLS server.

    Every NAME (host name or IP address) becomes a SAN; the first is the CN
    and the file name.
    """
    stem = _file_stem(names[0])

    def make() -> CertAndKey:
        ca_cert, ca_key = load_ca(ca_dir)
        return make_cert(ca_cert, ca_key, names[0], names, usage="server", days=days)

    _issue(out, stem, make, force)


@cert.command(
    name="client",
    epilog=_examples(
        ("ipc cert client --ca-dir ca host-a", "host-a.pem and .key; --allow-client host-a"),
    ),
)
@_ca_dir_option
@_out_option
@_days_option(LEAF_DAYS)
@_force_option
@click.option("--san", multiple=True, metavar="NAME", help="Also add this DNS/IP SAN.")
@click.argument("cn")
def client_command(
    ca_dir: Path, out: Path, days: int, force: bool, san: Sequence[str], cn: str
) -> None:
    """Create CN.pem and CN.key for a TLS client.

    The server names the client by CN or fingerprint in --allow-client.
    """
    stem = _file_stem(cn)

    def make() -> CertAndKey:
        ca_cert, ca_key = load_ca(ca_dir)
        return make_cert(ca_cert, ca_key, cn, san, usage="client", days=days)

    _issue(out, stem, make, force)


def _load_for_cli(path: Path) -> x509.Certificate:
    try:
        return load_cert(path)
    except (ValueError, OSError) as exc:  # both name the file
        raise click.ClickException(str(exc)) from exc


@cert.command(
    name="fingerprint",
    epilog=_examples(("ipc cert fingerprint host-a.pem", "SHA256:... for --allow-client")),
)
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def fingerprint_command(file: Path) -> None:
    """Print the SHA-256 fingerprint (usable in --allow-client)."""
    click.echo(fingerprint(_load_for_cli(file)))


@cert.command(
    name="inspect",
    epilog=_examples(("ipc cert inspect /etc/libipc/tls/server.pem", "")),
)
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def inspect_command(file: Path) -> None:
    """Show subject, issuer, SANs, validity, serial and fingerprint."""
    click.echo(describe(_load_for_cli(file)))


def _to_revoke(ca_cert: x509.Certificate, item: str) -> tuple[int, str]:
    """(serial, how to name it) of a certificate file or a hex serial."""
    if not os.path.exists(item):
        serial = parse_serial(item)
        return serial, f"serial {serial:x}"
    certificate = load_cert(item)
    try:
        certificate.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ValueError(f"{item}: not issued by this CA") from None
    ident = identity(certificate)
    return certificate.serial_number, f"serial {certificate.serial_number:x} (CN={ident.cn})"


@cert.command(
    name="crl",
    epilog=_examples(
        ("ipc cert crl --ca-dir ca host-a.pem", "revoke host-a's certificate"),
        ("ipc cert crl --ca-dir ca", "renew the CRL (before its next update)"),
    ),
)
@_ca_dir_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="The CRL file to make or extend. Default: DIR/crl.pem (DIR of --ca-dir).",
)
@click.option(
    "--days",
    type=int,
    default=CRL_DAYS,
    metavar="N",
    help="Days until its next update; past that date every client of the CA is refused.",
)
@click.argument("revoke", nargs=-1, metavar="[CERT|SERIAL]...")
def crl_command(ca_dir: Path, out: Path | None, days: int, revoke: Sequence[str]) -> None:
    """Make or extend the CA's revocation list (for ipc-tlsd --crl).

    Each CERT file (or hex SERIAL, as `cert inspect` prints it) is revoked;
    entries already in the CRL stay. With none, the CRL is just renewed:
    re-run it before its next update. Then `kill -HUP` the daemons.
    """
    out = out or ca_dir / "crl.pem"
    try:
        ca_cert, ca_key = load_ca(ca_dir)
        previous = load_crl(out) if out.exists() else None
        if previous is not None and not previous.is_signature_valid(ca_key.public_key()):
            raise ValueError(f"{out}: a CRL of another CA (or damaged)")
        known = {r.serial_number for r in previous} if previous is not None else set()
        targets = [_to_revoke(ca_cert, item) for item in revoke]
        crl = make_crl(ca_cert, ca_key, [s for s, _ in targets], previous=previous, days=days)
        write_crl(out, crl)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    for serial, name in targets:
        click.echo(f"{'already revoked' if serial in known else 'revoked'} {name}")
    click.echo(f"wrote {out}: {describe_crl(crl)}")
