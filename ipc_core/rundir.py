"""The run directory: where services live, how they are named and locked.

Every service is a Unix stream socket ``$RUNDIR/<name>`` (0660) guarded by an
exclusive ``flock`` on ``$RUNDIR/<name>.lock``. The lock, not the socket file,
says whether an instance is alive: a socket file whose lock is free was left
by a crashed instance and is replaced.

The lock file also carries the service's *marks*, one per line, for the
protocol daemons to read before they connect a network peer (the reference
leaves lock files empty, and an empty lock means no mark):

* ``local-only``: never reach this service from the network;
* ``peer-info``: the service wants to know who its clients are, so a daemon
  connects through its *door*, a second socket ``$RUNDIR/<name>.door``
  (same lock, same mode, removed with the service; see :mod:`ipc_core.door`).

Names ending in ``.door`` are therefore reserved: no service may take one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import (
    InvalidServiceName,
    RunDirectoryError,
    ServiceBusy,
    ServiceError,
    UsageError,
)

DEFAULT_RUNDIR = "/tmp/.libipc-run/"
RUNDIR_MODE = 0o770
SOCKET_UMASK = 0o117  # sockets come out 0660
LOCK_SUFFIX = ".lock"
#: A peer-information service's second socket: ``$RUNDIR/<name>.door``.
DOOR_SUFFIX = ".door"
LOCK_MODE = 0o660  # like the sockets: a group member can take over a stale lock
# The marks a service writes into its lock file, one per line (the reference
# leaves lock files empty): "never reach me from the network", "connect
# through my door and tell me who the client is".
LOCAL_ONLY_MARK = b"local-only"
PEER_INFO_MARK = b"peer-info"
HANDOFF_MARK = b"handoff"
HANDOFF_WEBSOCKET_MARK = b"handoff-websocket"
_MARK_READ = 256
_MARK = re.compile(rb"[a-z][a-z0-9-]{0,31}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: The longest Unix socket path: sun_path is 108 bytes including the terminating NUL.
SUN_PATH_MAX = 107


def rundir(env: dict[str, str] | None = None) -> Path:
    """The run directory from ``$RUNDIR`` (default ``/tmp/.libipc-run/``)."""
    value = (os.environ if env is None else env).get("RUNDIR") or DEFAULT_RUNDIR
    return Path(value)


def _hint(uid: int) -> str:
    return f"set RUNDIR=DIR to a directory of your own (e.g. RUNDIR=/run/user/{uid}/ipc)"


def check_rundir(info: os.stat_result, path: Path, uid: int | None = None) -> None:
    """Refuse a run directory in which someone else could plant a lock, a
    link or a socket: not a directory, owned by another user than ``uid``
    (default: ours) or root, or writable by others. Raises RunDirectoryError."""
    uid = os.geteuid() if uid is None else uid
    if not stat.S_ISDIR(info.st_mode):
        raise RunDirectoryError(f"run directory {path} is not a directory; {_hint(uid)}")
    if info.st_uid not in (uid, 0):
        raise RunDirectoryError(
            f"run directory {path} belongs to uid {info.st_uid}, not to you or root; {_hint(uid)}"
        )
    if info.st_mode & stat.S_IWOTH:
        mode = stat.S_IMODE(info.st_mode)
        raise RunDirectoryError(
            f"run directory {path} is writable by others (mode {mode:04o}); {_hint(uid)}"
        )


def open_rundir(path: Path, *, create: bool = True) -> int:
    """Create the run directory (exactly 0770) if needed, check it is safe
    (see :func:`check_rundir`) and return an ``O_PATH`` descriptor of it.

    The descriptor is opened with ``O_NOFOLLOW`` and checked with ``fstat``,
    so what is checked is what is used (no symlink followed between the two);
    callers create the lock and remove stale sockets relative to it.
    """
    created = False
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, RUNDIR_MODE)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise RunDirectoryError(
                f"cannot create run directory {path}: {exc.strerror}; {_hint(os.geteuid())}"
            ) from None
    flags = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | (os.O_RDONLY if created else os.O_PATH))
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        info = os.fstat(fd)
        check_rundir(info, path)
        if created and stat.S_IMODE(info.st_mode) != RUNDIR_MODE:
            os.fchmod(fd, RUNDIR_MODE)  # exactly 0770, whatever the umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_error(path: Path, exc: OSError) -> RunDirectoryError:
    hint = _hint(os.geteuid())
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.lstat(path).st_mode):  # O_DIRECTORY|O_NOFOLLOW says ENOTDIR
            return RunDirectoryError(f"run directory {path} is a symbolic link; {hint}")
    if exc.errno == errno.ELOOP:
        return RunDirectoryError(f"run directory {path} is a symbolic link; {hint}")
    if exc.errno == errno.ENOTDIR:
        return RunDirectoryError(f"run directory {path} is not a directory; {hint}")
    if exc.errno == errno.ENOENT:
        return RunDirectoryError(f"run directory {path} does not exist; {hint}")
    return RunDirectoryError(f"cannot use run directory {path}: {exc.strerror}; {hint}")


def ensure_rundir(path: Path) -> Path:
    """Create the run directory (0770) if needed, check it is safe, return it."""
    os.close(open_rundir(path))
    return path


def validate_name(name: str, directory: Path | None = None) -> str:
    """Return ``name`` if it can be a service socket in ``directory``, else raise."""
    if not isinstance(name, str):
        raise InvalidServiceName(f"service name must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidServiceName("service name is empty")
    if "/" in name:
        raise InvalidServiceName(f"service name {name!r} contains '/'")
    if name in (".", ".."):
        raise InvalidServiceName(f"service name {name!r} is not allowed")
    if _CONTROL.search(name):
        raise InvalidServiceName(f"service name {name!r} contains control characters")
    directory = rundir() if directory is None else directory
    # len(os.fsencode(directory / (name + ".lock"))), without building a Path
    size = len(os.fsencode(directory)) + 1 + len(os.fsencode(name)) + len(LOCK_SUFFIX)
    if size > SUN_PATH_MAX:
        raise InvalidServiceName(
            f"service name {name[:40]!r}... is too long for a socket path in {directory}"
        )
    return name


def socket_path(name: str, directory: Path | None = None) -> Path:
    """Where service ``name`` listens (the name is validated)."""
    directory = rundir() if directory is None else directory
    return directory / validate_name(name, directory)


def door_path(name: str, directory: Path | None = None) -> Path:
    """Where service ``name`` listens for protocol daemons when it asked for
    peer information: ``$RUNDIR/<name>.door`` (the name is validated; its
    length rule already leaves room for the suffix, as long as ``.lock``)."""
    directory = rundir() if directory is None else directory
    return directory / (validate_name(name, directory) + DOOR_SUFFIX)


def validate_service_name(name: str, directory: Path | None = None) -> str:
    """:func:`validate_name`, plus the names a service may not take: those
    ending in ``.door`` are the doors of peer-information services."""
    validate_name(name, directory)
    if name.endswith(DOOR_SUFFIX):
        raise InvalidServiceName(
            f"service name {name!r} ends with {DOOR_SUFFIX!r}, which is reserved"
            " for the doors of services that ask for peer information"
        )
    return name


@dataclass
class ServiceSocket:
    """A bound, listening service socket and the lock that proves we own it;
    with peer information, also its door (``door``, listening at
    ``door_path``). ``owner_uid`` is the run directory's owner, whom a door
    trusts."""

    name: str
    path: Path
    sock: socket.socket
    lock_fd: int
    door: socket.socket | None = None
    door_path: Path | None = None
    owner_uid: int = 0

    def close(self) -> None:
        """Remove the door and the socket file, then release the lock (in that
        order, so a new instance never sees our sockets with a free lock).
        Only a socket, and only our own lock file, is removed."""
        if self.door is not None and self.door_path is not None:
            _unlink_socket(self.door_path)
            self.door.close()
        _unlink_socket(self.path)
        self.sock.close()
        if self.lock_fd >= 0:
            lock_path = str(self.path) + LOCK_SUFFIX
            with contextlib.suppress(OSError):
                if os.lstat(lock_path).st_ino == os.fstat(self.lock_fd).st_ino:
                    os.unlink(lock_path)
            os.close(self.lock_fd)
            self.lock_fd = -1


def _unlink_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def _take_lock(dir_fd: int, lock_path: Path, name: str, retries: int = 3) -> int:
    """Open (``O_NOFOLLOW``: a planted link is refused, not followed) and
    flock ``lock_path`` relative to the checked run directory."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(lock_path.name, flags, LOCK_MODE, dir_fd=dir_fd)
    except OSError as exc:
        raise _lock_error(lock_path, exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ServiceError(f"lock {lock_path} is not a regular file; remove it")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ServiceBusy(
                f"service {name!r} is already running (lock {lock_path} held)"
            ) from None
        raise ServiceError(f"cannot lock {lock_path}: {exc.strerror}") from None
    except ServiceError:
        os.close(fd)
        raise
    # The file may have been unlinked by a closing instance between our open
    # and our flock; then we hold a lock on a ghost. Check and retry.
    try:
        same = (
            os.fstat(fd).st_ino
            == os.stat(lock_path.name, dir_fd=dir_fd, follow_symlinks=False).st_ino
        )
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        if retries <= 0:
            raise ServiceError(f"cannot lock {lock_path}: it keeps being replaced")
        return _take_lock(dir_fd, lock_path, name, retries - 1)
    os.set_blocking(fd, True)
    _lock_mode(fd)
    return fd


def _lock_error(lock_path: Path, exc: OSError) -> ServiceError:
    if exc.errno == errno.ELOOP:
        return ServiceError(f"lock {lock_path} is a symbolic link; refusing it (remove it)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return RunDirectoryError(
            f"cannot open lock {lock_path}: {exc.strerror} (only the run directory's"
            f" owner and group may start services there); {_hint(os.geteuid())}"
        )
    return ServiceError(f"cannot open lock {lock_path}: {exc.strerror}")


def _remove_stale_socket(dir_fd: int, path: Path, *, needed: bool = True) -> None:
    """With the lock held, a socket file left at ``path`` is stale: remove it.
    Anything else (a file, a link, a directory) is not ours to delete: an
    error if we need the path (``needed``), left alone otherwise."""
    try:
        info = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        if not needed:
            return
        raise ServiceError(f"{path} exists and is not a socket; refusing to remove it")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path.name, dir_fd=dir_fd)


