"""The ``ipc`` tool: the example pong service and small clients for scripts.

ipc pongd [NAME]        echo service (default ``pong``)
ipc cat NAME            each stdin line is a message; replies are printed
ipc send NAME MESSAGE   one request, print the reply
ipc ls                  the services in the run directory, alive or stale
ipc status [NAME...]    the counters of running daemons (their NAME.ctl services)
ipc cert ...            a private CA and certificates for ipc-tlsd / wss
ipc token ...           signed tokens for ipc-websocketd --token-secret
ipc exec NAME -- PROG   any program as service NAME, one process per client
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from ipc_core import Context, EventType, IPCError, list_services
from ipc_core import rundir as default_rundir

from .engine.options import HELP_SETTINGS, LibipcGroup, help_epilog, rundir_option, seconds
from .ipc_status import status

log = logging.getLogger("ipc")


_rundir_option = rundir_option
_MAX_SIZE = 0xFFFFFFFF


class _Commands(LibipcGroup):
    """Loads ``ipc cert`` (and with it ``cryptography``, ~50 ms), ``ipc token``
    and ``ipc exec`` only when used, and turns any library or system error a
    command lets through into one line and exit status 1: a user never sees a
    traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IPCError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "cert", "exec", "token"])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "cert":
            from .ipc_cert import cert

            return cert
        if name == "token":
            from .ipc_token import token

            return token
        if name == "exec":
            from .ipc_exec import exec_command

            return exec_command
        return super().get_command(ctx, name)


@click.group(
    cls=_Commands,
    prog="ipc",
    context_settings=HELP_SETTINGS,
    epilog=help_epilog(
        [
            ("ipc pongd &", "run the example echo service pong"),
            ("ipc send pong hello", "one request, print the reply"),
            ("ipc ls", "the services in the run directory"),
            ("ipc status", "the counters of the running daemons"),
            ("ipc COMMAND --help", "the options and examples of one command"),
        ],
        ["Every command uses the run directory $RUNDIR (default /tmp/.libipc-run)."],
    ),
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    show_default=False,
    help="More log output: -v information, -vv debug.",
)
def main(verbose: int) -> None:
    """LibIPC command-line tool: the example service and small clients."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def serve_pong(ctx: Context, name: str, ready: bool = True, *, handoff: bool = True) -> None:
    """Echo every message back to its sender until stopped. ``handoff``:
    take ipc-tcpd's connections over (no relay in the path)."""
    ctx.handle_signals()  # before the socket exists: a SIGTERM once it does is a clean stop
    ctx.service_init(name, handoff=handoff)
    if ready:
        click.echo(f"pongd: serving {name!r} in {ctx.rundir}", err=True)
    write = ctx.write
    MESSAGE_RX = EventType.MESSAGE_RX
    for event in ctx:
        if event.type is MESSAGE_RX:
            write(event.fd, event.message)  # type: ignore[arg-type]
        elif event.type is EventType.DISCONNECTION and event.reason:
            log.info("client %d left: %s", event.fd, event.reason)


@main.command(
    epilog=help_epilog(
        [
            ("ipc pongd", "serve $RUNDIR/pong until Ctrl-C or SIGTERM"),
            ("ipc pongd echo --rundir /run/libipc", "the same service under another name"),
            ("ipc pongd --no-handoff", "always relayed by ipc-tcpd, never handed over"),
        ]
    )
)
@click.argument("name", default="pong")
@_rundir_option
@click.option(
    "--handoff/--no-handoff",
    default=True,
    show_default=True,
    help="Take over ipc-tcpd's connections (the TCP socket itself, no relay in the path).",
)
@click.option(
    "--max-message-size",
    type=click.IntRange(min=0, max=_MAX_SIZE),
    default=16 * 1024 * 1024,
    metavar="BYTES",
    help="Disconnect clients announcing a longer message.",
)
def pongd(name: str, rundir: Path | None, handoff: bool, max_message_size: int) -> None:
    """Run the example echo service NAME (default: pong)."""
    try:
        with Context(rundir_path=rundir, max_message_size=max_message_size) as ctx:
            serve_pong(ctx, name, handoff=handoff)
    except IPCError as exc:
        raise click.ClickException(str(exc)) from None


