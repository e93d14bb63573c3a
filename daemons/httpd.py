"""ipc-httpd: any HTTP client reaches a local service (HTTPd).

``POST /SERVICE`` with the body as one LibIPC message to ``$RUNDIR/SERVICE``;
the service's reply is the response body. One LibIPC connection per HTTP
keep-alive connection (a service keeps per-client state over a session),
pipelined requests answered in order. The HTTP side is
:mod:`daemons.codecs.http` (h11); this module is the flags and the driver
that does what a relay alone cannot (see :class:`HttpDriver`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import click
import h11

from ipc_core import Event, EventType, IPCError, Layer

from .codecs.http import HttpConnection, HttpHandshake, HttpOptions
from .codecs.proxied import use_proxy_protocol
from .codecs.tlswrap import TLSHandshake
from .codecs.wsrequest import HostPolicy, split_host
from .engine.daemon import Daemon
from .engine.handshake import Handshake
from .engine.log import setup_logging
from .engine.options import (
    CommonOptions,
    check_origins,
    common_options,
    libipc_command,
    proxy_protocol_option,
    seconds,
)
from .engine.startup import new_daemon, open_listeners, starting
from .engine.tlsconfig import ServerTLS, server_tls_options
from .engine.trust import TrustedNetworks

__all__ = ["HttpDriver", "build_daemon", "main"]

log = logging.getLogger("ipc.httpd")

NAME = "ipc-httpd"
DEFAULT_LISTEN = "127.0.0.1:8000"
#: Seconds a keep-alive connection may stay silent (no byte either way).
DEFAULT_IDLE_TIMEOUT = 60.0
#: Seconds a service has to reply to a request before the client gets 504.
DEFAULT_REPLY_TIMEOUT = 30.0
#: Bytes read and dropped from a socket being closed: unread bytes would make
#: the kernel send a reset, which can destroy the answer before it is read.
_DRAIN = 256 * 1024


class HttpDriver:
    """What ipc-httpd adds to the engine's relay of each switched connection.

    The Context relays requests and replies through the
    :class:`~daemons.codecs.http.HttpConnection` layer without us. The layer
    calls ``on_ready`` when a relay cannot finish alone: a pipelined request
    that became ready while a reply was written (its LibIPC bytes are fed to
    the service with ``ctx.feed_switch``), or a connection that must close
    (``Connection: close``, an error answer). A sweep every quarter of
    ``--reply-timeout`` answers 504 to requests whose reply is late: one
    timestamp per request on the hot path, no timer.

    Work asked from inside the relay is done on the next loop turn
    (``call_later(0)``): the relay is in the middle of writing a reply then.
    """

    def __init__(self, daemon: Daemon, reply_timeout: float) -> None:
        self.daemon = daemon
        self.reply_timeout = reply_timeout
        self.conns: dict[int, tuple[HttpConnection, Layer | None]] = {}
        if reply_timeout > 0:
            self._period = min(max(reply_timeout / 4, 0.05), 1.0)
            daemon.ctx.call_later(self._period, self._sweep)

    def switched(self, fd: int, handshake: Handshake, layer: Layer | None) -> None:
        """``Daemon.on_switched``: take the connection over."""
        conn = _connection_of(handshake)
        if conn is None:  # pragma: no cover - our factory's handshakes only
            return
        self.conns[fd] = (conn, layer)
        self.daemon.own(fd, self._on_event)
        conn.on_ready = functools.partial(self._soon, fd, conn)
        if conn.has_work:
            self._soon(fd, conn)

    def _on_event(self, event: Event) -> None:
        if event.type is EventType.DISCONNECTION:
            entry = self.conns.pop(event.fd, None)
            if entry is not None:
                entry[0].on_ready = None

    def _soon(self, fd: int, conn: HttpConnection) -> None:
        self.daemon.ctx.call_later(0, functools.partial(self._work, fd, conn))

    def _work(self, fd: int, conn: HttpConnection) -> None:
        entry = self.conns.get(fd)
        if entry is None or entry[0] is not conn:
            return
        up = conn.take_up()
        ctx = self.daemon.ctx
        if up and fd in ctx:
            try:
                ctx.feed_switch(fd, up)
            except IPCError as exc:
                log.warning("%s: %s: cannot pass a request on: %s", NAME, conn.peer, exc)
                self.close(fd)
                return
        if conn.must_close:
            self.close(fd)

    def close(self, fd: int) -> None:
        """Write the connection's last answers, then close it (and its
        service connection). TLS gets its close_notify."""
        entry = self.conns.pop(fd, None)
        ctx = self.daemon.ctx
        if entry is None or fd not in ctx:
            return
        conn, layer = entry
        conn.on_ready = None
        with contextlib.suppress(IPCError):
            conn.close()  # a request still in progress gets its 502
            if layer is not None and layer is not conn:
                layer.close()  # the TLS layer below too: close_notify after the answer
        with contextlib.suppress(IPCError):
            ctx.flush_switch(fd)
        sock = ctx.socket_of(fd)
        with contextlib.suppress(OSError, AttributeError):
            drained = 0
            while drained < _DRAIN:
                data = sock.recv(65536)
                if not data:
                    break
                drained += len(data)
        self.daemon.drop(fd)

    def _sweep(self) -> None:
        self.daemon.ctx.call_later(self._period, self._sweep)
        limit = time.monotonic() - self.reply_timeout
        late = [
            fd
            for fd, (conn, _layer) in self.conns.items()
            if (since := conn.busy_since) is not None and since <= limit
        ]
        for fd in late:
            conn = self.conns[fd][0]
            status = conn.expire()
            if status == 504:
                why = f"service {conn.service!r} did not reply"
            else:
                why = "the request body did not arrive"
            log.warning(
                "%s: %s: %s within %g s (--reply-timeout): %s",
                NAME,
                conn.peer,
                why,
                self.reply_timeout,
                status,
            )
            self.close(fd)


def _connection_of(handshake: object) -> HttpConnection | None:
    """The HTTP connection inside the wrappers (PROXY gate, TLS)."""
    for _ in range(4):
        if isinstance(handshake, HttpHandshake):
            return handshake.conn
        handshake = getattr(handshake, "inner", None)
    return None


class ServerCertificates:
    """The HTTPS flags (:class:`ServerTLS`): re-read on SIGHUP, the old
    context kept on error."""

    def __init__(self, server: ServerTLS) -> None:
        self.server = server
        self.context = server.context()

    def reload(self) -> None:
        try:
            self.context = self.server.context()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("%s: reload failed, keeping the previous certificate: %s", NAME, exc)
            return
        log.info("%s: reloaded the certificate for new connections", NAME)


@dataclass(frozen=True)
class HttpdSettings:
    """ipc-httpd's own flags."""

    options: HttpOptions
    hosts: tuple[str, ...] = ()
    reply_timeout: float = DEFAULT_REPLY_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    control_name: str = "http"


