"""ipc-tlsd: local LibIPC services over TLS, both ways (TCPd's handshake inside TLS).

Inbound: ``--listen :9443 --cert server.pem --key server.key``; a peer does a
TLS handshake, then exactly what a TCPd peer does (service name, ``ok``,
LibIPC frames), with the same ``--allow``/``--deny`` rules and deadline.
``--client-ca`` turns on mutual TLS, ``--allow-client`` narrows it to
named certificates and ``--crl`` refuses revoked ones. What is offered is
Mozilla's "intermediate" profile (TLS 1.2 with AEAD suites, TLS 1.3),
tightened with ``--min-tls``/``--ciphers``. Outbound: the daemon is the local service ``tls``
(``--service-name``); a client's message ``tls://HOST:PORT/SERVICE`` makes it
dial with TLS (SNI, verification against the system store or ``--ca``),
handshake, answer ``ok`` and switch.

Everything network-facing is the shared engine (:mod:`daemons.engine.daemon`,
:mod:`daemons.engine.outbound`) with TLS wrapped around the TCPd handshake
(:mod:`daemons.codecs.tlswrap`); this module is flags, SSL contexts and reload.

Every file is loaded before anything is bound, and a file that does not
load stops the start with one line naming the flag and the file (``--key
k.pem does not match --cert c.pem``), leaving no socket or lock behind.

Reload (SIGHUP) builds *new* contexts from the files (the CRL too); connections already
open keep the context they were made with, new ones get the new context. A
new file that does not load is logged and the old contexts stay in use, so a
botched certificate renewal never takes the daemon down.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from .codecs.proxied import use_proxy_protocol
from .codecs.tcp import TcpdClient, TcpdHandshake
from .codecs.tlswrap import TLSConnector, TLSHandshake, describe_identity
from .engine import certs
from .engine.addresses import Uri
from .engine.daemon import Daemon
from .engine.handshake import Connector, Handshake
from .engine.listeners import peer_name
from .engine.options import (
    CommonOptions,
    common_options,
    connect_timeout_option,
    idle_timeout_option,
    libipc_command,
    proxy_protocol_option,
)
from .engine.startup import describe_error, start_daemon, starting
from .engine.tlsconfig import ServerTLS, client_context, server_tls_options
from .engine.trust import TrustedNetworks

log = logging.getLogger("ipc.tlsd")

NAME = "ipc-tlsd"
DEFAULT_LISTEN = "127.0.0.1:9443"


@dataclass(frozen=True)
class TLSFiles:
    """The certificate files, re-read on every reload."""

    server: ServerTLS = field(default_factory=ServerTLS)
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    insecure: bool = False

    def server_context(self) -> ssl.SSLContext | None:
        """The inbound context (None when not listening); mTLS with a client CA."""
        if self.server.cert is None:
            return None
        return self.server.context()

    def client_context(self) -> ssl.SSLContext:
        """The outbound context: verify (system store or --ca), maybe a client cert."""
        return client_context(
            ca=self.ca, insecure=self.insecure, cert=self.client_cert, key=self.client_key
        )


class Contexts:
    """The SSL contexts new connections use; swapped as a whole on reload."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self.server, self.client = files.server_context(), files.client_context()

    def reload(self) -> bool:
        """Rebuild both contexts; on any error keep the old ones. True if swapped."""
        try:
            server, client = self.files.server_context(), self.files.client_context()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error(
                "%s: reload failed, keeping the previous certificates: %s",
                NAME,
                describe_error(exc),
            )
            return False
        self.server, self.client = server, client
        log.info(
            "%s: reloaded certificates for new connections%s%s",
            NAME,
            _cert_summary(self.files.server.cert),
            _crl_summary(self.files.server.policy.crl),
        )
        return True


