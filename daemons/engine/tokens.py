"""Who may open a WebSocket: tokens that ipc-websocketd checks before the upgrade.

Why: a browser that passes the Origin check reaches a service anonymously.
Browsers cannot set an ``Authorization`` header on a WebSocket, so a token
travels where a page can put it, and is checked before the upgrade so that a
refusal is a plain HTTP status (401: missing, bad or expired; 403: valid but
not for this service). Two kinds, usable together:

Signed tokens (``--token-secret FILE``), minted by an existing web
application with the same secret, no shared file::

    v1.<payload>.<mac>
    payload = base64url(JSON {"n": NAME, "s": [SERVICE, ...], "exp": UNIX_TIME,
                              "nbf": UNIX_TIME (optional)})
    mac     = base64url(HMAC-SHA256(secret, "v1." + payload))

base64url without padding, so a token is made of ``A-Z a-z 0-9 - _ .`` and
fits a query string, a cookie and a ``Sec-WebSocket-Protocol`` entry
unescaped. The MAC covers the exact text sent (the version prefix
included), is compared in constant time, and is checked before the payload
is parsed. A verifier refuses an unknown version, bad base64, a MAC of the
wrong size, JSON that is not exactly these keys with these types (an unknown
key would be a restriction this verifier cannot enforce: a new field needs
``v2``), an expired token (``now > exp + skew``) and one not yet valid
(``now + skew < nbf``). ``skew`` (default 60 s) absorbs clock differences
between the minting host and this one. Any language mints one in a few
lines: HMAC-SHA256 with the secret file's bytes (trailing CR/LF removed) as
the key.

A token file (``--token-file FILE``), one token a line::

    # TOKEN                          NAME    SERVICE[,SERVICE...]
    Xq0w3GvJ4eW8kM2pZr7tYb5nLc1s   alice   pong,chat-*

Tokens are 16 to 256 characters of ``A-Z a-z 0-9 - _ . ~`` (make one with
``python3 -c 'import secrets; print(secrets.token_urlsafe(24))'``); names
are printable without spaces; services are names or ``--allow``-style
patterns (``*`` is any). ``#`` starts a comment. Every problem is reported
with its line number, duplicate tokens included, and the whole file is
refused (a reload keeps the old table). Look-ups go through SHA-256 of the
token, so their timing says nothing useful about stored tokens.

Where a browser puts it (:func:`find_token`): the query parameter
``token``, the cookie ``ipc_token``, or a subprotocol entry
``ipc.token.<TOKEN>`` (``new WebSocket(url, ["ipc.token." + t])``). A browser
that offered subprotocols fails the connection unless the response selects
one, so :class:`PresentedToken` says which to echo. The token is removed from
the path, the offered subprotocols and the cookie handed on (logs, peer
information): the service learns the token's name, never the token.

A token narrows what a client may reach; it never widens ``--allow``, the
protected names or a service's ``local-only`` mark, which still apply.
Verification takes ``now`` from the caller (no clock here); the two loaders
are the only I/O, and refuse files others may read.
"""

from __future__ import annotations

import base64
import binascii
import enum
import fnmatch
import hashlib
import hmac
import json
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias
from urllib.parse import unquote_plus

from ipc_core.errors import UsageError

from .policy import service_name_error

__all__ = [
    "COOKIE_NAME",
    "DEFAULT_SKEW",
    "MIN_SECRET_BYTES",
    "QUERY_PARAMETER",
    "SUBPROTOCOL_PREFIX",
    "PresentedToken",
    "TokenAuthority",
    "TokenConfigError",
    "TokenEntry",
    "TokenFileError",
    "TokenResult",
    "TokenStatus",
    "TokenTable",
    "find_token",
    "load_secret_file",
    "load_token_file",
    "mint",
    "parse_token_file",
    "verify_signed",
]

VERSION = "v1"
MIN_SECRET_BYTES = 32
MAX_SECRET_FILE_BYTES = 4096
MAX_TOKEN_FILE_BYTES = 1 << 20
MAX_TOKEN_CHARS = 4096
MAX_NAME_CHARS = 64
MAX_SERVICES = 32
MIN_FILE_TOKEN_CHARS = 16
MAX_FILE_TOKEN_CHARS = 256
DEFAULT_SKEW = 60.0
MAX_TIME = 1 << 40  # far beyond any real expiry; keeps arithmetic sane

