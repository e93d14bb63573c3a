"""Descriptor passing over Unix sockets (SCM_RIGHTS), as the router needs.

Thin wrappers over ``socket.send_fds`` / ``socket.recv_fds`` that close
descriptors we did not ask for, so a hostile peer cannot leak fds into us.
"""

from __future__ import annotations

import os
import socket


def send_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    """Send ``data`` with one descriptor attached (``data`` must be non-empty)."""
    if not data:
        raise ValueError("descriptor passing needs at least one data byte")
    socket.send_fds(sock, [data], [fd])


def recv_fd(sock: socket.socket, bufsize: int = 4096) -> tuple[bytes, int | None]:
    """Receive data and at most one descriptor; extra descriptors are closed."""
    data, fds, _flags, _addr = socket.recv_fds(sock, bufsize, 4, socket.MSG_CMSG_CLOEXEC)
    for extra in fds[1:]:
        os.close(extra)
    return data, (fds[0] if fds else None)
