"""The PROXY protocol, versions 1 and 2 (HAProxy's doc/proxy-protocol.txt), Sans-I/O.

Why: a load balancer in TCP mode (HAProxy ``send-proxy-v2``, stunnel, AWS
NLB, nginx stream) hides the client; the PROXY header it writes first on
each connection is how the real address reaches us. The header is a claim,
so it is believed only from sources the operator listed
(``--proxy-protocol CIDR``): the spec says a receiver must never guess
whether a header is there. Hence two objects:

* :class:`ProxyHeaderParser` reads the header a trusted source must send:
  ``feed(bytes)`` answers :data:`NEED_DATA` or a :class:`ProxyResult` (the
  header and the bytes that followed it, which belong to the next layer:
  the TCPd name, a TLS ClientHello, an HTTP request), or raises
  :class:`ProxyProtocolError` with the reason to log.
* :class:`ProxyGate` runs first on every accepted connection once
  ``--proxy-protocol`` is set (wrapped around the daemon's handshake, the
  way :mod:`daemons.codecs.tlswrap` wraps TLS around it): for a trusted
  peer it is the parser (a missing header is an error); for any other peer
  it passes the bytes through untouched, but refuses them if they start
  with a PROXY signature (a client trying to spoof its address, or a proxy
  the operator forgot to list: either way the connection must close with a
  clear reason). :class:`ProxyPolicy` makes the per-connection gates from
  the CIDR list (:class:`daemons.engine.trust.TrustedNetworks`).

Rules of this parser (strict: the sender is a known machine, anything odd is
a misconfiguration worth a closed connection and a log line):

* version 1: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` with single spaces,
  addresses of the announced family (IPv4 dotted quads without leading
  zeros; IPv6 without a scope), ports 0..65535 without leading zeros, CRLF
  within the first 107 bytes (a lone CR or LF is an error). ``PROXY
  UNKNOWN...\\r\\n`` means "use the real endpoints".
* version 2: the 12-byte signature, version nibble 2, command LOCAL (use the
  real endpoints; the block is skipped, TLVs not interpreted) or PROXY; the
  address family/protocol byte one of 0x00, 0x11, 0x12, 0x21, 0x22, 0x31,
  0x32 (the spec's list; other combinations are refused). The header length
  is checked as soon as the first 16 bytes are here: more than the family's
  address block plus ``max_tlv_bytes`` (default 4 KiB, configurable up to
  the protocol's 64 KiB) is refused before anything else is read, so a
  connection never holds more than 16 + 216 + ``max_tlv_bytes`` bytes here.
  Every TLV must fit exactly; CRC32C is verified when present; ALPN,
  AUTHORITY (UTF-8, at most 255 bytes), UNIQUE_ID (at most 128 bytes), NETNS
  and the SSL TLV (version, CN, cipher, algorithms, client certificate) are
  decoded, a known TLV twice is an error; every TLV is also kept raw, in
  order, unknown types included.
* addresses come out as text, IPv4-mapped IPv6 as the IPv4 address it is
  (the form logs and per-source limits use elsewhere in the daemons); an
  AF_UNIX path up to its first NUL, an abstract one as ``@name``.

``feed(b"")`` means end of stream: inside a header it raises
:class:`~ipc_core.errors.PeerClosed`. The parser buffers at most the header;
what follows it in the same chunk is handed back untouched. No I/O, no clock:
the engine's handshake deadline covers the header (the spec suggests at
least 3 seconds).
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from ipc_core.errors import PeerClosed, ProtocolError, UsageError

from ..engine.trust import TrustedNetworks, normalize

__all__ = [
    "MAX_V1_BYTES",
    "MAX_V2_TLV_BYTES",
    "NEED_DATA",
    "V1_SIGNATURE",
    "V2_SIGNATURE",
    "Endpoint",
    "NeedData",
    "ProxyGate",
    "ProxyHeader",
    "ProxyHeaderParser",
    "ProxyPolicy",
    "ProxyProtocolError",
    "ProxyResult",
    "SslInfo",
    "crc32c",
    "encode_v1",
    "encode_v2",
]


class NeedData(enum.Enum):
    """Not enough bytes yet: read more and feed them (h11's convention)."""

    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1_BYTES = 107
"""The longest v1 line the spec allows, CRLF included."""
MAX_V2_TLV_BYTES = 4096
"""Default cap on a v2 header's TLV bytes. HAProxy's own TLVs (ALPN,
AUTHORITY, UNIQUE_ID, SSL with CN and cipher) take a few hundred bytes; a
client certificate in PP2_SUBTYPE_SSL_CLIENT_CERT takes 1 to 2 KiB. A sender
configured for more can be allowed with ``max_tlv_bytes`` (at most 65319)."""

_V2_HEADER = 16
_UNIX_PATH = 108
_ADDRESS_BYTES = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 2 * _UNIX_PATH}
_FAMILY_NAMES: dict[int, Family] = {0x0: "unspec", 0x1: "inet", 0x2: "inet6", 0x3: "unix"}
_TRANSPORT_NAMES: dict[int, Transport] = {0x0: "unspec", 0x1: "stream", 0x2: "dgram"}
_VALID_FAMILY_BYTES = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
_MAX_V2_LENGTH = 0xFFFF

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_SUBTYPE_SSL_GROUP = 0x26
PP2_SUBTYPE_SSL_SIG_SCHEME = 0x27
PP2_SUBTYPE_SSL_CLIENT_CERT = 0x28
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
_MAX_AUTHORITY = 255
_MAX_UNIQUE_ID = 128

