"""TLS around any daemon handshake: ``TLSHandshake`` (server) and ``TLSConnector`` (client).

Why a wrapper and not a TLS daemon engine: the engine (:mod:`daemons.engine.daemon`)
and the outbound dialer (:mod:`daemons.engine.outbound`) already drive Sans-I/O
handshakes and connectors over raw bytes. Putting TLS *around* an existing
handshake gives ipc-tlsd (TLS around the TCPd handshake) and wss (TLS around
the WebSocket upgrade) with no new I/O code at all:

    network bytes -> TLSLayer (ciphertext <-> plaintext) -> inner handshake

* Everything the inner handshake or connector writes is encrypted with
  ``TLSLayer.send`` (held by the layer until the TLS handshake completes), so
  ``data_to_send()`` always returns ciphertext only.
* Once the inner side is done, the switched phase needs TLS still: the layer
  handed to the Context is the ``TLSLayer`` itself (TCPd: the plaintext is
  the LibIPC stream) or ``StackedLayer(tls, inner_layer)`` (WebSocket over
  TLS). Plaintext decrypted past the inner handshake is returned as the
  "early" bytes, so nothing a fast peer sends is lost.
* Server side, the client certificate is checked against ``allow_client``
  (see :func:`daemons.engine.certs.matches_allow`) the moment the TLS handshake
  completes, before the inner handshake sees a single plaintext byte: a peer
  that is not allowed never learns which services exist.
* Peer information (:meth:`TLSHandshake.describe`, for a service that asked
  for it): the inner handshake's facts first, then the session's: ``tcp``
  becomes ``tls`` and ``ws`` becomes ``wss``, the TLS version, cipher and
  SNI, and the client certificate (subject, SANs, fingerprint, whether it
  chained to ``--client-ca``), named as :mod:`daemons.engine.certs` names it.
* Deadlines are the driver's business: the engine's handshake deadline covers
  the TLS handshake and the inner one together.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Callable, Sequence

from ipc_core import Layer, PeerClosed, ProtocolError, StackedLayer
from ipc_core.peerinfo import PeerInfo

from ..engine.certs import CertIdentity, identity, load_cert, matches_allow
from ..engine.handshake import Connector, Handshake, describes_peer, knows_client, settles
from .tls import TLSLayer

__all__ = ["TLSConnector", "TLSHandshake", "describe_identity"]

log = logging.getLogger("ipc.daemon.tls")


def describe_identity(ident: CertIdentity | None) -> str:
    """``CN=alice SHA256:AB:...`` for log lines; ``no client certificate`` for None."""
    if ident is None:
        return "no client certificate"
    cn = f"CN={ident.cn}" if ident.cn is not None else "no CN"
    return f"{cn} {ident.fingerprint}"


#: What a transport becomes under TLS.
_SECURE_TRANSPORTS = {"tcp": "tls", "ws": "wss", "http": "https"}


class TLSHandshake:
    """Server side: a TLS handshake, then ``inner`` over the plaintext.

    Implements :class:`daemons.engine.handshake.Handshake`. ``allow_client`` (patterns
    as for ``--allow-client``) narrows which client certificates may connect;
    an empty sequence allows any certificate the context accepted (or none, if
    the context does not ask for one). ``on_identity`` is called once, right
    after the TLS handshake and the allow-list check passed, with the client's
    identity (None without a certificate) so the caller can log it with the
    peer address; without it the identity is logged here at INFO. A refused
    client is not reported: the ProtocolError's reason names it.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        inner: Handshake,
        *,
        allow_client: Sequence[str] = (),
        on_identity: Callable[[CertIdentity | None], None] | None = None,
    ) -> None:
        self.tls = TLSLayer(ssl_context, server_side=True)
        self.inner = inner
        #: The inner handshake's optional pause rule (a declared capability).
        self._inner_settles = settles(inner)
        self.allow_client = tuple(allow_client)
        self.on_identity = on_identity
        #: The client's certificate identity, once the TLS handshake is done.
        self.identity: CertIdentity | None = None
        self._verified = False  # identity checked against allow_client
        # A certificate the handshake accepted chained to the context's CAs
        # (--client-ca) only if the context asked for one.
        self._checks_certificates = ssl_context.verify_mode != ssl.CERT_NONE
        #: The real client, when a PROXY header in front of TLS named it
        #: (:meth:`client_named`): for log lines about this connection.
        self.named_client: tuple[str, int | None] | None = None
        # The inner handshake's other optional capabilities (per class).
        self._inner_describes = describes_peer(inner)
        self._inner_client = knows_client(inner)

    # -- what the engine reads ---------------------------------------------

    @property
    def service(self) -> str | None:
        return self.inner.service

    @property
    def finished(self) -> bool:
        return self.inner.finished

    @property
    def settle_after(self) -> float | None:
        """The inner handshake's pause rule, but only once TLS is up: a peer
        pausing inside the TLS handshake is not pausing after a name."""
        if not self._verified or self._inner_settles is None:
            return None
        return self._inner_settles.settle_after

    def settle(self) -> None:
        if self._inner_settles is not None and self._verified:
            self._inner_settles.settle()

    @property
    def client(self) -> tuple[str, int | None] | None:
        """The inner handshake's real client (a trusted forwarding header
        inside wss), None if it has none: TLS itself names nobody."""
        return self._inner_client.client if self._inner_client is not None else None

    def client_named(self, client: tuple[str, int | None]) -> None:
        """A PROXY header in front of TLS named the client (see
        :class:`daemons.codecs.proxied.HearsClient`)."""
        self.named_client = client

    def describe(self, info: PeerInfo) -> PeerInfo:
        """The inner handshake's facts, then the TLS session's and the client
        certificate's (see the module docstring)."""
        if self._inner_describes is not None:
            info = self._inner_describes.describe(info)
        tls = self.tls
        cipher = tls.cipher
        der = tls.peer_certificate_der()
        if not der:
            return dataclasses.replace(
                info,
                transport=_SECURE_TRANSPORTS.get(info.transport, info.transport),
                tls_version=tls.version,
                tls_cipher=cipher[0] if cipher is not None else None,
                tls_sni=tls.server_name,
            )
        certificate = load_cert(der)
        ident = self.identity or identity(certificate)
        return dataclasses.replace(
            info,
            transport=_SECURE_TRANSPORTS.get(info.transport, info.transport),
            tls_version=tls.version,
            tls_cipher=cipher[0] if cipher is not None else None,
            tls_sni=tls.server_name,
            cert_subject=certificate.subject.rfc4514_string(),
            cert_sans=ident.sans,
            cert_sha256=ident.fingerprint,
            cert_verified=self._checks_certificates,
        )

    # -- bytes -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed ciphertext (b"" = EOF); the plaintext goes to the inner handshake."""
        if self.finished:
            return  # refused: we only wait to flush and close
        plain = self.tls.receive_data(data)
        if not self.tls.handshake_complete:
            return
        if not self._verified:
            self._check_client()
        if plain:
            self.inner.receive_data(plain)

    def data_to_send(self) -> bytes:
        """The inner handshake's output, encrypted, plus TLS's own records.

        Once the inner handshake is finished (an HTTP error page, a refusal),
        our close_notify follows its last bytes: a TLS peer can then tell a
        complete answer from a truncated one.
        """
        pending = self.inner.data_to_send()
        if pending:
            self.tls.send(pending)
        elif self.inner.finished:
            self.tls.close()  # after the last piece of a long answer, not the first
        return self.tls.data_to_send()

    def accept(self) -> tuple[Layer | None, bytes]:
        """The inner handshake's layer, under TLS, and the early plaintext."""
        inner_layer, early = self.inner.accept()
        # Push the inner success reply (``ok``...) into TLS before the layer
        # changes hands, so it is encrypted ahead of any relayed byte.
        pending = self.inner.data_to_send()
        if pending:
            self.tls.send(pending)
        if inner_layer is None:
            return self.tls, early
        return StackedLayer(self.tls, inner_layer), early

    def reject(self, reason: str, status: int) -> None:
        """Let the inner handshake refuse (its bytes go out encrypted), then close TLS."""
        try:
            self.inner.reject(reason, status)
            pending = self.inner.data_to_send()
            if pending:
                self.tls.send(pending)
        finally:
            self.tls.close()

    # -- internals ---------------------------------------------------------

    def _check_client(self) -> None:
        """Name the client and hold it against ``allow_client``; report it if let in."""
        der = self.tls.peer_certificate_der()
        self.identity = identity(der) if der else None
        if self.allow_client:
            if self.identity is None:
                raise ProtocolError("tls: no client certificate, and --allow-client is set")
            if not matches_allow(self.identity, self.allow_client):
                raise ProtocolError(
                    f"tls: client {describe_identity(self.identity)} is not in --allow-client"
                )
        self._verified = True
        if self.on_identity is not None:
            self.on_identity(self.identity)
        else:
            log.info("tls: client %s (%s)", describe_identity(self.identity), self.tls.version)


