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

Server side, the name the client asked for (SNI) is kept for the peer
information (:attr:`TLSLayer.server_name`). OpenSSL tells it only to a
callback on the context, and CPython reports a name that is not ASCII from
there as an "Exception ignored" traceback on stderr (a client could fill the
log with them); so the layer reads it from the ClientHello itself
(:class:`_ServerNameReader`), while the handshake is on, bounded.

The layer shape (``receive_data`` / ``send`` / ``data_to_send`` / ``close``
/ ``closed``) is the same as :class:`daemons.codecs.ws.WebSocketServerLayer`, so a
driver can stack them (wss = TLS below WebSocket).
"""

from __future__ import annotations

import ssl

from ipc_core import IPCError, PeerClosed, ProtocolError

__all__ = ["TLSLayer"]

# One SSLObject.read() returns at most one record's worth (16 KiB); asking for
# more costs nothing and keeps the loop short if OpenSSL ever returns more.
_READ_SIZE = 65536

# --------------------------------------------------------------------------
# Errors a layer keeps
# --------------------------------------------------------------------------


def _protocol_error(exc: ssl.SSLError) -> ProtocolError:
    """Turn OpenSSL's error into a readable, loggable reason.

    No ``__cause__`` here: an error the layer keeps must not hold a traceback
    (see :func:`_fresh`); callers that raise at once add ``from exc``.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"certificate verify failed: {exc.verify_message}"
    elif exc.reason:
        reason = exc.reason.lower().replace("_", " ")
    else:
        reason = str(exc)
    return ProtocolError(f"tls: {reason}")


def _fresh(err: IPCError) -> IPCError:
    """A new exception like ``err``, with no traceback, cause or context.

    Why: a raised exception's traceback holds the frames it passed through,
    and those frames hold the layer. Keeping a raised exception on the layer
    (to raise it again later) makes a cycle, so a closed layer, and its
    buffers, would live until the cyclic GC runs. The layer keeps a copy that
    is never raised and raises new copies of it.
    """
    return type(err)(*err.args)


