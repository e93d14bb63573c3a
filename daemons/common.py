"""Plumbing shared by every protocol daemon (ipcd, ipc-tcpd, ipc-tlsd, ipc-websocketd).

Written once so that all daemons accept the same addresses, refuse the same
service names and log the same way:

* :func:`parse_listen` / :func:`open_listener` / :func:`bound_address`:
  ``:9000``, ``HOST:PORT``, ``[IPv6]:PORT``, ``unix:PATH`` -> a listening socket.
* :func:`parse_uri` / :func:`parse_connect_target`: ``tcp://[::1]:9000/pong``.
* :class:`ServiceAccess`: which local services a network peer may reach (the
  reference TCPd is an open relay to *any* local service; we are not).
* :func:`setup_logging`: human, journald-friendly or JSON lines on stderr.
* :func:`common_options` / :func:`listen_specs`: the click flags every daemon has.

Everything here is pure parsing except :func:`open_listener` (it binds) and
:func:`setup_logging` (it installs a handler).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fnmatch
import functools
import ipaddress
import json
import logging
import math
import os
import re
import socket
import stat
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click

from ipc_core.framing import DEFAULT_MAX_MESSAGE_SIZE
from ipc_core.rundir import is_local_only

__all__ = [
    "DEFAULT_PORTS",
    "DEFAULT_PROTECTED",
    "MAX_SECONDS",
    "MAX_SERVICE_NAME_BYTES",
    "NEVER_REACHABLE",
    "CommonOptions",
    "LibipcCommand",
    "LibipcGroup",
    "ListenAddress",
    "ListenParamType",
    "ServiceAccess",
    "Uri",
    "bound_address",
    "common_options",
    "escape_log_text",
    "help_epilog",
    "libipc_command",
    "listen_specs",
    "network_refusal",
    "open_listener",
    "parse_connect_target",
    "parse_listen",
    "parse_uri",
    "seconds",
    "service_name_error",
    "setup_logging",
    "tune_tcp",
]

# --------------------------------------------------------------------------
# Host and port syntax
# --------------------------------------------------------------------------

_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def _check_port(text: str) -> int:
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


def _split(text: str) -> tuple[str, socket.AddressFamily, str | None]:
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
        host, _family, port = _split(text)
        if port is None:
            if default_port is None:
                raise ValueError("missing port")
            return host, default_port
        return host, _check_port(port)
    except ValueError as exc:
        raise ValueError(f"{exc} in {text!r}") from None


# --------------------------------------------------------------------------
# Listen addresses
# --------------------------------------------------------------------------

_LISTEN_HINT = "expected :PORT, HOST:PORT, [IPv6]:PORT or unix:PATH"
#: ``sun_path`` is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_PATH = 107


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
        if len(os.fsencode(path)) > _MAX_UNIX_PATH:
            raise ValueError(f"unix socket path longer than {_MAX_UNIX_PATH} bytes")
        return ListenAddress(socket.AF_UNIX, path=path)
    if spec.isdigit():
        raise ValueError(f"missing ':' before the port (as in :{spec})")
    if spec.startswith(":") and spec.count(":") == 1:
        return ListenAddress(socket.AF_UNSPEC, None, _check_port(spec[1:]))
    host, family, port = _split(spec)
    if port is None:
        raise ValueError("missing port")
    return ListenAddress(family, host, _check_port(port))


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
        host, _family, port_text = _split(authority)
        if port_text is not None:
            port = _check_port(port_text)
        elif scheme in default_ports:
            port = default_ports[scheme]
        else:
            raise ValueError(f"missing port (scheme {scheme!r} has no default port)")
    except ValueError as exc:
        raise ValueError(f"{exc} in {uri!r}") from None
    return Uri(scheme, host, port, service)


# --------------------------------------------------------------------------
# Service access policy
# --------------------------------------------------------------------------

#: Services a network peer reaches only when ``--allow`` names them exactly
#: (no glob unlocks them): the router and the protocol daemons under the
#: reference's default names. Our own routers and outbound sides are also
#: recognised under any name, by the ``local-only`` mark in their lock file
#: (:func:`network_refusal`); these names cover the reference's daemons, which
#: write no mark.
DEFAULT_PROTECTED: tuple[str, ...] = ("ipc", "tcp", "tls", "ws", "wss")
#: Names a network peer never reaches, whatever ``--allow`` says: the daemons'
#: control services (counters, for ``ipc status``) and lock files.
NEVER_REACHABLE: tuple[str, ...] = ("*.ctl", "*.lock")
MAX_SERVICE_NAME_BYTES = 100


def service_name_error(name: str) -> str | None:
    """Return why ``name`` cannot be a service name, or None if it can.

    Refused: empty, ``.``/``..``, ``/``, control characters (NUL, bytes below
    0x20, DEL), more than 100 UTF-8 bytes.
    """
    if not name:
        return "empty service name"
    if name in (".", ".."):
        return f"service name {name!r} is not allowed"
    if "/" in name:
        return f"service name {name!r} contains '/'"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return f"service name {name!r} contains a control character"
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return f"service name {name!r} is not valid UTF-8"
    if size > MAX_SERVICE_NAME_BYTES:
        return f"service name is {size} bytes long, the limit is {MAX_SERVICE_NAME_BYTES}"
    return None


@dataclass(frozen=True, init=False)
class ServiceAccess:
    """Which local services a remote peer may ask for.

    Rules, in order:

    1. an invalid name is refused;
    2. a name matching :data:`NEVER_REACHABLE` (``*.ctl``, ``*.lock``) is refused;
    3. a name matching a ``deny`` glob is refused (deny wins);
    4. a *protected* name (:data:`DEFAULT_PROTECTED`, plus whatever a daemon
       adds with :meth:`protect`, e.g. its own ``--service-name``) is allowed
       only if ``allow`` holds that exact name: a glob never unlocks it
       (``--allow 't*'`` does not expose ``tcp``);
    5. with an empty ``allow`` list everything else is allowed, otherwise the
       name must match one ``allow`` glob.

    Globs are :func:`fnmatch.fnmatchcase` (case-sensitive, like file names).
    This is the static part of the policy; :func:`network_refusal` adds what
    the run directory says (services marked ``local-only``).
    """

    allow: tuple[str, ...]
    deny: tuple[str, ...]
    protected: tuple[str, ...]

    def __init__(
        self,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        protected: Iterable[str] = DEFAULT_PROTECTED,
    ) -> None:
        object.__setattr__(self, "allow", tuple(allow))
        object.__setattr__(self, "deny", tuple(deny))
        object.__setattr__(self, "protected", tuple(protected))

    def protect(self, *names: str) -> ServiceAccess:
        """Return a copy that also protects ``names``."""
        extra = tuple(n for n in names if n not in self.protected)
        return ServiceAccess(self.allow, self.deny, self.protected + extra)

    def names_exactly(self, name: str) -> bool:
        """True if ``--allow`` gives ``name`` itself (not a glob matching it)."""
        return name in self.allow

    def check(self, name: str) -> str | None:
        """Return None if ``name`` may be reached, else the reason it may not."""
        reason = service_name_error(name)
        if reason:
            return reason
        for pattern in NEVER_REACHABLE:
            if fnmatch.fnmatchcase(name, pattern):
                return f"service {name!r} is never reachable from the network ({pattern})"
        for pattern in self.deny:
            if fnmatch.fnmatchcase(name, pattern):
                return f"service {name!r} is denied (--deny {pattern})"
        if name in self.protected:
            if self.names_exactly(name):
                return None
            return f"service {name!r} is protected; allow it explicitly (--allow {name})"
        if self.allow and not any(fnmatch.fnmatchcase(name, p) for p in self.allow):
            return f"service {name!r} is not in the allow list"
        return None


def network_refusal(access: ServiceAccess, name: str, directory: Path) -> str | None:
    """Why a network peer may not reach ``name`` in run directory ``directory``,
    or None if it may.

    :meth:`ServiceAccess.check`, then the run directory: a service whose lock
    holds the ``local-only`` mark (a router or the outbound side of a protocol
    daemon, under whatever name it was started) would make this daemon an open
    relay, so only an exact ``--allow NAME`` lets a peer reach it.
    """
    reason = access.check(name)
    if reason is None and not access.names_exactly(name) and is_local_only(name, directory):
        reason = (
            f"service {name!r} is local-only (a router or an outbound side); "
            f"allow it explicitly (--allow {name})"
        )
    return reason


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------

LOG_FORMATS = ("auto", "human", "json")
# Attributes every LogRecord has; anything else came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# sd-daemon(3) priority prefixes, parsed by journald on stderr.
_SD_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}


#: What a peer must not put into a log line: C0 and C1 controls (newlines
#: would forge a line, ESC would drive the terminal, NUL truncates) and the
#: Unicode line separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_log_text(text: str) -> str:
    """``text`` with every control character written as ``\\xNN``: whatever a
    peer sends (a certificate subject, a request path, a service name), the
    log gets one line per record and no terminal escapes."""
    return _UNSAFE.sub(_escape_char, text)


class _HumanFormatter(logging.Formatter):
    """``[TIME ]LEVEL logger: message key=value ...``, one line per record
    (tracebacks aside): the message and the extras are escaped."""

    def __init__(self, timestamps: bool, journal: bool) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        super().__init__(("%(asctime)s " if timestamps else "") + fmt)
        self.journal = journal

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_log_text(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        if extras:
            head, nl, tail = text.partition("\n")
            pairs = " ".join(f"{k}={escape_log_text(str(v))}" for k, v in extras.items())
            text = f"{head} {pairs}{nl}{tail}"
        if self.journal:
            text = f"<{_SD_PRIORITY.get(record.levelname, 6)}>{text}"
        return text


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, _dt.UTC)
        obj: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            obj.setdefault(key, value)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        text = json.dumps(obj, default=str, ensure_ascii=False)
        # json escapes C0 controls itself; DEL, C1 and U+2028/9 it leaves raw.
        return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _under_systemd(env: Mapping[str, str]) -> bool:
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def _is_journal(stream: TextIO, env: Mapping[str, str]) -> bool:
    """True if ``stream`` is the journald stream systemd gave us (JOURNAL_STREAM=dev:ino)."""
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


def _level(verbosity: int) -> int:
    if verbosity > 0:
        return logging.DEBUG
    if verbosity == 0:
        return logging.INFO
    return logging.WARNING if verbosity == -1 else logging.ERROR


_HANDLER_MARK = "_libipc_daemon_handler"


def setup_logging(
    verbosity: int = 0,
    fmt: str = "auto",
    *,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Configure the root logger to write to stderr; return the handler.

    ``verbosity`` is ``verbose - quiet``: 1+ DEBUG, 0 INFO, -1 WARNING,
    -2 ERROR. ``fmt``: ``human`` has timestamps, ``json`` is one object per
    line, ``auto`` is human but drops timestamps under systemd (the journal
    adds its own) and adds sd-daemon ``<N>`` priority prefixes when stderr is
    the journal. Calling it again replaces the previous handler.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    setattr(handler, _HANDLER_MARK, True)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    elif fmt == "human" or not _under_systemd(env):
        handler.setFormatter(_HumanFormatter(timestamps=True, journal=False))
    else:
        handler.setFormatter(_HumanFormatter(timestamps=False, journal=_is_journal(stream, env)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_level(verbosity))
    return handler


# --------------------------------------------------------------------------
# click options
# --------------------------------------------------------------------------


def _env_source(ctx: click.Context, param: click.Parameter) -> str | None:
    """The environment variable ``param`` took its value from, if it did."""
    if param.name is None:
        return None
    if ctx.get_parameter_source(param.name) is not click.core.ParameterSource.ENVIRONMENT:
        return None
    names: list[str] = []
    if isinstance(param.envvar, str):
        names.append(param.envvar)
    elif param.envvar:
        names.extend(param.envvar)
    if ctx.auto_envvar_prefix and isinstance(param, click.Option):
        names.append(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
    return next((n for n in names if os.environ.get(n)), None)


#: The upper bound of every duration flag: long enough for any sensible
#: timeout, short enough that ``call_later`` and the kernel's socket options
#: (``TCP_USER_TIMEOUT`` in ms, a u32) never overflow.
MAX_SECONDS = 7 * 24 * 3600.0


class FiniteFloatRange(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses ``nan`` and ``inf``.

    Why: click checks bounds with ``<``/``>``, and every comparison with nan
    is false, so ``--handshake-timeout nan`` would pass any range."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if isinstance(rv, float) and not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def seconds(
    min: float = 0.0, *, min_open: bool = False, max: float = MAX_SECONDS
) -> click.FloatRange:
    """The click type of a duration flag (``SECONDS``): finite, bounded."""
    return FiniteFloatRange(min=min, min_open=min_open, max=max)


class LibipcCommand(click.Command):
    """A click command in the suite's one style.

    * errors name what the user actually typed: a bad value that came from
      the environment names that variable (``IPC_TCPD_HANDSHAKE_TIMEOUT``),
      not a flag they never used;
    * every option shows its environment variable (``[env var: ...]``),
      including the ones ``auto_envvar_prefix`` makes up; defaults are shown
      through ``context_settings={"show_default": True}`` (see
      :func:`libipc_command`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, click.Option) and param.allow_from_autoenv:
                param.show_envvar = True

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.BadParameter as exc:
            variable = (
                exc.param is not None and exc.ctx is not None and _env_source(exc.ctx, exc.param)
            )
            if variable:
                exc.param_hint = f"environment variable {variable}"
            raise


