"""Peer information: who is on the other side of a relayed connection.

Why: behind ipc-tcpd, ipc-tlsd or ipc-websocketd a service sees a Unix
socket and nothing else, so it cannot greet, log or authorize its clients.
A service that opts in gets one :class:`PeerInfo` per relayed connection,
before the first message, on the connection event (never in the message
stream). Every daemon fills the same record from what its handshake learnt
(addresses after the PROXY protocol or trusted forwarding headers, the TLS
session, the WebSocket request, the token's name); this module is the
record and its wire form, with no I/O and nothing from ``daemons``.

Wire form (version 1.1; 1.0 had no ``method``): one UTF-8 JSON object, at most 16 KiB
(:data:`MAX_ENCODED`), keys in the order below, a key left out when its
value is the default (None, empty, false)::

    {"v":[1,1],"transport":"wss","client_address":"203.0.113.5",...}

======================  =========================  =====================================
key                     JSON type                  meaning
======================  =========================  =====================================
``v``                   [major, minor] integers    format version; a decoder refuses
                                                   another major and ignores keys it
                                                   does not know (a newer minor's)
``transport``           string                     ``tcp``, ``tls``, ``ws``, ``wss``
                                                   (later ``http``, ``https``); lower
                                                   case ``[a-z][a-z0-9+.-]*``, at most
                                                   16 characters (new ones may appear)
``client_address``      string                     the client's IP (IPv4-mapped shown as
                                                   IPv4), after the PROXY protocol or
                                                   trusted forwarding headers; or what
                                                   a trusted proxy said instead
                                                   (``unknown``, ``_obfuscated``)
``client_port``         integer 0..65535           the client's port, if known
``local_address``       string                     the daemon's address the client
                                                   reached (the PROXY header's
                                                   destination when there was one)
``local_port``          integer 0..65535           that address's port
``via``                 string                     how the client address was learnt
                                                   when not from the socket:
                                                   ``proxy-protocol``, ``forwarded``,
                                                   ``x-forwarded-for``
``proxy_address``       string                     the socket's peer (the proxy) when
                                                   ``via`` is set
``tls_version``         string                     ``TLSv1.3``... (TLS transports)
``tls_cipher``          string                     the cipher suite's OpenSSL name
``tls_sni``             string                     the server name the client asked for
``cert_subject``        string                     the client certificate's subject,
                                                   RFC 4514 (``CN=alice,O=Example``)
``cert_sans``           array of strings           its subject alternative names:
                                                   ``DNS:x``, ``IP:x``, ``URI:x``,
                                                   ``email:x``
``cert_sha256``         string                     its SHA-256 fingerprint,
                                                   ``SHA256:AB:CD:...`` (32 pairs, the
                                                   form ipc-tlsd logs and
                                                   ``--allow-client`` takes)
``cert_verified``       true                       the certificate chains to the
                                                   daemon's CA (absent: false)
``method``              string                     the HTTP request method (``POST``,
                                                   ``GET``...; ipc-httpd's first request);
                                                   a WebSocket upgrade leaves it out
                                                   (always ``GET``). Since 1.1
``path``                string                     WebSocket/HTTP request path, as sent
                                                   (percent-encoded), without the query
``query``               array of [name, value]     the query parameters, decoded, in
                                                   order, repeats kept (a token
                                                   parameter removed)
``subprotocol``         string                     the WebSocket subprotocol selected
``origin``              string                     the ``Origin`` header
``user_agent``          string                     the ``User-Agent`` header
``cookie``              string                     the ``Cookie`` header(s), joined with
                                                   ``; `` (the token cookie removed)
``authorization``       string                     the ``Authorization`` header
``token_name``          string                     the name of the token that
                                                   authenticated the client
======================  =========================  =====================================

Strings are Unicode text with no NUL and no lone surrogate. The bound is on
the encoded size: :func:`encode` raises :class:`PeerInfoTooLarge` (a client
sent headers too large to relay; a daemon answers 431 or closes), and
:func:`decode` refuses more than 16 KiB before parsing anything, as well as
malformed JSON (BOM, NaN, duplicate keys), another major version, and known
keys with the wrong type: each as a :class:`~ipc_core.errors.ProtocolError`.
Building a record with a wrong value is a :class:`~ipc_core.errors.UsageError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .errors import ProtocolError, UsageError

__all__ = [
    "MAX_ENCODED",
    "VERSION",
    "PeerInfo",
    "PeerInfoTooLarge",
    "decode",
    "encode",
]

VERSION = (1, 1)
"""(major, minor) written by :func:`encode`."""
MAX_ENCODED = 16 * 1024

_TRANSPORT = re.compile(r"[a-z][a-z0-9+.-]{0,15}")
_FINGERPRINT = re.compile(r"SHA256(:[0-9A-F]{2}){32}")
_VIA = frozenset({"proxy-protocol", "forwarded", "x-forwarded-for"})


class PeerInfoTooLarge(ProtocolError):
    """The encoded record would exceed :data:`MAX_ENCODED`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerInfo:
    """Version 1 of the peer information record (see the module docstring)."""

    transport: str
    client_address: str | None = None
    client_port: int | None = None
    local_address: str | None = None
    local_port: int | None = None
    via: str | None = None
    proxy_address: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_sni: str | None = None
    cert_subject: str | None = None
    cert_sans: tuple[str, ...] = ()
    cert_sha256: str | None = None
    cert_verified: bool = False
    method: str | None = None
    path: str | None = None
    query: tuple[tuple[str, str], ...] = ()
    subprotocol: str | None = None
    origin: str | None = None
    user_agent: str | None = None
    cookie: str | None = None
    authorization: str | None = None
    token_name: str | None = None

    version: ClassVar[tuple[int, int]] = VERSION

    def __post_init__(self) -> None:
        for name, value in _items(self):
            problem = _problem(name, value)
            if problem is not None:
                raise UsageError(f"PeerInfo.{name}: {problem}")

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        return next((v for k, v in self.query if k == name), None)


