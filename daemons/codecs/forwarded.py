"""The real client behind HTTP proxies: ``X-Forwarded-For`` and RFC 7239 ``Forwarded``.

Why: behind nginx or a cloud load balancer, ipc-websocketd's transport peer
is the proxy; the client's address arrives in a header the proxy appends
to. Anyone can send such a header, so it is evidence only where a trusted
proxy (``--trust-proxy CIDR``) wrote it. The rule, the one every careful
implementation uses ("rightmost untrusted"):

1. If the transport peer is not trusted, it is the client; the headers are
   ignored (whatever they say).
2. Otherwise walk the header's hops from the right (the hop the nearest
   proxy added) to the left. Each hop names who connected to the proxy on
   its right. The first hop that is not a trusted proxy is the client. If
   every hop is trusted, the leftmost is the client.
3. A hop that says ``unknown`` or an obfuscated identifier (``_hidden``,
   RFC 7239 section 6.3) ends the walk: a trusted proxy vouches that the
   client is there, but its address is withheld. The result carries that
   identifier as the address, with no IP (``ip`` is None): logs show it,
   per-source limits fall back to the proxy that reported it (``proxy``).
4. A malformed hop also ends the walk, but the result is the last hop that
   was understood (often the transport peer), with ``problem`` saying why,
   for a debug log line. Garbage never raises and never moves trust to the
   left of it. (A client can write garbage at the left end, which the walk
   normally never reaches.)

Only one header kind is honoured, chosen by the operator (``header=``):
a proxy that sets ``X-Forwarded-For`` usually passes a client's own
``Forwarded`` through untouched, so honouring both would let the client
write the hop the walk believes. The default is ``X-Forwarded-For``, what
nginx's ``$proxy_add_x_forwarded_for`` produces. Repeated header lines are
one list, in order (RFC 9110 section 5.3).

Parsing: ``Forwarded`` per RFC 7239 (elements split at commas outside
quoted strings, pairs at semicolons, names case-insensitive, a parameter at
most once per element), leniently accepting what real proxies emit
(unquoted or unbracketed IPv6, spaces around ``;``). A node is an IPv4
address, an IPv6 address (bracketed when a port follows), ``unknown`` or
``_obfuscated``, optionally with ``:port`` or ``:_obfport`` (an obfuscated
port is dropped). ``X-Forwarded-For`` holds bare IPs, also ``ip:port`` and
``[v6]:port`` as some proxies write them. Addresses come out normalized
(IPv4-mapped IPv6 as IPv4, no scope). The cost is linear in the header
size, which the HTTP parser bounds (websockets: 8 KiB a line); the walk
stops after ``max_hops`` trusted hops. No I/O.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from ..engine.trust import IPAddress, TrustedNetworks, normalize, parse_ip, peer_ip

__all__ = [
    "MAX_HOPS",
    "ClientAddress",
    "ForwardedElement",
    "ForwardedHeader",
    "Hop",
    "parse_forwarded",
    "parse_x_forwarded_for",
    "real_client",
]

MAX_HOPS = 32
"""Trusted hops walked at most (a chain of proxies is a handful long)."""

Source: TypeAlias = Literal["transport", "forwarded", "x-forwarded-for"]


class ForwardedHeader(enum.Enum):
    """Which header the trusted proxies write (the other one is ignored)."""

    X_FORWARDED_FOR = "x-forwarded-for"
    FORWARDED = "forwarded"


@dataclass(frozen=True, slots=True)
class Hop:
    """One hop of a forwarding header: who connected to the proxy on its right."""

    node: str
    """An IP (normalized), ``unknown``, or an obfuscated ``_identifier``."""
    port: int | None = None
    proto: str | None = None
    host: str | None = None
    problem: str | None = None
    """Set when the hop could not be parsed (then ``node`` is empty)."""

    @property
    def ip(self) -> IPAddress | None:
        return parse_ip(self.node)


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """Who the client is, and how we know."""

    address: str
    """An IP text (normalized), ``unknown``, an ``_obfuscated`` identifier, or
    for a Unix transport peer its path (``unix-peer`` when unnamed)."""
    port: int | None
    source: Source
    """``transport``: the socket's peer itself; otherwise the header used."""
    proxy: str | None = None
    """The trusted proxy that named this client (None for ``transport``)."""
    proto: str | None = None
    """``Forwarded``'s ``proto=`` in the client's hop (``https``...), if any."""
    host: str | None = None
    """``Forwarded``'s ``host=`` in the client's hop, if any."""
    problem: str | None = None
    """Why the walk stopped before a client (a malformed hop, too many hops)."""

    @property
    def ip(self) -> IPAddress | None:
        """The client's IP, None when withheld (``unknown``, obfuscated) or Unix."""
        return parse_ip(self.address)

    @property
    def limit_key_address(self) -> str:
        """What per-source limits should count: the client's IP, or the proxy
        that reported a withheld client (so one proxy cannot be starved by
        another's anonymous clients, nor an anonymous flood pass unlimited)."""
        if self.ip is not None or self.proxy is None:
            return self.address
        return self.proxy