class TLSConnector:
    """Client side: a TLS handshake with SNI, then ``inner`` over the plaintext.

    Implements :class:`daemons.engine.handshake.Connector`. ``ssl_context`` decides
    the verification (system store or a private CA, hostname check) and any
    client certificate; ``server_hostname`` is sent as SNI and checked
    against the server certificate (an IP address is checked, never sent).
    """

    def __init__(self, ssl_context: ssl.SSLContext, server_hostname: str, inner: Connector) -> None:
        self.tls = TLSLayer(ssl_context, server_side=False, server_hostname=server_hostname)
        self.inner = inner

    @property
    def done(self) -> bool:
        return self.inner.done

    def data_to_send(self) -> bytes:
        pending = self.inner.data_to_send()
        if pending:
            self.tls.send(pending)  # held until the TLS handshake completes
        return self.tls.data_to_send()

    def receive_data(self, data: bytes) -> None:
        try:
            plain = self.tls.receive_data(data)
        except PeerClosed:
            if not self.tls.handshake_complete:
                raise
            # A clean TLS close before the inner answer: the inner side knows
            # best what that means (TCPd: the service was refused).
            self.inner.receive_data(b"")
            raise
        if plain:
            self.inner.receive_data(plain)

    def result(self) -> tuple[Layer | None, bytes]:
        inner_layer, early = self.inner.result()
        pending = self.inner.data_to_send()
        if pending:
            self.tls.send(pending)
        if inner_layer is None:
            return self.tls, early
        return StackedLayer(self.tls, inner_layer), early
