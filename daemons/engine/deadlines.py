"""Requests with a deadline: "this must happen by then, else give up".

Why one helper: a network peer in its handshake, an outbound attempt, an
ipcd look-up and a local client that owes us its request are the same idea.
Each keeps one timer per key (a descriptor); :meth:`Deadlines.done` cancels
it on every path that forgets the key. A timer that fires after its entry
was replaced or done does nothing: the timer carries its entry, so a
descriptor number reused by a newer connection is never closed by an older
deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

from ipc_core import Context, TimerHandle

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["Deadlines", "RequestDeadlines"]

log = logging.getLogger("ipc.daemon")

K = TypeVar("K", bound=Hashable)


class _Entry:
    __slots__ = ("handle", "on_expire")

    def __init__(self, on_expire: Callable[[], None]) -> None:
        self.on_expire = on_expire
        self.handle: TimerHandle | None = None


class Deadlines(Generic[K]):
    """One deadline per key, on a Context's timers."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._entries: dict[K, _Entry] = {}

    def start(self, key: K, seconds: float, on_expire: Callable[[], None]) -> None:
        """(Re)start ``key``'s deadline: ``on_expire()`` in ``seconds`` unless
        :meth:`done` comes first."""
        self.done(key)
        entry = _Entry(on_expire)
        entry.handle = self._ctx.call_later(seconds, lambda: self._fire(key, entry))
        self._entries[key] = entry

    def done(self, key: K) -> bool:
        """It happened (or was abandoned): True if ``key`` had a deadline."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        if entry.handle is not None:
            entry.handle.cancel()
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _fire(self, key: K, entry: _Entry) -> None:
        if self._entries.get(key) is not entry:
            return
        del self._entries[key]
        entry.on_expire()


class RequestDeadlines:
    """Local clients of one of our services that owe us a request.

    Why: a Unix client that connects and never sends its look-up (ipcd), its
    URI (the outbound side) or its command (``NAME.ctl``) would hold a
    descriptor forever. Each client gets the daemon's handshake timeout;
    one that misses it is counted, logged (throttled) and closed.
    """

    def __init__(self, daemon: Daemon, service: str) -> None:
        self.daemon = daemon
        self.service = service
        self._deadlines: Deadlines[int] = Deadlines(daemon.ctx)

    def start(self, fd: int) -> None:
        """(Re)start ``fd``'s deadline."""
        self._deadlines.start(fd, self.daemon.handshake_timeout, lambda: self._expire(fd))

    def done(self, fd: int) -> bool:
        """The request came (or the client left); True if ``fd`` was waiting."""
        return self._deadlines.done(fd)

    def __contains__(self, fd: object) -> bool:
        return fd in self._deadlines

    def _expire(self, fd: int) -> None:
        daemon = self.daemon
        daemon.metrics.local_timeouts.inc(service=self.service)
        more = daemon.throttle(f"local {self.service}").due()
        if more is not None:
            log.warning(
                "%s: a local client of %r sent nothing within %g s; closing it%s",
                daemon.name,
                self.service,
                daemon.handshake_timeout,
                more,
            )
        daemon.drop(fd)