def real_client(
    peer: Any,
    trusted: TrustedNetworks,
    headers: Iterable[tuple[str, str]],
    *,
    header: ForwardedHeader = ForwardedHeader.X_FORWARDED_FOR,
    max_hops: int = MAX_HOPS,
) -> ClientAddress:
    """The client of a request that came from socket peer ``peer`` with
    ``headers`` (name, value pairs, in order, repeats allowed)."""
    current = _transport(peer)
    if not trusted.trusts_peer(peer):
        return current
    wanted = header.value
    values = [value for name, value in headers if name.lower() == wanted]
    if not values:
        return current
    joined = ", ".join(values)
    if header is ForwardedHeader.FORWARDED:
        hops = [element.hop for element in parse_forwarded(joined)]
    else:
        hops = parse_x_forwarded_for(joined)
    source: Source = "forwarded" if header is ForwardedHeader.FORWARDED else "x-forwarded-for"
    for walked, hop in enumerate(reversed(hops)):
        if walked >= max_hops:
            return _with_problem(current, f"more than {max_hops} trusted hops")
        if hop.problem is not None:
            return _with_problem(current, hop.problem)
        candidate = ClientAddress(hop.node, hop.port, source, current.address, hop.proto, hop.host)
        ip = hop.ip
        if ip is None or not trusted.contains(ip):
            return candidate
        current = candidate
    return current


def _transport(peer: Any) -> ClientAddress:
    ip = peer_ip(peer)
    if ip is not None:
        return ClientAddress(str(ip), int(peer[1]), "transport")
    if isinstance(peer, bytes):
        peer = peer.decode("utf-8", "backslashreplace")
    return ClientAddress(str(peer) if peer else "unix-peer", None, "transport")


def _with_problem(client: ClientAddress, problem: str) -> ClientAddress:
    return ClientAddress(
        client.address,
        client.port,
        client.source,
        client.proxy,
        client.proto,
        client.host,
        problem,
    )


# -- X-Forwarded-For ------------------------------------------------------------


def parse_x_forwarded_for(value: str) -> list[Hop]:
    """The hops of an ``X-Forwarded-For`` value, left to right (empty list
    items skipped, as RFC 9110's list rule says)."""
    hops = []
    for item in value.split(","):
        item = item.strip(" \t")
        if item:
            hops.append(_xff_hop(item))
    return hops


_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?")
_IPV4_PORT = re.compile(r"([0-9.]{7,15}):([0-9]{1,5})")


def _xff_hop(item: str) -> Hop:
    if item.lower() == "unknown":
        return Hop("unknown")
    ip = _plain_ip(item)
    if ip is not None:
        return Hop(str(ip))
    match = _BRACKETED.fullmatch(item) or _IPV4_PORT.fullmatch(item)
    if match:
        ip = _plain_ip(match.group(1))
        port = _port(match.group(2))
        # Brackets hold IPv6 only (the _IPV4_PORT pattern admits no colon).
        ipv6_text = ":" in match.group(1)
        if ip is not None and port != -1 and ipv6_text == (match.re is _BRACKETED):
            return Hop(str(ip), port)
    return Hop("", problem=f"X-Forwarded-For hop {_show(item)} is not an address")


def _plain_ip(text: str) -> IPAddress | None:
    """An IP with no scope id (a peer's header has no business naming our
    interfaces)."""
    return None if "%" in text else parse_ip(text)


def _port(text: str | None) -> int | None:
    """None for no port, -1 for a bad one."""
    if text is None:
        return None
    port = int(text)
    return port if port <= 0xFFFF else -1


# -- Forwarded (RFC 7239) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ForwardedElement:
    """One element of a ``Forwarded`` header: its parameters (names lower-case,
    values unquoted) and the hop it describes."""

    params: tuple[tuple[str, str], ...]
    hop: Hop


def parse_forwarded(value: str) -> list[ForwardedElement]:
    """The elements of a ``Forwarded`` value, left to right. A malformed
    element is kept, its hop's ``problem`` set, so a walk can stop there."""
    elements = []
    for raw, problem in _split_elements(value):
        if problem is None and not raw.strip(" \t"):
            continue  # an empty list item
        elements.append(_element(raw, problem))
    return elements