def encode(info: PeerInfo) -> bytes:
    """The wire form of ``info``; :class:`PeerInfoTooLarge` over 16 KiB."""
    data: dict[str, Any] = {"v": list(VERSION)}
    for name, value in _items(info):
        if value is None or value == () or value is False:
            continue
        if name == "query":
            value = [list(pair) for pair in value]
        elif name == "cert_sans":
            value = list(value)
        data[name] = value
    raw = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(raw) > MAX_ENCODED:
        raise PeerInfoTooLarge(
            f"peer information of {len(raw)} bytes, limit is {MAX_ENCODED} "
            "(request headers too large to relay)"
        )
    return raw


def decode(raw: bytes) -> PeerInfo:
    """Parse a wire form; :class:`~ipc_core.errors.ProtocolError` if it is not
    a version 1 record within bounds."""
    if len(raw) > MAX_ENCODED:
        raise ProtocolError(f"peer information of {len(raw)} bytes, limit is {MAX_ENCODED}")
    data = load_object(raw)
    version = data.get("v")
    if (
        not isinstance(version, list)
        or len(version) != 2
        or not all(type(n) is int and n >= 0 for n in version)
    ):
        raise ProtocolError("peer information without a [major, minor] version")
    if version[0] != VERSION[0]:
        raise ProtocolError(
            f"peer information version {version[0]}.{version[1]}, this library reads {VERSION[0]}.x"
        )
    values: dict[str, Any] = {}
    for name in _NAMES:
        if name not in data:
            continue
        value = data[name]
        if name == "query" and isinstance(value, list):
            value = tuple(tuple(p) if isinstance(p, list) else p for p in value)
        elif name == "cert_sans" and isinstance(value, list):
            value = tuple(value)
        problem = _problem(name, value)
        if problem is not None:
            raise ProtocolError(f"peer information field {name}: {problem}")
        values[name] = value
    if "transport" not in values:
        raise ProtocolError("peer information without a transport")
    return PeerInfo(**values)


def load_object(raw: bytes, what: str = "peer information") -> dict[str, Any]:
    """Strict JSON of one object, for the door's messages (the record, the
    verdict): UTF-8 without a BOM, no NaN/Infinity, no duplicate key; else a
    ProtocolError naming ``what``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise ProtocolError(f"{what} starts with a byte-order mark")
    try:
        data = json.loads(text, object_pairs_hook=_unique, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return data


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _constant(name: str) -> Any:
    raise ValueError(name)


# -- field checks, shared by construction and decoding ---------------------------------

_NAMES: tuple[str, ...] = tuple(f.name for f in fields(PeerInfo))
_PORTS = frozenset({"client_port", "local_port"})
_LISTS = frozenset({"cert_sans", "query"})


def _items(info: PeerInfo) -> list[tuple[str, Any]]:
    return [(name, getattr(info, name)) for name in _NAMES]


def _problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be field ``name``, or None."""
    if name == "transport":
        return _text_problem(value) or (
            None if _TRANSPORT.fullmatch(value) else f"{value!r} is not a transport name"
        )
    if name == "cert_verified":
        return None if isinstance(value, bool) else "expected true or false"
    if name in _LISTS:
        return _list_problem(name, value)
    if value is None:
        return None
    if name in _PORTS:
        ok = type(value) is int and 0 <= value <= 0xFFFF
        return None if ok else "expected a port 0..65535"
    problem = _text_problem(value)
    if problem is None and name == "via" and value not in _VIA:
        problem = f"{value!r} is not one of {sorted(_VIA)}"
    if problem is None and name == "cert_sha256" and not _FINGERPRINT.fullmatch(value):
        problem = "expected SHA256:AB:CD:... (32 hexadecimal pairs)"
    return problem


def _list_problem(name: str, value: Any) -> str | None:
    if not isinstance(value, tuple):
        return "expected a list"
    for item in value:
        if name == "query":
            if not (isinstance(item, tuple) and len(item) == 2):
                return "expected [name, value] pairs"
            problem = _text_problem(item[0]) or _text_problem(item[1])
        else:
            problem = _text_problem(item)
        if problem is not None:
            return problem
    return None


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, not {type(value).__name__}"
    if "\x00" in value:
        return "a string holds NUL"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "a string holds a lone surrogate"
    return None