QUERY_PARAMETER = "token"
COOKIE_NAME = "ipc_token"
SUBPROTOCOL_PREFIX = "ipc.token."

_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_FILE_TOKEN = re.compile(r"[A-Za-z0-9._~-]+")
_VERSIONED = re.compile(r"v[0-9]+\.")
_PAYLOAD_KEYS = frozenset({"n", "s", "exp", "nbf"})

Where: TypeAlias = Literal["query", "cookie", "subprotocol"]
Kind: TypeAlias = Literal["signed", "file"]


class TokenStatus(enum.Enum):
    """The outcome of a token check, and the HTTP status a refusal gets."""

    OK = "ok"
    MISSING = "missing"
    BAD = "bad"
    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"
    WRONG_SERVICE = "wrong service"

    @property
    def http_status(self) -> int | None:
        """None for OK; 403 for a valid token for another service; else 401."""
        if self is TokenStatus.OK:
            return None
        return 403 if self is TokenStatus.WRONG_SERVICE else 401


@dataclass(frozen=True, slots=True)
class TokenResult:
    """A checked token. ``reason`` is for the log line: it may name the
    token's holder, never the token."""

    status: TokenStatus
    reason: str = ""
    name: str | None = None
    services: tuple[str, ...] = ()
    kind: Kind | None = None
    expires: int | None = None

    @property
    def ok(self) -> bool:
        return self.status is TokenStatus.OK

    @property
    def http_status(self) -> int | None:
        return self.status.http_status


class TokenConfigError(UsageError, ValueError):
    """A secret or token file that cannot be used (the message says why and
    how to fix it); a daemon refuses to start, or keeps its old table."""


