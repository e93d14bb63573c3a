"""UDP for ipc-udpd, without I/O: what the flags and requests say, how large
a datagram may be, and why one is dropped.

UDP's "protocol" is tiny (one datagram = one LibIPC message, both ways), so
this module holds the rules around it:

* :func:`parse_udp_listen`: ``--listen :5140=SERVICE`` (address, then the
  local service every flow of that port reaches);
* :func:`parse_udp_target`: the request a local client sends the outbound
  side, ``udp://HOST:PORT`` (a ``/SERVICE`` path is accepted and not sent,
  so that ipcd's ``IPC_NETWORK`` routes work unchanged);
* :func:`max_payload`: the largest datagram towards an address (65507 bytes
  over IPv4, 65527 over IPv6);
* :class:`Drop`: the reasons a datagram or a message is dropped (the label
  of ``ipc_udp_dropped_total``): UDP cannot push back, so what does not fit
  is dropped, counted, and logged at a bounded rate.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from ..engine.addresses import check_port, split_host_port
from ..engine.policy import service_name_error

__all__ = [
    "MAX_IPV4_PAYLOAD",
    "MAX_IPV6_PAYLOAD",
    "Drop",
    "UdpTarget",
    "max_payload",
    "parse_udp_target",
]

#: 65535 (the IPv4 total length) - 20 (IP header) - 8 (UDP header).
MAX_IPV4_PAYLOAD = 65507
#: 65535 (the IPv6 payload length, no jumbograms) - 8 (UDP header).
MAX_IPV6_PAYLOAD = 65527


class Drop(enum.StrEnum):
    """Why a datagram (or a message meant to be one) was dropped."""

    #: The service does not read: its queue is over the high-water mark.
    QUEUE_FULL = "queue full"
    #: A datagram over --max-message-size.
    OVERSIZE = "oversize"
    #: A message over the largest datagram (65507 bytes over IPv4).
    TOO_LARGE_FOR_UDP = "too large for udp"
    #: The kernel's send buffer is full (or it refused the datagram).
    SEND_FAILED = "send failed"
    #: The remote port answered "unreachable" (ICMP).
    UNREACHABLE = "unreachable"
    #: --max-flows.
    TOO_MANY_FLOWS = "too many flows"
    #: --max-flows-per-ip.
    TOO_MANY_FROM_SOURCE = "too many flows from one address"
    #: The policy refuses the service (local-only, *.ctl...).
    REFUSED = "refused"
    #: No such local service, or it cannot take a connection now.
    NO_SERVICE = "no service"
    #: The service read the peer information and said no.
    SERVICE_REFUSED = "service refused"


@dataclass(frozen=True)
class UdpTarget:
    """Where an outbound association sends: ``host`` (brackets removed) and
    ``port``; ``service`` is the path of the URI, if any (not sent)."""

    host: str
    port: int
    service: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"udp://{host}:{self.port}"


def parse_udp_target(text: str) -> UdpTarget:
    """Parse an outbound request: ``udp://HOST:PORT``, optionally followed by
    ``/`` or ``/SERVICE`` (the service is up to the remote port: an
    ipc-udpd there serves one service per port; the path is accepted so that
    ipcd routes ``NAME udp://HOST:PORT/NAME`` as for tcp://)."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "udp":
        raise ValueError(f"expected udp://HOST:PORT, got {text!r}")
    authority, _slash, service = rest.partition("/")
    try:
        host, _family, port_text = split_host_port(authority)
        if port_text is None:
            raise ValueError("missing port")
        port = check_port(port_text)
        if port == 0:
            raise ValueError("port 0 cannot be sent to")
    except ValueError as exc:
        raise ValueError(f"{exc} in {text!r}") from None
    if service:
        reason = service_name_error(service)
        if reason:
            raise ValueError(f"bad service in {text!r}: {reason}")
    return UdpTarget(host, port, service or None)


def max_payload(address: object) -> int:
    """The largest UDP payload towards ``address`` (a socket address tuple):
    IPv4 (also IPv4-mapped on a dual-stack socket) 65507, IPv6 65527."""
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        host = address[0].partition("%")[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return MAX_IPV4_PAYLOAD
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
            return MAX_IPV6_PAYLOAD
    return MAX_IPV4_PAYLOAD