class LibipcGroup(click.Group):
    """A group whose subcommands are all :class:`LibipcCommand` (and whose
    subgroups are LibipcGroups)."""

    command_class = LibipcCommand
    group_class = type


#: click's settings for every command of the suite.
HELP_SETTINGS: Mapping[str, Any] = {"help_option_names": ["-h", "--help"], "show_default": True}


def help_epilog(examples: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> str:
    """The end of a ``--help`` page: an ``Examples:`` block kept as written
    (click's ``\b`` marker stops it from rewrapping), then ``notes``, each a
    paragraph click wraps.

    ``examples`` are ``(command line, what it does)`` pairs; a command line
    may hold newlines (continuation lines, written after a ``\\``)."""
    lines = ["\b", "Examples:"]
    for command, what in examples:
        lines.append("  " + command.replace("\n", "\n    "))
        if what:
            lines.append("      " + what.replace("\n", "\n      "))
    return "\n\n".join(["\n".join(lines), *notes])


def env_note(prefix: str) -> str:
    """The paragraph every daemon's help ends with: where settings come from."""
    return (
        f"Every option can also be set in the environment, as shown: "
        f"{prefix}_<OPTION> (repeatable options: values separated by spaces). "
        "Under systemd they go in /etc/libipc/<unit>.env."
    )


def libipc_command(
    name: str | None = None,
    *,
    env_prefix: str | None = None,
    examples: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
) -> Callable[[Callable[..., Any]], LibipcCommand]:
    """``@click.command`` in the suite's style: :class:`LibipcCommand`, ``-h``,
    defaults shown and, with ``env_prefix``, every option an environment
    variable ``PREFIX_OPTION`` (named in the help and in errors). The
    function's docstring is the help; its first line the summary."""
    settings = dict(HELP_SETTINGS)
    if env_prefix:
        settings["auto_envvar_prefix"] = env_prefix
        notes = [*notes, env_note(env_prefix)]
    return click.command(  # type: ignore[return-value]
        name,
        cls=LibipcCommand,
        context_settings=settings,
        epilog=help_epilog(examples, notes),
    )


class ListenParamType(click.ParamType):
    """click type turning a ``--listen``-style string into a :class:`ListenAddress`."""

    name = "ADDRESS"

    def convert(self, value: Any, param: Any, ctx: Any) -> ListenAddress:
        if isinstance(value, ListenAddress):
            return value
        try:
            return parse_listen(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


LISTEN = ListenParamType()


def listen_specs(
    cli_values: Sequence[str | ListenAddress],
    env: Mapping[str, str] | None = None,
    default: str = ":9000",
) -> list[ListenAddress]:
    """Decide where to listen: ``--listen`` (or its auto env var), else the
    reference's ``ADDRESS`` env var (whitespace-separated), else ``default``.

    Raises ``ValueError`` for a bad ``ADDRESS``.
    """
    env = os.environ if env is None else env
    values: Sequence[str | ListenAddress] = cli_values
    if not values:
        values = env.get("ADDRESS", "").split() or [default]
    return [v if isinstance(v, ListenAddress) else parse_listen(v) for v in values]


@dataclass(frozen=True)
class CommonOptions:
    """The values of the flags added by :func:`common_options`."""

    listen: tuple[ListenAddress, ...]
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    rundir: str | None
    log_format: str
    verbose: int
    quiet: int
    handshake_timeout: float
    max_connections: int
    max_message_size: int
    metrics: ListenAddress | None
    peer_timeout: float = 30.0
    max_connections_per_ip: int = 64

    @property
    def verbosity(self) -> int:
        return self.verbose - self.quiet

    def listen_addresses(
        self, default: str = ":9000", env: Mapping[str, str] | None = None
    ) -> list[ListenAddress]:
        """:func:`listen_specs` applied to ``--listen``."""
        return listen_specs(self.listen, env, default)

    def access(self, *protected: str) -> ServiceAccess:
        """A :class:`ServiceAccess` from ``--allow``/``--deny``, also protecting ``protected``."""
        return ServiceAccess(self.allow, self.deny).protect(*protected)


_COMMON_NAMES = tuple(f.name for f in CommonOptions.__dataclass_fields__.values())
#: Upper bound of --max-connections and --max-connections-per-ip.
MAX_CONNECTIONS = 1_000_000
#: --peer-timeout becomes TCP_KEEPIDLE, which Linux caps at 32767 s.
MAX_PEER_TIMEOUT = 32767.0
F = TypeVar("F", bound=Callable[..., Any])


def common_options(func: F | None = None, *, default_listen: str | None = None) -> Any:
    """Add the flags every daemon shares and pass them as ``common: CommonOptions``.

    Declare the command with :func:`libipc_command` and an ``env_prefix``
    (``IPC_TCPD``, ...) so every flag is also an environment variable
    (``IPC_TCPD_LISTEN=":9000 unix:/run/x"``, ``IPC_TCPD_VERBOSE=2``).
    ``--rundir`` also reads ``RUNDIR`` like every LibIPC program. ``--listen``
    has no default on purpose: call ``common.listen_addresses(default)`` so the
    reference's ``ADDRESS`` variable is honoured as a fallback;
    ``default_listen`` puts that default in the help.

    Example::

        @libipc_command(env_prefix="IPC_TCPD")
        @common_options(default_listen="127.0.0.1:9000")
        def main(common: CommonOptions) -> None:
            setup_logging(common.verbosity, common.log_format)
            socks = [open_listener(a) for a in common.listen_addresses("127.0.0.1:9000")]
    """
    if func is None:
        return functools.partial(_add_common_options, default_listen=default_listen)
    return _add_common_options(func, default_listen)


def _add_common_options(func: F, default_listen: str | None = None) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in _COMMON_NAMES}
        return func(*args, common=CommonOptions(**values), **kwargs)

    fallback = default_listen or "the daemon's default"
    options = [
        click.option(
            "--listen",
            "-l",
            type=LISTEN,
            multiple=True,
            help="Address to listen on: :PORT (all interfaces, IPv4 and IPv6), "
            "HOST:PORT, [IPv6]:PORT or unix:PATH. Repeatable. "
            f"Default: $ADDRESS if set, else {fallback}. Ignored when systemd "
            "passes the sockets.",
        ),
        click.option(
            "--allow",
            multiple=True,
            metavar="GLOB",
            help="Local services remote peers may reach. Repeatable. "
            "Default: all but the protected ones (the daemons' own services).",
        ),
        click.option(
            "--deny",
            multiple=True,
            metavar="GLOB",
            help="Local services remote peers may never reach (wins over --allow). Repeatable.",
        ),
        click.option(
            "--rundir",
            envvar="RUNDIR",
            default=None,
            metavar="DIR",
            help="LibIPC run directory. Default: /tmp/.libipc-run.",
        ),
        click.option(
            "--log-format",
            type=click.Choice(LOG_FORMATS),
            default="auto",
            help="auto: human, without timestamps under systemd; json: one object per line.",
        ),
        click.option(
            "-v",
            "--verbose",
            count=True,
            show_default=False,
            help="More logs: -v adds debug lines.",
        ),
        click.option(
            "-q",
            "--quiet",
            count=True,
            show_default=False,
            help="Fewer logs: -q warnings and errors only, -qq errors only.",
        ),
        click.option(
            "--handshake-timeout",
            type=seconds(0, min_open=True),
            default=5.0,
            metavar="SECONDS",
            help="Close peers that have not finished their handshake by then.",
        ),
        click.option(
            "--max-connections",
            type=click.IntRange(min=1, max=MAX_CONNECTIONS),
            default=10000,
            metavar="N",
            help="Refuse new network connections beyond N open ones.",
        ),
        click.option(
            "--max-message-size",
            type=click.IntRange(min=0, max=0xFFFFFFFF),
            default=DEFAULT_MAX_MESSAGE_SIZE,
            metavar="BYTES",
            help="Disconnect peers announcing a longer message.",
        ),
        click.option(
            "--metrics",
            type=LISTEN,
            default=None,
            metavar="ADDRESS",
            help="Serve Prometheus /metrics and /healthz on this address. Default: off.",
        ),
        click.option(
            "--peer-timeout",
            type=seconds(1, max=MAX_PEER_TIMEOUT),
            default=30.0,
            metavar="SECONDS",
            help="Close a TCP peer whose data stays unacknowledged this long, or that "
            "stops answering keepalive probes (a dead link, a vanished host).",
        ),
        click.option(
            "--max-connections-per-ip",
            type=click.IntRange(min=0, max=MAX_CONNECTIONS),
            default=64,
            metavar="N",
            help="Refuse a source address (an IPv6 /64) more than N connections "
            "at once, handshaking or relayed. 0 = no limit.",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]
