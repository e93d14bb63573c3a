"""Listening sockets: ``--listen`` values, binding them, tuning accepted peers.

``:9000``, ``HOST:PORT``, ``[IPv6]:PORT``, ``unix:PATH`` -> :class:`ListenAddress`
(:func:`parse_listen`) -> a bound, non-blocking socket (:func:`open_listener`).
Also what an accepted TCP peer gets (:func:`tune_tcp`), how a bound socket is
named in logs (:func:`bound_address`), which listeners other hosts can reach
(:func:`exposed_addresses`) and the open-file limit a daemon needs
(:func:`raise_fd_limit`).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import resource
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ipc_core import SUN_PATH_MAX

from .addresses import check_port, split_host_port

__all__ = [
    "ListenAddress",
    "bound_address",
    "exposed_addresses",
    "open_listener",
    "parse_listen",
    "peer_name",
    "raise_fd_limit",
    "tune_tcp",
]

log = logging.getLogger("ipc.daemon")

# --------------------------------------------------------------------------
# Listen addresses
# --------------------------------------------------------------------------

_LISTEN_HINT = "expected :PORT, HOST:PORT, [IPv6]:PORT or unix:PATH"


@dataclass(frozen=True)
class ListenAddress:
    """Where a daemon listens: a TCP host/port or a Unix socket path.

    ``family`` is ``AF_UNIX`` (``path`` set), ``AF_INET`` / ``AF_INET6`` (an
    address literal), or ``AF_UNSPEC``: ``host`` is None for "all interfaces,
    IPv4 and IPv6" (``:9000``), else a host name resolved when opening.
    """

    family: socket.AddressFamily
    host: str | None = None
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.family == socket.AF_UNIX

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host is None:
            return f":{self.port}"
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen(spec: str) -> ListenAddress:
    """Parse a ``--listen`` value; raise ``ValueError`` with a hint on bad input.

    ``:PORT`` means every interface, IPv4 and IPv6 (one dual-stack socket);
    ``0.0.0.0:PORT`` is IPv4 only and ``[::]:PORT`` IPv6 only, so both can be
    given together. Port 0 asks the kernel for a free port (tests).
    """
    try:
        return _parse_listen(spec)
    except ValueError as exc:
        raise ValueError(f"{exc}: {_LISTEN_HINT}, got {spec!r}") from None


def _parse_listen(spec: str) -> ListenAddress:
    if not isinstance(spec, str) or not spec:
        raise ValueError("empty address")
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path or "\0" in path:
            raise ValueError("empty or invalid unix socket path")
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise ValueError(f"unix socket path longer than {SUN_PATH_MAX} bytes")
        return ListenAddress(socket.AF_UNIX, path=path)
    if spec.isdigit():
        raise ValueError(f"missing ':' before the port (as in :{spec})")
    if spec.startswith(":") and spec.count(":") == 1:
        return ListenAddress(socket.AF_UNSPEC, None, check_port(spec[1:]))
    host, family, port = split_host_port(spec)
    if port is None:
        raise ValueError("missing port")
    return ListenAddress(family, host, check_port(port))


def _unlink_stale_unix(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return  # let bind() report the real problem
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process listens on", path)


def _ipv6_unavailable(exc: OSError) -> bool:
    return exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def open_listener(
    addr: ListenAddress, backlog: int = 1024, *, unix_mode: int = 0o660
) -> socket.socket:
    """Return a bound, listening, non-blocking socket for ``addr``.

    TCP sockets get SO_REUSEADDR (restart without waiting for TIME_WAIT).
    Unix sockets are created with ``unix_mode`` (0660, as LibIPC services)
    and a stale socket file left by a dead process is replaced; a live one is
    not. A host name binds the first address ``getaddrinfo`` returns.
    """
    if addr.is_unix:
        assert addr.path is not None
        _unlink_stale_unix(addr.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~unix_mode)
        try:
            sock.bind(addr.path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
    elif addr.host is None:
        try:
            sock = _bind_tcp(socket.AF_INET6, ("::", addr.port), v6only=False)
        except OSError as exc:
            if not _ipv6_unavailable(exc):
                raise
            sock = _bind_tcp(socket.AF_INET, ("0.0.0.0", addr.port))
    else:
        infos = socket.getaddrinfo(
            addr.host, addr.port, addr.family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        family, _type, _proto, _name, sockaddr = infos[0]
        sock = _bind_tcp(family, sockaddr, v6only=True)
    try:
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_tcp(family: int, sockaddr: Any, v6only: bool = True) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def tune_tcp(sock: socket.socket, peer_timeout: float) -> None:
    """Make a vanished peer fail in bounded time instead of ~15 min (or never).

    TCP_USER_TIMEOUT aborts a connection whose sent data stays unacknowledged
    for ``peer_timeout``; keepalive probes (first after ``peer_timeout`` idle,
    then 3 more at a third of it) catch an idle connection whose peer is gone.
    TCP_NODELAY: LibIPC messages are requests and answers, not a byte stream.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(peer_timeout))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(peer_timeout * 1000))


def bound_address(sock: socket.socket) -> str:
    """Describe where ``sock`` is bound, for log lines: ``127.0.0.1:40123``,
    ``[::]:9000`` or ``unix:/run/x``."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):  # abstract namespace
            return "unix:@" + name[1:].decode(errors="replace")
        return f"unix:{name}"
    if sock.family == socket.AF_INET6:
        host, port, _flow, scope = name
        if scope and "%" not in host:
            host = f"{host}%{scope}"
        return f"[{host}]:{port}"
    host, port = name
    return f"{host}:{port}"


def exposed_addresses(sockets: Iterable[socket.socket]) -> list[str]:
    """The listening addresses other hosts may reach: TCP sockets bound to
    anything but a loopback address (a wildcard included)."""
    exposed = []
    for sock in sockets:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        host = sock.getsockname()[0].partition("%")[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            exposed.append(bound_address(sock))
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_unspecified:
            exposed.append(f"{bound_address(sock)} (every interface)")
        elif not ip.is_loopback:
            exposed.append(bound_address(sock))
    return exposed


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-file limit towards ``wanted`` (two descriptors per
    relayed connection), within the hard limit; a shell's default soft limit
    of 1024 would cap a daemon at ~500 connections. Returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        # Debug only: with the default --max-connections this would be said
        # on every start; a daemon that does reach the limit says so when an
        # accept fails (see Daemon.accept_failed).
        log.debug(
            "open-file limit %d allows about %d relayed connections",
            soft,
            (soft - 64) // 2,
        )
    return soft


def peer_name(addr: Any) -> str:
    """``192.0.2.7:51212``, ``[2001:db8::1]:51212`` or ``unix-peer``. An
    IPv4 peer of a dual-stack listener (``:9000``) arrives IPv4-mapped
    (``::ffff:192.0.2.7``): it is written as the IPv4 address it is."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        if host.startswith("::ffff:"):
            with contextlib.suppress(ValueError):
                mapped = ipaddress.IPv6Address(host).ipv4_mapped
                if mapped is not None:
                    host = str(mapped)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr) or "unix-peer"
