"""``ipc token``: signed tokens for ipc-websocketd, without openssl.

Why: ipc-websocketd ``--token-secret FILE`` admits a browser that presents a
token signed with the secret in FILE (:mod:`daemons.engine.tokens`). A web
application mints them itself; these commands are the same flow for an
operator and for scripts:

* ``ipc token secret FILE``: a new random secret, mode 0600, never over an
  existing file (that would silently invalidate every token in use);
* ``ipc token new``: one token on stdout and nothing else (``$(...)``);
* ``ipc token check``: who a token names, for which services, until when,
  or why it is refused (exit status 1).

A secret file that others may read is refused with the library's message
(exit status 2, like any bad argument); no command prints a traceback.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from .engine.options import LibipcGroup, help_epilog
from .engine.tokens import (
    DEFAULT_SKEW,
    TokenConfigError,
    TokenStatus,
    load_secret_file,
    mint,
    verify_signed,
)

__all__ = ["MAX_TTL", "parse_duration", "parse_time", "token"]

#: The longest lifetime ``ipc token new`` mints: a token cannot be revoked
#: (only the secret can be changed), so "forever" is not offered.
MAX_TTL = 366 * 86400
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"([0-9]{1,9})([smhd]?)")
#: Bytes of randomness in a new secret (written as base64url text: the web
#: application and the daemon both use the file's text as the HMAC key).
SECRET_BYTES = 48


def parse_duration(text: str) -> int:
    """Seconds in ``30``, ``90s``, ``15m``, ``12h`` or ``7d``; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (a number with s, m, h or d: 15m, 12h, 7d)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_time(text: str, now: float) -> int:
    """A Unix time from ``@1767225600``, an ISO 8601 date-time (UTC when it
    names no zone) or a duration from ``now`` (``10m``); ValueError otherwise."""
    text = text.strip()
    if text.startswith("@") and text[1:].isdigit() and len(text) <= 13:
        return int(text[1:])
    if _DURATION.fullmatch(text.lower()):
        return int(now) + parse_duration(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time (2026-01-31T09:00:00Z, @UNIX_SECONDS, or 10m from now)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


class Duration(click.ParamType):
    """``--ttl``: a duration with a unit, more than 0 and at most 366 days."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if not 0 < seconds <= MAX_TTL:
            self.fail(f"{value!r}: a lifetime is more than 0 and at most 366d", param, ctx)
        return seconds


class When(click.ParamType):
    """``--not-before``: kept as text, resolved against the same ``now`` as the TTL."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            parse_time(str(value), time.time())
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


def _secret(path: Path) -> bytes:
    """The secret in ``path``, or a usage error (exit 2) saying what is wrong."""
    try:
        return load_secret_file(path)
    except TokenConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="'--secret-file'") from None


def _utc(timestamp: float) -> str:
    moment = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(seconds: float) -> str:
    whole = int(abs(seconds))
    if whole >= 86400:
        return f"{whole // 86400} d {whole % 86400 // 3600} h"
    if whole >= 3600:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    if whole >= 60:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole} s"


_secret_file_option = click.option(
    "--secret-file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="The secret ipc-websocketd --token-secret reads (make one: ipc token secret FILE).",
)


@click.group(
    name="token",
    cls=LibipcGroup,
    epilog=help_epilog(
        [
            ("ipc token secret /etc/libipc/token.secret", "a new random secret, mode 0600"),
            (
                "ipc token new --secret-file /etc/libipc/token.secret \\\n"
                "--name alice --service pong --ttl 1h",
                "a token for alice, valid for pong during an hour",
            ),
            ("ipc token check --secret-file /etc/libipc/token.secret TOKEN", "whose, until when"),
        ],
        [
            "ipc-websocketd --token-secret FILE admits a browser that presents such a token "
            "(?token=T in the URL, the ipc_token cookie, or the subprotocol ipc.token.T)."
        ],
    ),
)
def token() -> None:
    """Signed tokens for ipc-websocketd --token-secret (mint, check)."""


