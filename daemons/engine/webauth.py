"""Tokens as a daemon uses them: ``--token-file`` and ``--token-secret``
loaded at start, re-read on SIGHUP, checked for one request.

Why a module apart from :mod:`daemons.engine.tokens`: that module is the
token formats and their checks, with no I/O beyond its two loaders; this one
is the glue a daemon needs around them (and ipc-websocketd would otherwise
carry): which flag a bad file belongs to (a start-up error names it and the
daemon exits 2), a reload that keeps the old table when the new file is bad
(and says why in the log), and one call that checks the token a request
carries for a service, with a log-safe reason. A token itself is never
logged: reasons come from :class:`~daemons.engine.tokens.TokenResult`, which
names the holder at most.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from .log import plural
from .tokens import (
    DEFAULT_SKEW,
    PresentedToken,
    TokenAuthority,
    TokenConfigError,
    TokenResult,
    TokenStatus,
    load_secret_file,
    load_token_file,
)

__all__ = ["TokenSetupError", "TokenSource"]

log = logging.getLogger("ipc.daemon.tokens")


class TokenSetupError(TokenConfigError):
    """A token file or secret file that cannot be used at start; ``flag``
    names the option (``--token-file``, ``--token-secret``)."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


class TokenSource:
    """The files behind a :class:`~daemons.engine.tokens.TokenAuthority`.

    Built with :meth:`open` (which raises :class:`TokenSetupError`), then
    :meth:`reload` on SIGHUP: each file is re-read; one that fails to load
    leaves its part (table or secret) as it was, with an error line naming
    the file and every problem. ``now`` is the clock of :meth:`check`
    (``time.time``; a test may pass its own).
    """

    def __init__(
        self,
        authority: TokenAuthority,
        token_file: Path | None,
        secret_file: Path | None,
        *,
        name: str = "ipc",
        now: Callable[[], float] = time.time,
    ) -> None:
        self.authority = authority
        self.token_file = token_file
        self.secret_file = secret_file
        self.name = name
        self.now = now

    @classmethod
    def open(
        cls,
        token_file: str | os.PathLike[str] | None,
        secret_file: str | os.PathLike[str] | None,
        *,
        name: str = "ipc",
        skew: float = DEFAULT_SKEW,
    ) -> TokenSource:
        """Load both files (either may be None, not both)."""
        if token_file is None and secret_file is None:
            raise TokenSetupError("--token-file", "no token file and no secret file")
        table = secret = None
        if token_file is not None:
            try:
                table = load_token_file(token_file)
            except TokenConfigError as exc:
                raise TokenSetupError("--token-file", str(exc)) from None
        if secret_file is not None:
            try:
                secret = load_secret_file(secret_file)
            except TokenConfigError as exc:
                raise TokenSetupError("--token-secret", str(exc)) from None
        authority = TokenAuthority(table, secret, skew=skew)
        return cls(
            authority,
            Path(token_file) if token_file is not None else None,
            Path(secret_file) if secret_file is not None else None,
            name=name,
        )

    def summary(self) -> str:
        """For the start-up line: what is checked."""
        parts = []
        if self.authority.table is not None:
            parts.append(f"{plural(len(self.authority.table), 'token')} from {self.token_file}")
        if self.authority.secret is not None:
            parts.append(f"signed tokens (secret {self.secret_file})")
        return " and ".join(parts)

    def reload(self) -> None:
        """SIGHUP: re-read the files; a bad one keeps what was loaded before."""
        if self.token_file is not None:
            try:
                table = load_token_file(self.token_file)
            except TokenConfigError as exc:
                log.error(
                    "%s: token reload failed, keeping the previous tokens: %s", self.name, exc
                )
            else:
                self.authority.replace_table(table)
                log.info(
                    "%s: reloaded %s from %s",
                    self.name,
                    plural(len(table), "token"),
                    self.token_file,
                )
        if self.secret_file is not None:
            try:
                self.authority.secret = load_secret_file(self.secret_file)
            except TokenConfigError as exc:
                log.error(
                    "%s: secret reload failed, keeping the previous secret: %s", self.name, exc
                )
            else:
                log.info("%s: reloaded the token secret from %s", self.name, self.secret_file)

    def check(self, presented: PresentedToken, service: str) -> TokenResult:
        """The verdict on the token a request carries (as found by
        :func:`~daemons.engine.tokens.find_token`) for ``service``."""
        if presented.problem is not None:
            return TokenResult(TokenStatus.BAD, presented.problem)
        return self.authority.check(presented.token, service, now=self.now())