def _lock_mode(fd: int) -> None:
    """Give our lock the sockets' mode (0660, whatever the umask), so that a
    group member can take it over once we are gone."""
    with contextlib.suppress(OSError):
        info = os.fstat(fd)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != LOCK_MODE:
            os.fchmod(fd, LOCK_MODE)


def _mark_lock(
    fd: int,
    *,
    local_only: bool,
    peer_info: bool = False,
    handoff: bool = False,
    handoff_websocket: bool = False,
    extra: tuple[bytes, ...] = (),
) -> None:
    """Write the service's marks into its lock, one per line; a service
    without marks empties it, so a name taken over from a marked one is not
    marked."""
    os.ftruncate(fd, 0)
    marks = b"".join(
        mark + b"\n"
        for mark, wanted in (
            (LOCAL_ONLY_MARK, local_only),
            (PEER_INFO_MARK, peer_info),
            (HANDOFF_MARK, handoff),
            (HANDOFF_WEBSOCKET_MARK, handoff_websocket),
            *((mark, True) for mark in extra),
        )
        if wanted
    )
    if marks:
        os.pwrite(fd, marks, 0)


def _check_marks(marks: tuple[str, ...]) -> tuple[bytes, ...]:
    out = []
    for mark in marks:
        raw = mark.encode("ascii", "replace") if isinstance(mark, str) else b""
        if not _MARK.fullmatch(raw):
            raise UsageError(f"lock mark {mark!r}: expected a lower-case word (a-z, 0-9, -)")
        out.append(raw)
    return tuple(out)


