"""The exception tree of ipc_core, split by blame.

    IPCError                      root: catch this to catch everything
    ├── UsageError                the caller did something wrong (bad name, unknown fd)
    │   └── InvalidServiceName
    ├── ServiceError              the local system refused (service busy, missing, rundir)
    │   ├── RunDirectoryError     the run directory is unusable or unsafe (link, owner, mode)
    │   ├── ServiceBusy           another instance holds the service lock
    │   └── ServiceUnavailable    nothing listens under that name / route failed
    ├── ProtocolError             a peer broke the protocol (bad frame, oversize length)
    │   └── MessageTooLarge
    ├── PeerClosed                the peer went away (EOF, reset); not a bug of anyone's
    └── PeerNotReading            the peer stopped reading (send queue hard limit, linger)

A misbehaving peer never makes ``Context.wait_event`` raise: the loop turns
ProtocolError / PeerClosed into a DISCONNECTION event plus a log line. These
exceptions surface only from calls that act on one peer directly
(``Context.read``, ``connect_service``) or from Sans-I/O objects.
"""

from __future__ import annotations


class IPCError(Exception):
    """Root of every exception raised by ipc_core."""


class UsageError(IPCError):
    """The caller used the API wrongly (unknown descriptor, bad argument)."""


class InvalidServiceName(UsageError, ValueError):
    """A service name that cannot be a socket file in the run directory."""


class ServiceError(IPCError):
    """The local system could not provide or reach a service."""


class RunDirectoryError(ServiceError):
    """The run directory cannot be used: missing, unreadable, or unsafe (a
    symbolic link, another user's, writable by others). The message says to
    set ``RUNDIR``."""


class ServiceBusy(ServiceError):
    """Another live instance already holds the service's lock file."""


class ServiceUnavailable(ServiceError):
    """No service answers under that name (or the route to it failed)."""


class ProtocolError(IPCError):
    """A peer sent bytes that break the protocol; its connection must close."""


class MessageTooLarge(ProtocolError):
    """A peer announced a message longer than the configured maximum."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"message of {length} bytes announced, limit is {limit}")
        self.length = length
        self.limit = limit
        self.valid_bytes = 0  # bytes of the scanned chunk before the bad header


class PeerClosed(IPCError):
    """The peer closed the connection (EOF or reset)."""


class PeerNotReading(IPCError):
    """The peer stopped reading: what is queued for it passed the hard limit,
    or a flushing close found it still unread at the linger deadline."""