@main.command(
    epilog=help_epilog(
        [
            ("ipc send pong hello", "prints hello (pong echoes)"),
            (
                'IPC_NETWORK="pong tcp://192.0.2.7:9000/pong" ipc send pong hello',
                "through ipcd and ipc-tcpd: pong on another host",
            ),
        ]
    )
)
@click.argument("name")
@click.argument("message")
@_rundir_option
@click.option(
    "--timeout",
    type=seconds(0, min_open=True),
    default=5.0,
    metavar="SECONDS",
    help="How long to wait for the connection, then for the reply.",
)
def send(name: str, message: str, rundir: Path | None, timeout: float) -> None:
    """Send MESSAGE to service NAME and print the reply."""
    try:
        with Context(rundir_path=rundir) as ctx:
            fd = ctx.connect_service(name, timeout=timeout)
            ctx.write(fd, message.encode())
            reply = ctx.read(fd, timeout=timeout)
    except TimeoutError:
        raise click.ClickException(f"no reply from {name!r} within {timeout} s") from None
    except IPCError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(reply.decode(errors="replace"))


@main.command(
    epilog=help_epilog(
        [
            ("printf 'a\\nb\\n' | ipc cat pong", "two messages, two replies printed"),
            ("ipc cat --raw pong < request.bin > reply.bin", "binary in, binary out"),
        ]
    )
)
@click.argument("name")
@_rundir_option
@click.option("--raw", is_flag=True, help="Binary mode: stdin chunks are messages, replies raw.")
@click.option(
    "--timeout",
    type=seconds(0, min_open=True),
    default=5.0,
    metavar="SECONDS",
    help="How long to wait for the connection, and for the replies after stdin ends.",
)
def cat(name: str, rundir: Path | None, raw: bool, timeout: float) -> None:
    """Send each stdin line to service NAME; print the replies.

    Each line (without its newline) is one message; with --raw each chunk
    read from stdin is one message and replies are written as they are.
    """
    try:
        ctx = Context(rundir_path=rundir)
        fd = ctx.connect_service(name, timeout=timeout)
    except IPCError as exc:
        raise click.ClickException(str(exc)) from None
    with ctx:
        _cat_loop(ctx, fd, raw, timeout)


def _cat_loop(ctx: Context, fd: int, raw: bool, timeout: float) -> None:
    stdin = sys.stdin.buffer
    out = sys.stdout.buffer
    stdin_fd = stdin.fileno()
    ctx.add_external(stdin_fd)
    outstanding = 0
    stdin_open = True
    pending = b""
    while stdin_open or outstanding:
        event = ctx.wait_event(timeout=None if stdin_open else timeout)
        if event.type == EventType.EXTERNAL:
            chunk = os.read(stdin_fd, 65536)
            if not chunk:
                stdin_open = False
                ctx.remove_external(stdin_fd)
                if pending and not raw:
                    ctx.write(fd, pending)
                    outstanding += 1
                continue
            if raw:
                ctx.write(fd, chunk)
                outstanding += 1
                continue
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                ctx.write(fd, line)
                outstanding += 1
        elif event.type == EventType.MESSAGE_RX:
            outstanding -= 1
            assert event.message is not None
            out.write(event.message if raw else event.message + b"\n")
            out.flush()
        elif event.type == EventType.DISCONNECTION:
            if outstanding or stdin_open:
                raise click.ClickException(
                    f"service closed the connection ({event.reason or 'EOF'})"
                )
            return
        elif event.type == EventType.TIMER:
            raise click.ClickException(f"{outstanding} replies missing after {timeout} s")


@main.command(
    name="ls",
    epilog=help_epilog(
        [
            ("ipc ls", "e.g. 'pong  alive' and 'old  stale' (a socket nobody serves)"),
            ("ipc ls --rundir /run/libipc", "the services of the systemd units"),
        ]
    ),
)
@_rundir_option
def ls_(rundir: Path | None) -> None:
    """List the services in the run directory and whether each is alive."""
    directory = rundir or default_rundir()
    try:
        services = list_services(directory)
    except IPCError as exc:
        raise click.ClickException(str(exc)) from None
    if not services:
        click.echo(f"no services in {directory}", err=True)
        return
    width = max(len(n) for n, _ in services)
    for name, alive in services:
        click.echo(f"{name:<{width}}  {'alive' if alive else 'stale'}")


main.add_command(status)