def bind_service(
    name: str,
    directory: Path | None = None,
    backlog: int = 1024,
    *,
    local_only: bool = False,
    peer_info: bool = False,
    handoff: bool = False,
    handoff_websocket: bool = False,
    marks: tuple[str, ...] = (),
) -> ServiceSocket:
    """Lock, clean up stale sockets, bind and listen: one service instance.

    ``local_only`` marks the service as never to be reached from the network
    (see :func:`is_local_only`); ``peer_info`` marks it as wanting peer
    information and binds its door too (see :func:`door_path`); ``handoff``
    marks it as taking handed-over network sockets through its door (see
    :mod:`ipc_core.door`), and binds the door too; ``handoff_websocket`` the
    same for WebSocket connections (mark ``handoff-websocket``). ``marks``: more lines for
    the lock (lower-case words, e.g. ``hands-over``), for other programs to
    read with :func:`service_marks`. A name
    ending in ``.door`` is refused (InvalidServiceName).
    """
    directory = rundir() if directory is None else directory
    validate_service_name(name, directory)
    path = socket_path(name, directory)
    dir_fd = open_rundir(directory)
    try:
        return _bind_in(
            dir_fd,
            name,
            path,
            backlog,
            local_only=local_only,
            peer_info=peer_info,
            handoff=handoff,
            handoff_websocket=handoff_websocket,
            marks=_check_marks(marks),
        )
    finally:
        os.close(dir_fd)


