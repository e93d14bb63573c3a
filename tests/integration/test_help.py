"""``--help`` of every command, in one style, and numeric flags validated.

Walks click's own objects (every command of ``ipc``, ``ipcd``, ``ipc-tcpd``,
``ipc-tlsd``, ``ipc-websocketd``): each help page has an ``Examples:``
block, every option a description, the daemons' options their environment
variable and defaults, and metavars from one vocabulary. Every numeric
option refuses a negative, a non-finite or an over-large value with exit
status 2, and a bad value from the environment names the variable.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterator

import click
import pytest

from daemons import httpd, ipc, ipcd, tcpd, tlsd, websocketd
from tests.helpers import BIN

#: Daemons: every option is an environment variable ``PREFIX_OPTION``.
DAEMONS: dict[str, click.Command] = {
    "ipcd": ipcd.main,
    "ipc-tcpd": tcpd.main,
    "ipc-tlsd": tlsd.main,
    "ipc-websocketd": websocketd.main,
    "ipc-httpd": httpd.main,
}
#: click's generic metavars, which say nothing about units.
GENERIC_METAVARS = ("TEXT", "FLOAT", "INTEGER", "PATH", "RANGE")
#: Numeric options the command checks itself (one line, exit 1; see
#: tests/unit/daemons/test_certs.py): ``--days`` of the certificates may be
#: negative on purpose (an expired certificate, for tests).
CHECKED_BY_THE_COMMAND = {
    ("ipc cert ca", "days"),
    ("ipc cert server", "days"),
    ("ipc cert client", "days"),
    ("ipc cert crl", "days"),
}
#: Placeholder values for required arguments, so that parsing reaches the options.
ARGUMENTS = {"name": "pong", "message": "hi", "names": "x", "cn": "x", "file": __file__}


def _walk(name: str, command: click.Command) -> Iterator[tuple[str, click.Command]]:
    yield name, command
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=name)
        for sub in command.list_commands(ctx):
            yield from _walk(f"{name} {sub}", command.get_command(ctx, sub))


def all_commands() -> list[tuple[str, click.Command]]:
    return [*_walk("ipc", ipc.main), *DAEMONS.items()]


COMMANDS = all_commands()
IDS = [name for name, _ in COMMANDS]


def _help(name: str, command: click.Command) -> str:
    parent = None
    if " " in name:  # a subcommand inherits its group's settings (show_default)
        parent = ipc.main.make_context("ipc", [], resilient_parsing=True)
    ctx = command.make_context(name, [], parent=parent, resilient_parsing=True)
    return command.get_help(ctx)


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option)]


def test_every_command_is_a_libipc_command() -> None:
    """The shared class: environment errors name the variable, env vars shown."""
    from daemons.engine.options import LibipcCommand, LibipcGroup

    for name, command in COMMANDS:
        kind = LibipcGroup if isinstance(command, click.Group) else LibipcCommand
        assert isinstance(command, kind), name


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=IDS)
def test_help_has_examples_and_every_option_a_description(
    name: str, command: click.Command
) -> None:
    text = _help(name, command)
    assert "\nExamples:\n" in text.replace("  Examples:", "Examples:"), text
    assert f"\n    {name.split()[0]}" in text or "ipc " in text, "examples use the command"
    summary = (command.help or "").strip().splitlines()
    assert summary and summary[0].endswith((".", ")")), f"{name}: first line is the summary"
    for option in _options(command):
        assert option.help and option.help.strip(), f"{name} {option.opts[0]}: no help text"
    for word in GENERIC_METAVARS:
        assert f" {word}" not in text.split("Examples:")[0], f"{name}: generic metavar {word}"


@pytest.mark.parametrize(("name", "command"), list(DAEMONS.items()), ids=list(DAEMONS))
def test_daemon_help_shows_env_vars_defaults_and_listen_address(
    name: str, command: click.Command
) -> None:
    text = " ".join(_help(name, command).split())  # unwrapped
    prefix = command.context_settings["auto_envvar_prefix"]
    for option in _options(command):
        env = option.envvar or f"{prefix}_{option.name.upper()}"
        first = env if isinstance(env, str) else env[0]
        assert first in text, f"{name} {option.opts[0]}: env var {first} not shown"
        default = option.default
        if isinstance(default, int | float | str) and default not in (False, 0, ""):
            assert f"default: {default}" in text, f"{name} {option.opts[0]}: default not shown"
    if name != "ipcd":
        expected = {
            "ipc-tcpd": "9000",
            "ipc-tlsd": "9443",
            "ipc-websocketd": "8080",
            "ipc-httpd": "8000",
        }[name]
        assert f"else 127.0.0.1:{expected}" in text or f"else :{expected}" in text


def test_installed_commands_show_the_same_help() -> None:
    """The console scripts, as a user runs them (one subprocess each)."""
    for program in ("ipc", "ipcd", "ipc-tcpd", "ipc-tlsd", "ipc-websocketd"):
        out = subprocess.run(
            [str(BIN / program), "--help"], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert "Examples:" in out.stdout and "Traceback" not in out.stderr


# --------------------------------------------------------------------------
# Numeric options
# --------------------------------------------------------------------------


def _numeric() -> list[tuple[str, click.Command, click.Option]]:
    found = []
    for name, command in COMMANDS:
        for option in _options(command):
            if option.count or option.is_flag:
                continue
            if (name, option.name) in CHECKED_BY_THE_COMMAND:
                continue
            if isinstance(option.type, click.types.IntParamType | click.types.FloatParamType):
                found.append((name, command, option))
    return found


NUMERIC = _numeric()


def _parse(name: str, command: click.Command, args: list[str]) -> None:
    """Parse ``args`` as the command would, without running it."""
    arguments = [
        ARGUMENTS[p.name] for p in command.params if isinstance(p, click.Argument) and p.required
    ]
    command.make_context(name, [*args, *arguments])


def _bad_values(option: click.Option) -> list[str]:
    bad = ["1e400", "nan"] if isinstance(option.type, click.types.FloatParamType) else []
    if isinstance(option.type, click.types._NumberRangeBase) and option.type.max is not None:
        bad.append(str(option.type.max * 2 + 1))
    else:
        bad.append("1" + "0" * 30)
    return bad


def test_numeric_options_found() -> None:
    """The walk is not vacuous: the options of the issue are in it."""
    names = {(n, o.name) for n, _c, o in NUMERIC}
    for expected in [
        ("ipc-tcpd", "connect_timeout"),
        ("ipcd", "timeout"),
        ("ipc send", "timeout"),
        ("ipc status", "timeout"),
        ("ipc pongd", "max_message_size"),
        ("ipc-tlsd", "handshake_timeout"),
        ("ipc-websocketd", "max_connections"),
    ]:
        assert expected in names


@pytest.mark.parametrize(
    ("name", "command", "option"),
    NUMERIC,
    ids=[f"{n} {o.opts[0]}" for n, _c, o in NUMERIC],
)
def test_numeric_option_refuses_out_of_range(
    name: str, command: click.Command, option: click.Option
) -> None:
    flag = option.opts[0]
    assert isinstance(option.type, click.types._NumberRangeBase), f"{name} {flag}: no range"
    for value in [*_bad_values(option), "-1"]:
        with pytest.raises(click.BadParameter) as info:
            _parse(name, command, [flag, value])
        assert info.value.exit_code == 2
    if isinstance(option.type, click.FloatRange):
        default = option.default
        assert default is not None and math.isfinite(default)


@pytest.mark.parametrize(
    ("program", "variable", "flag"),
    [
        ("ipc-tcpd", "IPC_TCPD_HANDSHAKE_TIMEOUT", "--handshake-timeout"),
        ("ipc-tcpd", "IPC_TCPD_CONNECT_TIMEOUT", "--connect-timeout"),
        ("ipcd", "IPCD_TIMEOUT", "--timeout"),
        ("ipc-tlsd", "IPC_TLSD_MAX_CONNECTIONS", "--max-connections"),
    ],
)
def test_bad_environment_value_names_the_variable(
    program: str, variable: str, flag: str, tmp_path
) -> None:
    out = subprocess.run(
        [str(BIN / program)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "RUNDIR": str(tmp_path), variable: "abc"},
    )
    assert out.returncode == 2, out.stderr
    assert f"environment variable {variable}" in out.stderr
    assert flag not in out.stderr.split("Error:")[-1]
    assert "Traceback" not in out.stderr


def test_negative_flag_values_are_refused_by_the_programs(tmp_path) -> None:
    """The two cases of the issue, as a user types them."""
    for argv in (["ipc-tcpd", "--connect-timeout", "-1"], ["ipcd", "--timeout", "-5"]):
        out = subprocess.run(
            [str(BIN / argv[0]), *argv[1:], "--rundir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 2, out.stderr
        assert f"Invalid value for '{argv[1]}'" in out.stderr


# -- one source of truth: --version, --rundir, start-up failures (issue 13) ---------


@pytest.mark.parametrize("program", ["ipc", "ipcd", "ipc-tcpd", "ipc-tlsd", "ipc-websocketd"])
def test_every_program_prints_its_version(program: str) -> None:
    """``PROG, version X`` from the installed distribution's metadata."""
    import importlib.metadata

    out = subprocess.run(
        [str(BIN / program), "--version"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{program}, version {importlib.metadata.version('libipc')}\n"


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=IDS)
def test_every_command_has_version(name: str, command: click.Command) -> None:
    assert "--version" in _help(name, command)


def test_rundir_is_declared_once() -> None:
    """Every command that takes --rundir takes the same one: $RUNDIR, a Path."""
    from pathlib import Path

    from daemons import demo

    found = []
    for name, command in [*COMMANDS, ("demo", demo.main)]:
        for param in command.params:
            if param.name == "rundir":
                found.append(name)
                assert isinstance(param, click.Option) and param.envvar == "RUNDIR", name
                assert isinstance(param.type, click.Path), name
                assert param.type.type is Path, name
                assert param.metavar == "DIR", name
    assert {"ipcd", "ipc-tcpd", "ipc-tlsd", "ipc-websocketd", "ipc status", "demo"} <= set(found)


@pytest.mark.parametrize(("name", "command"), list(DAEMONS.items()), ids=list(DAEMONS))
def test_a_startup_error_is_one_line_naming_the_program(name: str, command: click.Command) -> None:
    """Wherever a daemon's start fails, the one place that reports it says
    ``PROG: reason`` and exits 1: no traceback, no click ``Error:`` style."""
    from click.testing import CliRunner

    from daemons.engine.errors import StartupError

    def fail(*_args: object, **_kwargs: object) -> None:
        raise StartupError("--listen 192.0.2.1:9: address not available on this host")

    original = command.callback
    command.callback = fail
    try:
        result = CliRunner().invoke(command, [], prog_name="whatever")
    finally:
        command.callback = original
    assert result.exit_code == 1
    assert result.output == f"{name}: --listen 192.0.2.1:9: address not available on this host\n"


TLS_SERVER_FLAGS = ("cert", "key", "client_ca", "allow_client", "min_tls", "ciphers", "crl")


def test_the_tls_server_flags_are_declared_once() -> None:
    """ipc-tlsd and ipc-websocketd (wss) take the same TLS server flags, with
    the same types and words, and refuse the same contradictions alike."""
    from click.testing import CliRunner

    def flags(command: click.Command) -> dict[str, tuple[object, ...]]:
        return {
            p.name: (tuple(p.opts), type(p.type), p.metavar, p.multiple)
            for p in command.params
            if isinstance(p, click.Option) and p.name in TLS_SERVER_FLAGS
        }

    assert flags(tlsd.main) == flags(websocketd.main)
    assert set(flags(tlsd.main)) == set(TLS_SERVER_FLAGS)
    allow_help = {
        p.help for c in (tlsd.main, websocketd.main) for p in c.params if p.name == "allow_client"
    }
    assert len(allow_help) == 1
    args = ["--cert", "c.pem", "--key", "k.pem", "--allow-client", "CN:x"]
    outputs = {
        CliRunner().invoke(c, args).output.splitlines()[-1] for c in (tlsd.main, websocketd.main)
    }
    assert len(outputs) == 1, outputs
    assert "--allow-client needs --client-ca" in outputs.pop()
