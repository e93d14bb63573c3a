"""The one way a daemon connects to a local service: non-blocking, never
waits, and every failure a :class:`LocalRefused` with its kind.

Used by the engine for network peers (after the access policy) and by ipcd
for look-ups. Clients (``ipc send``, ``ipc status``) use the library's
blocking :func:`ipc_core.connect_direct` instead: they have nothing else to do
while they wait.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ipc_core import IPCError, socket_path

from .errors import Failure, LocalRefused

__all__ = ["connect_local"]


def connect_local(name: str, rundir: Path) -> socket.socket:
    """A non-blocking socket connected to ``$RUNDIR/name``.

    Raises :class:`LocalRefused`: REFUSED for a name that cannot be a socket
    in ``rundir`` (the library's rule, :func:`ipc_core.validate_name`),
    UNKNOWN_SERVICE when nothing listens there, SERVICE_UNAVAILABLE when the
    service's backlog is full or no descriptor is left (the daemon keeps
    serving others either way).
    """
    try:
        path = socket_path(name, rundir)
    except IPCError as exc:  # e.g. too long for a socket path here
        raise LocalRefused(Failure.REFUSED, str(exc)) from None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:  # EMFILE/ENFILE
        raise LocalRefused(
            Failure.SERVICE_UNAVAILABLE, f"service {name!r}: {exc.strerror or exc}"
        ) from None
    sock.setblocking(False)
    try:
        sock.connect(os.fsencode(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise LocalRefused(Failure.UNKNOWN_SERVICE, f"no local service {name!r}") from None
    except OSError as exc:
        sock.close()
        why = "its backlog is full" if isinstance(exc, BlockingIOError) else exc.strerror
        raise LocalRefused(Failure.SERVICE_UNAVAILABLE, f"service {name!r}: {why or exc}") from None
    return sock