Family: TypeAlias = Literal["inet", "inet6", "unix", "unspec"]
Transport: TypeAlias = Literal["stream", "dgram", "unspec"]
Command: TypeAlias = Literal["PROXY", "LOCAL"]


class ProxyProtocolError(ProtocolError):
    """A PROXY header that is missing, malformed, too large, or from a source
    that may not send one. The message is the reason to log."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of the proxied connection: an IP text and port, or a Unix path
    (port None)."""

    address: str
    port: int | None

    def __str__(self) -> str:
        if self.port is None:
            return self.address
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class SslInfo:
    """The PP2_TYPE_SSL TLV: what the proxy saw of the client's TLS session."""

    client: int
    """Bit field: 0x01 TLS used, 0x02 certificate on this connection, 0x04
    certificate on this TLS session."""
    verify: int
    """0 when the client presented a certificate that was verified."""
    version: str | None = None
    common_name: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    group: str | None = None
    sig_scheme: str | None = None
    client_cert: bytes | None = None
    """The client's certificate, DER (only if the proxy is set to send it)."""

    @property
    def tls(self) -> bool:
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def has_certificate(self) -> bool:
        return bool(self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS))

    @property
    def verified(self) -> bool:
        """A client certificate was presented and the proxy verified it."""
        return self.has_certificate and self.verify == 0


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header. ``source`` is None when the receiver must use
    the real connection's endpoints (v1 UNKNOWN, v2 LOCAL, v2 UNSPEC)."""

    version: Literal[1, 2]
    command: Command
    family: Family
    transport: Transport
    source: Endpoint | None = None
    destination: Endpoint | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    """Every v2 TLV as (type, value), in order (empty for LOCAL and v1)."""
    alpn: bytes | None = None
    authority: str | None = None
    unique_id: bytes | None = None
    netns: str | None = None
    ssl: SslInfo | None = None

    @property
    def uses_real_endpoints(self) -> bool:
        return self.source is None


@dataclass(frozen=True, slots=True)
class ProxyResult:
    """What a parser or gate produced: the header (None: an untrusted peer
    that sent none) and the bytes after it, for the next layer."""

    header: ProxyHeader | None
    rest: bytes