class TokenFileError(TokenConfigError):
    """A token file with bad lines; ``problems`` has one line-numbered entry each."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        shown = "; ".join(problems[:10])
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        super().__init__(f"{source}: {count}: {shown}{more}")
        self.source = source
        self.problems = list(problems)


# -- signed tokens ----------------------------------------------------------------


def mint(
    secret: bytes,
    name: str,
    services: Sequence[str],
    *,
    now: float,
    ttl: float,
    not_before: float | None = None,
) -> str:
    """A signed token for ``name`` reaching ``services`` until ``now + ttl``."""
    _check_secret(secret)
    problem = _name_problem(name) or _services_problem(services)
    if problem is not None:
        raise TokenConfigError(problem)
    if not 0 < ttl < MAX_TIME:
        raise TokenConfigError(f"token lifetime must be positive, not {ttl}")
    payload: dict[str, Any] = {"n": name, "s": list(services), "exp": int(now + ttl)}
    if not_before is not None:
        payload["nbf"] = int(not_before)
    body = _b64encode(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
    signed = f"{VERSION}.{body}"
    return f"{signed}.{_b64encode(_mac(secret, signed))}"


def verify_signed(
    token: str, secret: bytes, service: str, *, now: float, skew: float = DEFAULT_SKEW
) -> TokenResult:
    """Check a signed token for ``service`` at time ``now`` (Unix seconds)."""
    if len(token) > MAX_TOKEN_CHARS:
        return _bad(f"token of {len(token)} characters")
    version, _, rest = token.partition(".")
    if version != VERSION:
        return _bad(f"unknown token version {version[:8]!r}")
    body, dot, mac_text = rest.partition(".")
    if not dot or "." in mac_text:
        return _bad("signed token is not v1.PAYLOAD.MAC")
    mac = _b64decode(mac_text)
    payload_bytes = _b64decode(body)
    if mac is None or payload_bytes is None:
        return _bad("signed token with bad base64")
    if not hmac.compare_digest(mac, _mac(secret, f"{VERSION}.{body}")):
        return _bad("signed token with a wrong signature (another secret?)")
    try:
        payload = _payload(payload_bytes)
    except ValueError as exc:
        return _bad(f"signed token with a bad payload: {exc}")
    name, services, expires, not_before = payload
    if now > expires + skew:
        return TokenResult(
            TokenStatus.EXPIRED,
            f"token of {name!r} expired {int(now - expires)} s ago",
            name,
            services,
            "signed",
            expires,
        )
    if not_before is not None and now + skew < not_before:
        return TokenResult(
            TokenStatus.NOT_YET_VALID,
            f"token of {name!r} valid only in {int(not_before - now)} s",
            name,
            services,
            "signed",
            expires,
        )
    return _for_service(name, services, service, "signed", expires)


def _mac(secret: bytes, signed: str) -> bytes:
    return hmac.new(secret, signed.encode("ascii"), hashlib.sha256).digest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Strict unpadded base64url: only its alphabet, canonical trailing bits."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if _b64encode(data) == text else None


def _payload(raw: bytes) -> tuple[str, tuple[str, ...], int, int | None]:
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique, parse_constant=_nan)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    unknown = set(data) - _PAYLOAD_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)!r}")
    name, services = data.get("n"), data.get("s")
    if not isinstance(name, str) or _name_problem(name):
        raise ValueError("bad name")
    if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
        raise ValueError("bad service list")
    problem = _services_problem(services)
    if problem is not None:
        raise ValueError(problem)
    expires = _time(data.get("exp"), "exp")
    not_before = _time(data["nbf"], "nbf") if "nbf" in data else None
    if expires is None:
        raise ValueError("no exp")
    return name, tuple(services), expires, not_before


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _nan(name: str) -> Any:
    raise ValueError(f"JSON {name}")


def _time(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value < MAX_TIME:
        raise ValueError(f"{key} is not a time")
    return value


def load_secret_file(path: str | os.PathLike[str]) -> bytes:
    """The HMAC secret in ``path``: its bytes less trailing CR/LF, at least
    32 of them, in a regular file that others cannot read or write."""
    data = _read_private(path, MAX_SECRET_FILE_BYTES, "secret file")
    secret = data.rstrip(b"\r\n")
    try:
        _check_secret(secret)
    except TokenConfigError as exc:
        raise TokenConfigError(f"secret file {os.fspath(path)}: {exc}") from None
    return secret


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise TokenConfigError(
            f"the secret is {len(secret)} bytes, at least {MIN_SECRET_BYTES} are needed "
            "(make one: head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE)"
        )


def _read_private(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """Read a small file that holds secrets, refusing one that others may
    read or write (mode bits for "others"); groups are allowed (a web
    application sharing the secret through a group)."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise TokenConfigError(f"{what} {name}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TokenConfigError(f"{what} {name} is not a regular file")
        if info.st_mode & 0o007:
            raise TokenConfigError(
                f"{what} {name} is accessible to others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): chmod o= {name}"
            )
        if info.st_size > limit:
            raise TokenConfigError(f"{what} {name} is over {limit} bytes")
        chunks = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise TokenConfigError(f"{what} {name} is over {limit} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise TokenConfigError(f"{what} {name}: {exc.strerror}") from None
    finally:
        os.close(fd)


# -- the token file -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenEntry:
    name: str
    services: tuple[str, ...]
    line: int


class TokenTable:
    """Tokens from a token file, looked up by their SHA-256."""

    def __init__(self, entries: Iterable[tuple[str, TokenEntry]] = ()) -> None:
        self._by_digest: dict[bytes, TokenEntry] = {}
        for token, entry in entries:
            self._by_digest[_digest(token)] = entry

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, token: str) -> TokenEntry | None:
        return self._by_digest.get(_digest(token))

    def check(self, token: str, service: str) -> TokenResult:
        entry = self.lookup(token)
        if entry is None:
            return _bad("unknown token")
        return _for_service(entry.name, entry.services, service, "file", None)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_token_file(text: str, source: str = "token file") -> TokenTable:
    """Parse a token file's text; raise :class:`TokenFileError` listing
    every bad line (nothing is half-loaded)."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    entries: list[tuple[str, TokenEntry]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = _fields(line)
        if not fields:
            continue
        problem = _line_problem(fields)
        if problem is None and fields[0] in seen:
            problem = f"the token of line {seen[fields[0]]} again"
        if problem is not None:
            problems.append(f"line {number}: {problem}")
            continue
        token, name, services = fields[0], fields[1], tuple(fields[2].split(","))
        seen[token] = number
        entries.append((token, TokenEntry(name, services, number)))
    if problems:
        raise TokenFileError(source, problems)
    return TokenTable(entries)


def _fields(line: str) -> list[str]:
    """Whitespace-separated fields up to a ``#`` comment (a field starting
    with ``#``; tokens, names and services never do)."""
    fields = []
    for field in line.split():
        if field.startswith("#"):
            break
        fields.append(field)
    return fields