def _cert_summary(path: Path | None) -> str:
    """`` (server certificate CN=x SHA256:..., valid until ...)`` for log lines."""
    if path is None:
        return ""
    try:
        cert = certs.load_cert(path)
        ident = certs.identity(cert)
    except (OSError, ValueError):
        return ""
    expired = " EXPIRED" if certs.is_expired(cert) else ""
    return (
        f" (server certificate {describe_identity(ident)}, valid until "
        f"{cert.not_valid_after_utc:%Y-%m-%d}{expired})"
    )


def _crl_summary(path: Path | None) -> str:
    """``; CRL crl.pem: 2 revoked, next update 2027-05-01`` for log lines."""
    if path is None:
        return ""
    try:
        return f"; CRL {path}: {certs.describe_crl(certs.load_crl(path))}"
    except (OSError, ValueError):
        return ""


def _handshake_factory(
    daemon: Daemon, contexts: Contexts, allow_client: Sequence[str], mtls: bool
) -> Callable[[str], Handshake]:
    exists = daemon.reachable

    def make(peer: str) -> Handshake:
        if contexts.server is None:  # socket-activated with --no-listen
            raise ValueError("no --cert/--key to serve TLS with")
        hs = TLSHandshake(
            contexts.server,
            TcpdHandshake(exists),
            allow_client=allow_client,
            on_identity=lambda ident: _log_identity(peer, hs, ident, mtls),
        )
        return hs

    return make


def _log_identity(
    peer: str, hs: TLSHandshake, ident: certs.CertIdentity | None, mtls: bool
) -> None:
    version = hs.tls.version or "TLS"
    if hs.named_client is not None:  # behind a proxy: name the client it named
        peer = f"{peer_name(hs.named_client)} (via {peer})"
    if mtls:
        log.info("%s: %s: %s client %s", NAME, peer, version, describe_identity(ident))
    else:
        log.debug("%s: %s: %s", NAME, peer, version)


def _connector_factory(contexts: Contexts, insecure: bool) -> Callable[[Uri], Connector]:
    def make(uri: Uri) -> Connector:
        if insecure:
            log.warning(
                "%s: NOT verifying the certificate of %s:%d (--insecure-skip-verify)",
                NAME,
                uri.host,
                uri.port,
            )
        return TLSConnector(contexts.client, uri.host, TcpdClient(uri.service))

    return make


def _check_flags(files: TLSFiles, listen: bool) -> None:
    """Refuse contradictory or incomplete flags before binding anything."""
    server = files.server
    if listen and (server.cert is None or server.key is None):
        raise click.UsageError("--cert and --key are required to listen (or use --no-listen)")
    if not listen and server.given:
        raise click.UsageError(
            "--cert, --key, --client-ca, --allow-client, --crl, --min-tls and --ciphers "
            "are for listening; they make no sense with --no-listen"
        )
    server.check()
    if files.insecure and files.ca is not None:
        raise click.UsageError("--ca and --insecure-skip-verify contradict each other")
    if (files.client_cert is None) != (files.client_key is None):
        raise click.UsageError("--client-cert and --client-key go together")


_FILE = click.Path(dir_okay=False, path_type=Path)