class ProxyHeaderParser:
    """Reads one PROXY header, v1 or v2, from a trusted source."""

    def __init__(self, *, max_tlv_bytes: int = MAX_V2_TLV_BYTES) -> None:
        limit = _MAX_V2_LENGTH - _ADDRESS_BYTES[0x3]
        if not 0 <= max_tlv_bytes <= limit:
            raise UsageError(f"max_tlv_bytes must be within 0..{limit}, not {max_tlv_bytes}")
        self._max_tlv = max_tlv_bytes
        self._buf = bytearray()
        self._done = False

    @property
    def buffered(self) -> int:
        """Bytes held (at most the header's size)."""
        return len(self._buf)

    def feed(self, data: bytes) -> ProxyResult | NeedData:
        """Take received bytes (``b""`` = end of stream)."""
        if self._done:
            raise UsageError("the PROXY header was already parsed: feed the next layer")
        if not data:
            what = f"after {len(self._buf)} bytes of" if self._buf else "before"
            raise PeerClosed(f"connection closed {what} the PROXY protocol header")
        self._buf += data
        head = bytes(self._buf[:_V2_HEADER])
        if V2_SIGNATURE.startswith(head[:12]) and head[:1] == b"\r":
            outcome = self._try_v2()
        elif V1_SIGNATURE.startswith(head[:6]):
            outcome = self._try_v1()
        else:
            raise ProxyProtocolError(
                f"no PROXY protocol header from a --proxy-protocol source, which must "
                f"send one (first bytes {bytes(self._buf[:16])!r})"
            )
        if isinstance(outcome, NeedData):
            return NEED_DATA
        header, size = outcome
        rest = bytes(self._buf[size:])
        self._buf = bytearray()
        self._done = True
        return ProxyResult(header, rest)

    # -- version 1 --------------------------------------------------------

    def _try_v1(self) -> tuple[ProxyHeader, int] | NeedData:
        buf = self._buf
        window = bytes(buf[:MAX_V1_BYTES])
        end = window.find(b"\r\n")
        scan = window if end < 0 else window[:end]
        # Before the CRLF: no LF at all, and no CR (but a last byte that may
        # be the first half of a CRLF still coming).
        if b"\n" in scan or b"\r" in (scan if end >= 0 else scan[:-1]):
            raise ProxyProtocolError("PROXY v1 line with a lone CR or LF")
        _check_v1_prefix(scan)
        if end < 0:
            if len(buf) >= MAX_V1_BYTES:
                raise ProxyProtocolError(
                    f"PROXY v1 line without CRLF in its first {MAX_V1_BYTES} bytes"
                )
            return NEED_DATA
        return _parse_v1(window[:end]), end + 2

    # -- version 2 --------------------------------------------------------

    def _try_v2(self) -> tuple[ProxyHeader, int] | NeedData:
        buf = self._buf
        if len(buf) < _V2_HEADER:
            return NEED_DATA
        ver_cmd, fam, length = struct.unpack_from("!BBH", buf, 12)
        if ver_cmd >> 4 != 2:
            raise ProxyProtocolError(f"PROXY v2 signature with version {ver_cmd >> 4}")
        command = ver_cmd & 0x0F
        if command not in (0x0, 0x1):
            raise ProxyProtocolError(f"PROXY v2 header with unknown command {command}")
        if fam not in _VALID_FAMILY_BYTES and command == 0x1:
            raise ProxyProtocolError(f"PROXY v2 header with address family byte {fam:#04x}")
        address_bytes = _ADDRESS_BYTES[fam >> 4] if command == 0x1 else _ADDRESS_BYTES[0x3]
        if length > address_bytes + self._max_tlv:
            raise ProxyProtocolError(
                f"PROXY v2 header of {_V2_HEADER + length} bytes, limit is "
                f"{_V2_HEADER + address_bytes + self._max_tlv}"
            )
        size = _V2_HEADER + length
        if len(buf) < size:
            return NEED_DATA
        block = bytes(buf[:size])
        if command == 0x0:
            return ProxyHeader(2, "LOCAL", "unspec", "unspec"), size
        return _parse_v2_proxy(block, fam), size


class ProxyGate:
    """Per accepted connection once ``--proxy-protocol`` is set: a trusted
    peer must send a header (parsed), any other must not (its bytes pass
    through, unless they begin with a PROXY signature)."""

    def __init__(self, trusted: bool, *, max_tlv_bytes: int = MAX_V2_TLV_BYTES) -> None:
        self.trusted = trusted
        self._parser = ProxyHeaderParser(max_tlv_bytes=max_tlv_bytes) if trusted else None
        self._held = b""
        self._done = False

    def feed(self, data: bytes) -> ProxyResult | NeedData:
        if self._parser is not None:
            return self._parser.feed(data)
        if self._done:
            raise UsageError("the PROXY gate already let this connection through")
        if not data:
            raise PeerClosed("connection closed before its first bytes were checked")
        held = self._held + data
        if held.startswith(V1_SIGNATURE) or held.startswith(V2_SIGNATURE):
            raise ProxyProtocolError(
                "PROXY protocol header from a source not listed in --proxy-protocol "
                "(a client forging its address, or a proxy missing from the list)"
            )
        if V1_SIGNATURE.startswith(held) or V2_SIGNATURE.startswith(held):
            self._held = held  # at most 11 bytes: not yet clear
            return NEED_DATA
        self._held = b""
        self._done = True
        return ProxyResult(None, held)

    @property
    def holding(self) -> bool:
        """An unlisted peer's first bytes could still begin a header (``PRO``)
        and are held until more come."""
        return bool(self._held)

    def release(self) -> ProxyResult:
        """An unlisted peer stopped after bytes that could begin a header
        (a TCPd name ``PROX`` without terminator): no header is coming, let
        them through. A listed source must send its header: never released."""
        if self._parser is not None:
            raise UsageError("a --proxy-protocol source must send its header: nothing to release")
        if self._done:
            raise UsageError("the PROXY gate already let this connection through")
        held, self._held = self._held, b""
        self._done = True
        return ProxyResult(None, held)


