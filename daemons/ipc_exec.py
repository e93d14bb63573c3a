"""``ipc exec NAME -- PROGRAM ARGS...``: any program becomes a LibIPC service.

Why: websocketd's appeal is that a script reading stdin and writing stdout
is a WebSocket server. Here the script becomes the local service NAME, and
with the daemons in front it is reachable over TCP, TLS and WebSocket at
once, with the client's identity in its environment.

This module is the command: its options, the program's environment, start
and stop. The service itself, one program per client connection, is
:class:`daemons.execservice.ExecService` (its docstring says how it
works).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ipc_core import Context, IPCError, ServiceBusy

from .engine.cgienv import base_environment
from .engine.listeners import raise_fd_limit
from .engine.log import setup_logging
from .engine.options import libipc_command, logging_options, rundir_option, seconds
from .execservice import DEFAULT_MAX_MESSAGE_SIZE, MODES, ExecService, frame_log

__all__ = ["ExecService", "exec_command"]

log = logging.getLogger("ipc.exec")


def _resolve(program: str, env: dict[str, str]) -> str | None:
    """The path to execute: as given when it holds a slash, else looked up
    in the program's PATH. None when nothing executable is there."""
    if "/" in program:
        path = Path(program)
        ok = path.is_file() and os.access(path, os.X_OK)
        return str(path.absolute()) if ok else None
    return shutil.which(program, path=env.get("PATH", ""))


def _fail(message: str) -> None:
    click.echo(f"ipc exec: {message}", err=True)
    raise click.exceptions.Exit(2)