_TCHAR = "!#$%&'*+-.^_`|~0-9A-Za-z"
_NAME = re.compile(f"[{_TCHAR}]+")
_LOOSE_VALUE = re.compile(r"[^\s\",;=\\]+")  # a token, leniently with : [ ]
_OBFUSCATED = re.compile(r"_[A-Za-z0-9._-]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_HOST = re.compile(r"[!-~]{1,255}")
_FORWARDED_NODE = re.compile(r"(\[[^\]]*\]|[^:\[\]]+)(?::([^:]+))?")


def _split_elements(value: str) -> list[tuple[str, str | None]]:
    """Split at commas outside quoted strings; an unterminated quote makes the
    rest one malformed element."""
    out: list[tuple[str, str | None]] = []
    start = 0
    quoted = escaped = False
    for i, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            if char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == ",":
            out.append((value[start:i], None))
            start = i + 1
    tail = value[start:]
    out.append((tail, "Forwarded element with an unterminated quoted string" if quoted else None))
    return out


def _element(raw: str, problem: str | None) -> ForwardedElement:
    if problem is None:
        try:
            params = _pairs(raw)
        except ValueError as exc:
            problem = str(exc)
    if problem is not None:
        return ForwardedElement((), Hop("", problem=problem))
    values = dict(params)
    node = values.get("for")
    hop = _forwarded_node(node) if node is not None else Hop("unknown")
    proto = values.get("proto")
    host = values.get("host")
    hop = Hop(
        hop.node,
        hop.port,
        proto.lower() if proto is not None and _SCHEME.fullmatch(proto) else None,
        host if host is not None and _HOST.fullmatch(host) else None,
        hop.problem,
    )
    return ForwardedElement(tuple(params), hop)


def _pairs(raw: str) -> list[tuple[str, str]]:
    """``name=value`` pairs separated by ``;`` (quoted strings respected)."""
    pairs: list[tuple[str, str]] = []
    pos = 0
    text = raw.strip(" \t")
    while pos < len(text):
        if text[pos] in " \t;":
            pos += 1
            continue
        name_match = _NAME.match(text, pos)
        if name_match is None or text[name_match.end() : name_match.end() + 1] != "=":
            raise ValueError(f"Forwarded element {_show(raw)} is not name=value pairs")
        name = name_match.group().lower()
        pos = name_match.end() + 1
        value, pos = _value(text, pos, raw)
        if any(name == seen for seen, _ in pairs):
            raise ValueError(f"Forwarded element {_show(raw)} repeats {name}=")
        pairs.append((name, value))
        rest = text[pos : pos + 1]
        if rest and rest not in " \t;":
            raise ValueError(f"Forwarded element {_show(raw)} is not name=value pairs")
    return pairs


def _value(text: str, pos: int, raw: str) -> tuple[str, int]:
    if text[pos : pos + 1] == '"':
        chars = []
        i = pos + 1
        while i < len(text):
            char = text[i]
            if char == "\\" and i + 1 < len(text):
                chars.append(text[i + 1])
                i += 2
                continue
            if char == '"':
                value = "".join(chars)
                if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
                    break
                return value, i + 1
            chars.append(char)
            i += 1
        raise ValueError(f"Forwarded element {_show(raw)} has a bad quoted string")
    match = _LOOSE_VALUE.match(text, pos)
    if match is None:
        raise ValueError(f"Forwarded element {_show(raw)} has an empty value")
    return match.group(), match.end()


def _forwarded_node(value: str) -> Hop:
    lowered = value.lower()
    if lowered == "unknown":
        return Hop("unknown")
    if _OBFUSCATED.fullmatch(value):
        return Hop(value)
    ip = _plain_ip(value)
    if ip is not None:  # bare IPv4, or an unbracketed IPv6 without a port
        return Hop(str(ip))
    match = _FORWARDED_NODE.fullmatch(value)
    if match:
        name, port_text = match.group(1), match.group(2)
        port = _node_port(port_text)
        if name.lower() == "unknown" and port != -1:
            return Hop("unknown", port)
        if _OBFUSCATED.fullmatch(name) and port != -1:
            return Hop(name, port)
        if name.startswith("["):
            ip = _plain_ip(name[1:-1])
            ip = ip if ip is not None and ":" in name else None
        else:
            ip = _plain_ip(name)
            ip = ip if ip is not None and ip.version == 4 else None
        if ip is not None and port != -1:
            return Hop(str(normalize(ip)), port)
    return Hop("", problem=f"Forwarded for={_show(value)} is not a node")


def _node_port(text: str | None) -> int | None:
    """A numeric port, None (absent or obfuscated, RFC 7239 section 6.3), -1 if bad."""
    if text is None or _OBFUSCATED.fullmatch(text):
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return -1
    return _port(text)


def _show(text: str) -> str:
    """Peer text for a log line: quoted, escaped, bounded."""
    return repr(text[:80])