class ProxyPolicy:
    """``--proxy-protocol CIDR`` (repeatable) turned into per-connection gates."""

    def __init__(self, trusted: TrustedNetworks, *, max_tlv_bytes: int = MAX_V2_TLV_BYTES) -> None:
        self.trusted = trusted
        self.max_tlv_bytes = max_tlv_bytes
        ProxyHeaderParser(max_tlv_bytes=max_tlv_bytes)  # validate the bound now

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str], **kwargs: Any) -> ProxyPolicy:
        return cls(TrustedNetworks.parse(cidrs, flag="--proxy-protocol"), **kwargs)

    @property
    def enabled(self) -> bool:
        """False with no ``--proxy-protocol``: the daemon skips the gate
        altogether (bytes go to the handshake as before)."""
        return bool(self.trusted)

    def requires_header(self, peer: Any) -> bool:
        """True: this peer must send a header; False: it must not."""
        return self.trusted.trusts_peer(peer)

    def gate(self, peer: Any) -> ProxyGate:
        return ProxyGate(self.requires_header(peer), max_tlv_bytes=self.max_tlv_bytes)


# -- version 1 details ------------------------------------------------------

_V1_PORT = r"(0|[1-9][0-9]{0,4})"
_V1_TCP = re.compile(
    rb"PROXY (TCP4|TCP6) ([0-9A-Fa-f.:]{2,45}) ([0-9A-Fa-f.:]{2,45}) "
    + _V1_PORT.encode()
    + b" "
    + _V1_PORT.encode()
)
_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")
_IPV4_TEXT = re.compile(r"(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}")


def _check_v1_prefix(window: bytes) -> None:
    """Fail early on a line that cannot become valid (the spec asks to abort
    as soon as possible so the sender notices)."""
    if not window.startswith(V1_SIGNATURE):
        return  # shorter than "PROXY ": still a prefix
    proto = window[len(V1_SIGNATURE) :]
    if not any(p.startswith(proto[: len(p)]) for p in _V1_PROTOCOLS):
        raise ProxyProtocolError(f"PROXY v1 line with unknown protocol {_show(proto[:8])}")


def _parse_v1(line: bytes) -> ProxyHeader:
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return ProxyHeader(1, "PROXY", "unspec", "unspec")
    match = _V1_TCP.fullmatch(line)
    if match is None:
        raise ProxyProtocolError(f"malformed PROXY v1 line {_show(line)}")
    proto, src, dst, sport, dport = (g.decode("ascii") for g in match.groups())
    family: Family = "inet" if proto == "TCP4" else "inet6"
    src_ip = _v1_address(src, family)
    dst_ip = _v1_address(dst, family)
    ports = int(sport), int(dport)
    if max(ports) > 0xFFFF:
        raise ProxyProtocolError(f"PROXY v1 line with a port over 65535: {_show(line)}")
    return ProxyHeader(
        1,
        "PROXY",
        family,
        "stream",
        Endpoint(src_ip, ports[0]),
        Endpoint(dst_ip, ports[1]),
    )


def _v1_address(text: str, family: Family) -> str:
    try:
        if family == "inet":
            if not _IPV4_TEXT.fullmatch(text):
                raise ValueError(text)
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(text)
        else:
            ip = ipaddress.IPv6Address(text)
    except ValueError:
        name = "TCP4" if family == "inet" else "TCP6"
        raise ProxyProtocolError(f"PROXY v1 {name} line with address {text!r}") from None
    return str(normalize(ip))


# -- version 2 details ------------------------------------------------------