def _read_error(exc: ssl.SSLError | None) -> IPCError | None:
    """What an ``SSLObject.read`` failure means; None: just wait for more.
    ``exc`` None is a read that returned b"" (a clean close)."""
    if exc is None or isinstance(exc, ssl.SSLZeroReturnError):
        return PeerClosed("tls: peer sent close_notify")
    if isinstance(exc, ssl.SSLWantReadError):
        return None
    if isinstance(exc, ssl.SSLEOFError):
        return PeerClosed("tls: peer closed the connection without close_notify")
    return _protocol_error(exc)


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
        #: Server side, until the ClientHello is read: where the SNI is looked for.
        self._sni_reader: _ServerNameReader | None = _ServerNameReader() if server_side else None
        self._sni: str | None = None
        self._handshake_complete = False
        self._pending: list[bytes] = []  # plaintext sent before the handshake completed
        # Raised (as a fresh copy, see _fresh) by the next receive_data; never
        # raised itself, so it holds no traceback and no frame holding us.
        self._error: IPCError | None = None
        self._closing = False  # close() was called
        # fast_receive declined after feeding the BIO: what it read (bytes) or
        # the error it hit (without its traceback), for the receive_data call
        # that follows with the same bytes (see fast_receive).
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

    @property
    def server_name(self) -> str | None:
        """The server name of the session: the one the client asked for (SNI)
        on the server side (None if it sent none), the one we asked for on
        the client side."""
        if self._ssl.server_side:
            return self._sni
        return self._ssl.server_hostname

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate (DER), or None if it presented none."""
        if not self._handshake_complete:
            return None
        return self._ssl.getpeercert(binary_form=True)

    # -- network side ------------------------------------------------------

    def receive_data(self, data: bytes) -> bytes:
        """Feed ciphertext (b"" = EOF); return the plaintext it completed."""
        if self._error is not None:
            raise _fresh(self._error)
        fed, self._fed = self._fed, None
        if fed is not None:
            pass  # fast_receive already put these bytes into the BIO
        elif data:
            self._incoming.write(data)
            if self._sni_reader is not None and self._sni_reader.feed(data):
                self._sni, self._sni_reader = self._sni_reader.name, None
        else:
            self._incoming.write_eof()
        try:
            if not self._handshake_complete and not self._advance_handshake():
                if not data:
                    raise PeerClosed("tls: connection closed during the handshake")
                return b""
            return self._read_all(fed)
        except IPCError as exc:
            self._error = _fresh(exc)
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
            self._fed = exc.with_traceback(None)  # its frames hold us (see _fresh)
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

    def send(self, data: bytes | bytearray | memoryview) -> None:
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
        if isinstance(fed, ssl.SSLError):
            return self._stop_reading(chunks, fed)
        read = self._ssl.read
        incoming = self._incoming
        ssl_pending = self._ssl.pending
        if fed:
            chunks.append(fed)
            if not incoming.pending and not ssl_pending():
                return fed
        try:
            while True:
                chunk = read(_READ_SIZE)
                if not chunk:  # SSL_read reports a clean close this way too
                    return self._stop_reading(chunks, None)
                chunks.append(chunk)
                if not incoming.pending and not ssl_pending():
                    # Everything received is decrypted: skip the read that
                    # would only raise SSLWantReadError (an exception per
                    # message is a measurable share of a small message's cost).
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except ssl.SSLError as exc:
            return self._stop_reading(chunks, exc)

    def _stop_reading(self, chunks: list[bytes], exc: ssl.SSLError | None) -> bytes:
        """The plaintext read so far; a close or error is raised now if there
        is none, else kept for the next call. Never raises a local variable:
        the dead frame would hold the exception and the exception the frame."""
        err = _read_error(exc)
        data = b"".join(chunks)
        if err is None:
            return data
        self._error = err
        if data:
            return data
        raise _fresh(err)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            # With a MemoryBIO, write() takes everything (the BIO grows).
            self._ssl.write(data)
        except ssl.SSLError as exc:
            self._error = _protocol_error(exc)


# --------------------------------------------------------------------------
# The server name (SNI) of a ClientHello
# --------------------------------------------------------------------------

_RECORD_HEADER = 5
_HANDSHAKE_RECORD = 22
_CLIENT_HELLO = 1
#: A ClientHello larger than this is not looked into (post-quantum key shares
#: make them ~2 KiB; the protocol allows 16 MiB, which we never hold).
_MAX_CLIENT_HELLO = 32 * 1024
_SERVER_NAME_EXTENSION = 0
_HOST_NAME = 0


class _ServerNameReader:
    """Finds the host name in the client's first handshake message.

    ``feed(ciphertext)`` until it answers True (done: :attr:`name` is the
    name, or None if there was none or the bytes were not a ClientHello it
    could read). It never raises: OpenSSL judges the handshake; this only
    reads what it will have accepted. It holds at most one record header
    plus :data:`_MAX_CLIENT_HELLO` bytes, and only until the ClientHello ends.
    """

    __slots__ = ("_message", "_raw", "name")

    def __init__(self) -> None:
        self._raw = b""  # bytes not yet split into records
        self._message = bytearray()  # handshake bytes, across records
        self.name: str | None = None

    def feed(self, data: bytes) -> bool:
        raw = self._raw + data
        message = self._message
        while len(raw) >= _RECORD_HEADER:
            if raw[0] != _HANDSHAKE_RECORD:
                return True
            length = int.from_bytes(raw[3:5], "big")
            if len(raw) < _RECORD_HEADER + length:
                break
            message += raw[_RECORD_HEADER : _RECORD_HEADER + length]
            raw = raw[_RECORD_HEADER + length :]
            if len(message) >= 4:
                if message[0] != _CLIENT_HELLO:
                    return True
                size = int.from_bytes(message[1:4], "big")
                if size > _MAX_CLIENT_HELLO:
                    return True
                if len(message) >= 4 + size:
                    self.name = _server_name(bytes(message[4 : 4 + size]))
                    return True
        if len(raw) + len(message) > _MAX_CLIENT_HELLO + _RECORD_HEADER:
            return True
        self._raw = raw
        return False


def _server_name(hello: bytes) -> str | None:
    """The host_name of a ClientHello body's server_name extension (RFC 6066
    section 3), if it is printable ASCII; None otherwise."""
    try:
        at = 2 + 32  # legacy_version, random
        at += 1 + hello[at]  # legacy_session_id
        at += 2 + int.from_bytes(hello[at : at + 2], "big")  # cipher_suites
        at += 1 + hello[at]  # legacy_compression_methods
        end = at + 2 + int.from_bytes(hello[at : at + 2], "big")
        at += 2
        while at + 4 <= min(end, len(hello)):
            kind = int.from_bytes(hello[at : at + 2], "big")
            size = int.from_bytes(hello[at + 2 : at + 4], "big")
            body = hello[at + 4 : at + 4 + size]
            at += 4 + size
            if kind != _SERVER_NAME_EXTENSION:
                continue
            names = body[2 : 2 + int.from_bytes(body[:2], "big")]
            pos = 0
            while pos + 3 <= len(names):
                name_type = names[pos]
                length = int.from_bytes(names[pos + 1 : pos + 3], "big")
                name = names[pos + 3 : pos + 3 + length]
                pos += 3 + length
                if name_type == _HOST_NAME and len(name) == length:
                    if name and all(0x21 <= b < 0x7F for b in name):
                        return name.decode("ascii")
                    return None
            return None
    except IndexError:
        return None
    return None
