"""Trusted networks: which peers may speak for someone else.

Why this module: two features let a peer claim that a connection really
comes from another address, the PROXY protocol (``--proxy-protocol CIDR``)
and forwarding headers (``--trust-proxy CIDR``). Both are safe only when the
claim comes from a proxy the operator named, so both need the same three
things, written once here: parse the operator's CIDR list (refusing typos
with a message that names the bad entry), turn a socket's peer address into
an IP (IPv4-mapped IPv6 as the IPv4 address it is, a scope id dropped), and
ask whether that IP is inside one of the networks.

A peer on a Unix socket has no IP: it is trusted only when the list holds
the word ``unix`` (a proxy on the same host, e.g. HAProxy sending to
``unix:/run/ipc-tcpd.sock``). No I/O here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any, TypeAlias

from ipc_core.errors import UsageError

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

UNIX = "unix"
"""The word in a CIDR list that trusts peers on Unix sockets."""


class BadNetwork(UsageError, ValueError):
    """An entry of a CIDR list is not a network (the message names it)."""


def parse_ip(text: str) -> IPAddress | None:
    """The IP in ``text``, IPv4-mapped IPv6 as IPv4, a ``%scope`` dropped;
    None when ``text`` is not an IP address."""
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    return normalize(ip)


def normalize(ip: IPAddress) -> IPAddress:
    """``::ffff:192.0.2.7`` is ``192.0.2.7``: a dual-stack listener sees IPv4
    peers that way, and the operator writes IPv4 networks for them."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def peer_ip(addr: Any) -> IPAddress | None:
    """The IP of a socket peer address (``getpeername()``: a tuple for
    AF_INET/AF_INET6), None for a Unix peer or anything else."""
    if isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[0], str):
        return parse_ip(addr[0])
    return None


class TrustedNetworks:
    """An immutable set of networks (and maybe ``unix``) that are trusted.

    ``TrustedNetworks.parse(["10.0.0.0/8", "::1", "unix"])``; a bare address
    is a /32 or /128. An empty list trusts nobody.
    """

    __slots__ = ("_networks", "_unix")

    def __init__(self, networks: Iterable[IPNetwork] = (), *, unix: bool = False) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(networks)
        self._unix = unix

    @classmethod
    def parse(cls, entries: Iterable[str], *, flag: str | None = "CIDR") -> TrustedNetworks:
        """Parse operator input; ``flag`` names the option in error messages
        (None: the message starts with the entry, for click, which names the
        option itself)."""
        networks: list[IPNetwork] = []
        unix = False
        for raw in entries:
            entry = raw.strip()
            if entry.lower() == UNIX:
                unix = True
                continue
            networks.append(_parse_network(entry, flag))
        return cls(networks, unix=unix)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self._networks

    @property
    def trusts_unix(self) -> bool:
        return self._unix

    def union(self, other: TrustedNetworks | None) -> TrustedNetworks:
        """Every network of both lists (``unix`` if either says it): one
        daemon may trust proxies for two reasons (``--proxy-protocol`` and
        ``--trust-proxy``), and ``Daemon.trusted_proxies`` holds them all."""
        if other is None:
            return self
        networks = dict.fromkeys(self._networks + other._networks)
        return TrustedNetworks(networks, unix=self._unix or other._unix)

    def __bool__(self) -> bool:
        return bool(self._networks) or self._unix

    def __repr__(self) -> str:
        names = [str(n) for n in self._networks] + ([UNIX] if self._unix else [])
        return f"TrustedNetworks({names!r})"

    def contains(self, ip: IPAddress | None) -> bool:
        """Whether ``ip`` lies in one of the networks (None: never)."""
        if ip is None:
            return False
        ip = normalize(ip)
        return any(ip.version == net.version and ip in net for net in self._networks)

    def trusts_peer(self, addr: Any) -> bool:
        """Whether a socket peer address is trusted: its IP is in a network,
        or it is a Unix peer (a str or bytes path, possibly empty) and the list
        says ``unix``."""
        if isinstance(addr, str | bytes):
            return self._unix
        return self.contains(peer_ip(addr))


def _parse_network(entry: str, flag: str | None) -> IPNetwork:
    what = f"{flag} {entry!r}" if flag else repr(entry)
    try:
        network = ipaddress.ip_network(entry.partition("%")[0] if "/" not in entry else entry)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            raise BadNetwork(
                f"{what}: host bits set (did you mean {ipaddress.ip_network(entry, strict=False)}?)"
            ) from None
        raise BadNetwork(
            f"{what} is not an IP network (examples: 10.0.0.0/8, 2001:db8::/32, 192.0.2.7, unix)"
        ) from None
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            # ::ffff:10.0.0.0/104 means 10.0.0.0/8: peers are compared as IPv4.
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network