def _parse_v2_proxy(block: bytes, fam: int) -> ProxyHeader:
    family = _FAMILY_NAMES[fam >> 4]
    transport = _TRANSPORT_NAMES[fam & 0x0F]
    address_bytes = _ADDRESS_BYTES[fam >> 4]
    if len(block) - _V2_HEADER < address_bytes:
        raise ProxyProtocolError(
            f"PROXY v2 header of {len(block) - _V2_HEADER} address bytes, "
            f"{family} needs {address_bytes}"
        )
    source, destination = _v2_endpoints(block[_V2_HEADER : _V2_HEADER + address_bytes], fam)
    tlv_start = _V2_HEADER + address_bytes
    tlvs = _split_tlvs(block, tlv_start)
    fields = _decode_tlvs(tlvs, block, tlv_start)
    return ProxyHeader(
        2,
        "PROXY",
        family,
        transport,
        source,
        destination,
        tuple((t, v) for t, v, _ in tlvs),
        **fields,
    )


def _v2_endpoints(raw: bytes, fam: int) -> tuple[Endpoint | None, Endpoint | None]:
    kind = fam >> 4
    if kind == 0x1:
        src4, dst4, sport, dport = struct.unpack("!4s4sHH", raw)
        return (
            Endpoint(str(ipaddress.IPv4Address(src4)), sport),
            Endpoint(str(ipaddress.IPv4Address(dst4)), dport),
        )
    if kind == 0x2:
        src6, dst6, sport, dport = struct.unpack("!16s16sHH", raw)
        return (
            Endpoint(str(normalize(ipaddress.IPv6Address(src6))), sport),
            Endpoint(str(normalize(ipaddress.IPv6Address(dst6))), dport),
        )
    if kind == 0x3:
        return (
            Endpoint(_unix_path(raw[:_UNIX_PATH]), None),
            Endpoint(_unix_path(raw[_UNIX_PATH:]), None),
        )
    return None, None


def _unix_path(raw: bytes) -> str:
    """``sun_path`` as text: up to the first NUL, an abstract name as ``@name``."""
    if raw[:1] == b"\x00":
        name = raw[1:].rstrip(b"\x00")
        return "@" + name.decode("utf-8", "backslashreplace") if name else ""
    return raw.partition(b"\x00")[0].decode("utf-8", "backslashreplace")


def _split_tlvs(block: bytes, start: int) -> list[tuple[int, bytes, int]]:
    """(type, value, offset of the value) for each TLV from ``start`` to the end."""
    tlvs = []
    pos = start
    while pos < len(block):
        if pos + 3 > len(block):
            raise ProxyProtocolError("PROXY v2 header ends inside a TLV header")
        kind, size = struct.unpack_from("!BH", block, pos)
        if pos + 3 + size > len(block):
            raise ProxyProtocolError(
                f"PROXY v2 TLV {kind:#04x} of {size} bytes overruns the header"
            )
        tlvs.append((kind, block[pos + 3 : pos + 3 + size], pos + 3))
        pos += 3 + size
    return tlvs


def _decode_tlvs(tlvs: list[tuple[int, bytes, int]], block: bytes, start: int) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    seen: set[int] = set()
    for kind, value, offset in tlvs:
        if kind in _SINGLE_TLVS:
            if kind in seen:
                raise ProxyProtocolError(f"PROXY v2 header with TLV {kind:#04x} twice")
            seen.add(kind)
        if kind == PP2_TYPE_CRC32C:
            _check_crc(block, value, offset)
        elif kind == PP2_TYPE_ALPN:
            fields["alpn"] = value
        elif kind == PP2_TYPE_AUTHORITY:
            if len(value) > _MAX_AUTHORITY:
                raise ProxyProtocolError(f"PROXY v2 authority of {len(value)} bytes")
            fields["authority"] = _utf8(value, "authority")
        elif kind == PP2_TYPE_UNIQUE_ID:
            if len(value) > _MAX_UNIQUE_ID:
                raise ProxyProtocolError(f"PROXY v2 unique id of {len(value)} bytes")
            fields["unique_id"] = value
        elif kind == PP2_TYPE_NETNS:
            fields["netns"] = _ascii(value, "netns")
        elif kind == PP2_TYPE_SSL:
            fields["ssl"] = _decode_ssl(value)
    return fields


_SINGLE_TLVS = frozenset(
    {
        PP2_TYPE_ALPN,
        PP2_TYPE_AUTHORITY,
        PP2_TYPE_CRC32C,
        PP2_TYPE_UNIQUE_ID,
        PP2_TYPE_SSL,
        PP2_TYPE_NETNS,
    }
)

