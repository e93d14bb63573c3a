"""ipcd: the router. Local clients reach remote services as if they were local.

A client whose ``IPC_NETWORK`` names a route for service S connects to the
local service ``ipc`` and sends one message ``S;<IPC_NETWORK>``. ipcd finds
the directive for S and resolves its target:

* ``NAME`` (no ``://``) or ``unix://NAME``: the local service NAME;
* ``SCHEME://ADDRESS/PATH``: the local protocol daemon named SCHEME (``tcp``,
  ``tls``, ``ws``...) is sent the whole URI as one message and must answer the
  message ``ok``; its connection is then the connection to the remote service.

On success ipcd hands the connected descriptor to the client with SCM_RIGHTS
and the raw bytes ``ok`` (the reference's bytes); on failure it sends the
LibIPC message ``error: <reason>`` (framed like any message, no descriptor)
and closes: a framed reader (another ipcd through ``ipc://``, a LibIPC
client) reads it as one message, and :func:`ipc_core.routing.ask_router`
takes anything but ``ok`` with a descriptor as a failure. Every look-up has a
deadline; a missing daemon, a bad route or a silent remote never blocks other
look-ups, and a client that sends no look-up is closed after
``--handshake-timeout``.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import click

from ipc_core import (
    ROUTER_SERVICE,
    Context,
    Event,
    EventType,
    IPCError,
    ProtocolError,
    encode,
    parse_lookup,
    parse_network,
    service_marks,
)

from .engine.daemon import Daemon
from .engine.deadlines import Deadlines, RequestDeadlines
from .engine.errors import Failure, LocalRefused
from .engine.local import connect_local
from .engine.log import setup_logging
from .engine.options import libipc_command, logging_options, rundir_option, seconds
from .engine.outbound import HANDOFF_OPTION, HANDS_OVER
from .engine.policy import ServiceAccess
from .engine.startup import starting

log = logging.getLogger("ipc.ipcd")

_MAX_ANSWER = 4096


@dataclass
class _Lookup:
    client_fd: int
    service: str
    target: str
    started: float
    daemon_fd: int = -1
    answer: bytes = b""
    #: The network socket itself, when the protocol daemon handed it over.
    passed: socket.socket | None = None


def resolve_target(target: str) -> tuple[str, str | None]:
    """``(local service to connect to, URI to send it or None)``."""
    scheme, sep, rest = target.partition("://")
    if not sep:
        return target, None
    if scheme == "unix":
        return rest, None
    if not scheme or not rest:
        raise ProtocolError(f"bad target {target!r}")
    return scheme, target


#: The program that serves each scheme's outbound side, for error messages.
_SCHEME_DAEMONS = {"tcp": "ipc-tcpd", "tls": "ipc-tlsd", "udp": "ipc-udpd"}


def _missing_service(name: str, uri: str | None, rundir: object) -> str:
    """Why a route's local service cannot be reached, naming what to start:
    a plain service (``unix://NAME``, ``NAME``) has no daemon to blame."""
    if uri is None:
        return f"no local service {name!r} in {rundir}"
    program = _SCHEME_DAEMONS.get(name)
    hint = f"start {program}" if program else f"no protocol daemon serves {name}://"
    return f"no local service {name!r} for {name}:// routes in {rundir} ({hint})"


class Router:
    """The ``ipc`` service's logic, driven by the daemon engine's events."""

    def __init__(self, daemon: Daemon, service_name: str, timeout: float) -> None:
        self.daemon = daemon
        self.ctx = daemon.ctx
        self.timeout = timeout
        self.service_fd = daemon.service_init(service_name, "--service-name")
        self._clients = RequestDeadlines(daemon, service_name)  # no look-up yet
        self._by_client: dict[int, _Lookup] = {}
        self._by_daemon: dict[int, _Lookup] = {}
        r = daemon.metrics.registry
        self.lookups = r.counter("ipc_lookups_total", "Router look-ups, by result.", ["result"])
        self._deadlines: Deadlines[int] = Deadlines(self.ctx)  # look-ups, by client fd
        daemon.own(self.service_fd, self._on_service)

    def _on_service(self, event: Event) -> None:
        """A local client connected: it owes us a look-up."""
        if event.type is EventType.CONNECTION:
            self.daemon.own(event.fd, self._on_client)
            self._clients.start(event.fd)

    def _on_client(self, event: Event) -> None:
        fd = event.fd
        if event.type is EventType.MESSAGE_RX:
            if self._clients.done(fd):
                assert event.message is not None
                self._lookup(fd, event.message)
        elif event.type is EventType.DISCONNECTION:
            self._clients.done(fd)
            lookup = self._by_client.get(fd)
            if lookup is not None:
                self._forget(lookup)
                if lookup.daemon_fd >= 0:
                    self.daemon.drop(lookup.daemon_fd)

    def _on_daemon_event(self, event: Event) -> None:
        """The protocol daemon asked to dial: its answer, or its close."""
        lookup = self._by_daemon.get(event.fd)
        if lookup is None:
            return
        if event.type is EventType.EXTERNAL:
            self._on_daemon(lookup)
        elif event.type is EventType.DISCONNECTION:
            self._by_daemon.pop(event.fd, None)
            lookup.daemon_fd = -1
            why = event.reason or "EOF"
            self._fail(lookup, f"protocol daemon closed the connection ({why})")

    def _lookup(self, client_fd: int, payload: bytes) -> None:
        try:
            service, network = parse_lookup(payload)
            routes = parse_network(network)
        except ProtocolError as exc:
            self._answer_error(client_fd, str(exc), "bad request")
            return
        target = routes.get(service)
        if target is None:
            self._answer_error(client_fd, f"no route for {service!r} in IPC_NETWORK", "no route")
            return
        lookup = _Lookup(client_fd, service, target, time.monotonic())
        try:
            local, uri = resolve_target(target)
            sock = self._connect_local(local, uri)
        except (ProtocolError, IPCError, OSError) as exc:
            self._answer_error(client_fd, f"{service!r} -> {target}: {exc}", "unreachable")
            return
        if uri is None:
            self._hand_over(lookup, sock)
            return
        self._by_client[client_fd] = lookup
        lookup.daemon_fd = self.ctx.add_external(sock)
        self._by_daemon[lookup.daemon_fd] = lookup
        self.daemon.own(lookup.daemon_fd, self._on_daemon_event)
        request = uri.encode()
        if HANDS_OVER in service_marks(local, self.ctx.rundir):
            request += b"\n" + HANDOFF_OPTION.encode()  # the socket itself, please
        self.ctx.send_raw(lookup.daemon_fd, encode(request))
        self._deadlines.start(
            client_fd,
            self.timeout,
            lambda: self._fail(lookup, f"no answer within {self.timeout} s"),
        )

    def _connect_local(self, name: str, uri: str | None) -> socket.socket:
        """Connect to the local service ``name``: the target itself, or the
        protocol daemon that dials ``uri``."""
        try:
            return connect_local(name, self.ctx.rundir)
        except LocalRefused as exc:
            if exc.failure is Failure.UNKNOWN_SERVICE:
                raise IPCError(_missing_service(name, uri, self.ctx.rundir)) from None
            raise

    def _on_daemon(self, lookup: _Lookup) -> None:
        """Read the daemon's answer frame exactly: bytes after it belong to the
        client, so they must stay in the socket."""
        sock = self.ctx.socket_of(lookup.daemon_fd)
        need = 4 if len(lookup.answer) < 4 else 4 + struct.unpack(">I", lookup.answer[:4])[0]
        try:
            chunk, fds, _flags, _addr = socket.recv_fds(
                sock, need - len(lookup.answer), 1, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(lookup, f"protocol daemon: {exc.strerror or exc}")
            return
        for fd in fds:  # a hand-off: the connected network socket
            if lookup.passed is None:
                lookup.passed = socket.socket(fileno=fd)
            else:
                os.close(fd)
        if not chunk:
            self._fail(lookup, "protocol daemon closed the connection")
            return
        lookup.answer += chunk
        if len(lookup.answer) == 4:
            (length,) = struct.unpack(">I", lookup.answer)
            if length > _MAX_ANSWER:
                self._fail(lookup, f"protocol daemon answered {length} bytes")
            return
        if len(lookup.answer) < 4 or len(lookup.answer) < need:
            return
        answer = lookup.answer[4:]
        if answer != b"ok":
            self._fail(lookup, answer.decode(errors="replace"))
            return
        self._forget(lookup)
        sock = self.ctx.socket_of(lookup.daemon_fd)
        self.daemon.disown(lookup.daemon_fd)
        self.ctx.remove_external(lookup.daemon_fd)
        if lookup.passed is not None:
            # The client gets the network connection itself: no relay left.
            sock.close()
            sock, lookup.passed = lookup.passed, None
        self._hand_over(lookup, sock)

    def _hand_over(self, lookup: _Lookup, sock: socket.socket) -> None:
        try:
            self.ctx.send_fd(lookup.client_fd, b"ok", sock.fileno())
        except (OSError, IPCError) as exc:
            log.warning("ipcd: cannot hand %r to the client: %s", lookup.service, exc)
            self.lookups.inc(result="error")
        else:
            self.lookups.inc(result="ok")
            log.info(
                "ipcd: %r -> %s (%.1f ms)",
                lookup.service,
                lookup.target,
                (time.monotonic() - lookup.started) * 1000,
            )
        finally:
            sock.close()
            self.daemon.drop(lookup.client_fd)

    def _fail(self, lookup: _Lookup, reason: str) -> None:
        if self._by_client.get(lookup.client_fd) is not lookup:
            return
        self._forget(lookup)
        if lookup.daemon_fd >= 0:
            self.daemon.drop(lookup.daemon_fd)
        if lookup.passed is not None:
            lookup.passed.close()
            lookup.passed = None
        self._answer_error(
            lookup.client_fd, f"{lookup.service!r} -> {lookup.target}: {reason}", "unreachable"
        )

    def _forget(self, lookup: _Lookup) -> None:
        self._by_client.pop(lookup.client_fd, None)
        self._by_daemon.pop(lookup.daemon_fd, None)
        self._deadlines.done(lookup.client_fd)

    def _answer_error(self, client_fd: int, reason: str, kind: str) -> None:
        log.warning("ipcd: %s", reason)
        self.lookups.inc(result=kind)
        if client_fd in self.ctx:
            # Framed: a LibIPC reader (another ipcd reached by ipc://) would
            # take raw "erro" for a length.
            self.ctx.write(client_fd, f"error: {reason}".encode())
            self.ctx.close(client_fd, flush=True)


@libipc_command(
    prog="ipcd",
    env_prefix="IPCD",
    examples=[
        ("ipcd", "serve the router 'ipc' in $RUNDIR (default /tmp/.libipc-run)"),
        (
            'IPC_NETWORK="pong tcp://192.0.2.7:9000/pong" ipc send pong hi',
            "a client whose IPC_NETWORK names a route for pong: ipcd asks the\n"
            "local service tcp (ipc-tcpd) to dial 192.0.2.7:9000",
        ),
        ('IPC_NETWORK="db unix://db-2" ipc send db hi', "a route to another local service"),
    ],
    notes=[
        "ipcd listens on no network port: it only serves the Unix socket "
        "$RUNDIR/ipc (and ipc.ctl for ipc status).",
    ],
)
@rundir_option
@click.option(
    "--service-name",
    default=ROUTER_SERVICE,
    metavar="NAME",
    help="The router's service name (clients look for 'ipc').",
)
@click.option(
    "--timeout",
    type=seconds(0, min_open=True),
    default=10.0,
    metavar="SECONDS",
    help="How long a look-up may take before the client gets an error.",
)
@click.option(
    "--handshake-timeout",
    type=seconds(0, min_open=True),
    default=5.0,
    metavar="SECONDS",
    help="Close a client that has not sent its look-up by then.",
)
@logging_options
def main(
    rundir: Path | None,
    service_name: str,
    timeout: float,
    handshake_timeout: float,
    log_format: str,
    verbose: int,
    quiet: int,
) -> None:
    """The LibIPC router: hands clients connections to local or remote services.

    A client whose IPC_NETWORK names a route for service S asks ipcd; ipcd
    connects to S (a local service, or a protocol daemon such as ipc-tcpd
    for tcp:// routes) and passes the connected descriptor to the client.
    """
    setup_logging(verbose - quiet, log_format)
    with starting():
        ctx = Context(rundir_path=rundir)
        daemon = Daemon("ipcd", ctx, ServiceAccess(), handshake_timeout=handshake_timeout)
        try:
            Router(daemon, service_name, timeout)
            daemon.serve_control(f"{service_name}.ctl")
        except BaseException:
            daemon.close()  # no socket or lock left behind
            raise
    log.info("ipcd: serving %r in %s", service_name, ctx.rundir)
    try:
        daemon.run()
    finally:
        ctx.close_all()


if __name__ == "__main__":
    main()