def build_daemon(
    common: CommonOptions,
    settings: HttpdSettings,
    *,
    tls: ServerCertificates | None = None,
    allow_client: Sequence[str] = (),
    proxy_protocol: TrustedNetworks | None = None,
) -> Daemon:
    """Context, engine, driver, listeners (systemd sockets first), metrics."""
    daemon = new_daemon(NAME, common, idle_timeout=settings.idle_timeout)
    options = settings.options
    hosts = HostPolicy(extra=settings.hosts)  # replaced once the listeners are open

    def factory(peer: str) -> Handshake:
        handshake = HttpHandshake(HttpConnection(options, hosts, peer))
        if tls is None:
            return handshake
        return TLSHandshake(tls.context, handshake, allow_client=allow_client)

    driver = HttpDriver(daemon, settings.reply_timeout)
    daemon.on_switched = driver.switched
    use_proxy_protocol(daemon, proxy_protocol or TrustedNetworks())
    if tls is not None:
        daemon.on_reload = tls.reload
    daemon.serve_control(f"{settings.control_name}.ctl", flag="--control-name")
    open_listeners(daemon, common, factory, DEFAULT_LISTEN)
    # The accepted Host names depend on the bound sockets (port 0, systemd's).
    hosts = HostPolicy.for_sockets(daemon.listening_sockets, settings.hosts, secure=tls is not None)
    return daemon


def _valid_content_type(value: str) -> bool:
    """Whether ``value`` can be a Content-Type header (h11 would refuse it at
    the first reply otherwise, closing every connection)."""
    if not value.isascii() or not value.isprintable() or not value.strip():
        return False
    try:
        h11.Response(status_code=200, headers=[("content-type", value)])
    except h11.LocalProtocolError:
        return False
    return True