@libipc_command(
    prog=NAME,
    env_prefix="IPC_TLSD",
    examples=[
        (
            "ipc cert ca --out ca && ipc cert server --ca-dir ca localhost",
            "a private CA, and a server certificate signed by it",
        ),
        (
            "ipc-tlsd --cert localhost.pem --key localhost.key",
            f"{DEFAULT_LISTEN}; every local service but the protected ones",
        ),
        (
            "ipc-tlsd --listen :9443 --cert s.pem --key s.key \\\n"
            "--client-ca ca/ca.pem --allow-client host-a --allow pong",
            "every interface, mutual TLS: only the client host-a, only pong",
        ),
        (
            "ipc-tlsd --cert s.pem --key s.key --proxy-protocol 10.0.0.2",
            "behind HAProxy in TCP mode (send-proxy-v2, TLS passed through) at 10.0.0.2",
        ),
        ("ipc-tlsd --no-listen --ca ca/ca.pem", "outbound only: tls:// routes for ipcd"),
        (
            'IPC_NETWORK="pong tls://b.example.org:9443/pong" ipc send pong hi',
            "with ipcd running: a client reaches pong on host b over TLS",
        ),
    ],
    notes=["kill -HUP re-reads the certificate, key, CA and CRL files for new connections."],
)
@common_options(default_listen=DEFAULT_LISTEN)
@click.option(
    "--service-name",
    envvar=["IPC_TLSD_SERVICE_NAME", "IPC_SERVICE_NAME"],
    default="tls",
    metavar="NAME",
    help="Local service name of the outbound side (clients send it tls:// URIs).",
)
@server_tls_options(purpose="required to listen")
@click.option(
    "--no-listen",
    is_flag=True,
    help="Outbound only: accept no network peers (no --cert/--key needed).",
)
@click.option(
    "--ca",
    type=_FILE,
    default=None,
    metavar="FILE",
    help="Outbound: trust these CAs instead of the system store.",
)
@click.option(
    "--insecure-skip-verify",
    is_flag=True,
    help="Outbound: do NOT verify servers (anyone can impersonate them). Tests only.",
)
@click.option(
    "--client-cert",
    type=_FILE,
    default=None,
    metavar="FILE",
    help="Outbound: present this client certificate (mutual TLS).",
)
@click.option(
    "--client-key",
    type=_FILE,
    default=None,
    metavar="FILE",
    help="Outbound: private key of --client-cert.",
)
@connect_timeout_option("connect, TLS and TCPd handshake")
@idle_timeout_option
@proxy_protocol_option
def main(
    common: CommonOptions,
    service_name: str,
    server_tls: ServerTLS,
    no_listen: bool,
    ca: Path | None,
    insecure_skip_verify: bool,
    client_cert: Path | None,
    client_key: Path | None,
    connect_timeout: float,
    idle_timeout: float,
    proxy_protocol: TrustedNetworks,
) -> None:
    """Put local LibIPC services on TLS, and reach remote ones over TLS (TLSd).

    Inbound: a peer does a TLS handshake, then what a TCPd peer does
    (service name, "ok", LibIPC messages). Outbound: the local service "tls"
    takes a message tls://HOST:PORT/SERVICE and dials it, verifying the
    server against the system store or --ca.
    """
    files = TLSFiles(server_tls, ca, client_cert, client_key, insecure_skip_verify)
    _check_flags(files, not no_listen)
    with starting():
        contexts = Contexts(files)
    mtls = server_tls.mtls
    with starting():
        daemon, outbound = start_daemon(
            NAME,
            common,
            service_name=service_name,
            default_listen=DEFAULT_LISTEN,
            make_handshake=lambda daemon: _handshake_factory(
                daemon, contexts, server_tls.allow_client, mtls
            ),
            connectors={"tls": _connector_factory(contexts, insecure_skip_verify)},
            connect_timeout=connect_timeout,
            listen=not no_listen,
            idle_timeout=idle_timeout,
        )
    if server_tls.cert is not None:
        log.info(
            "%s: serving TLS %s%s%s%s",
            NAME,
            "1.3" if server_tls.policy.min_tls == "1.3" else "1.2 and 1.3",
            _cert_summary(server_tls.cert),
            ", client certificates required" if mtls else "",
            _crl_summary(server_tls.policy.crl),
        )
    if insecure_skip_verify:
        log.warning(
            "%s: --insecure-skip-verify: outbound servers are NOT verified; "
            "anyone on the path can read and change the traffic",
            NAME,
        )
    use_proxy_protocol(daemon, proxy_protocol)
    daemon.on_reload = contexts.reload
    try:
        daemon.run()
    finally:
        outbound.close()
        daemon.ctx.close_all()


if __name__ == "__main__":
    main()
