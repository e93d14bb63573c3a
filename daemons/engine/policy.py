"""Which local services a network peer may reach.

The reference TCPd is an open relay to *any* local service; we are not.
:class:`ServiceAccess` holds ``--allow``/``--deny`` and the protected names;
:func:`network_refusal` adds what the run directory says (services marked
``local-only``); :func:`policy_summary` and :func:`exposure_warning` say it
in the start-up log.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ipc_core import InvalidServiceName, is_local_only, validate_name

__all__ = [
    "DEFAULT_PROTECTED",
    "MAX_SERVICE_NAME_BYTES",
    "NEVER_REACHABLE",
    "ServiceAccess",
    "exposure_warning",
    "network_refusal",
    "policy_summary",
    "service_name_error",
]


#: Services a network peer reaches only when ``--allow`` names them exactly
#: (no glob unlocks them): the router and the protocol daemons under the
#: reference's default names. Our own routers and outbound sides are also
#: recognised under any name, by the ``local-only`` mark in their lock file
#: (:func:`network_refusal`); these names cover the reference's daemons, which
#: write no mark.
DEFAULT_PROTECTED: tuple[str, ...] = ("ipc", "tcp", "tls", "ws", "wss")
#: Names a network peer never reaches, whatever ``--allow`` says: the daemons'
#: control services (counters, for ``ipc status``) and lock files.
NEVER_REACHABLE: tuple[str, ...] = ("*.ctl", "*.lock", "*.door")
#: The policy on top of the library's rule: a name a peer sends is at most
#: this many UTF-8 bytes, whatever the run directory would allow.
MAX_SERVICE_NAME_BYTES = 100
#: The shortest run directory: with it, the library's socket-path rule checks
#: the name alone (a remote host's service, whose run directory is not ours).
_NAME_ALONE = Path("/")


def service_name_error(name: str, directory: Path | None = None) -> str | None:
    """Return why ``name`` cannot be a service name, or None if it can.

    One rule, the library's (:func:`ipc_core.validate_name`: not empty, no
    ``/``, not ``.``/``..``, no control character, short enough for a socket
    path in ``directory``), plus the policy: valid UTF-8 of at most
    :data:`MAX_SERVICE_NAME_BYTES` bytes. ``directory`` None judges the name
    alone (a service on another host).
    """
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return f"service name {name!r} is not valid UTF-8"
    if size > MAX_SERVICE_NAME_BYTES:
        return f"service name is {size} bytes long, the limit is {MAX_SERVICE_NAME_BYTES}"
    try:
        validate_name(name, _NAME_ALONE if directory is None else directory)
    except InvalidServiceName as exc:
        return str(exc)
    return None


@dataclass(frozen=True, init=False)
class ServiceAccess:
    """Which local services a remote peer may ask for.

    Rules, in order:

    1. an invalid name is refused;
    2. a name matching :data:`NEVER_REACHABLE` (``*.ctl``, ``*.lock``, ``*.door``)
       is refused;
    3. a name matching a ``deny`` glob is refused (deny wins);
    4. a *protected* name (:data:`DEFAULT_PROTECTED`, plus whatever a daemon
       adds with :meth:`protect`, e.g. its own ``--service-name``) is allowed
       only if ``allow`` holds that exact name: a glob never unlocks it
       (``--allow 't*'`` does not expose ``tcp``);
    5. with an empty ``allow`` list everything else is allowed, otherwise the
       name must match one ``allow`` glob.

    Globs are :func:`fnmatch.fnmatchcase` (case-sensitive, like file names).
    This is the static part of the policy; :func:`network_refusal` adds what
    the run directory says (services marked ``local-only``).
    """

    allow: tuple[str, ...]
    deny: tuple[str, ...]
    protected: tuple[str, ...]

    def __init__(
        self,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        protected: Iterable[str] = DEFAULT_PROTECTED,
    ) -> None:
        object.__setattr__(self, "allow", tuple(allow))
        object.__setattr__(self, "deny", tuple(deny))
        object.__setattr__(self, "protected", tuple(protected))

    def protect(self, *names: str) -> ServiceAccess:
        """Return a copy that also protects ``names``."""
        extra = tuple(n for n in names if n not in self.protected)
        return ServiceAccess(self.allow, self.deny, self.protected + extra)

    def names_exactly(self, name: str) -> bool:
        """True if ``--allow`` gives ``name`` itself (not a glob matching it)."""
        return name in self.allow

    def check(self, name: str) -> str | None:
        """Return None if ``name`` may be reached, else the reason it may not."""
        reason = service_name_error(name)
        if reason:
            return reason
        for pattern in NEVER_REACHABLE:
            if fnmatch.fnmatchcase(name, pattern):
                return f"service {name!r} is never reachable from the network ({pattern})"
        for pattern in self.deny:
            if fnmatch.fnmatchcase(name, pattern):
                return f"service {name!r} is denied (--deny {pattern})"
        if name in self.protected:
            if self.names_exactly(name):
                return None
            return f"service {name!r} is protected; allow it explicitly (--allow {name})"
        if self.allow and not any(fnmatch.fnmatchcase(name, p) for p in self.allow):
            return f"service {name!r} is not in the allow list"
        return None


def network_refusal(
    access: ServiceAccess, name: str, directory: Path, *, marks: frozenset[str] | None = None
) -> str | None:
    """Why a network peer may not reach ``name`` in run directory ``directory``,
    or None if it may.

    :meth:`ServiceAccess.check`, then the run directory: a service whose lock
    holds the ``local-only`` mark (a router or the outbound side of a protocol
    daemon, under whatever name it was started) would make this daemon an open
    relay, so only an exact ``--allow NAME`` lets a peer reach it. ``marks``:
    the lock's marks when the caller has read them already (one read per
    connection, not two).
    """
    reason = access.check(name)
    if reason is None and not access.names_exactly(name) and _local_only(name, directory, marks):
        reason = (
            f"service {name!r} is local-only (a router or an outbound side); "
            f"allow it explicitly (--allow {name})"
        )
    return reason


def _local_only(name: str, directory: Path, marks: frozenset[str] | None) -> bool:
    if marks is None:
        return is_local_only(name, directory)
    return "local-only" in marks  # the lock mark (docs/protocol.md)


def policy_summary(access: ServiceAccess) -> str:
    """The allow/deny policy in one sentence, for the start-up log."""
    if access.allow:
        reach = "only " + ", ".join(access.allow)
    else:
        reach = (
            "every local service except the protected ones ("
            + ", ".join(access.protected)
            + "), local-only ones and *.ctl"
        )
    text = f"network peers may reach {reach}"
    if access.deny:
        text += "; never " + ", ".join(access.deny)
    return text


def exposure_warning(exposed: Sequence[str], access: ServiceAccess) -> str | None:
    """The warning for listeners other hosts reach with no ``--allow``
    list, or None (loopback only, or an allow list names what is served)."""
    if not exposed or access.allow:
        return None
    where = ", ".join(exposed)
    return (
        f"listening on {where}, reachable from other hosts, with no --allow: "
        "every local service but the protected ones is published; name the "
        "services to serve with --allow NAME (or listen on 127.0.0.1)"
    )