@libipc_command(
    prog=NAME,
    env_prefix="IPC_HTTPD",
    examples=[
        (
            "ipc-httpd",
            f"http://{DEFAULT_LISTEN}/pong: curl --data-binary hello http://{DEFAULT_LISTEN}/pong",
        ),
        (
            "ipc-httpd --listen :8080 --allow pong --content-type text/plain",
            "every interface, only the service pong, replies as text",
        ),
        (
            "ipc-httpd --cors https://app.example.com",
            "pages of that origin may fetch() the services",
        ),
        (
            "ipc-httpd --listen :8443 --cert s.pem --key s.key --host api.example.com",
            "HTTPS on every interface, reached as api.example.com",
        ),
    ],
    notes=[
        "POST /SERVICE: the body is one message, the reply the response body. "
        "GET or HEAD /SERVICE: 200 if the service accepts a connection, else 404. "
        "Refused and unknown services both answer 404.",
    ],
)
@common_options(default_listen=DEFAULT_LISTEN)
@click.option(
    "--content-type",
    default="application/octet-stream",
    show_default=True,
    metavar="TYPE",
    help="Content-Type of the replies.",
)
@click.option(
    "--cors",
    "cors",
    multiple=True,
    metavar="ORIGIN",
    help="Browser origins whose pages may call (https://app.example.com, "
    "https://*.example.com, null or *); their answers carry "
    "Access-Control-Allow-Origin. Repeatable. Default: none (a request with "
    "an Origin header gets 403).",
)
@click.option(
    "--reply-timeout",
    type=seconds(0),
    default=DEFAULT_REPLY_TIMEOUT,
    metavar="SECONDS",
    help="Answer 504 (and close) when the service has not replied this long, "
    "408 when a request body has not arrived in this long. 0 = off.",
)
@click.option(
    "--idle-timeout",
    type=seconds(0),
    default=DEFAULT_IDLE_TIMEOUT,
    metavar="SECONDS",
    help="Close a keep-alive connection with no byte either way for this long. 0 = off.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME[:PORT]",
    envvar="IPC_HTTPD_HOST",
    help="A name clients use to reach this daemon. Requests whose Host is not "
    "one of the daemon's names (loopback, localhost, listen addresses, this "
    "machine's name) get 421: the defence against DNS rebinding. Repeatable.",
)
@proxy_protocol_option
@server_tls_options(purpose="serves https://")
@click.option(
    "--control-name",
    default="http",
    metavar="NAME",
    help="Counters are served on the local service NAME.ctl (ipc status NAME); "
    "give each instance sharing a run directory its own.",
)
def main(
    common: CommonOptions,
    content_type: str,
    cors: tuple[str, ...],
    reply_timeout: float,
    idle_timeout: float,
    hosts: tuple[str, ...],
    proxy_protocol: TrustedNetworks,
    server_tls: ServerTLS,
    control_name: str,
) -> None:
    """Let any HTTP client reach local LibIPC services: POST /SERVICE.

    The request body is one LibIPC message to $RUNDIR/SERVICE and the
    service's reply the response body (200). One LibIPC connection per HTTP
    keep-alive connection; pipelined requests are answered in order.
    """
    server_tls.check_optional("https")
    check_origins(cors, "--cors")
    for host in hosts:
        if split_host(host) is None:
            raise click.BadParameter(
                f"{host!r}: a host is NAME or NAME:PORT (as in api.example.com, [::1]:8080)",
                param_hint="--host",
            )
    if not _valid_content_type(content_type):
        raise click.BadParameter(f"{content_type!r}: not a media type", param_hint="--content-type")
    setup_logging(common.verbosity, common.log_format)
    with starting():
        tls = None if server_tls.cert is None else ServerCertificates(server_tls)
        settings = HttpdSettings(
            HttpOptions(
                max_message_size=common.max_message_size,
                content_type=content_type,
                cors=cors,
                secure=tls is not None,
            ),
            hosts=hosts,
            reply_timeout=reply_timeout,
            idle_timeout=idle_timeout,
            control_name=control_name,
        )
        daemon = build_daemon(
            common,
            settings,
            tls=tls,
            allow_client=server_tls.allow_client,
            proxy_protocol=proxy_protocol,
        )
    log.info(
        "%s: %s, replies as %s, CORS: %s, reply timeout: %s",
        NAME,
        "https (TLS)" if tls else "http",
        content_type,
        ", ".join(cors) if cors else "none",
        f"{reply_timeout:g} s" if reply_timeout else "off",
    )
    try:
        daemon.run()
    finally:
        daemon.ctx.close_all()


if __name__ == "__main__":
    main()
