"""Relaying between the two ends of a switched pair.

Theory of operation
-------------------
What one end of a pair reads is written to its partner inside the loop. How
depends on the pair's set-up, so the way is chosen once, when the switch is
made (and again when a codec or callbacks are set on the pair), and stored
as the end's ``reader``; the loop then calls ``conn.reader(conn)`` and no
read re-decides it. :meth:`Relay.choose` picks one strategy per end:

=================  ========================================  ==================
strategy           when (for the end that reads)             what a read costs
=================  ========================================  ==================
``read_plain``     neither end has a layer, the partner no   one ``send`` of the
                   out-callback: both carry the LibIPC       bytes read; frame
                   stream as is (the TCPd relay)             boundaries checked
``read_fast_out``  this end plain, the partner's layer has   the layer's wire
                   ``fast_send``                             bytes for one frame
``read_fast_in``   this end's layer has ``fast_receive``,    the stream the
                   the partner is plain                      layer decoded
``read_general``   anything else (layers without fast        ``relay_data``:
                   hooks, the partner's out-callback)        layer, scan, forward
``read_callback``  this end has an in-callback (the          the callback reads
                   reference's API)                          itself
=================  ========================================  ==================

Each fast strategy handles the common case inline (one read is exactly one
whole frame, the partner's socket takes it all) and hands anything else
(partial or several frames, an oversize length, a hook that declines) to
``relay_data``, the general path, with the same bytes: the general path
gives the same result, only slower. ``read_plain`` repeats the tail of
``_pass_on`` rather than calling it: it is the hottest function of a relay,
and one more call per message shows in the benchmarks.

When one end goes, ``Connections.close_pair`` closes the other after its
queue and gives it ``read_orphan``.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
from typing import TYPE_CHECKING, Any

from ._connections import Connections, Reader, bad_input
from .errors import MessageTooLarge, PeerClosed, ProtocolError
from .events import Event, EventType
from .framing import FrameDecoder, header
from .switch import SwitchResult, fast_receive_of, fast_send_of

if TYPE_CHECKING:
    import collections

    from ._connections import Conn
    from .framing import FrameScanner

log = logging.getLogger("ipc_core")

_unpack_header = struct.Struct(">I").unpack_from
# Reads up to this size are relayed as a copy of the read buffer: copying a
# small read is cheaper than slicing a memoryview (and C functions take a
# bytearray faster than a memoryview); larger reads keep the zero-copy view.
_COPY_READS = 4096
_SWITCH_RX = EventType.SWITCH_RX
_SWITCH_TX = EventType.SWITCH_TX


class Relay:
    """The strategies that forward what switched ends read (see above)."""

    def __init__(
        self,
        table: Connections,
        buf: bytearray,
        events: collections.deque[Event],
        *,
        max_message_size: int,
        switch_events: bool,
    ) -> None:
        self.table = table
        self._buf = buf
        self._view = memoryview(buf)
        self._events = events
        self.max_message_size = max_message_size
        #: False: no SWITCH_RX/SWITCH_TX events (a daemon does not need them).
        self.switch_events = switch_events
        # The strategies' slow paths, bound once.
        self._enqueue = table.enqueue
        self._lost = table.lost
        self._close_pair = table.close_pair

    # -------------------------------------------------------------- choosing

    def choose(self, conn: Conn) -> None:
        """(Re)choose the strategy of both ends of ``conn``'s pair."""
        partner = conn.partner
        conn.reader = self._strategy(conn, partner)
        if partner is not None:
            partner.reader = self._strategy(partner, conn)

    def _strategy(self, end: Conn, other: Conn | None) -> Reader:
        end.fast_in = end.fast_out = None
        if end.in_cb is not None:
            return self.read_callback
        if other is None or other.out_cb is not None:
            return self.read_general
        if end.layer is None:
            if other.layer is None:
                return self.read_plain
            end.fast_out = fast_send_of(other.layer)
            if end.fast_out is not None:
                return self.read_fast_out
        elif other.layer is None:
            end.fast_in = fast_receive_of(end.layer)
            if end.fast_in is not None:
                return self.read_fast_in
        return self.read_general

    # ------------------------------------------------------------ strategies

    def read_plain(self, conn: Conn) -> None:
        """Both ends carry the LibIPC stream: forward the chunk as it is."""
        buf = self._buf
        try:
            n = conn.sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close_pair(conn, f"read failed: {exc.strerror or exc}")
            return
        if n == 0:
            self.switch_eof(conn)
            return
        data: Any = buf[:n] if n <= _COPY_READS else self._view[:n]
        scanner: FrameScanner = conn.scanner  # type: ignore[assignment]
        if (
            scanner.idle
            and n >= 4
            and (length := _unpack_header(buf)[0]) + 4 == n
            and length <= scanner.max_message_size
        ):
            frames = 1  # exactly one whole frame: FrameScanner.scan's fast path, inlined
        else:
            try:
                frames = scanner.scan(data)
            except MessageTooLarge:
                self.relay_data(conn, data)  # the general path logs, forwards the good part
                return
        # _pass_on, inlined (see the module docstring)
        stats = conn.stats
        stats.bytes += n
        stats.messages += frames
        partner: Conn = conn.partner  # type: ignore[assignment]
        if partner.out:
            # a copy of a small read is private already; a view of the buffer is not
            self._enqueue(partner, bytes(data) if type(data) is memoryview else data)
        else:
            try:
                sent = partner.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(partner, exc)
                return
            if sent < n:
                self._enqueue(partner, bytes(data[sent:]))
        if self.switch_events:
            self._events.append(Event(_SWITCH_RX, conn.fd))
            self._events.append(Event(_SWITCH_TX, partner.fd))

    def read_fast_out(self, conn: Conn) -> None:
        """This end plain, the partner's layer has ``fast_send``: a read that
        is one whole frame becomes the layer's wire bytes in one call."""
        buf = self._buf
        try:
            n = conn.sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close_pair(conn, f"read failed: {exc.strerror or exc}")
            return
        if n == 0:
            self.switch_eof(conn)
            return
        data: Any = buf[:n] if n <= _COPY_READS else self._view[:n]
        scanner: FrameScanner = conn.scanner  # type: ignore[assignment]
        if not (
            scanner.idle
            and n >= 4
            and (length := _unpack_header(buf)[0]) + 4 == n
            and length <= scanner.max_message_size
        ):
            self.relay_data(conn, data)
            return
        out = conn.fast_out(data)  # type: ignore[misc]  # one message -> its wire bytes
        if out is None:
            self.relay_data(conn, data)
            return
        self._pass_on(conn, out, n)

    def read_fast_in(self, conn: Conn) -> None:
        """This end's layer has ``fast_receive``, the partner is plain: the
        wire bytes of one read become the LibIPC stream in one call."""
        buf = self._buf
        try:
            n = conn.sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close_pair(conn, f"read failed: {exc.strerror or exc}")
            return
        if n == 0:
            self.switch_eof(conn)
            return
        data: Any = buf[:n] if n <= _COPY_READS else self._view[:n]
        out = conn.fast_in(data)  # type: ignore[misc]
        if out is None:
            self.relay_data(conn, data)
            return
        size = len(out)
        scanner: FrameScanner = conn.scanner  # type: ignore[assignment]
        if not (
            scanner.idle
            and size >= 4
            and (length := _unpack_header(out)[0]) + 4 == size
            and length <= scanner.max_message_size
        ):
            self.relay_data(conn, out, decoded=True)  # scans, counts, forwards
            return
        self._pass_on(conn, out, size)

    def read_general(self, conn: Conn) -> None:
        """Layers without fast hooks, an out-callback on the partner: every
        read goes through ``relay_data``."""
        buf = self._buf
        try:
            n = conn.sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close_pair(conn, f"read failed: {exc.strerror or exc}")
            return
        if n == 0:
            self.switch_eof(conn)
            return
        self.relay_data(conn, buf[:n] if n <= _COPY_READS else self._view[:n])

    def read_callback(self, conn: Conn) -> None:
        """The reference's in-callback reads ``conn`` itself and returns one
        payload (or IGNORE, FD_CLOSING, ERROR)."""
        partner = conn.partner
        assert partner is not None and conn.in_cb is not None
        try:
            result, payload = conn.in_cb(conn.fd)
        except Exception as exc:  # a callback's bug must not kill the loop
            log.exception("switch in-callback failed on %d", conn.fd)
            self._close_pair(conn, f"in callback raised {exc!r}")
            return
        if result == SwitchResult.IGNORE:
            return
        if result != SwitchResult.NO_ERROR or payload is None:
            reason = None if result == SwitchResult.FD_CLOSING else "in callback: error"
            self._close_pair(conn, reason)
            return
        if partner.out_cb is not None:
            self._call_out_cb(partner, payload)
        elif partner.layer is not None:
            partner.layer.send(header(len(payload)) + payload)
            self.table.flush_layer(partner)
        else:
            self.table.send(partner, header(len(payload)) + payload)
        if self.switch_events:
            self._events.append(Event(_SWITCH_RX, conn.fd))
            self._events.append(Event(_SWITCH_TX, partner.fd))

    def _pass_on(self, conn: Conn, data: bytes, size: int) -> None:
        """Send one whole frame's bytes (``size`` of them counted as read) to
        the partner; queue what its socket does not take."""
        stats = conn.stats
        stats.bytes += size
        stats.messages += 1
        partner: Conn = conn.partner  # type: ignore[assignment]
        if partner.out:
            self._enqueue(partner, data)
        else:
            try:
                sent = partner.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(partner, exc)
                return
            if sent < len(data):
                self._enqueue(partner, data[sent:])
        if self.switch_events:
            self._events.append(Event(_SWITCH_RX, conn.fd))
            self._events.append(Event(_SWITCH_TX, partner.fd))

    # ---------------------------------------------------------- general path

    def relay_data(
        self, conn: Conn, data: bytes | bytearray | memoryview, *, decoded: bool = False
    ) -> None:
        """Forward bytes read from ``conn`` to its partner: the general path
        (layers, callbacks, partial or several frames). ``decoded``: the
        bytes are the LibIPC stream already (not for ``conn``'s layer)."""
        partner = conn.partner
        assert partner is not None
        layer = conn.layer
        if layer is not None and not decoded:
            try:
                data = layer.receive_data(bytes(data))
            except PeerClosed:
                self.table.flush_layer(conn)
                self._close_pair(conn, None)
                return
            except ProtocolError as exc:
                log.warning("descriptor %d: %s; closing the pair", conn.fd, exc)
                self.table.flush_layer(conn)
                self._close_pair(conn, str(exc), error=type(exc))
                return
            pending = layer.data_to_send()  # e.g. a TLS alert or a pong
            if pending:
                self.table.send(conn, pending)
            if not data or conn.fd not in self.table.conns:
                return
        try:
            frames = conn.scanner.scan(data)  # type: ignore[union-attr]
        except MessageTooLarge as exc:
            log.warning("%s; closing the pair", bad_input(conn, exc))
            if exc.valid_bytes:  # deliver the good messages before the bad header
                self._forward(conn, partner, data[: exc.valid_bytes])
            self._close_pair(conn, str(exc), error=MessageTooLarge)
            return
        stats = conn.stats
        stats.bytes += len(data)
        stats.messages += frames
        self._forward(conn, partner, data)
        if self.switch_events:
            self._events.append(Event(_SWITCH_RX, conn.fd))
            self._events.append(Event(_SWITCH_TX, partner.fd))

    def _forward(self, conn: Conn, partner: Conn, data: bytes | bytearray | memoryview) -> None:
        if partner.layer is not None:
            try:
                # Layers copy what they keep (SSLObject.write, FrameDecoder), so
                # the read buffer's view can be passed without a copy.
                partner.layer.send(data)
            except ProtocolError as exc:
                log.warning("descriptor %d: %s; closing the pair", partner.fd, exc)
                self.table.flush_layer(partner)
                self._close_pair(partner, str(exc), error=type(exc))
                return
            self.table.flush_layer(partner)
        elif partner.out_cb is not None:
            self._write_switched_callback(conn, partner, data)
        else:
            self.table.send(partner, data, copy=True)  # type: ignore[arg-type]

    def _write_switched_callback(
        self, conn: Conn, partner: Conn, data: bytes | bytearray | memoryview
    ) -> None:
        if conn.decoder is None:
            conn.decoder = FrameDecoder(self.max_message_size)
        for payload in conn.decoder.feed(data):
            if not self._call_out_cb(partner, payload):
                return

    def _call_out_cb(self, conn: Conn, payload: bytes) -> bool:
        assert conn.out_cb is not None
        try:
            result = conn.out_cb(conn.fd, payload)
        except Exception as exc:
            log.exception("switch out-callback failed on %d", conn.fd)
            self._close_pair(conn, f"out callback raised {exc!r}")
            return False
        if result in (SwitchResult.NO_ERROR, SwitchResult.IGNORE):
            return True
        self._close_pair(conn, None if result == SwitchResult.FD_CLOSING else "out callback: error")
        return False

    # ------------------------------------------------------------ half-close

    def switch_eof(self, conn: Conn) -> None:
        """End ``conn`` of a pair read EOF: honour a half-close.

        Between two plain socket ends (the TCPd relay), the partner's write
        side is shut down once what is queued for it is written, and the other
        direction keeps flowing until its reader sees EOF (or an error) too;
        only then are both closed. A peer that sends its requests then
        ``shutdown(SHUT_WR)`` so gets every reply. Layered or callback ends
        (TLS, WebSocket: the protocol has its own close, and its layer speaks
        for the socket), a peer that is wholly gone (POLLHUP: a Unix peer that
        closed, not just shut its write side) and a second EOF close the pair
        as before.
        """
        partner = conn.partner
        if conn.layer is not None:
            with contextlib.suppress(PeerClosed, ProtocolError):
                conn.layer.receive_data(b"")
            self._close_pair(conn, None)
            return
        if (
            conn.eof
            or partner is None
            or partner.eof
            or not _can_shut_write(partner)
            or _hung_up(conn.sock)
        ):
            self._close_pair(conn, None)
            return
        conn.eof = True
        self.table.update_mask(conn)  # no more EPOLLIN: a half-closed socket stays readable
        if partner.out:
            partner.shut_pending = True
        else:
            self.table.shut_write(partner)


def _can_shut_write(conn: Conn) -> bool:
    """Whether a switched end can be half-closed by shutting its socket's
    write side: a plain socket (no layer or out-callback speaking for it)."""
    return conn.layer is None and conn.out_cb is None and isinstance(conn.sock, socket.socket)


def _hung_up(sock: socket.socket) -> bool:
    """True when both directions of ``sock`` are shut (POLLHUP): a Unix peer
    that closed, as opposed to one that only shut its write side. One poll,
    made once per connection (at its EOF)."""
    poller = select.poll()
    poller.register(sock.fileno(), 0)
    return any(events & select.POLLHUP for _, events in poller.poll(0))