@token.command(
    name="secret",
    epilog=help_epilog(
        [
            ("ipc token secret token.secret", "64 random characters in token.secret, mode 0600"),
            (
                "install -d -m 0750 -g www-data /etc/libipc/secret && \\\n"
                "ipc token secret /etc/libipc/secret/token && "
                "chgrp www-data /etc/libipc/secret/token && chmod 0640 /etc/libipc/secret/token",
                "shared with a web application through its group",
            ),
        ],
        ["An existing FILE is never overwritten: tokens signed with it would stop working."],
    ),
)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE")
def secret_command(file: Path) -> None:
    """Create FILE holding a new random secret (mode 0600)."""
    text = secrets.token_urlsafe(SECRET_BYTES) + "\n"
    try:
        fd = os.open(
            file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
    except FileExistsError:
        raise click.BadParameter(
            f"{file} exists; not overwritten (tokens signed with it would stop working)",
            param_hint="'FILE'",
        ) from None
    except OSError as exc:
        raise click.BadParameter(f"{file}: {exc.strerror}", param_hint="'FILE'") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask said
        os.write(fd, text.encode("ascii"))
    except OSError as exc:
        os.close(fd)
        file.unlink(missing_ok=True)
        raise click.ClickException(f"{file}: {exc.strerror}") from None
    os.close(fd)


@token.command(
    name="new",
    epilog=help_epilog(
        [
            (
                "ipc token new --secret-file token.secret --name alice --service pong --ttl 1h",
                "prints v1.eyJuIjoi...  (the token, nothing else)",
            ),
            (
                "T=$(ipc token new --secret-file token.secret --name bob \\\n"
                "--service 'chat-*' --service pong --ttl 7d)",
                "bob may reach pong and every chat-... service for a week",
            ),
            (
                "ipc token new --secret-file token.secret --name carol --service pong \\\n"
                "--ttl 2h --not-before 2026-03-01T09:00:00Z",
                "valid from 09:00 UTC on March 1 for two hours",
            ),
        ],
        [
            "A token cannot be revoked before it expires (change the secret to revoke every "
            "token at once): keep lifetimes short. TIME is an ISO 8601 date-time (UTC unless "
            "it names a zone), @UNIX_SECONDS, or a duration from now (10m)."
        ],
    ),
)
@_secret_file_option
@click.option(
    "--name",
    required=True,
    metavar="NAME",
    help="Who the token is for (the services see it as token_name; logged).",
)
@click.option(
    "--service",
    "services",
    required=True,
    multiple=True,
    metavar="NAME",
    help="A service the token opens, or a pattern ('chat-*'). Repeatable.",
)
@click.option(
    "--ttl",
    type=Duration(),
    default="1h",
    help="Lifetime, counted from --not-before if given, else from now: 90s, 15m, 12h, "
    "7d (at most 366d).",
)
@click.option(
    "--not-before",
    type=When(),
    default=None,
    help="The token is refused before TIME.",
)
def new_command(
    secret_file: Path, name: str, services: Sequence[str], ttl: int, not_before: str | None
) -> None:
    """Print a new token signed with the secret in --secret-file."""
    secret = _secret(secret_file)
    now = time.time()
    start = parse_time(not_before, now) if not_before is not None else None
    try:
        text = mint(
            secret,
            name,
            list(services),
            now=now if start is None else start,
            ttl=ttl,
            not_before=start,
        )
    except TokenConfigError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(text)


@token.command(
    name="check",
    epilog=help_epilog(
        [
            ("ipc token check --secret-file token.secret v1.eyJuIjoi...", "name, services, expiry"),
            (
                'ipc token check --secret-file token.secret --service chat-1 "$T" '
                ">/dev/null && echo ok",
                "exit status 0 only if the token opens chat-1 now",
            ),
            ('echo "$T" | ipc token check --secret-file token.secret -', "the token from stdin"),
        ],
        [
            "Checked as ipc-websocketd checks it, with its default clock skew (60 s). "
            "Exit status 1 when the token is refused; the reason is printed."
        ],
    ),
)
@_secret_file_option
@click.option(
    "--service",
    default=None,
    metavar="NAME",
    help="Also check that the token opens service NAME (else any service will do).",
)
@click.argument("token_text", metavar="TOKEN")
def check_command(secret_file: Path, service: str | None, token_text: str) -> None:
    """Say whose TOKEN is and until when, or why it is refused."""
    secret = _secret(secret_file)
    if token_text == "-":
        token_text = sys.stdin.readline(8192).strip()
    now = time.time()
    # Without --service any service will do: a name no pattern can match,
    # and WRONG_SERVICE then counts as valid.
    result = verify_signed(token_text.strip(), secret, service or "/", now=now)
    acceptable = result.ok or (service is None and result.status is TokenStatus.WRONG_SERVICE)
    if not acceptable:
        click.echo(f"refused ({result.status.value}, HTTP {result.http_status}): {result.reason}")
        if result.name is not None:
            _describe(result.name, result.services, result.expires, _not_before(token_text), now)
        sys.exit(1)
    click.echo("valid" + (f" for {service}" if service else ""))
    assert result.name is not None
    _describe(result.name, result.services, result.expires, _not_before(token_text), now)


def _describe(
    name: str, services: Sequence[str], expires: int | None, not_before: int | None, now: float
) -> None:
    click.echo(f"name:       {name}")
    click.echo(f"services:   {', '.join(services)}")
    if not_before is not None:
        click.echo(f"not before: {_utc(not_before)}")
    if expires is not None:
        if expires >= now:
            when = f"in {_span(expires - now)}"
        else:
            grace = (
                " (still accepted within the clock skew)" if now - expires <= DEFAULT_SKEW else ""
            )
            when = f"{_span(now - expires)} ago{grace}"
        click.echo(f"expires:    {_utc(expires)} ({when})")


def _not_before(text: str) -> int | None:
    """The ``nbf`` of a token already verified (its payload is trusted JSON)."""
    body = text.strip().split(".")[1]
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    value = payload.get("nbf")
    return value if isinstance(value, int) else None
