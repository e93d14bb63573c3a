"""The environment of a program ``ipc exec`` starts: peer information as CGI
variables, what the operator passes, nothing else.

Why: websocketd's users have scripts that read ``$REMOTE_ADDR`` and
``$QUERY_STRING``; the peer information (:class:`ipc_core.PeerInfo`) says
the same things, so it is written in the same CGI convention (RFC 3875 and
websocketd's ``HTTP_*`` headers), the TLS client identity in mod_ssl's
names. No I/O here: a PeerInfo in, a dict out.

The operator's part is built once (:func:`base_environment`): ``PATH`` (a
safe default unless passed or set), ``--pass-env`` names copied from the
daemon's environment, then ``--env NAME=VALUE``. The names this module
writes for a connection are reserved (:func:`reserved`): the operator cannot
set them, so a program can trust that ``REMOTE_ADDR`` came from the daemon.
Every value is cleaned: NUL removed, CR/LF and other controls turned into
spaces, cut at :data:`MAX_VALUE` bytes of UTF-8.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence

from ipc_core import PeerInfo

__all__ = [
    "DEFAULT_PATH",
    "MAX_SANS",
    "MAX_VALUE",
    "RESERVED_NAMES",
    "RESERVED_PREFIXES",
    "base_environment",
    "clean_value",
    "connection_environment",
    "reserved",
    "valid_name",
]

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Bytes of UTF-8 one value may hold (a cookie jar, a long query).
MAX_VALUE = 8192
#: Subject alternative names listed per kind (SSL_CLIENT_SAN_DNS_0...).
MAX_SANS = 16

#: Every name :func:`connection_environment` may write (besides the prefixes).
RESERVED_NAMES = frozenset(
    {
        "GATEWAY_INTERFACE",
        "SERVER_SOFTWARE",
        "SERVER_PROTOCOL",
        "REMOTE_ADDR",
        "REMOTE_HOST",
        "REMOTE_PORT",
        "SERVER_ADDR",
        "SERVER_NAME",
        "SERVER_PORT",
        "HTTPS",
        "REQUEST_METHOD",
        "REQUEST_URI",
        "SCRIPT_NAME",
        "PATH_INFO",
        "QUERY_STRING",
        "AUTH_TYPE",
        "REMOTE_USER",
        "IPC_SERVICE",
        "IPC_TRANSPORT",
        "IPC_TOKEN_NAME",
        "IPC_VIA",
        "IPC_PROXY_ADDR",
        "IPC_CLIENT_PID",
        "IPC_CLIENT_UID",
    }
)
#: Prefixes of reserved names: request headers and TLS facts.
RESERVED_PREFIXES = ("HTTP_", "SSL_")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROLS = re.compile("[\x01-\x1f\x7f]")
_SAN_KINDS = {"DNS": "DNS", "IP": "IPaddr", "email": "Email", "URI": "URI"}


def valid_name(name: str) -> bool:
    """A portable environment variable name (letters, digits, underscore)."""
    return _NAME.fullmatch(name) is not None


def reserved(name: str) -> bool:
    """True for a name only the connection may set."""
    return name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES)


def clean_value(value: str) -> str:
    """``value`` without NUL, controls as spaces, at most MAX_VALUE bytes."""
    value = _CONTROLS.sub(" ", value.replace("\x00", ""))
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_VALUE:
        return value
    return raw[:MAX_VALUE].decode("utf-8", "ignore")


def base_environment(
    pass_env: Sequence[str], set_env: Sequence[tuple[str, str]], inherited: Mapping[str, str]
) -> dict[str, str]:
    """The operator's part (see the module docstring). Raises ValueError
    naming a bad or reserved name, or a value with NUL."""
    env = {"PATH": DEFAULT_PATH}
    for name in pass_env:
        _check_name(name, "--pass-env")
        if name in inherited:
            env[name] = inherited[name]
    for name, value in set_env:
        _check_name(name, "--env")
        if "\x00" in value:
            raise ValueError(f"--env {name}: a value cannot hold NUL")
        env[name] = value
    return env


def _check_name(name: str, flag: str) -> None:
    if not valid_name(name):
        raise ValueError(f"{flag} {name!r}: not a variable name (letters, digits, _)")
    if reserved(name):
        raise ValueError(
            f"{flag} {name}: reserved for what the connection says "
            "(CGI names, HTTP_*, SSL_*, IPC_*: see docs/ipc-exec.md)"
        )


def connection_environment(
    base: Mapping[str, str],
    service: str,
    info: PeerInfo | None,
    *,
    software: str = "ipc-exec",
    local_pid: int | None = None,
    local_uid: int | None = None,
) -> dict[str, str]:
    """The whole environment of one program: ``base``, then the connection's
    variables (see docs/ipc-exec.md for the table). ``info`` None: a local
    client that connected to the service directly (``IPC_TRANSPORT=local``,
    its pid and uid when known)."""
    env = dict(base)
    out: dict[str, str] = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": software,
        "IPC_SERVICE": service,
    }
    if info is None:
        out["IPC_TRANSPORT"] = "local"
        if local_pid is not None:
            out["IPC_CLIENT_PID"] = str(local_pid)
        if local_uid is not None:
            out["IPC_CLIENT_UID"] = str(local_uid)
    else:
        _peer_variables(out, info)
    for name, value in out.items():
        env[name] = clean_value(value)
    return env


def _peer_variables(out: dict[str, str], info: PeerInfo) -> None:
    out["IPC_TRANSPORT"] = info.transport
    secure = info.transport in ("tls", "wss", "https")
    web = info.transport in ("ws", "wss", "http", "https")
    if info.client_address is not None:
        out["REMOTE_ADDR"] = info.client_address
        out["REMOTE_HOST"] = (
            info.client_address
        )  # no reverse lookup (websocketd's default does one)
    if info.client_port is not None:
        out["REMOTE_PORT"] = str(info.client_port)
    if info.local_address is not None:
        out["SERVER_ADDR"] = info.local_address
    if info.local_port is not None:
        out["SERVER_PORT"] = str(info.local_port)
    server_name = info.tls_sni or info.local_address
    if server_name is not None:
        out["SERVER_NAME"] = server_name
    if secure:
        out["HTTPS"] = "on"
    if info.via is not None:
        out["IPC_VIA"] = info.via
    if info.proxy_address is not None:
        out["IPC_PROXY_ADDR"] = info.proxy_address
    if info.token_name is not None:
        out["IPC_TOKEN_NAME"] = info.token_name
    if web:
        query = urllib.parse.urlencode(list(info.query), quote_via=urllib.parse.quote)
        path = info.path or "/"
        out["SERVER_PROTOCOL"] = "HTTP/1.1"
        out["REQUEST_METHOD"] = info.method or "GET"  # a WebSocket upgrade is a GET
        out["SCRIPT_NAME"] = ""
        out["PATH_INFO"] = urllib.parse.unquote(path)
        out["QUERY_STRING"] = query
        out["REQUEST_URI"] = path + (f"?{query}" if query else "")
        for name, value in (
            ("HTTP_ORIGIN", info.origin),
            ("HTTP_USER_AGENT", info.user_agent),
            ("HTTP_COOKIE", info.cookie),
            ("HTTP_AUTHORIZATION", info.authorization),
            ("HTTP_SEC_WEBSOCKET_PROTOCOL", info.subprotocol),
        ):
            if value is not None:
                out[name] = value
        if info.authorization is not None:
            out["AUTH_TYPE"] = info.authorization.split(" ", 1)[0]
    if secure:
        _tls_variables(out, info)


def _tls_variables(out: dict[str, str], info: PeerInfo) -> None:
    for name, value in (
        ("SSL_PROTOCOL", info.tls_version),
        ("SSL_CIPHER", info.tls_cipher),
        ("SSL_TLS_SNI", info.tls_sni),
        ("SSL_CLIENT_S_DN", info.cert_subject),
        ("SSL_CLIENT_FINGERPRINT", info.cert_sha256),
    ):
        if value is not None:
            out[name] = value
    if info.cert_subject is None and info.cert_sha256 is None:
        out["SSL_CLIENT_VERIFY"] = "NONE"
    else:
        out["SSL_CLIENT_VERIFY"] = "SUCCESS" if info.cert_verified else "FAILED"
    counts: dict[str, int] = {}
    for san in info.cert_sans:
        kind, _, value = san.partition(":")
        label = _SAN_KINDS.get(kind)
        if label is None or not value:
            continue
        n = counts.get(label, 0)
        if n >= MAX_SANS:
            continue
        counts[label] = n + 1
        out[f"SSL_CLIENT_SAN_{label}_{n}"] = value
