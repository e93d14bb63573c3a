"""``ipc status``: a daemon's counters without HTTP, through its control service.

Every daemon built on :class:`daemons.engine.daemon.Daemon` serves ``NAME.ctl``
(``tcp.ctl``, ``ipc.ctl``...) in the run directory and answers the message
``status`` with JSON (see :meth:`Daemon.status`). Going through the run
directory means the same permissions as every other LibIPC service (0660 and
the group), no port to open, and it works on hosts where ``--metrics`` is off.

``ipc status`` asks every ``*.ctl`` it finds (or the names given) and prints
one row per daemon, or the raw answers with ``--json``. A daemon that does not
answer is a row with its error, and the exit status is 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ipc_core import Context, IPCError, connect_direct, list_services
from ipc_core import rundir as default_rundir

from .engine.options import LibipcCommand, help_epilog, rundir_option, seconds

__all__ = ["query", "status", "summarize"]

F = TypeVar("F", bound=Callable[..., Any])

CONTROL_SUFFIX = ".ctl"


def query(ctx: Context, name: str, timeout: float) -> dict[str, Any]:
    """Ask one control service for its status; raise IPCError/TimeoutError.

    Always the local socket, never through ipcd: ``IPC_NETWORK`` is for
    applications, and a control service is about this host."""
    fd = ctx.adopt(connect_direct(name, ctx.rundir, timeout))
    try:
        ctx.write(fd, b"status")
        answer: dict[str, Any] = json.loads(ctx.read(fd, timeout=timeout))
    except ValueError as exc:
        raise IPCError(f"{name}: not a JSON answer ({exc})") from None
    finally:
        ctx.close(fd)
    return answer


def _total(metric: Any, **match: str) -> float:
    """Sum a snapshot entry: a number, or labelled samples filtered by ``match``."""
    if isinstance(metric, int | float):
        return metric
    if not isinstance(metric, list):
        return 0
    return sum(s["value"] for s in metric if all(s["labels"].get(k) == v for k, v in match.items()))


def summarize(answer: dict[str, Any]) -> dict[str, Any]:
    """The columns of the table from one daemon's answer."""
    m = answer.get("metrics", {})
    return {
        "daemon": answer.get("daemon", "?"),
        "pid": answer.get("pid", "?"),
        "uptime": f"{answer.get('uptime_seconds', 0):.0f}s",
        "open": _total(m.get("ipc_connections_open")),
        "total": _total(m.get("ipc_connections_total")),
        "msgs in/out": f"{_total(m.get('ipc_messages_total'), direction='in'):.0f}/"
        f"{_total(m.get('ipc_messages_total'), direction='out'):.0f}",
        "bytes in/out": f"{_total(m.get('ipc_bytes_total'), direction='in'):.0f}/"
        f"{_total(m.get('ipc_bytes_total'), direction='out'):.0f}",
        "hs fail": _total(m.get("ipc_handshake_failures_total")),
        "errors": _total(m.get("ipc_errors_total")),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if isinstance(value, float) and value == int(value):
        return str(int(value))
    return str(value)


def _control_services(directory: Path) -> list[str]:
    return [n for n, alive in list_services(directory) if alive and n.endswith(CONTROL_SUFFIX)]


@click.command(
    cls=LibipcCommand,
    epilog=help_epilog(
        [
            ("ipc status", "one row per running daemon"),
            ("ipc status tcp --json", "the raw answer of ipc-tcpd's tcp.ctl"),
            ("RUNDIR=/run/libipc ipc status", "the daemons of the systemd units"),
        ]
    ),
)
@click.argument("names", nargs=-1)
@rundir_option
@click.option("--json", "as_json", is_flag=True, help="Print the daemons' answers as JSON.")
@click.option(
    "--timeout",
    type=seconds(0, min_open=True),
    default=2.0,
    metavar="SECONDS",
    help="How long to wait for each daemon's answer.",
)
def status(names: tuple[str, ...], rundir: Path | None, as_json: bool, timeout: float) -> None:
    """Counters of the running daemons (NAME: tcp, ipc...; default: all).

    Each daemon serves NAME.ctl in the run directory; this asks each one.
    """
    directory = rundir or default_rundir()
    services = [n if n.endswith(CONTROL_SUFFIX) else n + CONTROL_SUFFIX for n in names]
    if not services:
        try:
            services = _control_services(directory)
        except IPCError as exc:
            raise click.ClickException(str(exc)) from None
        if not services:
            raise click.ClickException(f"no daemon control service (*.ctl) in {directory}")
    answers: dict[str, dict[str, Any]] = {}
    failed = False
    with Context(rundir_path=directory) as ctx:
        for name in services:
            try:
                answers[name] = query(ctx, name, timeout)
            except (IPCError, OSError, TimeoutError) as exc:
                answers[name] = {"error": str(exc)}
                failed = True
    if as_json:
        click.echo(json.dumps(answers, indent=2, sort_keys=True))
    else:
        rows = [{"service": n, **summarize(a)} for n, a in answers.items() if "error" not in a]
        if rows:
            click.echo(_table(rows))
        for name, answer in answers.items():
            if "error" in answer:
                click.echo(f"{name}: {answer['error']}", err=True)
    if failed:
        raise SystemExit(1)