def _parse_env(values: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, text = value.partition("=")
        if not sep:
            raise click.BadParameter(f"{value!r} is not NAME=VALUE", param_hint="'--env'")
        pairs.append((name, text))
    return pairs


@libipc_command(
    "exec",
    prog="ipc exec",
    env_prefix="IPC_EXEC",
    examples=[
        (
            "ipc exec counter -- ./count.sh",
            "each client gets its own count.sh (one line, one message)",
        ),
        (
            "ipc exec shout -- stdbuf -oL tr a-z A-Z",
            "line mode: each message a line on stdin, each line a reply",
        ),
        (
            "ipc exec env --env GREETING=hi -- /usr/bin/env",
            "the program sees GREETING and the CGI variables",
        ),
        ("ipc exec blob --raw -- gzip -c", "raw mode: each read of stdout is one message"),
        (
            "ipc-websocketd --listen :8080 & ipc exec counter -- ./count.sh",
            "ws://host:8080/counter runs count.sh",
        ),
    ],
    notes=[
        "Without PROGRAM on the command line, IPC_EXEC_PROGRAM and IPC_EXEC_ARGS "
        "(split like a shell) name it: the systemd unit ipc-exec@NAME reads them "
        "from /etc/libipc/ipc-exec@NAME.env.",
        "The program's environment holds PATH (a safe default), --pass-env and "
        "--env variables, and what the connection says: REMOTE_ADDR, REMOTE_PORT, "
        "SERVER_PORT, PATH_INFO, QUERY_STRING, HTTP_*, SSL_CLIENT_*, IPC_TRANSPORT, "
        "IPC_SERVICE, IPC_TOKEN_NAME (docs/ipc-exec.md has the table).",
    ],
)
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- PROGRAM [ARGS]...]")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="line",
    help="line: a message is a line; framed: the program speaks LibIPC frames on "
    "the client's connection itself (no relay); raw: each read is a message.",
)
@click.option("--framed", is_flag=True, help="Short for --mode framed.")
@click.option("--raw", is_flag=True, help="Short for --mode raw.")
@click.option(
    "--env",
    "set_env",
    envvar="IPC_EXEC_ENV",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set a variable in the program's environment (repeatable).",
)
@click.option(
    "--pass-env",
    multiple=True,
    metavar="NAME",
    help="Keep this variable of ipc exec's environment (repeatable); others are scrubbed.",
)
@click.option(
    "--max-processes",
    type=click.IntRange(1, 100_000),
    default=256,
    metavar="N",
    help="Programs running at once; more clients are refused (and closed).",
)
@click.option(
    "--grace",
    type=seconds(0),
    default=5.0,
    metavar="SECONDS",
    help="After the client leaves: SIGTERM after this, SIGKILL after twice this.",
)
@click.option(
    "--max-message-size",
    type=click.IntRange(1, 0xFFFFFFFF),
    default=DEFAULT_MAX_MESSAGE_SIZE,
    metavar="BYTES",
    help="Longest message, and longest line in line mode (a longer one closes the client).",
)
@click.option(
    "--stderr-rate",
    type=click.IntRange(1, 1_000_000),
    default=50,
    metavar="LINES",
    help="Program stderr lines logged per second (all programs); the rest are dropped and counted.",
)
@click.option(
    "--handoff/--no-handoff",
    default=True,
    help="Take WebSocket connections over from ipc-websocketd (it then relays "
    "nothing; the program is fed over pipes here), or have it relay every message.",
)
@click.option(
    "--max-connections-per-ip",
    "max_per_ip",
    type=click.IntRange(0, 100_000),
    default=64,
    metavar="N",
    help="Programs one client address (an IPv6 /64) may run at once, for clients "
    "that came through a daemon (handed over or relayed); more are refused. 0 = no limit.",
)
@click.option(
    "--ping-interval",
    type=seconds(0),
    default=20.0,
    metavar="SECONDS",
    help="Handed-over WebSocket clients: a ping this often; no pong by the next "
    "one closes the client (0: never).",
)
@rundir_option
@logging_options
def exec_command(
    name: str,
    command: tuple[str, ...],
    mode: str,
    framed: bool,
    raw: bool,
    set_env: tuple[str, ...],
    pass_env: tuple[str, ...],
    max_processes: int,
    grace: float,
    max_message_size: int,
    stderr_rate: int,
    handoff: bool,
    ping_interval: float,
    max_per_ip: int,
    rundir: Path | None,
    verbose: int,
    quiet: int,
    log_format: str,
) -> None:
    """Serve NAME: each client connection runs one PROGRAM process.

    In line mode (the default) each message is a line on the program's
    stdin and each line it writes on stdout is a message; --framed passes
    LibIPC frames through; --raw makes each read of stdout a message. Its
    stderr goes to the log. When the client leaves, the program's stdin is
    closed; when the program exits, the client is closed.
    """
    if framed and raw:
        raise click.UsageError("--framed and --raw exclude each other")
    if framed:
        mode = "framed"
    elif raw:
        mode = "raw"
    argv = list(command)
    if not argv:
        program = os.environ.get("IPC_EXEC_PROGRAM", "").strip()
        if not program:
            raise click.UsageError("no PROGRAM: write it after --, or set IPC_EXEC_PROGRAM")
        try:
            argv = [program, *shlex.split(os.environ.get("IPC_EXEC_ARGS", ""))]
        except ValueError as exc:
            raise click.UsageError(f"IPC_EXEC_ARGS: {exc}") from None
    try:
        env = base_environment(pass_env, _parse_env(set_env), os.environ)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    path = _resolve(argv[0], env)
    if path is None:
        _fail(f"{argv[0]}: no such executable program (PATH={env['PATH']})")
        return
    _quiet_group_logging()
    setup_logging(verbose - quiet, log_format)
    frame_log.setLevel(logging.DEBUG if verbose - quiet >= 2 else logging.WARNING)
    _ensure_std_descriptors()
    raise_fd_limit(64 + 5 * max_processes)
    try:
        ctx = Context(rundir_path=rundir, max_message_size=max_message_size, switch_events=False)
    except IPCError as exc:
        _fail(str(exc))
        return
    service = ExecService(
        ctx,
        name,
        path,
        argv,
        env=env,
        mode=mode,
        max_processes=max_processes,
        grace=grace,
        stderr_rate=stderr_rate,
        handoff=handoff,
        ping_interval=ping_interval,
        max_per_ip=max_per_ip,
    )
    ctx.handle_signals()  # before the socket exists: a SIGTERM once it does is a clean stop
    try:
        service.start()
    except ServiceBusy as exc:
        ctx.close_all()
        _fail(f"{exc} (is another ipc exec {name} running?)")
        return
    except IPCError as exc:
        ctx.close_all()
        _fail(str(exc))
        return
    log.info(
        "serving %r in %s: %s (%s mode, at most %d processes)",
        name,
        ctx.rundir,
        shlex.join(argv),
        mode,
        max_processes,
    )
    service.serve()


def _quiet_group_logging() -> None:
    """``ipc``'s own basicConfig handler would print every line twice."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not getattr(handler, "_libipc_daemon_handler", False):
            root.removeHandler(handler)


def _ensure_std_descriptors() -> None:
    """Descriptors 0-2 open (on /dev/null if need be), so a socket pair never
    lands there and a child's dup2 onto 0-2 always clears close-on-exec; and
    every other descriptor ipc exec was started with closed on exec, so that
    no program inherits what its parent left open (a shell's, a supervisor's)."""
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: list[str] | None = None) -> Any:
    """Run as a program of its own (``python -m daemons.ipc_exec``)."""
    return exec_command.main(argv, prog_name="ipc exec")


if __name__ == "__main__":
    main()
