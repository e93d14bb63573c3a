"""What a WebSocket upgrade request says about its client, and what may be
said about it: the Host and Origin checks, the real client behind trusted
proxies, the token's place in the request, and the peer information a
service gets. Sans-I/O: text in, decisions and records out.

Why a module of its own: these are facts read from one HTTP request, and
ipc-websocketd's handshake (:mod:`daemons.websocketd`) only decides on them.
They moved out of ``websocketd.py`` (issue 14: tokens, ``--trust-proxy
CIDR``, peer information) so that the command module stays the handshake,
the keepalive and the flags; ``daemons.websocketd`` re-exports the names it
always had (``HostPolicy``, ``same_origin``, ``split_host``, ``shown``).

Three rules hold everywhere here:

* Forwarding headers are evidence only from a trusted proxy (``--trust-proxy
  CIDR``, :class:`Forwarding`), read with the rightmost-untrusted rule of
  :func:`~daemons.codecs.forwarded.real_client`; so are ``X-Forwarded-Host``
  and ``X-Forwarded-Proto`` (or ``Forwarded``'s ``host=`` and ``proto=``)
  for the Host and same-origin checks.
* A token never leaves the request: the target, the cookie and the offered
  subprotocols are used in the token-free forms of
  :func:`~daemons.engine.tokens.find_token` for log lines and peer
  information, and :class:`TokenScrubber` removes tokens from websockets'
  own ``-vv`` lines (the request line, the headers, the 101).
* Peer text in a log line goes through :func:`shown` (quoted, escaped, cut);
  peer text in a :class:`~ipc_core.peerinfo.PeerInfo` is decoded as UTF-8
  with replacement characters, NUL replaced (the record refuses NUL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import re
import socket
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ipc_core.peerinfo import PeerInfo

from ..engine.tokens import SUBPROTOCOL_PREFIX, PresentedToken
from ..engine.trust import UNIX, TrustedNetworks, parse_ip
from .forwarded import ClientAddress, ForwardedHeader, real_client
from .ws import HandshakeRequest

__all__ = [
    "Forwarding",
    "HostPolicy",
    "TokenScrubber",
    "client_label",
    "describe_request",
    "limit_client",
    "peer_address",
    "same_origin",
    "scrub_tokens",
    "shown",
    "split_host",
    "url_path",
]


# -- origin and log text ------------------------------------------------------------


def same_origin(origin: str, host: str | None, scheme: str = "http") -> bool:
    """True if a page from ``origin`` was served by the host it now connects to.

    An origin is scheme, host and port: the origin's scheme must be the one
    the page used to reach us (``http`` for ws://, ``https`` for wss:// or
    behind a TLS proxy), and its ``host[:port]`` the request's Host header,
    the scheme's default port being implied. ``null`` (file:// pages,
    sandboxed frames) is never the same origin. Without the scheme, an
    http:// page on port 443 would count as the https:// site's own.
    """
    if not host or origin == "null":
        return False
    try:
        parts = urllib.parse.urlsplit(origin)
    except ValueError:  # "http://[zz": whatever it is, it is not us
        return False
    if parts.scheme != scheme or scheme not in ("http", "https") or not parts.netloc:
        return False
    default = ":80" if parts.scheme == "http" else ":443"

    def norm(netloc: str) -> str:
        netloc = netloc.strip().lower()
        return netloc[: -len(default)] if netloc.endswith(default) else netloc

    return norm(parts.netloc) == norm(host)


def shown(value: str | None, limit: int = 200) -> str:
    """A peer's text (path, Host, Origin) for a log line: quoted and escaped
    like repr() (no newline, ESC or NUL gets through to forge or garble a
    line), and cut at ``limit`` characters."""
    if value is None:
        return "(none)"
    cut = value[:limit]
    return repr(cut) + ("..." if len(value) > limit else "")


# -- Host check (DNS rebinding) ------------------------------------------------------


_LOCALHOST = "localhost"


def split_host(value: str) -> tuple[str, int | None] | None:
    """``name[:port]`` of a Host header, normalised (lower case, no final dot,
    IPv6 in brackets and compressed), or None if it is not a host."""
    value = value.strip().lower()
    port_text = ""
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        try:
            name = f"[{ipaddress.IPv6Address(name).compressed}]"
        except ValueError:
            return None
        port_text = rest[1:] if rest else ""
        if rest and not port_text:
            return None
    else:
        name, sep, port_text = value.partition(":")
        if sep and not port_text:
            return None
        name = name[:-1] if name.endswith(".") else name
        if not name or not all(c.isalnum() or c in "-._" for c in name) or not name.isascii():
            return None
    if not port_text:
        return name, None
    if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        return None
    return name, int(port_text)


def _is_loopback(name: str) -> bool:
    if name == _LOCALHOST or name.endswith("." + _LOCALHOST):
        return True  # RFC 6761: browsers resolve these to loopback themselves
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """Which ``Host`` headers name this daemon: the defence against DNS rebinding.

    A page on ``evil.example`` whose name the attacker re-points at 127.0.0.1
    is, for the browser, still the origin ``http://evil.example:8080``: its
    requests carry ``Host: evil.example:8080`` and a matching ``Origin``, so
    a same-origin check alone lets it in, and through us every local
    service. The one thing such a request cannot fake is the Host, so only
    names of this daemon are answered: loopback addresses and ``localhost``
    forms, the addresses it listens on, this machine's host name and FQDN,
    and the names given with ``--host`` (a public name, the name a reverse
    proxy passes on). Loopback names take any port (a tunnel or a port
    forward changes it, and a rebinding page cannot send one); the other
    built-in names must come with a port we listen on (or none, when we
    listen on the scheme's default port); ``--host NAME`` is
    also accepted without a port, ``--host NAME:PORT`` with exactly that port.
    """

    def __init__(
        self,
        names: Iterable[str] = (),
        ports: Iterable[int] = (),
        *,
        extra: Iterable[str] = (),
        default_port: bool = False,
    ) -> None:
        self.names = {n[0] for n in (split_host(x) for x in names) if n is not None}
        self.ports = set(ports)
        self.default_port = default_port
        self.bare: set[str] = set()  # --host NAME: no port, or a listening port
        self.exact: set[tuple[str, int | None]] = set()  # --host NAME:PORT
        for value in extra:
            parsed = split_host(value)
            if parsed is None:
                raise ValueError(f"--host {value!r}: not a host name or address[:port]")
            name, port = parsed
            if port is None:
                self.bare.add(name)
            else:
                self.exact.add((name, port))
                if port in (80, 443):
                    self.exact.add((name, None))

    @classmethod
    def for_sockets(
        cls, sockets: Iterable[socket.socket], extra: Iterable[str] = (), *, secure: bool = False
    ) -> HostPolicy:
        """The policy of a daemon listening on ``sockets``. A wildcard
        address (0.0.0.0, ::) cannot know the names it is reached by: then
        only the built-in names and ``--host`` ones."""
        names = [socket.gethostname(), socket.getfqdn()]
        ports = []
        for sock in sockets:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address, port = sock.getsockname()[:2]
            ports.append(port)
            ip = ipaddress.ip_address(address.partition("%")[0])
            if not ip.is_unspecified:
                names.append(f"[{ip.compressed}]" if ip.version == 6 else ip.compressed)
        default = 443 if secure else 80
        return cls([n for n in names if n], ports, extra=extra, default_port=default in ports)

    def allows(self, value: str) -> bool:
        """Does the Host header ``value`` name this daemon?"""
        parsed = split_host(value)
        if parsed is None:
            return False
        name, port = parsed
        if parsed in self.exact:
            return True
        if _is_loopback(name):
            # Any port: a rebinding page cannot send a loopback Host (its
            # Host is its own name), and an SSH tunnel or a port forward
            # (ssh -L 18080:127.0.0.1:8080) changes the port the browser sees.
            return True
        if port is None:
            return name in self.bare or (self.default_port and name in self.names)
        if port not in self.ports:
            return False
        return name in self.bare or name in self.names


def url_path(raw: str) -> str | None:
    """The percent-decoded path of a request target, or None if unusable."""
    path = raw.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        return None
    try:
        return urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None


# -- the real client behind trusted proxies ------------------------------------------


def peer_address(peer: str) -> tuple[str, int] | str:
    """The socket address behind the engine's peer name (``192.0.2.7:51212``,
    ``[2001:db8::1]:51212``): an ``(ip, port)`` tuple, or the text itself for
    a Unix peer, which has no IP (:mod:`daemons.engine.trust` trusts it only
    when the list says ``unix``)."""
    if peer.startswith("["):
        host, sep, port = peer[1:].partition("]:")
    else:
        host, sep, port = peer.rpartition(":")
    if sep and port.isascii() and port.isdigit() and len(port) <= 5:
        ip = parse_ip(host)
        if ip is not None and (ip.version == 6) == peer.startswith("["):
            return host, int(port)
    return peer


def client_label(client: ClientAddress) -> str:
    """The client as the engine names it in log lines: ``IP``, ``IP:PORT``,
    ``[IPv6]:PORT``, ``unknown``, ``_hidden``."""
    if client.port is None:
        return client.address
    if ":" in client.address:
        return f"[{client.address}]:{client.port}"
    return f"{client.address}:{client.port}"


def _first(value: str | None) -> str | None:
    """The first item of a comma-separated header value, stripped; None if empty."""
    if value is None:
        return None
    item = value.split(",")[0].strip(" \t")
    return item or None


@dataclass(frozen=True, slots=True)
class Forwarding:
    """``--trust-proxy CIDR`` (repeatable) and the header those proxies write
    (``--forwarded-header``: ``X-Forwarded-For`` unless told ``Forwarded``;
    one kind only, see :mod:`daemons.codecs.forwarded`)."""

    trusted: TrustedNetworks
    header: ForwardedHeader = ForwardedHeader.X_FORWARDED_FOR

    def summary(self) -> str:
        """For the start-up line: ``127.0.0.1/32, unix (x-forwarded-for)``."""
        trusted = self.trusted
        names = [str(n) for n in trusted.networks] + ([UNIX] if trusted.trusts_unix else [])
        return f"{', '.join(names)} ({self.header.value})"

    def trusts(self, peer: Any) -> bool:
        """Whether the socket peer ``peer`` is one of the trusted proxies."""
        return self.trusted.trusts_peer(peer)

    def client(self, peer: Any, request: HandshakeRequest) -> ClientAddress:
        """The real client of ``request``, received from socket peer ``peer``."""
        return real_client(peer, self.trusted, request.headers, header=self.header)

    def host_and_scheme(
        self, peer: Any, request: HandshakeRequest, client: ClientAddress
    ) -> tuple[str | None, str | None]:
        """The Host and the scheme the browser used, as a trusted proxy
        reports them: ``X-Forwarded-Host`` and ``X-Forwarded-Proto`` (their
        first item: the first proxy's), or the client hop's ``host=`` and
        ``proto=`` in ``Forwarded`` mode; (None, None) from anyone else."""
        if not self.trusts(peer):
            return None, None
        if self.header is ForwardedHeader.FORWARDED:
            if client.source != "forwarded":
                return None, None
            return client.host, client.proto
        proto = _first(request.header("x-forwarded-proto"))
        return _first(request.header("x-forwarded-host")), proto.lower() if proto else None


def limit_client(client: ClientAddress | None) -> tuple[str, int | None] | None:
    """What the engine's ``KnowsClient.client`` answers for ``client``: None
    when the socket's peer is the client; the client's ``(ip, port)``; for a
    client a trusted proxy withheld (``unknown``, ``_hidden``), the proxy
    that reported it (``(ip, None)``), so anonymous clients are still counted
    against ``--max-connections-per-ip``, under their proxy."""
    if client is None or client.source == "transport":
        return None
    if client.ip is not None:
        return client.address, client.port
    key = client.limit_key_address
    return (key, None) if parse_ip(key) is not None else None


# -- tokens out of log lines ------------------------------------------------------------

_SUBPROTOCOL_TOKEN = re.compile(re.escape(SUBPROTOCOL_PREFIX) + r"[^\s,;'\"]*", re.IGNORECASE)
_COOKIE_TOKEN = re.compile(r"(\bipc_token\s*=\s*)[^;\s'\"]*", re.IGNORECASE)
_QUERY_PAIR = re.compile(r"(?<=[?&])([^&=\s#'\"]*)=([^&\s#'\"]*)")
REDACTED = "(token removed)"


def _query_pair(match: re.Match[str]) -> str:
    name = match.group(1)
    if urllib.parse.unquote_plus(name).lower() == "token":
        return f"{name}={REDACTED}"
    return match.group()


def scrub_tokens(text: str) -> str:
    """``text`` with anything that may be a token replaced: a ``token`` query
    parameter, the ``ipc_token`` cookie, an ``ipc.token.`` subprotocol (the
    three places :func:`~daemons.engine.tokens.find_token` looks)."""
    if "oken" not in text.lower() and "%" not in text:  # token, ipc_token, ipc.token.
        return text
    text = _SUBPROTOCOL_TOKEN.sub(SUBPROTOCOL_PREFIX + REDACTED, text)
    text = _COOKIE_TOKEN.sub(lambda m: m.group(1) + REDACTED, text)
    return _QUERY_PAIR.sub(_query_pair, text)


class TokenScrubber(logging.Filter):
    """A logging filter for websockets' ``-vv`` lines, which quote the request
    line, every header and the 101 answer (its ``Sec-WebSocket-Protocol``):
    tokens are removed from the message and from any traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub_tokens(message)
        if record.exc_info:
            trace = logging.Formatter().formatException(record.exc_info)
            clean = f"{clean}\n{scrub_tokens(trace)}"
            record.exc_info = None
            record.exc_text = None
        if clean != message:
            record.msg, record.args = clean, ()
        return True


# -- peer information -------------------------------------------------------------------


def _text(value: str | None) -> str | None:
    """Header text (websockets decodes it as ISO-8859-1) as the UTF-8 the
    browser sent, invalid bytes and NUL replaced; None for None or empty."""
    if not value:
        return None
    with contextlib.suppress(UnicodeEncodeError):  # else not from the wire: already text
        value = value.encode("latin-1").decode("utf-8", "replace")
    return value.replace("\x00", "\ufffd")


def _query(query: str) -> tuple[tuple[str, str], ...]:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, errors="replace")
    return tuple(
        (name.replace("\x00", "\ufffd"), value.replace("\x00", "\ufffd")) for name, value in pairs
    )


