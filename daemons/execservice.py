"""The service behind ``ipc exec``: one program per client connection.

:mod:`daemons.ipc_exec` is the command (options, environment, start-up);
this is what it runs in its loop.

Theory of operation
-------------------
One Context, one loop, no thread per client. The service opts in to peer
information (``service_init(NAME, peer_info=True)``), so a client relayed
by ipc-tcpd, ipc-tlsd or ipc-websocketd arrives with a PeerInfo; a local
client that connects to NAME directly arrives without one.

Each CONNECTION starts one process (:func:`daemons.engine.children.spawn`)
whose stdin and stdout are one end of a Unix socket pair, and whose stderr
is a pipe. The other end of the pair is switched with the client
(``ctx.add_switch``): the loop relays both ways, with a Sans-I/O layer on
the program's end for line and raw modes (:mod:`daemons.codecs.lines`) and
none for framed mode. The switch gives back-pressure for free: when the
client's queue is over the mark the loop stops reading the program (its
socket buffer fills, the program blocks in write); when the program does
not read its stdin the loop stops reading the client.

In framed mode the program speaks LibIPC itself, so nothing is relayed:
after the door's accept, ``ctx.release`` gives the client's connection up
(never shut down) and the program gets it as its stdin and stdout. ipc exec
keeps its copy only to see the client leave (EPOLLHUP in a private epoll,
itself one EXTERNAL descriptor: the copy is never read) and closes it when
the program exits. A client whose first bytes ipc exec already read (sent
right behind the door's offer) takes the relay path instead, so that they
reach the program.

Lifecycle: the client leaving closes the pair (the program reads EOF), then
:meth:`Children.stop` sends SIGTERM to its process group after ``--grace``
and SIGKILL a grace later; the program exiting (a pidfd in the loop, reaped
at once) closes the client once its last output is relayed, and the exit
status is logged.

WebSocket clients of ipc-websocketd come handed over (lock mark
``handoff-websocket``): ipc exec answers their handshake itself and feeds
the program over two pipes (:mod:`daemons.engine.piperelay`), so one relay
is in the path, as in websocketd.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import socket
import struct
from collections.abc import Sequence

from ipc_core import Context, EventType, HandedOver, IPCError, PeerInfo, UsageError

from .codecs.lines import LineLayer, RawLayer
from .codecs.ws import HoldPool, WebSocketServerLayer
from .codecs.wsrequest import TokenScrubber
from .engine.cgienv import connection_environment
from .engine.children import Child, Children, describe_status, spawn
from .engine.daemon import source_key
from .engine.log import LogThrottle, escape_log_text
from .engine.options import version
from .engine.piperelay import PipeRelay, PipeRelays
from .engine.tokens import find_token

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "MODES", "ExecService", "frame_log"]

log = logging.getLogger("ipc.exec")
#: websockets' own log for handed-over clients (every frame and the request
#: at DEBUG, each connection at INFO): only with -vv, and never a token.
frame_log = logging.getLogger("ipc.exec.frames")
frame_log.addFilter(TokenScrubber())
#: As ipc-websocketd's --hold-pool default.
DEFAULT_HOLD_POOL = 2 * 1024 * 1024

MODES = ("line", "framed", "raw")
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
#: After its program exited, how long a client waits for the program's last
#: output before it is closed anyway (a background grandchild may hold the
#: program's stdout open).
DRAIN_SECONDS = 1.0
_UCRED = struct.Struct("3i")


class _Client:
    """One client connection and its program."""

    __slots__ = ("child", "client_fd", "closed_client", "program_fd", "reason")

    def __init__(self, client_fd: int, program_fd: int, child: Child) -> None:
        self.client_fd = client_fd
        self.program_fd = program_fd
        self.child = child
        self.closed_client = False
        self.reason: str | None = None


class _Direct:
    """A --framed client given to its program: ipc exec's copy of the
    connection, kept only to see the client leave (EPOLLHUP)."""

    __slots__ = ("child", "sock")

    def __init__(self, sock: socket.socket, child: Child) -> None:
        self.sock = sock
        self.child = child


class ExecService:
    """The service NAME: one program per client connection."""

    def __init__(
        self,
        ctx: Context,
        name: str,
        path: str,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        mode: str = "line",
        max_processes: int = 256,
        grace: float = 5.0,
        stderr_rate: int = 50,
        handoff: bool = True,
        ping_interval: float = 20.0,
        max_per_ip: int = 64,
    ) -> None:
        if mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}")
        self.ctx = ctx
        self.name = name
        self.path = path
        self.argv = list(argv)
        self.program = os.path.basename(argv[0]) or argv[0]
        self.env = env
        self.mode = mode
        self.max_processes = max_processes
        self.children = Children(ctx, grace=grace, stderr_rate=stderr_rate)
        self.listener = -1
        self._by_client: dict[int, _Client] = {}
        self._by_program: dict[int, _Client] = {}
        self._by_pid: dict[int, _Client] = {}
        #: --framed clients whose program holds the connection itself:
        #: descriptor of ipc exec's copy -> its record; and by child pid.
        self._direct: dict[int, _Direct] = {}
        self._direct_by_pid: dict[int, _Direct] = {}
        #: Where those copies are watched for the client leaving (one epoll,
        #: itself an EXTERNAL descriptor of the Context: the copies are never
        #: read, so their data must not wake the loop).
        self._watch: select.epoll | None = None
        #: Take WebSocket connections over from ipc-websocketd (lock mark
        #: ``handoff-websocket``): relayed here, over pipes, in ``_relays``.
        self.handoff = handoff
        self.ping_interval = ping_interval
        #: Programs one client address (IPv6: its /64) may run at once; 0: no cap.
        #: The daemons' --max-connections-per-ip counts a connection only while
        #: they hold it; a handed-over one is counted here.
        self.max_per_ip = max_per_ip
        self._per_ip: dict[str, int] = {}
        self._ip_of: dict[int, str] = {}  # pid -> its client's key
        self._relays: PipeRelays | None = None
        #: Unfinished fragmented messages all handed-over clients may hold
        #: beyond 256 KiB each, as ipc-websocketd bounds them.
        self._hold_pool = HoldPool(DEFAULT_HOLD_POOL)
        self._relay_by_pid: dict[int, tuple[PipeRelay, Child]] = {}
        self._refusals = LogThrottle()
        self._failures = LogThrottle()
        self._software = f"ipc-exec/{version()}"

    def start(self) -> None:
        """Listen as NAME (ServiceBusy if it runs already)."""
        self.listener = self.ctx.service_init(
            self.name, peer_info=True, handoff_websocket=self.handoff
        )
        if self.handoff:
            self._relays = PipeRelays(self.ctx, ping_interval=self.ping_interval)
        if self.mode == "framed":
            self._watch = select.epoll()
            self.ctx.add_external(self._watch.fileno())

    def serve(self) -> None:
        """Run until the Context is stopped (SIGINT/SIGTERM), then stop every child."""
        ctx = self.ctx
        try:
            for event in ctx:
                kind = event.type
                if kind is EventType.EXTERNAL:
                    if self._relays is not None and event.fd == self._relays.fd:
                        self._relays.run()
                    elif self._watch is not None and event.fd == self._watch.fileno():
                        self._clients_left()
                    else:
                        self.children.handle(event.fd)
                elif kind is EventType.CONNECTION:
                    self._connected(event.fd, event.peer)
                elif kind is EventType.DISCONNECTION:
                    self._disconnected(event.fd, event.reason)
                elif kind is EventType.MESSAGE_RX:
                    self._early_message(event.fd, event.message or b"")
        finally:
            ctx.close_all()
            for direct in list(self._direct.values()):
                self._let_go(direct)
            if self._watch is not None:
                self._watch.close()
            if self._relays is not None:
                self._relays.close()
            self.children.shutdown()

    # ------------------------------------------------------------ connecting

    def _label(self, fd: int, peer: PeerInfo | None) -> str:
        if peer is None:
            try:
                sock = self.ctx.socket_of(fd)
                pid = _UCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
                )[0]
                return f"local pid {pid}"
            except (OSError, IPCError, struct.error):
                return f"local client {fd}"
        address = peer.client_address or "unknown"
        if ":" in address:
            address = f"[{address}]"
        port = f":{peer.client_port}" if peer.client_port is not None else ""
        return escape_log_text(f"{peer.transport} {address}{port}")

    def _ip_key(self, peer: PeerInfo | None) -> str | None:
        """The per-address key of a client that came through a daemon (None:
        a local client, an unknown address, or no cap)."""
        if not self.max_per_ip or peer is None or not peer.client_address:
            return None
        return source_key((peer.client_address, peer.client_port or 0))

    def _count(self, pid: int, peer: PeerInfo | None) -> None:
        """A program started for ``peer``: counted under its address until it exits."""
        key = self._ip_key(peer)
        if key is not None:
            self._per_ip[key] = self._per_ip.get(key, 0) + 1
            self._ip_of[pid] = key

    def _uncount(self, pid: int) -> None:
        key = self._ip_of.pop(pid, None)
        if key is not None:
            left = self._per_ip[key] - 1
            if left:
                self._per_ip[key] = left
            else:
                del self._per_ip[key]

    def _refuse(self, fd: int, peer: PeerInfo | None, reason: str) -> None:
        if peer is not None:
            self.ctx.refuse(fd, reason)
        else:
            self.ctx.close(fd)

    def _connected(self, fd: int, peer: PeerInfo | None) -> None:
        label = self._label(fd, peer)
        if len(self.children) >= self.max_processes:
            more = self._refusals.due()
            if more is not None:
                log.warning(
                    "%s refused: %d processes running (--max-processes)%s",
                    label,
                    len(self.children),
                    more,
                )
            self._refuse(fd, peer, f"too many clients of {self.name} (--max-processes)")
            return
        key = self._ip_key(peer)
        if key is not None and self._per_ip.get(key, 0) >= self.max_per_ip:
            more = self._refusals.due()
            if more is not None:
                log.warning(
                    "%s refused: %d programs for %s (--max-connections-per-ip)%s",
                    label,
                    self._per_ip[key],
                    key,
                    more,
                )
            self._refuse(fd, peer, f"too many connections from {key} (--max-connections-per-ip)")
            return
        local_pid = local_uid = None
        if peer is None:
            with contextlib.suppress(OSError, IPCError, struct.error):
                local_pid, local_uid, _gid = _UCRED.unpack(
                    self.ctx.socket_of(fd).getsockopt(
                        socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size
                    )
                )
        env = connection_environment(
            self.env,
            self.name,
            peer,
            software=self._software,
            local_pid=local_pid,
            local_uid=local_uid,
        )
        if self._relays is not None and peer is not None and peer.transport == "ws":
            handed = self.ctx.take_handoff(fd)
            if handed is not None:
                self._take(handed, label, env)
                return
            if fd not in self.ctx:  # a hand-off the daemon withdrew (logged): gone
                return
        if self.mode == "framed" and self._give(fd, peer, label, env):
            return
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors: this client only
            self._cannot_start(fd, peer, label, exc)
            return
        try:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            ours.close()
            theirs.close()
            self._cannot_start(fd, peer, label, exc)
            return
        try:
            pid = spawn(self.path, self.argv, env, theirs.fileno(), err_w)
        except OSError as exc:
            ours.close()
            os.close(err_r)
            self._cannot_start(fd, peer, label, exc)
            return
        finally:
            theirs.close()
            os.close(err_w)
        child = Child(pid, self.program, label)
        self._count(pid, peer)
        child.on_exit = self._exited
        self.children.watch(child, err_r)
        ours.setblocking(False)
        program_fd = ours.fileno()
        self.ctx.add_switch(fd, ours)  # sends the door's accept first
        if self.mode == "line":
            self.ctx.set_switch_codec(program_fd, LineLayer(self.ctx.max_message_size))
        elif self.mode == "raw":
            self.ctx.set_switch_codec(program_fd, RawLayer(self.ctx.max_message_size))
        client = _Client(fd, program_fd, child)
        self._by_client[fd] = client
        self._by_program[program_fd] = client
        self._by_pid[pid] = client
        log.debug("%s: started %s", label, child.name)

    def _give(self, fd: int, peer: PeerInfo | None, label: str, env: dict[str, str]) -> bool:
        """--framed: start the program with the client's connection itself as
        its stdin and stdout, so no relay stays in the path. False (nothing
        done) when the Context already read bytes of this client (messages
        sent right behind the door's offer): the relay path delivers them.

        ``release`` sends the door's accept before the program can write a
        byte, and gives the socket up without shutting it down; ipc exec
        keeps its copy only to see the client leave (then closes it: the
        program's copy holds the connection), and closes it when the
        program exits, so that the client sees the end."""
        assert self._watch is not None
        try:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            self._cannot_start(fd, peer, label, exc)
            return True
        try:
            sock = self.ctx.release(fd)
        except UsageError:  # early bytes: relayed instead
            os.close(err_r)
            os.close(err_w)
            return False
        except IPCError:  # gone while the accept was written
            os.close(err_r)
            os.close(err_w)
            return True
        try:
            sock.setblocking(True)  # the program shares the open file's flags
            pid = spawn(self.path, self.argv, env, sock.fileno(), err_w)
        except OSError as exc:
            sock.close()
            os.close(err_r)
            self._log_cannot_start(label, exc)  # the accept is out: the client can only be closed
            return True
        finally:
            os.close(err_w)
        child = Child(pid, self.program, label)
        self._count(pid, peer)
        child.on_exit = self._exited
        self.children.watch(child, err_r)
        direct = _Direct(sock, child)
        try:
            # No event asked for: EPOLLHUP (the client closed: a Unix socket
            # whose peer is gone) and EPOLLERR come anyway; data and a
            # half-close (a client waiting for its answer) do not wake us.
            self._watch.register(sock.fileno(), 0)
        except OSError:  # cannot watch (out of memory): the program alone holds it
            sock.close()
        else:
            self._direct[sock.fileno()] = direct
        self._direct_by_pid[pid] = direct
        log.debug("%s: started %s with the connection", label, child.name)
        return True

    def _take(self, handed: HandedOver, label: str, env: dict[str, str]) -> None:
        """A WebSocket connection handed over by ipc-websocketd: answer its
        handshake here (the request is in ``early``), start the program with
        two pipes, and relay between them (:mod:`daemons.engine.piperelay`):
        one relay in the path, as websocketd has."""
        assert self._relays is not None
        sock, peer = handed.sock, handed.peer
        ws = WebSocketServerLayer(
            max_message_size=self.ctx.max_message_size, logger=frame_log, pool=self._hold_pool
        )
        try:
            ws.receive_data(handed.early)  # the request head: DECIDING
        except IPCError as exc:  # a request the daemon accepted but this layer does not
            self._handoff_broken(sock, ws, label, exc)
            return
        pipes: list[int] = []
        try:
            for _ in range(3):
                pipes.extend(os.pipe2(os.O_CLOEXEC))
            in_r, in_w, out_r, out_w, err_r, err_w = pipes
            pid = spawn(self.path, self.argv, env, in_r, err_w, stdout=out_w)
        except OSError as exc:  # out of descriptors, or the program cannot run
            _close_fds(pipes)
            self._handoff_failed(sock, ws, label, exc)
            return
        _close_fds([in_r, out_w, err_w])  # the program's ends
        child = Child(pid, self.program, label)
        self._count(pid, peer)
        child.on_exit = self._exited
        self.children.watch(child, err_r)
        try:
            opening = ws.accept(_subprotocol(ws, peer))  # 101; messages behind the request
        except IPCError as exc:  # e.g. a close frame or a bad frame right behind it
            _close_fds([in_w, out_r])  # the program reads EOF
            self.children.stop(child)
            self._handoff_broken(sock, ws, label, exc)
            return
        program: LineLayer | RawLayer | None = None
        if self.mode == "line":
            program = LineLayer(self.ctx.max_message_size)
        elif self.mode == "raw":
            program = RawLayer(self.ctx.max_message_size)
        relay = self._relays.start(
            sock,
            ws,
            program,
            in_w,
            out_r,
            label=f"{child.name} ({label})",
            on_end=functools.partial(self._relay_ended, child=child),
        )
        self._relay_by_pid[pid] = (relay, child)
        relay.to_client(ws.data_to_send())
        if opening:
            relay.to_program(opening)
        log.debug("%s: started %s (WebSocket handed over)", label, child.name)

    @staticmethod
    def _handoff_broken(
        sock: socket.socket, ws: WebSocketServerLayer, label: str, exc: IPCError
    ) -> None:
        """The handed-over client's bytes do not make a WebSocket here: what
        the layer answers (an HTTP error, a close frame) goes out, then the close."""
        log.warning("%s: WebSocket hand-off: %s; closing", label, exc)
        with contextlib.suppress(OSError, IPCError):
            sock.send(ws.data_to_send())
        sock.close()
        ws.release()

    def _handoff_failed(
        self, sock: socket.socket, ws: WebSocketServerLayer, label: str, exc: OSError
    ) -> None:
        """No program for a handed-over client: 503, logged at a bounded rate."""
        self._log_cannot_start(label, exc)
        with contextlib.suppress(IPCError):
            ws.reject(503, "Service unavailable: the program cannot be started.\n")
        with contextlib.suppress(OSError, IPCError):
            sock.send(ws.data_to_send())
        sock.close()
        ws.release()

    def _relay_ended(self, relay: PipeRelay, child: Child) -> None:
        """A handed-over client is done (it left, or the program's output
        ended): the program, if still running, gets its grace period."""
        if relay.reason:
            log.info("%s: closed: %s", relay.label, relay.reason)
        if child.status is None:
            self.children.stop(child)
        else:
            self._relay_by_pid.pop(child.pid, None)

    def _clients_left(self) -> None:
        """Clients of --framed programs left (EPOLLHUP: the program reads EOF
        and its writes fail): ipc exec's copies go, the programs get the grace
        period."""
        assert self._watch is not None
        for fd, _mask in self._watch.poll(0, 256):
            direct = self._direct.get(fd)
            if direct is None:
                continue
            self._let_go(direct)
            if direct.child.status is None:
                self.children.stop(direct.child)

    def _let_go(self, direct: _Direct) -> None:
        """Close ipc exec's copy of a --framed connection (never a shutdown:
        the program's copy stays connected)."""
        fd = direct.sock.fileno()
        if fd < 0 or self._direct.get(fd) is not direct:
            return
        del self._direct[fd]
        if self._watch is not None:
            with contextlib.suppress(OSError, ValueError):
                self._watch.unregister(fd)
        direct.sock.close()

    def _direct_exited(self, direct: _Direct) -> None:
        """A --framed program exited: the client sees the end once ipc exec's
        copy is closed too; a process left in its group may hold the
        connection (a background job): SIGTERM to the group after
        DRAIN_SECONDS, as the relay path does."""
        child = direct.child
        still_connected = direct.sock.fileno() >= 0
        self._let_go(direct)
        if not still_connected:
            return
        try:
            os.killpg(child.pid, 0)
        except (ProcessLookupError, PermissionError):
            return

        def drained() -> None:
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                return
            log.info(
                "%s (%s): its background processes may still hold the connection: SIGTERM",
                child.name,
                child.label,
            )

        self.ctx.call_later(DRAIN_SECONDS, drained)

    def _log_cannot_start(self, label: str, exc: OSError) -> None:
        more = self._failures.due()
        if more is not None:
            log.error(
                "cannot start %s for %s: %s; closing the client%s",
                self.path,
                label,
                exc.strerror or exc,
                more,
            )

    def _cannot_start(self, fd: int, peer: PeerInfo | None, label: str, exc: OSError) -> None:
        """The program cannot run for this client: logged (at a bounded
        rate), the client refused or closed, the others unaffected."""
        self._log_cannot_start(label, exc)
        self._refuse(fd, peer, f"{self.name}: the program cannot be started")

    def _early_message(self, fd: int, message: bytes) -> None:
        """A message read with the connection (right behind a door's offer),
        queued before the switch: it goes to the program first."""
        client = self._by_client.get(fd)
        if client is not None and fd in self.ctx:
            self.ctx.feed_switch(fd, len(message).to_bytes(4, "big") + message)

    # ------------------------------------------------------------ closing

    def _disconnected(self, fd: int, reason: str | None) -> None:
        client = self._by_client.pop(fd, None)
        if client is not None:
            client.closed_client = True
            if reason and client.reason is None:
                client.reason = reason
                log.info("%s (%s): closed: %s", client.child.name, client.child.label, reason)
            return
        client = self._by_program.pop(fd, None)
        if client is None:
            return
        if reason and client.reason is None:
            client.reason = reason
            log.info("%s (%s): closed: %s", client.child.name, client.child.label, reason)
        # The program's stdin and stdout are closed: it has the grace period.
        self.children.stop(client.child)

    def _exited(self, child: Child) -> None:
        self._uncount(child.pid)
        status = child.status or 0
        level = logging.INFO if status == 0 else logging.WARNING
        handed = self._relay_by_pid.pop(child.pid, None)
        if handed is not None:
            relay = handed[0]
            log.log(level, "%s (%s) %s", child.name, child.label, describe_status(status))
            if relay.open:
                # Its output is relayed until its stdout ends; a background
                # process holding it open gets DRAIN_SECONDS, then the end.
                self.ctx.call_later(DRAIN_SECONDS, relay.close_program_output)
            return
        direct = self._direct_by_pid.pop(child.pid, None)
        if direct is not None:
            log.log(level, "%s (%s) %s", child.name, child.label, describe_status(status))
            self._direct_exited(direct)
            return
        client = self._by_pid.pop(child.pid, None)
        if client is None or self._by_program.get(client.program_fd) is not client:
            log.log(level, "%s (%s) %s", child.name, child.label, describe_status(status))
            return
        log.log(
            level,
            "%s (%s) %s; closing its client",
            child.name,
            child.label,
            describe_status(status),
        )
        program_fd = client.program_fd

        def drained() -> None:
            if self._by_program.get(program_fd) is client and program_fd in self.ctx:
                # A background process of the program holds its stdout: the
                # client goes (once its queue is written), and so does the
                # rest of the program's process group.
                log.info(
                    "%s (%s): its background processes still hold its output: SIGTERM",
                    child.name,
                    child.label,
                )
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGTERM)
                self.ctx.close(program_fd)

        self.ctx.call_later(DRAIN_SECONDS, drained)


def _subprotocol(ws: WebSocketServerLayer, peer: PeerInfo) -> str | None:
    """The subprotocol the 101 selects: ipc-websocketd's choice. The peer
    information never names a token entry (``ipc.token.TOKEN``, a secret),
    which the daemon selects when the client offered nothing else (a browser
    fails a connection whose offered subprotocol goes unanswered): found
    again in the request, as the daemon found it."""
    if peer.subprotocol is not None or ws.request is None:
        return peer.subprotocol
    presented = find_token(ws.request.path, ws.request.headers)
    return presented.echo if presented.where == "subprotocol" else None


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
