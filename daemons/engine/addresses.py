"""Where to connect: host and port syntax, and routing URIs.

Pure parsing, no I/O: ``HOST:PORT``, ``[IPv6]:PORT`` (:func:`parse_connect_target`,
and the listen addresses of :mod:`daemons.engine.listeners`) and
``SCHEME://HOST[:PORT]/SERVICE`` / ``unix://SERVICE`` (:func:`parse_uri`).
Errors are ``ValueError`` with a short reason naming the input.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from .policy import service_name_error

__all__ = [
    "DEFAULT_PORTS",
    "Uri",
    "check_port",
    "parse_connect_target",
    "parse_uri",
    "split_host_port",
]

# --------------------------------------------------------------------------
# Host and port syntax
# --------------------------------------------------------------------------

_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def check_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text) or int(text) > 65535:
        raise ValueError(f"bad port {text!r} (expected 0..65535)")
    return int(text)


def _check_host(host: str) -> socket.AddressFamily:
    """Validate a bare (unbracketed) IPv4 address or host name."""
    if not host:
        raise ValueError("empty host")
    with contextlib.suppress(ValueError):
        ipaddress.IPv4Address(host)
        return socket.AF_INET
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host) or all(x.isdigit() for x in labels):
        raise ValueError(f"bad host {host!r} (expected an IP address or a host name)")
    return socket.AF_UNSPEC


def split_host_port(text: str) -> tuple[str, socket.AddressFamily, str | None]:
    """Split ``HOST[:PORT]`` / ``[V6][:PORT]`` into (host, family, port text or None).

    Errors are short ``ValueError`` details; callers add the context.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']'")
        host = text[1:end]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r}") from None
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']'")
        return host, socket.AF_INET6, (rest[1:] if rest else None)
    if text.count(":") > 1:
        raise ValueError("IPv6 addresses need brackets (as in [::1]:9000)")
    host, sep, port = text.partition(":")
    return host, _check_host(host), (port if sep else None)


def parse_connect_target(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[IPv6]:PORT`` (or ``HOST`` with a default port).

    Returns ``(host, port)`` with IPv6 brackets removed, ready for
    ``socket.create_connection``.
    """
    try:
        host, _family, port = split_host_port(text)
        if port is None:
            if default_port is None:
                raise ValueError("missing port")
            return host, default_port
        return host, check_port(port)
    except ValueError as exc:
        raise ValueError(f"{exc} in {text!r}") from None


# --------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------

#: Port used when a URI omits it. tcp keeps the reference's 9000; the others
#: are our choice: the usual alternates for TLS, HTTP and HTTPS.
DEFAULT_PORTS: Mapping[str, int] = {"tcp": 9000, "tls": 9443, "ws": 8080, "wss": 8443}
_SCHEME_RE = re.compile(r"[a-z][a-z0-9+.-]*")


@dataclass(frozen=True)
class Uri:
    """A routing target: ``SCHEME://HOST:PORT/SERVICE`` or ``unix://SERVICE``.

    For ``unix`` URIs ``host`` is empty and ``port`` is 0.
    """

    scheme: str
    host: str
    port: int
    service: str

    @property
    def is_local(self) -> bool:
        return self.scheme == "unix"

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` for ``socket.create_connection``."""
        if self.is_local:
            raise ValueError(f"{self} is a local service, it has no network address")
        return self.host, self.port

    def __str__(self) -> str:
        if self.is_local:
            return f"unix://{self.service}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.service}"


def parse_uri(uri: str, default_ports: Mapping[str, int] = DEFAULT_PORTS) -> Uri:
    """Parse a routing URI strictly (see :data:`DEFAULT_PORTS` for omitted ports).

    The service must be a valid service name (:func:`service_name_error`);
    schemes without a default port need an explicit one.
    """
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or not _SCHEME_RE.fullmatch(scheme):
        raise ValueError(f"expected SCHEME://HOST[:PORT]/SERVICE or unix://SERVICE, got {uri!r}")
    if scheme == "unix":
        reason = service_name_error(rest)
        if reason:
            raise ValueError(f"bad service in {uri!r}: {reason}")
        return Uri("unix", "", 0, rest)
    authority, slash, service = rest.partition("/")
    if not slash or not service:
        raise ValueError(f"missing service in {uri!r}: expected {scheme}://HOST[:PORT]/SERVICE")
    reason = service_name_error(service)
    if reason:
        raise ValueError(f"bad service in {uri!r}: {reason}")
    try:
        host, _family, port_text = split_host_port(authority)
        if port_text is not None:
            port = check_port(port_text)
        elif scheme in default_ports:
            port = default_ports[scheme]
        else:
            raise ValueError(f"missing port (scheme {scheme!r} has no default port)")
    except ValueError as exc:
        raise ValueError(f"{exc} in {uri!r}") from None
    return Uri(scheme, host, port, service)