def _bind_in(
    dir_fd: int,
    name: str,
    path: Path,
    backlog: int,
    *,
    local_only: bool,
    peer_info: bool,
    handoff: bool = False,
    handoff_websocket: bool = False,
    marks: tuple[bytes, ...] = (),
) -> ServiceSocket:
    lock_fd = _take_lock(dir_fd, Path(str(path) + LOCK_SUFFIX), name)
    door = Path(str(path) + DOOR_SUFFIX)
    wants_door = peer_info or handoff or handoff_websocket
    try:
        owner_uid = os.fstat(dir_fd).st_uid
        _mark_lock(
            lock_fd,
            local_only=local_only,
            peer_info=peer_info,
            handoff=handoff,
            handoff_websocket=handoff_websocket,
            extra=marks,
        )
        # A door left by a crashed instance goes too, whether or not this one
        # has a door: a service without peer information leaves none behind.
        _remove_stale_socket(dir_fd, door, needed=wants_door)
        _remove_stale_socket(dir_fd, path)
    except OSError as exc:
        os.close(lock_fd)
        raise ServiceError(
            f"cannot prepare service {name!r} in {path.parent}: {exc.strerror}"
        ) from None
    except ServiceError:
        os.close(lock_fd)
        raise
    door_sock = None
    try:
        if wants_door:
            # The door first: once the service's name answers, so does its door.
            door_sock = _listen(door, backlog, passcred=True)
        sock = _listen(path, backlog)
    except OSError as exc:
        if door_sock is not None:
            _unlink_socket(door)
            door_sock.close()
        os.close(lock_fd)
        failed = door if door_sock is None and wants_door else path
        raise ServiceError(f"cannot listen on {failed}: {exc.strerror or exc}") from exc
    return ServiceSocket(
        name,
        path,
        sock,
        lock_fd,
        door=door_sock,
        door_path=door if wants_door else None,
        owner_uid=owner_uid,
    )


def _listen(path: Path, backlog: int, *, passcred: bool = False) -> socket.socket:
    """A non-blocking socket listening at ``path`` (0660). ``passcred``: the
    connections it accepts receive the writer's credentials with what they
    read (SO_PASSCRED, inherited at accept, so no byte comes without)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if passcred:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        old = os.umask(SOCKET_UMASK)
        try:
            sock.bind(os.fsencode(path))
        finally:
            os.umask(old)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def service_marks(name: str, directory: Path | None = None) -> frozenset[str]:
    """The marks in service ``name``'s lock file (``local-only``,
    ``peer-info``); empty when it has none, or no lock.

    Cheap (one open, one read): a protocol daemon asks it once per network
    connection. A missing, unreadable or odd lock (a link, a FIFO) has no
    marks; so has a name that cannot be a service. Only lines that look like
    marks (lower case words) count.
    """
    directory = rundir() if directory is None else directory
    try:
        lock_path = os.path.join(directory, validate_name(name, directory) + LOCK_SUFFIX)
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (OSError, InvalidServiceName):
        return frozenset()
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return frozenset()
        raw = os.read(fd, _MARK_READ)
    except OSError:
        return frozenset()
    finally:
        os.close(fd)
    lines = raw.split(b"\n")
    if len(raw) == _MARK_READ:
        lines.pop()  # perhaps cut short: not a whole line
    return frozenset(line.decode() for line in lines if _MARK.fullmatch(line))


def is_local_only(name: str, directory: Path | None = None) -> bool:
    """True when service ``name`` declared itself local-only in its lock file
    (see :func:`service_marks`)."""
    return LOCAL_ONLY_MARK.decode() in service_marks(name, directory)


def service_alive(name: str, directory: Path | None = None) -> bool:
    """True when an instance holds the service's lock (it is running)."""
    directory = rundir() if directory is None else directory
    lock_path = directory / (validate_name(name, directory) + LOCK_SUFFIX)
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def list_services(directory: Path | None = None) -> list[tuple[str, bool]]:
    """Every service socket in the run directory, with whether it is
    connectable (the doors of peer-information services are not services)."""
    directory = rundir() if directory is None else directory
    found: list[tuple[str, bool]] = []
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return found
    except OSError as exc:
        raise _open_error(directory, exc) from None
    for entry in entries:
        if entry.name.endswith(DOOR_SUFFIX):
            continue
        try:
            if not stat.S_ISSOCK(entry.lstat().st_mode):
                continue
        except OSError:
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(os.fsencode(entry))
            alive = True
        except OSError:
            alive = False
        finally:
            probe.close()
        found.append((entry.name, alive))
    return found
