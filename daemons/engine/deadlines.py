"""Requests with a deadline: a local client that owes us a request."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["RequestDeadlines"]

log = logging.getLogger("ipc.daemon")


class RequestDeadlines:
    """Local clients of one of our services that owe us a request.

    Why: a Unix client that connects and never sends its look-up (ipcd), its
    URI (the outbound side) or its command (``NAME.ctl``) would hold a
    descriptor forever. Each client gets the daemon's handshake timeout; the
    timer carries a token, so it never closes a newer client that reused the
    descriptor number.
    """

    def __init__(self, daemon: Daemon, service: str) -> None:
        self.daemon = daemon
        self.service = service
        self._timers: dict[int, tuple[object, Any]] = {}

    def start(self, fd: int) -> None:
        """(Re)start ``fd``'s deadline."""
        self.done(fd)
        token = object()
        handle = self.daemon.ctx.call_later(
            self.daemon.handshake_timeout, lambda: self._expire(fd, token)
        )
        self._timers[fd] = (token, handle)

    def done(self, fd: int) -> bool:
        """The request came (or the client left); True if ``fd`` was waiting."""
        entry = self._timers.pop(fd, None)
        if entry is None:
            return False
        entry[1].cancel()
        return True

    def __contains__(self, fd: object) -> bool:
        return fd in self._timers

    def _expire(self, fd: int, token: object) -> None:
        entry = self._timers.get(fd)
        if entry is None or entry[0] is not token:
            return
        del self._timers[fd]
        daemon = self.daemon
        daemon.metrics.local_timeouts.inc(service=self.service)
        more = daemon._throttle(f"local {self.service}").due()
        if more is not None:
            log.warning(
                "%s: a local client of %r sent nothing within %g s; closing it%s",
                daemon.name,
                self.service,
                daemon.handshake_timeout,
                more,
            )
        daemon.ctx.close(fd)
