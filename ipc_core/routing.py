"""``IPC_NETWORK``: how a client reaches a service that may be remote.

The variable holds directives ``<service> <uri>`` separated by ``;`` (spaces
around ``;`` tolerated). When it names a route for the service, the client
asks the router ``ipc`` with one LibIPC message ``SERVICE;IPC_NETWORK`` and
receives the connected descriptor over SCM_RIGHTS with the raw bytes ``ok``.
Unlike the reference, a client whose variable names no route for the service,
or whose router is not running, falls back to the direct local connection;
when that fails too, the error names the route and the missing router. A
malformed directive is skipped with a warning; the others still count.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from .errors import PeerClosed, ProtocolError, ServiceUnavailable
from .fdpass import recv_fd
from .framing import encode
from .rundir import socket_path

log = logging.getLogger("ipc_core.routing")

ROUTER_SERVICE = "ipc"


def parse_network(value: str) -> dict[str, str]:
    """Parse ``IPC_NETWORK`` into ``{service: target}`` (first directive wins).

    A directive that is not ``NAME TARGET`` is skipped with a logged warning:
    one typo must not silently drop every other route. Raises ProtocolError
    only when the variable has bad directives and no good one (nothing
    usable, and something to say about it).
    """
    routes: dict[str, str] = {}
    bad: list[str] = []
    for raw in value.split(";"):
        directive = raw.strip()
        if not directive:
            continue
        parts = directive.split()
        if len(parts) != 2:
            bad.append(directive)
            continue
        routes.setdefault(parts[0], parts[1])
    if bad and not routes:
        raise ProtocolError(f"bad IPC_NETWORK directive {bad[0]!r}: expected 'NAME URI'")
    for directive in bad:
        log.warning("IPC_NETWORK: ignoring bad directive %r (expected 'NAME URI')", directive[:80])
    return routes


def lookup_message(service: str, network: str) -> bytes:
    """The payload a client sends to the router: ``SERVICE;IPC_NETWORK``."""
    return f"{service};{network}".encode()


def parse_lookup(payload: bytes) -> tuple[str, str]:
    """Split a router look-up message into (service, IPC_NETWORK)."""
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        raise ProtocolError("look-up message is not UTF-8") from None
    service, sep, network = text.partition(";")
    if not sep or not service.strip():
        raise ProtocolError(f"bad look-up message {text[:80]!r}: expected 'SERVICE;ROUTES'")
    return service.strip(), network


def connect_direct(name: str, directory: Path, timeout: float = 5.0) -> socket.socket:
    """Connect to the local service socket ``directory/name``."""
    path = socket_path(name, directory)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fsencode(path))
    except OSError as exc:
        sock.close()
        raise connect_error(name, directory, exc) from (
            None if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)) else exc
        )
    sock.settimeout(None)  # the timeout was for connecting; the caller decides the rest
    return sock


def connect_error(name: str, directory: Path, exc: OSError) -> ServiceUnavailable:
    """The error for a failed connection to the local socket of ``name``
    (shared by the blocking and the asyncio clients)."""
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return ServiceUnavailable(f"no service {name!r} in {directory} ({exc.strerror})")
    return ServiceUnavailable(f"cannot connect to service {name!r}: {exc.strerror}")


def ask_router(
    router: socket.socket, name: str, network: str, timeout: float = 5.0
) -> socket.socket:
    """Ask a connected router for ``name``; return the received socket.

    The router socket is closed in every case.
    """
    router.settimeout(timeout)
    try:
        router.sendall(encode(lookup_message(name, network)))
        try:
            data, fd = recv_fd(router)
        except TimeoutError:
            raise ServiceUnavailable(
                f"router gave no answer for {name!r} within {timeout} s"
            ) from None
        except OSError as exc:
            raise PeerClosed(f"router failed: {exc}") from exc
    finally:
        router.close()
    sock = router_answer(name, data, fd)
    # O_NONBLOCK lives on the open file description ipcd shared with us:
    # make the descriptor agree with the blocking socket object we return.
    sock.setblocking(True)
    return sock


def router_answer(name: str, data: bytes, fd: int | None) -> socket.socket:
    """The router's answer (``data`` and the descriptor it passed, if any)
    as the connected socket, or ServiceUnavailable naming its reason. The
    socket's blocking mode is whatever ipcd left: the caller sets its own."""
    if data[:2] == b"ok" and fd is not None:
        return socket.socket(fileno=fd)
    if fd is not None:
        os.close(fd)
    if len(data) >= 4 and int.from_bytes(data[:4], "big") == len(data) - 4:
        data = data[4:]  # ipcd frames its failure answers as a LibIPC message
    reason = data.decode(errors="replace").strip() or "router closed the connection"
    raise ServiceUnavailable(f"router cannot reach {name!r}: {reason}")


def connect(name: str, directory: Path, timeout: float = 5.0) -> socket.socket:
    """Connect to ``name``, through the router when ``IPC_NETWORK`` says so."""
    route = route_for(name)
    if route is not None:
        target, network = route
        try:
            router = connect_direct(ROUTER_SERVICE, directory, timeout)
        except ServiceUnavailable as exc:
            log.debug("router not running (%s); connecting to %r directly", exc, name)
            return _direct_or_no_router(name, target, directory, timeout)
        return ask_router(router, name, network, timeout)
    return connect_direct(name, directory, timeout)


def route_for(name: str) -> tuple[str, str] | None:
    """``(target, IPC_NETWORK)`` when ``IPC_NETWORK`` names a route for
    ``name`` (then the router is asked), else None (connect directly)."""
    network = os.environ.get("IPC_NETWORK")
    if not network:
        return None
    try:
        routes = parse_network(network)
    except ProtocolError as exc:
        log.warning("ignoring IPC_NETWORK: %s", exc)
        routes = {}
    target = routes.get(name)
    if target is None:
        log.debug("IPC_NETWORK has no route for %r; connecting directly", name)
        return None
    return target, network


def no_router_error(name: str, target: str, directory: Path) -> ServiceUnavailable:
    """A route exists, ipcd does not run and no local service answers."""
    return ServiceUnavailable(
        f"route for {name!r} via {target} but no router at {directory / ROUTER_SERVICE}: start ipcd"
    )


def _direct_or_no_router(name: str, target: str, directory: Path, timeout: float) -> socket.socket:
    """The fallback when a route exists but ipcd does not run: the local
    service if there is one, else an error that says what is missing."""
    try:
        return connect_direct(name, directory, timeout)
    except ServiceUnavailable:
        raise no_router_error(name, target, directory) from None
