"""Child processes inside a Context loop: start, watch, stop, reap.

Why: ``ipc exec`` runs one process per client connection, thousands over a
day, and must leave no zombie, no leaked descriptor and no stray process
behind, without a thread per child. Everything here runs in the loop:

* :func:`spawn` starts a program with ``posix_spawn`` (``vfork`` speed,
  whatever the parent's size) in a new session, its stdin and stdout one
  socket, its stderr a pipe, nothing else: Python opens every descriptor
  close-on-exec (PEP 446), and the file actions give the child exactly
  descriptors 0, 1 and 2. Signals the daemon ignores (SIGPIPE) are reset.
* :class:`Children` watches each child with a pidfd in the Context (an
  EXTERNAL event when it exits, reaped then with ``waitpid(pid, WNOHANG)``;
  a 0.5 s ``waitpid`` poll where pidfds are missing), reads its stderr into
  the log (one line per line, escaped, cut at :data:`STDERR_LINE`, at most
  ``stderr_rate`` lines a second for all children, the rest counted and
  dropped), and stops it on request: SIGTERM to its process group after the
  grace period, SIGKILL one grace period later.
* :meth:`Children.shutdown` stops every child when the daemon stops.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ipc_core import Context, TimerHandle

from .log import LogThrottle, escape_log_text

__all__ = ["STDERR_LINE", "Child", "Children", "describe_status", "spawn"]

log = logging.getLogger("ipc.exec")

#: Characters of one stderr line kept in the log (the rest is cut).
STDERR_LINE = 1000
_STDERR_READ = 65536
#: Signals a child must start with at their default action: the ones Python
#: ignores (SIGPIPE, SIGXFSZ) would otherwise stay ignored across exec.
_DEFAULT_SIGNALS = frozenset(
    {
        signal.SIGPIPE,
        signal.SIGXFSZ,
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGCHLD,
        signal.SIGUSR1,
        signal.SIGUSR2,
    }
)
_POLL_SECONDS = 0.5


def spawn(
    path: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    stdio: int,
    stderr: int,
    stdout: int | None = None,
) -> int:
    """Start ``path`` with ``argv`` and exactly ``env``; its stdin and stdout
    are ``stdio`` (its stdout ``stdout`` when given: two pipes), its stderr
    ``stderr``; return its pid (also its process group and session). Raises
    OSError when it cannot be executed."""
    return os.posix_spawn(
        path,
        list(argv),
        dict(env),
        file_actions=[
            (os.POSIX_SPAWN_DUP2, stdio, 0),
            (os.POSIX_SPAWN_DUP2, stdio if stdout is None else stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ],
        setsid=True,
        setsigdef=_DEFAULT_SIGNALS,
        setsigmask=(),
    )


def describe_status(status: int) -> str:
    """``exited with status 3``, ``killed by SIGKILL``: a wait status as words."""
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    return f"ended with wait status {status}"


@dataclass(eq=False)
class Child:
    """One running program: who it serves and how far its end has come."""

    pid: int
    program: str
    label: str  # the client, for log lines
    stderr_fd: int = -1
    pidfd: int = -1
    started: float = field(default_factory=time.monotonic)
    status: int | None = None  # the wait status once reaped
    stopping: bool = False
    timers: list[TimerHandle] = field(default_factory=list)
    partial: bytearray = field(default_factory=bytearray)  # unfinished stderr line
    #: Called once, when the child is reaped.
    on_exit: Callable[[Child], None] | None = None

    @property
    def name(self) -> str:
        """``count.sh[1234]``: how a child is named in the log."""
        return f"{self.program}[{self.pid}]"


class Children:
    """The children of one Context (see the module docstring)."""

    def __init__(self, ctx: Context, *, grace: float, stderr_rate: int = 50) -> None:
        self.ctx = ctx
        self.grace = grace
        self.stderr_rate = stderr_rate
        self.by_pid: dict[int, Child] = {}
        self._by_fd: dict[int, Child] = {}  # pidfd or stderr descriptor -> child
        self._window = 0.0
        self._lines = 0
        self._dropped = 0
        self._dropped_note = LogThrottle()
        self._poll: TimerHandle | None = None
        self.use_pidfd = hasattr(os, "pidfd_open")

    def __len__(self) -> int:
        return len(self.by_pid)

    # ------------------------------------------------------------- starting

    def watch(self, child: Child, stderr_fd: int) -> None:
        """Take charge of a spawned child: its exit and its stderr (a pipe's
        read end, owned from now on)."""
        self.by_pid[child.pid] = child
        os.set_blocking(stderr_fd, False)
        child.stderr_fd = stderr_fd
        self.ctx.add_external(stderr_fd)
        self._by_fd[stderr_fd] = child
        if self.use_pidfd:
            try:
                child.pidfd = os.pidfd_open(child.pid)
            except OSError as exc:
                if exc.errno == errno.ENOSYS:  # an old kernel: poll from now on
                    log.info("pidfd_open: %s; polling children instead", exc.strerror)
                    self.use_pidfd = False
                # else (out of descriptors...): this child is polled
            else:
                self.ctx.add_external(child.pidfd)
                self._by_fd[child.pidfd] = child
        if child.pidfd < 0:
            self._poll_soon()

    # -------------------------------------------------------------- events

    def handle(self, fd: int) -> bool:
        """An EXTERNAL event: True when ``fd`` was one of ours."""
        child = self._by_fd.get(fd)
        if child is None:
            return False
        if fd == child.stderr_fd:
            self._read_stderr(child)
        else:
            self._reap(child)
        return True

    def _reap(self, child: Child) -> None:
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = child.pid, 0
        if pid == 0:
            return  # a pidfd is readable only once it exited; be safe anyway
        self._forget_fd(child.pidfd, close=True)
        child.pidfd = -1
        for timer in child.timers:
            timer.cancel()
        child.timers.clear()
        child.status = status
        del self.by_pid[child.pid]
        # What it wrote on stderr before exiting is still in the pipe.
        if child.stderr_fd >= 0:
            self._read_stderr(child, final=True)
        if child.on_exit is not None:
            callback, child.on_exit = child.on_exit, None
            callback(child)

    def _poll_soon(self) -> None:
        if self._poll is None:
            self._poll = self.ctx.call_later(_POLL_SECONDS, self._poll_all)

    def _poll_all(self) -> None:
        self._poll = None
        for child in [c for c in self.by_pid.values() if c.pidfd < 0]:
            self._reap(child)
        if any(c.pidfd < 0 for c in self.by_pid.values()):
            self._poll_soon()

    # --------------------------------------------------------------- stderr

    def _read_stderr(self, child: Child, *, final: bool = False) -> None:
        fd = child.stderr_fd
        while True:
            try:
                data = os.read(fd, _STDERR_READ)
            except BlockingIOError:
                if final and child.status is not None:
                    return  # a grandchild may still hold the pipe: read on later
                return
            except OSError:
                data = b""
            if not data:
                if child.partial:
                    self._log_line(child, bytes(child.partial))
                    child.partial.clear()
                self._forget_fd(fd, close=True)
                child.stderr_fd = -1
                return
            partial = child.partial
            partial += data
            *lines, rest = partial.split(b"\n")
            for line in lines:
                self._log_line(child, line)
            partial.clear()
            if len(rest) > STDERR_LINE * 4:
                self._log_line(child, rest)  # no newline in sight: log what there is
            else:
                partial += rest
            if not final:
                return  # one read per event: one chatty child cannot starve the loop

    def _log_line(self, child: Child, line: bytes | bytearray) -> None:
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window, self._lines = now, 0
        if self._lines >= self.stderr_rate:
            self._dropped += 1
            more = self._dropped_note.due()
            if more is not None:
                log.warning(
                    "program stderr over %d lines a second: %d lines dropped",
                    self.stderr_rate,
                    self._dropped,
                )
                self._dropped = 0
            return
        self._lines += 1
        text = line.decode("utf-8", "replace").rstrip("\r")
        if len(text) > STDERR_LINE:
            text = text[:STDERR_LINE] + "..."
        log.info("%s: %s", child.name, escape_log_text(text))

    # -------------------------------------------------------------- stopping

    def stop(self, child: Child) -> None:
        """Its client is gone and its stdin closed: SIGTERM to its process
        group after the grace period, SIGKILL one grace period later."""
        if child.stopping or child.status is not None:
            return
        child.stopping = True
        call_later = self.ctx.call_later
        child.timers.append(call_later(self.grace, lambda: self._signal(child, signal.SIGTERM)))
        child.timers.append(call_later(2 * self.grace, lambda: self._signal(child, signal.SIGKILL)))

    def _signal(self, child: Child, sig: int) -> None:
        if child.status is not None:
            return
        log.info(
            "%s (%s) still running %.3g s after its client left: %s",
            child.name,
            child.label,
            time.monotonic() - child.started,
            signal.Signals(sig).name,
        )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)

    def shutdown(self, deadline: float | None = None) -> None:
        """The daemon stops: SIGTERM to every child, SIGKILL to those left
        after the grace period, every one reaped (blocking; the loop is over)."""
        if not self.by_pid:
            self._close_all_fds()
            return
        for child in self.by_pid.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGTERM)
        end = time.monotonic() + (self.grace if deadline is None else deadline)
        while self.by_pid and time.monotonic() < end:
            for child in list(self.by_pid.values()):
                self._reap_blocking(child, os.WNOHANG)
            if self.by_pid:
                time.sleep(0.02)
        for child in list(self.by_pid.values()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            self._reap_blocking(child, 0)
        self._close_all_fds()

    def _reap_blocking(self, child: Child, flags: int) -> None:
        try:
            pid, status = os.waitpid(child.pid, flags)
        except ChildProcessError:
            pid, status = child.pid, 0
        if pid:
            child.status = status
            self.by_pid.pop(child.pid, None)
            log.info("%s (%s) %s", child.name, child.label, describe_status(status))

    def _close_all_fds(self) -> None:
        for fd in list(self._by_fd):
            self._forget_fd(fd, close=True)

    def _forget_fd(self, fd: int, *, close: bool) -> None:
        if fd < 0 or self._by_fd.pop(fd, None) is None:
            return
        with contextlib.suppress(Exception):
            if fd in self.ctx:
                self.ctx.remove_external(fd)
        if close:
            with contextlib.suppress(OSError):
                os.close(fd)
