"""Relays between a handed-over network socket and a program's two pipes.

Why: ``ipc exec`` behind ipc-websocketd used to be two relays per message
(ipc-websocketd to the service, the service to the program) over Unix
sockets. When ipc-websocketd hands the WebSocket connection over (lock mark
``handoff-websocket``), ``ipc exec`` holds the client's socket itself and
talks to the program over pipes, as websocketd does: one relay, and a pipe
write costs the kernel far less than a Unix-socket send (measured in
``make bench``, suite ``exec``).

Each :class:`PipeRelay` joins three descriptors: the client's socket, the
write end of the program's stdin and the read end of its stdout. Two
Sans-I/O layers translate: ``net`` between the client's wire bytes and the
LibIPC stream (the WebSocket layer, which answers the handshake from the
request it is given), ``program`` between that stream and the program's
bytes (lines or raw reads; None: the program speaks LibIPC frames). Both
layers' fast paths take a read that is exactly one message in one call.

All relays of a process share one private epoll (:class:`PipeRelays`),
itself a single EXTERNAL descriptor of the Context: the loop wakes once for
a batch. Every buffer is bounded: bytes for the client above
``high_water`` stop the reading of the program (its pipe fills, it blocks in
write); bytes for the program above it stop the reading of the client.

Ending: the client leaving (EOF, a close frame, an error) closes the
program's stdin and calls ``on_end`` (the owner then stops the program after
its grace period); the program closing its stdout (it exited) closes the
WebSocket with 1000 once what it wrote is sent; a message of the program
the client cannot be given (a line over the limit) closes it with 1011, the
daemon stopping with 1001. What is still unsent to a client that does not
read goes after ``linger`` seconds. Every
``ping_interval`` each client is pinged, and one whose previous ping got no
pong is closed (as ipc-websocketd's keepalive does for the clients it relays).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

from ipc_core import Context, IPCError, PeerClosed, TimerHandle

__all__ = ["DEFAULT_HIGH_WATER", "PipeRelay", "PipeRelays"]

log = logging.getLogger("ipc.exec")

DEFAULT_HIGH_WATER = 256 * 1024
_READ = 65536
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP
_U32 = struct.Struct(">I")
_FRAMED, _RAW, _LINE = 0, 1, 2
_GOING_AWAY = 1001  # WebSocket close codes (RFC 6455 7.4.1)
_INTERNAL_ERROR = 1011


class _Layer(Protocol):
    """What a relay needs of a Sans-I/O layer (both sides have fast paths)."""

    def receive_data(self, data: bytes) -> bytes: ...
    def fast_receive(self, data: Any) -> bytes | None: ...
    def send(self, data: Any) -> None: ...
    def fast_send(self, data: Any) -> bytes | None: ...
    def data_to_send(self) -> bytes: ...


def _one_frame(stream: bytes) -> bool:
    """``stream`` is exactly one whole LibIPC frame (a fast path applies)."""
    return len(stream) >= 4 and _U32.unpack_from(stream)[0] + 4 == len(stream)


class PipeRelay:
    """One client socket and one program (see the module docstring)."""

    __slots__ = (
        "_buf",
        "_bufs",
        "_closing_timer",
        "_done",
        "_net_eof",
        "_net_out",
        "_prog_eof",
        "_prog_out",
        "_reading_net",
        "_reading_prog",
        "_relays",
        "_view",
        "high_water",
        "kind",
        "label",
        "net",
        "on_end",
        "program",
        "reason",
        "sock",
        "stdin",
        "stdout",
    )

    def __init__(
        self,
        relays: PipeRelays,
        sock: socket.socket,
        net: Any,
        program: Any | None,
        stdin: int,
        stdout: int,
        *,
        label: str,
        on_end: Callable[[PipeRelay], None] | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
    ) -> None:
        self._relays = relays
        self.sock = sock
        self.net = net
        self.program = program
        #: What the program reads and writes: LibIPC frames, raw reads, lines.
        self.kind = _FRAMED if program is None else _LINE if hasattr(program, "fast_line") else _RAW
        self.stdin = stdin  # the write end of the program's stdin (-1: closed)
        self.stdout = stdout  # the read end of its stdout (-1: closed)
        self.label = label
        self.on_end = on_end
        self.high_water = high_water
        self.reason: str | None = None
        self._net_out = bytearray()  # for the client, not yet taken by its socket
        self._prog_out = bytearray()  # for the program, not yet taken by its pipe
        self._reading_net = True
        self._reading_prog = True
        self._net_eof = False  # the client is done (nothing more read from it)
        self._prog_eof = False  # the program's output ended
        self._closing_timer: TimerHandle | None = None
        self._done = False  # the socket is closed
        self._buf = relays.buf  # shared by every relay: a read is handled before the next
        self._bufs = [relays.buf]
        self._view = relays.view

    # ------------------------------------------------------------ client side

    def net_readable(self) -> None:
        try:
            n = self.sock.recv_into(self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._client_gone(f"read failed: {exc.strerror or exc}")
            return
        if n == 0:
            self._slow_net(b"")
            return
        data = self._view[:n]
        kind = self.kind
        if kind:  # one whole message, the program reads it raw or as a line
            out = self.net.fast_payload(data)
            if out is not None and kind == _LINE:
                out += b"\n"
        else:
            out = self.net.fast_receive(data)
        if out is None:
            self._slow_net(bytes(data))
        elif self._prog_out or self.stdin < 0:
            self._write_program(out)
        else:  # the common case, inline: the pipe takes it all
            try:
                written = os.write(self.stdin, out)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self._program_input_gone(exc)
                return
            if written < len(out):
                self._write_program(out[written:])

    def _slow_net(self, data: bytes) -> None:
        """Anything but one whole data frame: websockets' parser (control
        frames, fragments, the close handshake, errors), then the program."""
        net = self.net
        try:
            stream = net.receive_data(data)
        except PeerClosed as exc:
            self._flush_net_layer()
            self._client_gone(None if not data else str(exc))
            return
        except IPCError as exc:  # the layer queued its close frame
            self._flush_net_layer()
            self._client_gone(str(exc))
            return
        self._flush_net_layer()  # pongs, a close reply
        if stream:
            self.to_program(stream)
        if getattr(net, "closed", False):
            self._client_gone(None)

    def to_program(self, stream: bytes) -> None:
        """LibIPC stream bytes from the client, for the program."""
        if self.stdin < 0:
            return  # the program closed its stdin: what the client says is dropped
        program = self.program
        if program is None:
            out = stream
        else:
            fast = program.fast_send(stream) if _one_frame(stream) else None
            if fast is None:
                program.send(stream)
                out = program.data_to_send()
            else:
                out = fast
        if out:
            self._write_program(out)

    def _write_program(self, out: bytes) -> None:
        if self.stdin < 0:
            return
        if self._prog_out:
            self._prog_out += out
        else:
            try:
                n = os.write(self.stdin, out)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._program_input_gone(exc)
                return
            if n == len(out):
                return
            self._prog_out += out[n:]
            self._relays.want(self.stdin, _OUT)
        if self._reading_net and len(self._prog_out) > self.high_water:
            self._reading_net = False  # the program is slow: stop reading the client
            self._watch_client()

    def stdin_writable(self) -> None:
        pending = self._prog_out
        try:
            n = os.write(self.stdin, pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self._program_input_gone(exc)
            return
        del pending[:n]
        if not pending:
            self._relays.want(self.stdin, 0)
        if not self._reading_net and not self._net_eof and len(pending) <= self.high_water // 4:
            self._reading_net = True
            self._watch_client()

    def _watch_client(self) -> None:
        """Watch the client's socket for reading while it is read, and for
        writing while bytes wait for it: pausing one direction must not
        pause the other (both congested at once would never drain)."""
        mask = _IN if self._reading_net and not self._net_eof else 0
        self._relays.want(self.sock.fileno(), (mask | _OUT) if self._net_out else mask)

    def _program_input_gone(self, exc: OSError) -> None:
        """The program no longer reads its stdin (closed it, or exited):
        what the client sends from now on is dropped; its output still goes."""
        if exc.errno != errno.EPIPE:
            log.debug("%s: writing to the program: %s", self.label, exc.strerror or exc)
        self._prog_out.clear()
        self._close_stdin()
        if not self._reading_net and not self._net_eof:
            # Paused for the program's sake: read the client again (what it
            # sends is dropped), or its pongs and its close would never be read.
            self._reading_net = True
            self._watch_client()

    # ----------------------------------------------------------- program side

    def stdout_readable(self) -> None:
        try:
            n = os.readv(self.stdout, self._bufs)
        except BlockingIOError:
            return
        except OSError as exc:
            n = 0
            log.debug("%s: reading the program: %s", self.label, exc.strerror or exc)
        if not n:
            self._program_done()
            return
        data = self._view[:n]
        kind = self.kind
        net = self.net
        if kind == _RAW:
            wire = net.fast_send_payload(data)
        elif kind == _LINE:
            line = self.program.fast_line(data)  # type: ignore[union-attr]
            wire = None if line is None else net.fast_send_payload(line)
        else:
            wire = net.fast_send(data) if _one_frame(data) else None  # type: ignore[arg-type]
        if wire is None:
            self._slow_program(bytes(data))
        elif self._net_out or self._done:
            self.to_client(wire)
        else:  # the common case, inline: the socket takes it all
            try:
                sent = self.sock.send(wire)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._client_gone(f"write failed: {exc.strerror or exc}", lost=True)
                return
            if sent < len(wire):
                self.to_client(wire[sent:])

    def _slow_program(self, data: bytes) -> None:
        """Anything but one whole message: the program's layer, then the
        client's general path."""
        program = self.program
        try:
            stream = data if program is None else program.receive_data(data)
        except IPCError as exc:  # a line over the maximum message size
            self._fail(f"the program: {exc}")
            return
        if not stream:
            return
        net = self.net
        try:
            wire = net.fast_send(stream) if _one_frame(stream) else None
            if wire is None:
                net.send(stream)
                wire = net.data_to_send()
        except IPCError as exc:  # too large a message: the layer queued 1011
            self._fail(f"the program: {exc}")
            return
        self.to_client(wire)

    def to_client(self, wire: bytes) -> None:
        if not wire or self._done:
            return
        if self._net_out:
            self._net_out += wire
        else:
            try:
                n = self.sock.send(wire)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._client_gone(f"write failed: {exc.strerror or exc}", lost=True)
                return
            if n == len(wire):
                return
            self._net_out += wire[n:]
            self._relays.want(self.sock.fileno(), _OUT | (_IN if self._reading_net else 0))
        if self._reading_prog and len(self._net_out) > self.high_water:
            self._reading_prog = False  # the client reads slowly: stop reading the program
            if self.stdout >= 0:
                self._relays.want(self.stdout, 0)

    def net_writable(self) -> None:
        pending = self._net_out
        try:
            n = self.sock.send(pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self._client_gone(f"write failed: {exc.strerror or exc}", lost=True)
            return
        del pending[:n]
        if not pending:
            if self._net_eof and self._prog_eof:
                self._finish()
                return
            self._relays.want(self.sock.fileno(), _IN if self._reading_net else 0)
        if not self._reading_prog and len(pending) <= self.high_water // 4 and self.stdout >= 0:
            self._reading_prog = True
            self._relays.want(self.stdout, _IN)

    # ----------------------------------------------------------------- ending

    def _flush_net_layer(self) -> None:
        with contextlib.suppress(IPCError):
            out = self.net.data_to_send()
            if out:
                self.to_client(out)

    def _client_gone(self, reason: str | None, *, lost: bool = False) -> None:
        """The client is done: the program reads EOF; the owner stops it."""
        if self._net_eof:
            if lost:
                self._finish()
            return
        self._net_eof = True
        if reason and self.reason is None:
            self.reason = reason
        self._relays.want(self.sock.fileno(), _OUT if self._net_out and not lost else 0)
        self._close_stdin()
        self._close_stdout()
        self._prog_eof = True
        self._ended()
        if lost or not self._net_out:
            self._finish()
        else:
            self._linger()

    def _ended(self) -> None:
        """Tell the owner, once, that this client is done with its program."""
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(self)

    def _program_done(self) -> None:
        """The program's output ended: what it wrote is sent, then the close
        frame (1000); the client's answering close (read like any frame) ends
        the connection, as RFC 6455 has it, so the browser sees a clean close.
        A client that never answers is cut after ``linger`` seconds."""
        self._close_stdout()
        self._prog_eof = True
        if self._net_eof:
            return
        with contextlib.suppress(IPCError):
            self.net.close()
        self._flush_net_layer()
        self._close_stdin()
        self._ended()
        if getattr(self.net, "closed", True):  # nothing to wait for (no handshake layer)
            self._client_gone(None)
            return
        self._reading_net = True  # the answer must be read, paused or not
        self._watch_client()
        self._linger()

    def _fail(self, reason: str) -> None:
        """A protocol error on the program's side: the client gets the close
        frame the layer queued (or the socket closes), the program its EOF."""
        if self.reason is None:
            self.reason = reason
        log.info("%s: %s; closing", self.label, reason)
        with contextlib.suppress(IPCError):  # a no-op when the layer queued its own
            self.net.close(_INTERNAL_ERROR, "the program's output is not deliverable")
        self._flush_net_layer()
        self._close_stdout()
        self._client_gone(reason)

    def keepalive(self, interval: float) -> None:
        """Every ``interval``: a ping; a client whose last pong never came is
        gone (a peer that vanished without a FIN would hold its program
        forever)."""
        if self._net_eof:
            return
        net = self.net
        if not net.pong_received_since_last_ping():
            self._client_gone(f"no pong within {interval:g} s", lost=True)
            return
        net.ping()
        self._flush_net_layer()

    def close_program_output(self) -> None:
        """The program exited and a grandchild may hold its stdout: end now."""
        if self.stdout >= 0:
            self._program_done()

    def _linger(self) -> None:
        if self._closing_timer is None:
            self._closing_timer = self._relays.ctx.call_later(self._relays.linger, self._finish)

    def _close_stdin(self) -> None:
        self.stdin = self._relays.close_fd(self.stdin)

    def _close_stdout(self) -> None:
        self.stdout = self._relays.close_fd(self.stdout)

    def _finish(self) -> None:
        """Everything closed; the relay forgotten."""
        if self._closing_timer is not None:
            self._closing_timer.cancel()
            self._closing_timer = None
        self._close_stdin()
        self._close_stdout()
        if not self._done:
            self._done = True
            self._relays.forget(self.sock.fileno())
            self.sock.close()
        release = getattr(self.net, "release", None)
        if release is not None:
            release()
        self._relays.ended(self)

    def close(self) -> None:
        """Stop at once (the daemon stops): the client is told 1001 (going
        away) when its socket takes the close frame now, as a relayed client
        is by ipc-websocketd."""
        if not self._done and not self._net_eof and not self._net_out:
            with contextlib.suppress(IPCError, OSError):
                self.net.close(_GOING_AWAY)
                out = self.net.data_to_send()
                if out:
                    self.sock.send(out)
        self._net_eof = self._prog_eof = True
        self._finish()

    @property
    def open(self) -> bool:
        return not self._done


class PipeRelays:
    """The relays of one process, in one private epoll that is itself one
    EXTERNAL descriptor of ``ctx`` (see the module docstring)."""

    def __init__(self, ctx: Context, *, linger: float = 2.0, ping_interval: float = 20.0) -> None:
        self.ctx = ctx
        self.linger = linger
        self.ping_interval = ping_interval
        if ping_interval > 0:
            ctx.call_later(ping_interval, self._ping_all)
        self._ep = select.epoll()
        self.fd = ctx.add_external(self._ep.fileno())
        #: descriptor -> (relay, what it is: 0 client, 1 stdin, 2 stdout)
        self._by_fd: dict[int, tuple[PipeRelay, int]] = {}
        self._mask: dict[int, int] = {}
        #: descriptor -> what reads it (the hot path: data, nothing else)
        self._readers: dict[int, Callable[[], None]] = {}
        self.relays: set[PipeRelay] = set()
        #: One read buffer for every relay (a read is handled before the next).
        self.buf = bytearray(_READ)
        self.view = memoryview(self.buf)

    def __len__(self) -> int:
        return len(self.relays)

    def start(
        self,
        sock: socket.socket,
        net: Any,
        program: Any | None,
        stdin: int,
        stdout: int,
        *,
        label: str,
        early: bytes = b"",
        on_end: Callable[[PipeRelay], None] | None = None,
    ) -> PipeRelay:
        """Relay ``sock`` (non-blocking; ``early``: bytes already read from
        it, parsed first) to a program's ``stdin`` and from its ``stdout``
        (pipe ends, owned from now on)."""
        os.set_blocking(stdin, False)
        os.set_blocking(stdout, False)
        relay = PipeRelay(self, sock, net, program, stdin, stdout, label=label, on_end=on_end)
        self.relays.add(relay)
        self._by_fd[sock.fileno()] = (relay, 0)
        self._by_fd[stdin] = (relay, 1)
        self._by_fd[stdout] = (relay, 2)
        self._readers[sock.fileno()] = relay.net_readable
        self._readers[stdout] = relay.stdout_readable
        self._register(sock.fileno(), _IN)
        self._register(stdin, 0)
        self._register(stdout, _IN)
        if early:
            self._early(relay, early)
        return relay

    def _early(self, relay: PipeRelay, early: bytes) -> None:
        try:
            stream = relay.net.receive_data(early)
        except IPCError as exc:
            relay._flush_net_layer()
            relay._client_gone(str(exc))
            return
        relay._flush_net_layer()
        if stream:
            relay.to_program(stream)

    def _register(self, fd: int, mask: int) -> None:
        self._ep.register(fd, mask)
        self._mask[fd] = mask

    def want(self, fd: int, mask: int) -> None:
        """Watch ``fd`` for ``mask`` (0: only errors) from now on."""
        if fd < 0 or self._mask.get(fd, -1) == mask:
            return
        with contextlib.suppress(OSError, KeyError):
            self._ep.modify(fd, mask)
            self._mask[fd] = mask

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed."""
        self._by_fd.pop(fd, None)
        self._readers.pop(fd, None)
        if self._mask.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def _ping_all(self) -> None:
        if self._ep.closed:
            return
        self.ctx.call_later(self.ping_interval, self._ping_all)
        for relay in list(self.relays):
            relay.keepalive(self.ping_interval)

    def close_fd(self, fd: int) -> int:
        """Forget and close pipe end ``fd`` (if open); -1, its new value."""
        if fd >= 0:
            self.forget(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        return -1

    def ended(self, relay: PipeRelay) -> None:
        self.relays.discard(relay)

    def run(self) -> None:
        """The EXTERNAL event of the private epoll: every ready descriptor."""
        by_fd = self._by_fd
        readers = self._readers
        for fd, mask in self._ep.poll(0, 512):
            if mask == _IN:  # the common case: data
                reader = readers.get(fd)
                if reader is not None:
                    reader()
                continue
            entry = by_fd.get(fd)
            if entry is None:
                continue
            relay, kind = entry
            if kind == 0:
                if mask & _OUT:
                    relay.net_writable()
                if mask & (_IN | _ERR) and by_fd.get(fd) is entry:
                    if relay._net_eof:
                        relay._client_gone(None, lost=True)
                    else:
                        relay.net_readable()
            elif kind == 2:
                relay.stdout_readable()
            elif mask & _ERR and not mask & _OUT:
                relay._program_input_gone(OSError(errno.EPIPE, "the program closed its stdin"))
            else:
                relay.stdin_writable()

    def close(self) -> None:
        for relay in list(self.relays):
            relay.close()
        with contextlib.suppress(Exception):
            self.ctx.remove_external(self.fd)
        self._ep.close()