_SSL_TEXT_FIELDS = {
    PP2_SUBTYPE_SSL_VERSION: "version",
    PP2_SUBTYPE_SSL_CN: "common_name",
    PP2_SUBTYPE_SSL_CIPHER: "cipher",
    PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
    PP2_SUBTYPE_SSL_KEY_ALG: "key_alg",
    PP2_SUBTYPE_SSL_GROUP: "group",
    PP2_SUBTYPE_SSL_SIG_SCHEME: "sig_scheme",
}


def _decode_ssl(value: bytes) -> SslInfo:
    if len(value) < 5:
        raise ProxyProtocolError(f"PROXY v2 SSL TLV of {len(value)} bytes (at least 5)")
    client, verify = struct.unpack_from("!BI", value)
    fields: dict[str, Any] = {}
    for kind, sub, _ in _split_tlvs(value, 5):
        if kind in _SSL_TEXT_FIELDS:
            name = _SSL_TEXT_FIELDS[kind]
            if name in fields:
                raise ProxyProtocolError(f"PROXY v2 SSL sub-TLV {kind:#04x} twice")
            # CN is UTF-8 per the spec, the other strings US-ASCII.
            fields[name] = _utf8(sub, name) if kind == PP2_SUBTYPE_SSL_CN else _ascii(sub, name)
        elif kind == PP2_SUBTYPE_SSL_CLIENT_CERT:
            if "client_cert" in fields:
                raise ProxyProtocolError("PROXY v2 SSL client certificate twice")
            fields["client_cert"] = sub
    return SslInfo(client, verify, **fields)


def _utf8(value: bytes, what: str) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProxyProtocolError(f"PROXY v2 {what} is not UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ProxyProtocolError(f"PROXY v2 {what} holds control characters")
    return text


def _ascii(value: bytes, what: str) -> str:
    if not all(0x20 <= b < 0x7F for b in value):
        raise ProxyProtocolError(f"PROXY v2 {what} is not printable US-ASCII")
    return value.decode("ascii")


def _check_crc(block: bytes, value: bytes, offset: int) -> None:
    if len(value) != 4:
        raise ProxyProtocolError(f"PROXY v2 CRC32C TLV of {len(value)} bytes (must be 4)")
    zeroed = block[:offset] + b"\x00\x00\x00\x00" + block[offset + 4 :]
    if crc32c(zeroed) != int.from_bytes(value, "big"):
        raise ProxyProtocolError("PROXY v2 header fails its CRC32C check")


def _make_crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B), as PP2_TYPE_CRC32C uses."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _show(data: bytes) -> str:
    """Peer bytes for a log line: quoted, escaped, bounded."""
    return repr(bytes(data[:64]))


# -- the sending side (tests, and a daemon that forwards to a PROXY listener) --


def encode_v1(source: Endpoint | None, destination: Endpoint | None) -> bytes:
    """``PROXY TCP4|TCP6 ...\\r\\n``, or ``PROXY UNKNOWN\\r\\n`` with no source."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src = ipaddress.ip_address(source.address)
    dst = ipaddress.ip_address(destination.address)
    if src.version != dst.version:
        src, dst = _as_v6(src), _as_v6(dst)
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst} {source.port or 0} {destination.port or 0}\r\n".encode()


def _as_v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)


def encode_v2(
    source: Endpoint | None,
    destination: Endpoint | None,
    tlvs: Iterable[tuple[int, bytes]] = (),
    *,
    local: bool = False,
    with_crc: bool = False,
) -> bytes:
    """A v2 header over TCP (LOCAL with ``local`` or no source), the TLVs
    appended in order, a valid CRC32C TLV last with ``with_crc``."""
    body = bytearray()
    if local or source is None or destination is None:
        ver_cmd, fam = 0x20, 0x00
    else:
        src = ipaddress.ip_address(source.address)
        dst = ipaddress.ip_address(destination.address)
        if src.version != dst.version:
            src, dst = _as_v6(src), _as_v6(dst)
        ver_cmd, fam = 0x21, (0x11 if src.version == 4 else 0x21)
        body += (
            src.packed + dst.packed + struct.pack("!HH", source.port or 0, destination.port or 0)
        )
    for kind, value in tlvs:
        body += struct.pack("!BH", kind, len(value)) + value
    if with_crc:
        body += struct.pack("!BH", PP2_TYPE_CRC32C, 4) + b"\x00\x00\x00\x00"
    header = bytearray(V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body)
    if with_crc:
        header[-4:] = crc32c(bytes(header)).to_bytes(4, "big")
    return bytes(header)