def _line_problem(fields: list[str]) -> str | None:
    if len(fields) != 3:
        return f"{len(fields)} fields, expected TOKEN NAME SERVICE[,SERVICE...]"
    token, name, services = fields
    if not _FILE_TOKEN.fullmatch(token):
        return "the token has characters outside A-Z a-z 0-9 - _ . ~"
    if not MIN_FILE_TOKEN_CHARS <= len(token) <= MAX_FILE_TOKEN_CHARS:
        return (
            f"the token is {len(token)} characters, it must have "
            f"{MIN_FILE_TOKEN_CHARS} to {MAX_FILE_TOKEN_CHARS}"
        )
    return _name_problem(name) or _services_problem(services.split(","))


def load_token_file(path: str | os.PathLike[str]) -> TokenTable:
    """Read and parse a token file (others may not read it: it holds secrets)."""
    data = _read_private(path, MAX_TOKEN_FILE_BYTES, "token file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenConfigError(
            f"token file {os.fspath(path)} is not UTF-8 (byte {exc.start})"
        ) from None
    return parse_token_file(text, f"token file {os.fspath(path)}")


# -- checks shared by both kinds ---------------------------------------------------


def _name_problem(name: str) -> str | None:
    if not name or len(name) > MAX_NAME_CHARS:
        return f"a name has 1 to {MAX_NAME_CHARS} characters"
    if not name.isprintable() or any(c.isspace() for c in name):
        return f"name {name[:MAX_NAME_CHARS]!r} holds spaces or unprintable characters"
    return None


def _services_problem(services: Sequence[str]) -> str | None:
    if not services:
        return "no service"
    if len(services) > MAX_SERVICES:
        return f"{len(services)} services, at most {MAX_SERVICES}"
    for service in services:
        problem = service_name_error(service)
        if problem is not None:
            return problem
    return None


def _for_service(
    name: str, services: tuple[str, ...], service: str, kind: Kind, expires: int | None
) -> TokenResult:
    if any(fnmatch.fnmatchcase(service, pattern) for pattern in services):
        return TokenResult(TokenStatus.OK, "", name, services, kind, expires)
    return TokenResult(
        TokenStatus.WRONG_SERVICE,
        f"token of {name!r} is not for service {service!r}",
        name,
        services,
        kind,
        expires,
    )


def _bad(reason: str) -> TokenResult:
    return TokenResult(TokenStatus.BAD, reason)


# -- where the browser put it ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PresentedToken:
    """What a WebSocket request carries, token-wise."""

    token: str | None
    where: Where | None
    problem: str | None
    """Set when the request is unusable as presented (two different tokens,
    a malformed one): the check is then BAD."""
    target: str
    """The request target with the ``token`` query parameter removed."""
    subprotocols: tuple[str, ...]
    """The subprotocols offered, token entries removed."""
    echo: str | None
    """The ``Sec-WebSocket-Protocol`` to answer when accepting: the first
    other entry offered if any (the daemon's usual choice), else the token
    entry itself (a browser that offered one fails without an answer)."""
    cookie: str | None
    """The ``Cookie`` header(s) joined, the ``ipc_token`` cookie removed."""


