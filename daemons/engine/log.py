"""Logging for every daemon: human, journald-friendly or JSON lines on stderr.

:func:`setup_logging` installs the handler; :func:`escape_log_text` keeps
whatever a peer sends on one line; :class:`LogThrottle` keeps a recurring
refusal from flooding the log; :func:`plural` makes lines read as sentences.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = ["LOG_EVERY", "LOG_FORMATS", "LogThrottle", "escape_log_text", "plural", "setup_logging"]

#: Seconds between two log lines about the same recurring refusal or error.
LOG_EVERY = 5.0


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


class LogThrottle:
    """At most one log line per ``interval`` seconds for a recurring condition.

    Why: a peer can repeat a refusal (a flood from one address, a descriptor
    limit retried every 100 ms) faster than anyone reads logs. :meth:`due`
    says whether to log now, and how many lines were held back since.
    """

    def __init__(self, interval: float = LOG_EVERY) -> None:
        self.interval = interval
        self._last = -math.inf
        self._held = 0

    def due(self) -> str | None:
        """None: stay quiet; else a suffix for the line ("" or " (N more ...)")."""
        now = time.monotonic()
        if now - self._last < self.interval:
            self._held += 1
            return None
        more = f" ({self._held} more since the last report)" if self._held else ""
        self._last, self._held = now, 0
        return more


def plural(count: int, noun: str) -> str:
    """``1 connection``, ``2 connections``: log lines read as sentences."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
