"""The command-line face every command shares (click).

* :class:`LibipcCommand` / :class:`LibipcGroup` / :func:`libipc_command`:
  one help style (examples, defaults, environment variables), errors that
  name what the user typed;
* :func:`seconds`: the bounded, finite type of every duration flag;
* :func:`common_options` / :class:`CommonOptions`: the flags every network
  daemon has (``--listen``, ``--allow``, ``--rundir``, limits, logging);
* :func:`idle_timeout_option`, :func:`connect_timeout_option`: the flags of
  the TCP-relaying daemons;
* :func:`proxy_protocol_option`: ``--proxy-protocol CIDR``, for every daemon
  that can sit behind a TCP load balancer.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from ipc_core import DEFAULT_MAX_MESSAGE_SIZE

from .errors import StartupError
from .listeners import ListenAddress, parse_listen
from .log import LOG_FORMATS
from .policy import ServiceAccess
from .trust import BadNetwork, TrustedNetworks

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "HELP_SETTINGS",
    "LISTEN",
    "MAX_SECONDS",
    "CommonOptions",
    "LibipcCommand",
    "LibipcGroup",
    "ListenParamType",
    "common_options",
    "connect_timeout_option",
    "env_note",
    "help_epilog",
    "idle_timeout_option",
    "libipc_command",
    "listen_specs",
    "proxy_protocol_option",
    "rundir_option",
    "seconds",
    "version",
]

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


#: The distribution whose version ``--version`` prints.
DISTRIBUTION = "libipc"


def version() -> str:
    """The installed distribution's version (``0+unknown`` when run from a
    source tree that was never installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def prog_name(ctx: click.Context) -> str:
    """The program's name for messages: the command's ``prog`` if it has one
    (``python -m daemons.tcpd`` is still ``ipc-tcpd``), else how it was run."""
    root = ctx.find_root()
    return getattr(root.command, "prog", None) or root.info_name or "ipc"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"{prog_name(ctx)}, version {version()}")
    ctx.exit()


def _version_option() -> click.Option:
    return click.Option(
        ["--version"],
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_print_version,
        help="Show the version and exit.",
    )


class _Style:
    """What every command of the suite shares, as a mixin of click's classes:
    ``--version``, and a :class:`StartupError` printed as ``PROG: reason``
    with exit status 1, in this one place (never a traceback)."""

    prog: str | None = None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except StartupError as exc:
            click.echo(f"{prog_name(ctx)}: {exc}", err=True)
            ctx.exit(1)


