"""ipc-tcpd: local LibIPC services over TCP, both ways (reference TCPd compatible).

Inbound: ``--listen :9000``; a peer writes a service name, gets ``ok``, then
speaks LibIPC frames, relayed to ``$RUNDIR/NAME`` unchanged. Outbound: the
daemon is the local service ``tcp`` (``--service-name``); a client's message
``tcp://HOST:PORT/SERVICE`` makes it dial, handshake, answer ``ok`` and switch.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ipc_core import Context, IPCError

from .common import (
    CommonOptions,
    ServiceAccess,
    common_options,
    libipc_command,
    seconds,
    setup_logging,
)
from .outbound import ConnectorFactory, Outbound
from .server import Daemon, open_listeners
from .tcp import TcpdClient, TcpdHandshake

log = logging.getLogger("ipc.tcpd")

#: Seconds a relayed TCP/TLS connection may carry no byte either way.
DEFAULT_IDLE_TIMEOUT = 300.0
F = TypeVar("F", bound=Callable[..., Any])


def idle_timeout_option(func: F) -> F:
    """``--idle-timeout`` for the TCP-relaying daemons (ipc-tcpd, ipc-tlsd).

    Not a common option: ipc-websocketd has its own ``--idle-timeout``
    (WebSocket messages, a close frame), which a byte-level timeout would
    contradict (its pings are bytes)."""
    option = click.option(
        "--idle-timeout",
        type=seconds(0),
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="Close a relayed connection with no byte either way for this long. 0 = off.",
    )
    return option(func)  # type: ignore[no-any-return]


def start_daemon(
    name: str,
    common: CommonOptions,
    *,
    service_name: str,
    default_listen: str,
    make_handshake: Callable[[Daemon], Callable[[str], Any]],
    connectors: dict[str, ConnectorFactory],
    connect_timeout: float,
    listen: bool = True,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
) -> tuple[Daemon, Outbound]:
    """Build a daemon: context, listeners (socket activation first), outbound
    service, metrics. Shared by ipc-tcpd and ipc-tlsd. ``listen=False``: no
    listeners of our own (outbound only); socket-activated ones are still used.

    On failure nothing is left behind (no socket, no lock) and the error
    names the flag at fault (:class:`daemons.server.StartupError`)."""
    setup_logging(common.verbosity, common.log_format)
    ctx = Context(rundir_path=common.rundir, max_message_size=common.max_message_size)
    access: ServiceAccess = common.access(service_name)
    daemon = Daemon(
        name,
        ctx,
        access,
        handshake_timeout=common.handshake_timeout,
        max_connections=common.max_connections,
        peer_timeout=common.peer_timeout,
        max_connections_per_ip=common.max_connections_per_ip,
        idle_timeout=idle_timeout,
    )
    try:
        # Local services first: a double start fails before any port is opened.
        outbound = Outbound(daemon, service_name, connectors, connect_timeout)
        daemon.serve_control(f"{service_name}.ctl")
        open_listeners(daemon, common, make_handshake(daemon), default_listen, listen=listen)
    except BaseException:
        daemon.close()
        raise
    return daemon, outbound


DEFAULT_LISTEN = "127.0.0.1:9000"


def connect_timeout_option(what: str) -> Callable[[F], F]:
    """``--connect-timeout``: the deadline of an outbound attempt (``what``
    it covers differs between ipc-tcpd and ipc-tlsd)."""
    return click.option(
        "--connect-timeout",
        type=seconds(0, min_open=True),
        default=5.0,
        metavar="SECONDS",
        help=f"Deadline of an outbound {what}.",
    )


@libipc_command(
    env_prefix="IPC_TCPD",
    examples=[
        ("ipc-tcpd", f"{DEFAULT_LISTEN}; every local service but the protected ones"),
        ("ipc-tcpd --listen :9000 --allow pong", "every interface, only the service pong"),
        ("ipc-tcpd --listen 192.0.2.7:9000 --deny 'admin*'", "one address, all but admin*"),
        (
            'IPC_NETWORK="pong tcp://192.0.2.7:9000/pong" ipc send pong hi',
            "with ipcd running: a client reaches pong on another host",
        ),
    ],
    notes=[
        "Plain TCP carries no encryption: keep it on loopback or a trusted "
        "network, use ipc-tlsd between hosts.",
    ],
)
@common_options(default_listen=DEFAULT_LISTEN)
@click.option(
    "--service-name",
    envvar=["IPC_TCPD_SERVICE_NAME", "IPC_SERVICE_NAME"],
    default="tcp",
    metavar="NAME",
    help="Local service name of the outbound side (clients send it tcp:// URIs).",
)
@connect_timeout_option("connect and TCPd handshake")
@idle_timeout_option
def main(
    common: CommonOptions, service_name: str, connect_timeout: float, idle_timeout: float
) -> None:
    """Put local LibIPC services on TCP, and reach remote ones (TCPd).

    Inbound: a TCP peer writes a service name, gets "ok", then exchanges
    LibIPC messages with $RUNDIR/NAME. Outbound: the local service "tcp"
    takes a message tcp://HOST:PORT/SERVICE, dials it and becomes that
    connection (ipcd uses it for IPC_NETWORK routes).
    """
    try:
        daemon, outbound = start_daemon(
            "ipc-tcpd",
            common,
            service_name=service_name,
            default_listen=DEFAULT_LISTEN,
            make_handshake=lambda daemon: lambda _peer: TcpdHandshake(daemon.reachable),
            connectors={"tcp": lambda uri: TcpdClient(uri.service)},
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
        )
    except (IPCError, OSError, ValueError) as exc:
        click.echo(f"ipc-tcpd: {exc}", err=True)
        sys.exit(1)
    try:
        daemon.run()
    finally:
        outbound.close()
        daemon.ctx.close_all()


if __name__ == "__main__":
    main()
