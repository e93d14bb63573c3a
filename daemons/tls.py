"""TLS as a Sans-I/O layer: ciphertext in, plaintext up; plaintext down, ciphertext out.

Theory of operation
-------------------
ipc-tlsd drives every connection from one epoll loop, so TLS must never block
and never own a socket. :class:`TLSLayer` wraps an :class:`ssl.SSLObject`
between two :class:`ssl.MemoryBIO` objects:

    network side                                    local side (LibIPC)
    receive_data(ciphertext) -> [incoming BIO] -> SSLObject -> plaintext returned
    data_to_send() <- [outgoing BIO] <- SSLObject <- send(plaintext)

* OpenSSL signals "I need more input" with :exc:`ssl.SSLWantReadError`. With
  memory BIOs that is never an error: it means "wait for the next
  ``receive_data``". Writes never want to write, since the outgoing BIO grows.
* The handshake is driven by ``receive_data``: each call retries
  ``do_handshake`` until it completes. Plaintext given to :meth:`send` before
  then is held and flushed the moment the handshake completes (a client may
  queue its first message right after connecting).
* Every ``receive_data`` drains all the plaintext OpenSSL can decrypt
  (records are at most 16 KiB, so a 1 MiB message is ~64 reads, joined once).
* Errors are split by blame, as in :mod:`ipc_core.errors`: a bad certificate,
  garbage, a wrong protocol version are :class:`ProtocolError` (with the
  OpenSSL reason, e.g. ``tls: certificate verify failed: ...``); the peer's
  close_notify or a bare EOF is :class:`PeerClosed`. Any alert OpenSSL wants
  to send about the failure is left in :meth:`data_to_send` first.
* If the peer's close (or an error) arrives in the same chunk as plaintext,
  the plaintext is returned first and the exception is raised by the next
  call (``receive_data(b"")`` will do); :attr:`closed` is already True.

The layer shape (``receive_data`` / ``send`` / ``data_to_send`` / ``close``
/ ``closed``) is the same as :class:`daemons.ws.WebSocketServerLayer`, so a
driver can stack them (wss = TLS below WebSocket).
"""

from __future__ import annotations

import os
import ssl

from ipc_core.errors import IPCError, PeerClosed, ProtocolError

__all__ = ["TLSLayer", "client_context", "server_context"]

StrPath = str | os.PathLike[str]

# One SSLObject.read() returns at most one record's worth (16 KiB); asking for
# more costs nothing and keeps the loop short if OpenSSL ever returns more.
_READ_SIZE = 65536