class LibipcCommand(_Style, click.Command):
    """A click command in the suite's one style.

    * errors name what the user actually typed: a bad value that came from
      the environment names that variable (``IPC_TCPD_HANDSHAKE_TIMEOUT``),
      not a flag they never used;
    * every option shows its environment variable (``[env var: ...]``),
      including the ones ``auto_envvar_prefix`` makes up; defaults are shown
      through ``context_settings={"show_default": True}`` (see
      :func:`libipc_command`);
    * ``--version``; a :class:`StartupError` becomes ``PROG: reason``, exit 1.
    """

    def __init__(self, *args: Any, prog: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prog = prog
        self.params.append(_version_option())
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


class LibipcGroup(_Style, click.Group):
    """A group whose subcommands are all :class:`LibipcCommand` (and whose
    subgroups are LibipcGroups); ``--version`` like every command."""

    command_class = LibipcCommand
    group_class = type

    def __init__(self, *args: Any, prog: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prog = prog
        self.params.append(_version_option())


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
    prog: str | None = None,
    env_prefix: str | None = None,
    examples: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
) -> Callable[[Callable[..., Any]], LibipcCommand]:
    """``@click.command`` in the suite's style: :class:`LibipcCommand`, ``-h``,
    defaults shown and, with ``env_prefix``, every option an environment
    variable ``PREFIX_OPTION`` (named in the help and in errors). The
    function's docstring is the help; its first line the summary. ``prog``
    names the program in ``--version`` and start-up errors."""
    settings = dict(HELP_SETTINGS)
    if env_prefix:
        settings["auto_envvar_prefix"] = env_prefix
        notes = [*notes, env_note(env_prefix)]
    return click.command(  # type: ignore[return-value]
        name,
        cls=LibipcCommand,
        context_settings=settings,
        epilog=help_epilog(examples, notes),
        prog=prog,
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
    rundir: Path | None
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


def _rundir_param() -> Callable[[F], F]:
    return click.option(
        "--rundir",
        envvar="RUNDIR",
        # The library checks the directory (and says what is wrong in one line).
        type=click.Path(readable=False, path_type=Path),
        default=None,
        metavar="DIR",
        help="LibIPC run directory. Default: /tmp/.libipc-run.",
    )


def rundir_option(func: F) -> F:
    """``--rundir DIR`` (``$RUNDIR`` too), the same on every command: the
    value is a :class:`~pathlib.Path` or None (the library's default)."""
    return _rundir_param()(func)


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


def _logging_params() -> list[Callable[[F], F]]:
    return [
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
    ]


def check_origins(origins: Sequence[str], flag: str) -> None:
    """Each of ``origins`` (``--origin``, ``--cors``) is SCHEME://HOST[:PORT],
    ``null`` or ``*``; else a BadParameter naming ``flag``."""
    for origin in origins:
        if origin not in ("*", "null") and "://" not in origin:
            raise click.BadParameter(
                f"{origin!r}: an origin is SCHEME://HOST[:PORT] (as in https://app.example.com),"
                " null or *",
                param_hint=flag,
            )


def logging_options(func: F) -> F:
    """``--log-format``, ``-v`` and ``-q``: the same on every long-running
    command (the daemons through :func:`common_options`, ipcd, ipc-udpd,
    ipc exec)."""
    for option in reversed(_logging_params()):
        func = option(func)
    return func


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
        _rundir_param(),
        *_logging_params(),
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


#: Seconds a relayed TCP/TLS connection may carry no byte either way.
DEFAULT_IDLE_TIMEOUT = 300.0


def idle_timeout_option(func: F) -> F:
    """``--idle-timeout`` for the TCP-relaying daemons (ipc-tcpd, ipc-tlsd).

    Not a common option: ipc-websocketd has its own ``--idle-timeout``
    (WebSocket messages, a close frame), which a byte-level timeout would
    contradict (its pings are bytes)."""
    option = click.option(
        "--idle-timeout",
        type=seconds(0),
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="Close a relayed connection with no byte either way for this long. 0 = off.",
    )
    return option(func)  # type: ignore[no-any-return]


def connect_timeout_option(what: str) -> Callable[[F], F]:
    """``--connect-timeout``: the deadline of an outbound attempt (``what``
    it covers differs between ipc-tcpd and ipc-tlsd)."""
    return click.option(
        "--connect-timeout",
        type=seconds(0, min_open=True),
        default=5.0,
        metavar="SECONDS",
        help=f"Deadline of an outbound {what}.",
    )


def _trusted_networks(
    _ctx: click.Context, _param: click.Parameter, value: Sequence[str]
) -> TrustedNetworks:
    try:
        return TrustedNetworks.parse(value, flag=None)
    except BadNetwork as exc:
        raise click.BadParameter(str(exc)) from None


def proxy_protocol_option(func: F) -> F:
    """``--proxy-protocol CIDR`` (repeatable; the word ``unix`` for peers on
    Unix-socket listeners), passed as ``proxy_protocol``: a
    :class:`~daemons.engine.trust.TrustedNetworks`, empty when not given.

    Sources inside must open every connection with a PROXY protocol header
    (v1 or v2), which names the real client; any other source that sends one
    is refused. A bad entry is a usage error (exit status 2) naming it. The
    command installs the gate (:class:`daemons.codecs.proxied.ProxyFront`)."""
    option = click.option(
        "--proxy-protocol",
        multiple=True,
        metavar="CIDR",
        callback=_trusted_networks,
        help="Proxies (IP networks, or 'unix' for peers on Unix-socket listeners) "
        "that open every connection with a PROXY protocol v1/v2 header naming the "
        "real client (HAProxy send-proxy-v2, nginx proxy_protocol, AWS NLB). A "
        "listed source without a header, and a header from any other source, are "
        "refused. Repeatable. Default: none (no header expected).",
    )
    return option(func)  # type: ignore[no-any-return]
