"""Starting a daemon: listeners (socket activation first), the outbound
service, the control service; failures as :class:`StartupError` naming the
flag at fault, with nothing left behind (no socket, no lock).

Startup failures have one style: whatever fails while a daemon starts (a
busy port, a certificate that does not load, a service name already taken,
an unusable run directory) becomes a :class:`StartupError` (:func:`starting`
converts the library's and the system's errors at the boundary), and the one
place that prints it is the suite's command class
(:class:`~daemons.engine.options.LibipcCommand`): ``PROG: reason``, exit
status 1, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ipc_core import Context, IPCError

from . import systemd
from .daemon import Daemon
from .errors import StartupError
from .handshake import HandshakeFactory
from .listeners import open_listener
from .log import setup_logging
from .options import DEFAULT_IDLE_TIMEOUT, CommonOptions
from .outbound import ConnectorFactory, Outbound

__all__ = [
    "StartupError",
    "bind_error",
    "describe_error",
    "new_daemon",
    "open_listeners",
    "start_daemon",
    "starting",
]


def describe_error(exc: BaseException) -> str:
    """One line for a start-up failure: what a configuration error says (it
    names the flag and the file), the file an OS error is about, or what
    OpenSSL objects to."""
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLCertVerificationError):
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        return f"a certificate, key or CA file does not load (or key and cert differ): {reason}"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


@contextlib.contextmanager
def starting() -> Iterator[None]:
    """Run a daemon's start-up: the library's and the system's errors
    (IPCError, OSError, ssl.SSLError, ValueError) leave as StartupError."""
    try:
        yield
    except StartupError:
        raise
    except (IPCError, OSError, ValueError) as exc:
        raise StartupError(describe_error(exc)) from None


def new_daemon(
    name: str, common: CommonOptions, *, protected: Sequence[str] = (), idle_timeout: float = 0.0
) -> Daemon:
    """A Context and a Daemon configured by the common flags; ``protected``
    names our own services (never reachable unless ``--allow`` names them)."""
    ctx = Context(rundir_path=common.rundir, max_message_size=common.max_message_size)
    return Daemon(
        name,
        ctx,
        common.access(*protected),
        handshake_timeout=common.handshake_timeout,
        max_connections=common.max_connections,
        peer_timeout=common.peer_timeout,
        max_connections_per_ip=common.max_connections_per_ip,
        idle_timeout=idle_timeout,
    )


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
    names the flag at fault (:class:`daemons.engine.startup.StartupError`)."""
    setup_logging(common.verbosity, common.log_format)
    daemon = new_daemon(name, common, protected=(service_name,), idle_timeout=idle_timeout)
    try:
        # Local services first: a double start fails before any port is opened.
        outbound = Outbound(daemon, service_name, connectors, connect_timeout)
        daemon.serve_control(f"{service_name}.ctl")
        open_listeners(daemon, common, make_handshake(daemon), default_listen, listen=listen)
    except BaseException:
        daemon.close()
        raise
    return daemon, outbound


def bind_error(flag: str, address: object, exc: OSError) -> StartupError:
    """``--listen 0.0.0.0:9000: address in use``: the flag, the value, the cause."""
    known = {
        errno.EADDRINUSE: "address in use",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
        errno.EADDRNOTAVAIL: "address not available on this host",
    }
    why = known.get(exc.errno or 0) or exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        why = f"cannot resolve the host ({exc.strerror})"
    return StartupError(f"{flag} {address}: {why}")


def open_listeners(
    daemon: Daemon,
    common: CommonOptions,
    factory: HandshakeFactory,
    default_listen: str,
    *,
    listen: bool = True,
) -> None:
    """Listeners for a daemon: systemd's sockets when socket-activated (one
    named ``metrics`` serves /metrics), else ``--listen`` / ``$ADDRESS`` /
    ``default_listen`` (none with ``listen=False``); plus ``--metrics``.

    On failure the daemon is closed (its services' sockets and locks are
    removed) and :class:`StartupError` names the flag and address."""
    try:
        _open_listeners(daemon, common, factory, default_listen, listen)
    except BaseException:
        daemon.close()
        raise


def _open_listeners(
    daemon: Daemon,
    common: CommonOptions,
    factory: HandshakeFactory,
    default_listen: str,
    listen: bool,
) -> None:
    activated = systemd.listen_fds()
    for sock, fdname in activated:
        if fdname == "metrics":
            daemon.serve_metrics(sock)
        else:
            daemon.listen(sock, factory)
    if not activated and listen:
        for address in common.listen_addresses(default_listen):
            daemon.listen(_bind("--listen", address), factory)
    if common.metrics is not None and not any(n == "metrics" for _, n in activated):
        daemon.serve_metrics(_bind("--metrics", common.metrics))
    daemon.log_policy()


def _bind(flag: str, address: Any) -> socket.socket:
    try:
        return open_listener(address)
    except OSError as exc:
        raise bind_error(flag, address, exc) from None
