"""systemd integration without libsystemd: socket activation and sd_notify.

Both protocols are tiny and stable (see sd_listen_fds(3), sd_notify(3)), so
the stdlib does: activation is a few environment variables naming inherited
descriptors from fd 3 on; notification is one datagram on a Unix socket.
Everything degrades to a no-op when not running under systemd, so daemons
call these unconditionally.

Watchdog: when the unit sets ``WatchdogSec=``, call :func:`watchdog` at
least every ``watchdog_interval() / 2`` seconds from the event loop (a timer),
so a wedged loop gets the daemon restarted.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

__all__ = [
    "LISTEN_FDS_START",
    "listen_fds",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
_ACTIVATION_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(
    unset_environment: bool = True, environ: MutableMapping[str, str] | None = None
) -> list[tuple[socket.socket, str]]:
    """Return the sockets systemd passed us, with their ``FileDescriptorName=``.

    Returns ``[]`` unless ``LISTEN_PID`` is our pid (the variables may have
    been inherited from a parent that was the real target). Names default to
    ``"unknown"`` without ``LISTEN_FDNAMES``, as in sd_listen_fds_with_names(3).
    Sockets are returned non-blocking and close-on-exec. The variables are
    removed afterwards (so children do not see them) unless
    ``unset_environment`` is False. Raises ``ValueError`` on malformed
    variables, ``OSError`` if a passed descriptor is not a socket.
    """
    env = os.environ if environ is None else environ
    try:
        pid, count, names = (env.get(name) for name in _ACTIVATION_VARS)
    finally:
        if unset_environment:
            for name in _ACTIVATION_VARS:
                env.pop(name, None)
    if not pid or not count:
        return []
    if not pid.isdigit() or not count.isdigit():
        raise ValueError(f"malformed LISTEN_PID={pid!r} / LISTEN_FDS={count!r}")
    if int(pid) != os.getpid():
        return []
    n = int(count)
    labels = names.split(":") if names is not None else ["unknown"] * n
    if len(labels) != n:
        raise ValueError(f"LISTEN_FDNAMES has {len(labels)} names for {n} descriptors")
    result: list[tuple[socket.socket, str]] = []
    for fd, label in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + n), labels, strict=True):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        result.append((sock, label))
    return result


def _notify_address(env: Mapping[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    if path.startswith("/"):
        return path
    return None  # unset, or a transport we do not speak (vsock:)


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE``) to the service manager.

    Returns False when not under systemd or if sending failed (logged at
    debug level): a daemon must keep working without a manager.
    """
    address = _notify_address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.debug("sd_notify(%r) failed: %s", state, exc)
        return False
    return True


def ready(status_text: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """READY=1: start-up finished (``Type=notify`` units wait for this)."""
    state = "READY=1" if status_text is None else f"READY=1\nSTATUS={status_text}"
    return notify(state, environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: shutdown started."""
    return notify("STOPPING=1", environ)


def reloading(environ: Mapping[str, str] | None = None) -> bool:
    """RELOADING=1 with MONOTONIC_USEC (``Type=notify-reload`` needs both);
    send :func:`ready` when the reload is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """STATUS=...: the one-line state shown by ``systemctl status``."""
    return notify(f"STATUS={text}", environ)


def watchdog(environ: Mapping[str, str] | None = None) -> bool:
    """WATCHDOG=1: the keep-alive ping."""
    return notify("WATCHDOG=1", environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds of the watchdog timeout (``WATCHDOG_USEC``), or None if disabled
    or meant for another process (``WATCHDOG_PID``). Ping twice as often."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000
