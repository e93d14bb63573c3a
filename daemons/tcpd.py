"""ipc-tcpd: local LibIPC services over TCP, both ways (reference TCPd compatible).

Inbound: ``--listen :9000``; a peer writes a service name, gets ``ok``, then
speaks LibIPC frames, relayed to ``$RUNDIR/NAME`` unchanged. Outbound: the
daemon is the local service ``tcp`` (``--service-name``); a client's message
``tcp://HOST:PORT/SERVICE`` makes it dial, handshake, answer ``ok`` and switch.
"""

from __future__ import annotations

import logging

import click

from .codecs.proxied import use_proxy_protocol
from .codecs.tcp import TcpdClient, TcpdHandshake
from .engine.options import (
    CommonOptions,
    common_options,
    connect_timeout_option,
    idle_timeout_option,
    libipc_command,
    proxy_protocol_option,
)
from .engine.startup import start_daemon, starting
from .engine.trust import TrustedNetworks

log = logging.getLogger("ipc.tcpd")

DEFAULT_LISTEN = "127.0.0.1:9000"


@libipc_command(
    prog="ipc-tcpd",
    env_prefix="IPC_TCPD",
    examples=[
        ("ipc-tcpd", f"{DEFAULT_LISTEN}; every local service but the protected ones"),
        ("ipc-tcpd --listen :9000 --allow pong", "every interface, only the service pong"),
        ("ipc-tcpd --listen 192.0.2.7:9000 --deny 'admin*'", "one address, all but admin*"),
        (
            'IPC_NETWORK="pong tcp://192.0.2.7:9000/pong" ipc send pong hi',
            "with ipcd running: a client reaches pong on another host",
        ),
        (
            "ipc-tcpd --listen 10.0.0.5:9000 --proxy-protocol 10.0.0.2",
            "behind HAProxy (send-proxy-v2) at 10.0.0.2: logs and limits name the client",
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
@proxy_protocol_option
@click.option(
    "--no-handoff",
    is_flag=True,
    help="Always relay, even to services that take handed-over connections "
    "(by default a service started with handoff=True, e.g. ipc pongd, gets "
    "the TCP socket itself after the handshake and ipc-tcpd leaves the path).",
)
def main(
    common: CommonOptions,
    service_name: str,
    connect_timeout: float,
    idle_timeout: float,
    proxy_protocol: TrustedNetworks,
    no_handoff: bool,
) -> None:
    """Put local LibIPC services on TCP, and reach remote ones (TCPd).

    Inbound: a TCP peer writes a service name, gets "ok", then exchanges
    LibIPC messages with $RUNDIR/NAME. Outbound: the local service "tcp"
    takes a message tcp://HOST:PORT/SERVICE, dials it and becomes that
    connection (ipcd uses it for IPC_NETWORK routes).
    """
    with starting():
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
    use_proxy_protocol(daemon, proxy_protocol)
    daemon.handoff = not no_handoff
    try:
        daemon.run()
    finally:
        outbound.close()
        daemon.ctx.close_all()


if __name__ == "__main__":
    main()