def describe_request(
    info: PeerInfo,
    request: HandshakeRequest,
    presented: PresentedToken,
    *,
    subprotocol: str | None,
    token_name: str | None,
    client: ClientAddress | None,
) -> PeerInfo:
    """``info`` (the engine's record of the socket) with what the upgrade
    request says: transport ``ws`` (a TLS wrapper makes it ``wss``), the path
    and query without the token, the subprotocol selected (never the token
    entry), Origin, User-Agent, the cookies but the token's, Authorization,
    the token's name; and the client a trusted proxy named (``via`` the
    header, ``proxy_address`` the peer that told us)."""
    target = presented.target.partition("#")[0]
    path, _, query = target.partition("?")
    if subprotocol is not None and subprotocol.startswith(SUBPROTOCOL_PREFIX):
        subprotocol = None
    changes: dict[str, Any] = {
        "transport": "ws",
        "path": _text(path),
        "query": _query(query),
        "subprotocol": _text(subprotocol),
        "origin": _text(request.origin),
        "user_agent": _text(request.header("user-agent")),
        "cookie": _text(presented.cookie),
        "authorization": _text(request.header("authorization")),
        "token_name": token_name,
    }
    if client is not None and client.source != "transport":
        changes.update(
            client_address=_text(client.address),
            client_port=client.port,
            via=client.source,
            proxy_address=info.client_address,
        )
    return dataclasses.replace(info, **changes)