def find_token(target: str, headers: Iterable[tuple[str, str]]) -> PresentedToken:
    """Find the token in a request's target (path and query) and headers."""
    headers = list(headers)
    query_tokens, clean_target = _from_query(target)
    proto_tokens, offered, token_entry = _from_subprotocols(headers)
    cookie_tokens, cookie = _from_cookies(headers)
    echo = offered[0] if offered else token_entry
    explicit = set(query_tokens) | set(proto_tokens)
    problem = None
    token: str | None = None
    where: Where | None = None
    if len(explicit) > 1:
        problem = "two different tokens in the query and the subprotocols"
    elif explicit:
        token = explicit.pop()
        where = "subprotocol" if proto_tokens else "query"
    elif len(set(cookie_tokens)) > 1:
        problem = f"two different {COOKIE_NAME} cookies"
    elif cookie_tokens:
        token, where = cookie_tokens[0], "cookie"
    if token == "":
        problem, token = "an empty token", None
    elif token is not None and not _FILE_TOKEN.fullmatch(token):
        problem, token = "a token with characters outside A-Z a-z 0-9 - _ . ~", None
    return PresentedToken(token, where, problem, clean_target, offered, echo, cookie)


def _from_query(target: str) -> tuple[list[str], str]:
    path, question, query = target.partition("?")
    if not question:
        return [], target
    query, hash_mark, fragment = query.partition("#")
    tokens, kept = [], []
    for piece in query.split("&"):
        name, _, value = piece.partition("=")
        if unquote_plus(name) == QUERY_PARAMETER:
            tokens.append(unquote_plus(value))
        else:
            kept.append(piece)
    clean = path + ("?" + "&".join(kept) if kept else "") + hash_mark + fragment
    return tokens, clean


def _from_subprotocols(
    headers: list[tuple[str, str]],
) -> tuple[list[str], tuple[str, ...], str | None]:
    tokens, offered = [], []
    entry = None
    for name, value in headers:
        if name.lower() != "sec-websocket-protocol":
            continue
        for item in value.split(","):
            item = item.strip(" \t")
            if item.startswith(SUBPROTOCOL_PREFIX):
                tokens.append(item[len(SUBPROTOCOL_PREFIX) :])
                entry = entry or item
            elif item:
                offered.append(item)
    return tokens, tuple(offered), entry


def _from_cookies(headers: list[tuple[str, str]]) -> tuple[list[str], str | None]:
    values = [value for name, value in headers if name.lower() == "cookie"]
    if not values:
        return [], None
    tokens, kept = [], []
    for piece in "; ".join(values).split(";"):
        piece = piece.strip(" \t")
        name, eq, value = piece.partition("=")
        if eq and name.strip() == COOKIE_NAME:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            tokens.append(value)
        elif piece:
            kept.append(piece)
    return tokens, "; ".join(kept) if kept else None


# -- both kinds, as ipc-websocketd uses them -------------------------------------------


class TokenAuthority:
    """``--token-file`` and/or ``--token-secret``: checks a presented token.

    The file's table is looked up first; a token shaped ``vN.…`` is then
    verified as a signed token when a secret is configured. ``replace_table``
    swaps in a reloaded file (SIGHUP) in one assignment.
    """

    def __init__(
        self,
        table: TokenTable | None = None,
        secret: bytes | None = None,
        *,
        skew: float = DEFAULT_SKEW,
    ) -> None:
        if secret is not None:
            _check_secret(secret)
        if not 0 <= skew <= 3600:
            raise TokenConfigError(f"clock skew must be within 0..3600 s, not {skew}")
        self.table = table
        self.secret = secret
        self.skew = skew

    @property
    def enabled(self) -> bool:
        return self.table is not None or self.secret is not None

    def replace_table(self, table: TokenTable) -> None:
        self.table = table

    def check(self, token: str | None, service: str, *, now: float) -> TokenResult:
        if token is None:
            return TokenResult(TokenStatus.MISSING, "no token")
        if len(token) > MAX_TOKEN_CHARS:
            return _bad(f"token of {len(token)} characters")
        if self.table is not None and self.table.lookup(token) is not None:
            return self.table.check(token, service)
        if _VERSIONED.match(token):
            if self.secret is None:
                return _bad("a signed token, and no --token-secret to verify it")
            return verify_signed(token, self.secret, service, now=now, skew=self.skew)
        return _bad("unknown token")

    def authenticate(
        self, target: str, headers: Iterable[tuple[str, str]], service: str, *, now: float
    ) -> tuple[TokenResult, PresentedToken]:
        """Find and check the token of a WebSocket request for ``service``."""
        presented = find_token(target, headers)
        if presented.problem is not None:
            return _bad(presented.problem), presented
        return self.check(presented.token, service, now=now), presented
