"""The TCPd handshake, Sans-I/O, both sides (reference-compatible bytes).

Server side: the peer writes the service name as raw bytes (no length
prefix); we answer the raw bytes ``ok`` once the local service is connected,
and from then on the stream carries LibIPC frames. The reference takes
whatever its first read returns as the name, which loses a first message sent
in the same segment and breaks on a name split over two segments. We find
the end of the name instead:

* the name ends at the first byte below 0x20. A NUL is kept (it is the first
  byte of the next frame's length header for any message under 16 MiB); a
  ``\\n`` or ``\\r\\n`` is consumed (friendly to ``nc``);
* with no such byte yet, the name is complete as soon as ``$RUNDIR/NAME``
  exists (what a reference client sends), else when no byte has come for
  ``settle_after`` seconds (the engine then calls :meth:`settle`);
* more than 100 bytes without an end is a protocol error.

Client side: write the name, read exactly ``ok``; anything else is a refusal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ipc_core import Layer, PeerClosed, ProtocolError
from ipc_core.peerinfo import PeerInfo

from ..engine.policy import MAX_SERVICE_NAME_BYTES

OK = b"ok"


class TcpdHandshake:
    """Server side of the TCPd handshake (see the module docstring)."""

    settle_after = 0.2

    def __init__(self, service_exists: Callable[[str], bool] = lambda _name: False) -> None:
        self.service: str | None = None
        self.finished = False
        self._exists = service_exists
        self._buf = b""
        self._cr = False  # a lone "\r" ended the last read (held, not in _buf)
        self._early = b""
        self._out = b""

    def receive_data(self, data: bytes) -> None:
        if self.service is not None or self.finished:
            self._early += data
            return
        if not data:
            raise PeerClosed("EOF before a service name")
        self._buf += b"\r" + data if self._cr else data
        self._cr = False
        for i, byte in enumerate(self._buf):
            if byte < 0x20:
                rest = self._buf[i:]
                if rest == b"\r":
                    # Maybe the first half of "\r\n": wait for the next byte,
                    # holding the name only (bounded like any unfinished name).
                    self._check_length(i)
                    self._buf, self._cr = self._buf[:i], True
                    return
                if rest[:2] == b"\r\n":
                    rest = rest[2:]
                elif rest[:1] == b"\n":
                    rest = rest[1:]
                self._take(self._buf[:i], rest)
                return
        self._check_length(len(self._buf))
        try:
            name = self._buf.decode()
        except UnicodeDecodeError:
            return  # a segment may end inside a UTF-8 character: wait for the rest
        if self._exists(name):
            self._take(self._buf, b"")

    @staticmethod
    def _check_length(size: int) -> None:
        """An unfinished name is never held beyond the limit (with or without
        a trailing ``\r``: both used to differ, see the fuzz tests)."""
        if size > MAX_SERVICE_NAME_BYTES:
            raise ProtocolError(f"no end of service name after {size} bytes")

    def settle(self) -> None:
        """No more bytes came: take what we have as the name (a held ``\r``
        is dropped: it ended the name)."""
        if self.service is None and (self._buf or self._cr):
            self._cr = False
            self._take(self._buf, b"")

    def _take(self, name: bytes, rest: bytes) -> None:
        if not name:
            raise ProtocolError("empty service name")
        self.service = self._decode(name)
        self._early = rest
        self._buf = b""

    @staticmethod
    def _decode(name: bytes) -> str:
        try:
            return name.decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"service name {name[:40]!r} is not UTF-8") from None

    def data_to_send(self) -> bytes:
        out, self._out = self._out, b""
        return out

    def accept(self) -> tuple[Layer | None, bytes]:
        """Queue ``ok``; return no layer (the stream is LibIPC) and early bytes."""
        self._out += OK
        early, self._early = self._early, b""
        return None, early

    #: The lock mark of a service that takes this stream (``HandsOver``).
    handoff_mark = "handoff"

    def handover(self) -> tuple[bytes, bytes] | None:
        """Accept for a hand-off: ``ok`` and the early bytes go to the service,
        which writes ``ok`` itself (the stream after it is plain LibIPC)."""
        _layer, early = self.accept()
        return self.data_to_send(), early

    def reject(self, reason: str, status: int) -> None:
        """The reference just closes: nothing to send."""
        self.finished = True

    def describe(self, info: PeerInfo) -> PeerInfo:
        """Peer information: a TCPd peer is plain ``tcp`` and its name tells
        nothing else (the addresses are the socket's, or a PROXY header's)."""
        return info if info.transport == "tcp" else dataclasses.replace(info, transport="tcp")


class TcpdClient:
    """Client side: send the name, expect ``ok``; keep what follows it."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.done = False
        self._out = service.encode()
        self._buf = b""

    def data_to_send(self) -> bytes:
        out, self._out = self._out, b""
        return out

    def receive_data(self, data: bytes) -> None:
        if not data:
            raise PeerClosed(
                f"remote closed the connection: service {self.service!r} refused or unknown there"
            )
        self._buf += data
        if len(self._buf) < len(OK):
            return
        if self._buf[: len(OK)] != OK:
            raise ProtocolError(f"remote answered {self._buf[:40]!r} instead of 'ok'")
        self.done = True

    def result(self) -> tuple[Layer | None, bytes]:
        """No layer; the LibIPC bytes that came right after ``ok``."""
        early, self._buf = self._buf[len(OK) :], b""
        return None, early