def server_context(
    cert: StrPath,
    key: StrPath | None,
    *,
    client_ca: StrPath | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """Build a server context: TLS >= 1.2, the ssl module's server defaults.

    ``client_ca`` makes the server ask for (and verify) a client certificate;
    ``require_client_cert`` turns the request into a requirement (mTLS).
    We start from ``SSLContext(PROTOCOL_TLS_SERVER)`` rather than
    ``create_default_context(CLIENT_AUTH)`` on purpose: the latter loads the
    system CA store as trust anchors for *client* certificates, so any
    certificate from a public CA would pass our mTLS check.
    """
    if require_client_cert and client_ca is None:
        raise ValueError("require_client_cert needs client_ca to verify against")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation (TLS 1.2) only serves CPU-exhaustion attacks.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
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
    ``cert``/``key`` present a client certificate for mTLS.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    elif key is not None:
        raise ValueError("a client key needs a client certificate")
    return ctx


def _protocol_error(exc: ssl.SSLError) -> ProtocolError:
    """Turn OpenSSL's error into a readable, loggable reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"certificate verify failed: {exc.verify_message}"
    elif exc.reason:
        reason = exc.reason.lower().replace("_", " ")
    else:
        reason = str(exc)
    err = ProtocolError(f"tls: {reason}")
    err.__cause__ = exc
    return err


class TLSLayer:
    """One TLS connection, either side, with no I/O of its own."""

    def __init__(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._handshake_complete = False
        self._pending: list[bytes] = []  # plaintext sent before the handshake completed
        self._error: IPCError | None = None  # raised by the next receive_data
        self._closing = False  # close() was called
        # fast_receive declined after feeding the BIO: what it read (bytes) or
        # the error it hit, for the receive_data call that follows with the
        # same bytes (see fast_receive).
        self._fed: bytes | ssl.SSLError | None = None
        if not server_side:
            # The client speaks first: put the ClientHello in the outgoing BIO.
            self._advance_handshake()

    # -- state -------------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        return self._handshake_complete

    @property
    def closed(self) -> bool:
        """True once the connection is over and data_to_send() is drained.

        "Over" means close() was called, the peer closed, or an error occurred;
        waiting for the drain keeps a driver from dropping our close_notify or
        alert on the floor.
        """
        return (self._closing or self._error is not None) and not self._outgoing.pending

    @property
    def version(self) -> str | None:
        """Negotiated protocol, e.g. ``"TLSv1.3"``; None before the handshake."""
        return self._ssl.version() if self._handshake_complete else None

    @property
    def cipher(self) -> tuple[str, str, int] | None:
        """``(name, protocol, secret bits)``; None before the handshake."""
        return self._ssl.cipher() if self._handshake_complete else None

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate (DER), or None if it presented none."""
        if not self._handshake_complete:
            return None
        return self._ssl.getpeercert(binary_form=True)

    # -- network side ------------------------------------------------------

    def receive_data(self, data: bytes) -> bytes:
        """Feed ciphertext (b"" = EOF); return the plaintext it completed."""
        if self._error is not None:
            raise self._error
        fed, self._fed = self._fed, None
        if fed is not None:
            pass  # fast_receive already put these bytes into the BIO
        elif data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        try:
            if not self._handshake_complete and not self._advance_handshake():
                if not data:
                    raise PeerClosed("tls: connection closed during the handshake")
                return b""
            return self._read_all(fed)
        except IPCError as exc:
            self._error = exc
            raise

    def data_to_send(self) -> bytes:
        """Ciphertext waiting to be written to the network (b"" if none)."""
        return self._outgoing.read()

    # -- the core's fast hooks (see ipc_core.switch.Layer) -------------------

    def fast_receive(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """Decrypt one read of an established connection in one call: the
        plaintext when it completed a record and nothing else came of it (no
        bytes to send back, no alert, nothing left over). Otherwise None, and
        the receive_data(data) call that follows finishes the job as the
        general path would (the bytes are already in the BIO by then)."""
        if (
            not self._handshake_complete
            or self._closing
            or self._error is not None
            or self._fed is not None
            or self._incoming.pending
        ):
            return None
        self._incoming.write(data)
        try:
            chunk = self._ssl.read(_READ_SIZE)
        except ssl.SSLError as exc:  # incl. want-read (a partial record), close_notify
            self._fed = exc
            return None
        if (
            chunk
            and not self._incoming.pending
            and not self._ssl.pending()
            and not self._outgoing.pending
        ):
            return chunk
        self._fed = chunk
        return None

    def fast_send(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """Encrypt one whole LibIPC message into the bytes for the network,
        when nothing is queued before it; None (nothing done): use send()."""
        if (
            not self._handshake_complete
            or self._closing
            or self._error is not None
            or self._outgoing.pending
        ):
            return None
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            self._error = _protocol_error(exc)  # as send() would: dropped, raised later
            return None
        return self._outgoing.read()

    # -- local side --------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Encrypt ``data`` for the peer (held until the handshake completes).

        Data sent after close() or after the connection failed is dropped: in
        a relay the local side routinely races the network side's close.
        """
        if self._closing or self._error is not None or not data:
            return
        if not self._handshake_complete:
            self._pending.append(bytes(data))
            return
        self._write(data)

    def close(self) -> None:
        """Start an orderly close: queue our close_notify."""
        if self._closing or self._error is not None:
            return
        self._closing = True
        self._pending.clear()
        if not self._handshake_complete:
            return  # nothing to protect yet; the driver just drops the socket
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # our close_notify is queued; we do not wait for the peer's
        except ssl.SSLError:
            pass  # already broken: closing anyway

    # -- internals ---------------------------------------------------------

    def _advance_handshake(self) -> bool:
        """Run the handshake as far as the received bytes allow."""
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError) as exc:
            raise PeerClosed("tls: connection closed during the handshake") from exc
        except ssl.SSLError as exc:
            raise _protocol_error(exc) from exc
        self._handshake_complete = True
        pending, self._pending = self._pending, []
        for chunk in pending:
            self._write(chunk)
        return True

    def _read_all(self, fed: bytes | ssl.SSLError | None = None) -> bytes:
        """Decrypt everything available; defer a close/error behind the data.
        ``fed``: what fast_receive already read (or the error it hit)."""
        chunks: list[bytes] = []
        read = self._ssl.read
        incoming = self._incoming
        ssl_pending = self._ssl.pending
        try:
            if isinstance(fed, ssl.SSLError):
                raise fed
            if fed:
                chunks.append(fed)
                if not incoming.pending and not ssl_pending():
                    return fed
            while True:
                chunk = read(_READ_SIZE)
                if not chunk:  # SSL_read reports a clean close this way too
                    raise ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed")
                chunks.append(chunk)
                if not incoming.pending and not ssl_pending():
                    # Everything received is decrypted: skip the read that
                    # would only raise SSLWantReadError (an exception per
                    # message is a measurable share of a small message's cost).
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except ssl.SSLWantReadError:
            return b"".join(chunks)
        except ssl.SSLZeroReturnError as exc:
            err: IPCError = PeerClosed("tls: peer sent close_notify")
            err.__cause__ = exc
        except ssl.SSLEOFError as exc:
            err = PeerClosed("tls: peer closed the connection without close_notify")
            err.__cause__ = exc
        except ssl.SSLError as exc:
            err = _protocol_error(exc)
        if not chunks:
            raise err
        self._error = err
        return b"".join(chunks)

    def _write(self, data: bytes) -> None:
        try:
            # With a MemoryBIO, write() takes everything (the BIO grows).
            self._ssl.write(data)
        except ssl.SSLError as exc:
            self._error = _protocol_error(exc)
