"""What wakes the loop besides descriptors: timers, other threads, signals.

Theory of operation
-------------------
Three small parts of :class:`~ipc_core.Context`, each a class of its own:

* :class:`Timers`: a heap of ``(when, seq, handle)``. A cancelled handle
  stays in the heap until it comes up (or until the heap has doubled since
  the last purge, then every cancelled entry goes: amortised O(1) per
  timer); ``seq`` keeps equal deadlines in order and handles uncompared. The
  heap is one list for the context's life (purged in place), so the loop may
  hold it in a local.
* :class:`Inbox`: callbacks from other threads (``call_soon_threadsafe``), a
  locked deque and an eventfd that epoll watches: writing the eventfd wakes a
  loop blocked in ``epoll.poll``.
* :class:`Signals`: the self-pipe trick. ``signal.set_wakeup_fd`` makes the
  interpreter write each signal number to a socketpair that epoll watches;
  the handlers run later, inside the loop, never inside the signal handler.

Nothing here reads or writes a connection; a callback's exception is logged
and costs nothing else (the loop goes on).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ipc_core")

_TIMERS_COMPACT_MIN = 4096


class TimerHandle:
    """A callback scheduled with :meth:`Context.call_later`; ``cancel()`` it."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], Any]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        # Drop the callback now: what its closure holds (a handshake, an
        # SSLObject) must not live on until the deadline would have fired.
        self.cancelled = True
        self.callback = _no_callback


def _no_callback() -> None:
    """What a cancelled timer holds instead of its callback."""


class Timers:
    """The loop's timers: a heap of deadlines (see the module docstring)."""

    __slots__ = ("_compact_at", "_seq", "heap")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._compact_at = _TIMERS_COMPACT_MIN

    def call_later(self, delay: float, callback: Callable[[], Any]) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + delay, callback)
        heap = self.heap
        heapq.heappush(heap, (handle.when, next(self._seq), handle))
        if len(heap) > self._compact_at:
            heap[:] = [t for t in heap if not t[2].cancelled]
            heapq.heapify(heap)
            self._compact_at = max(_TIMERS_COMPACT_MIN, 2 * len(heap))
        return handle

    def run_due(self) -> None:
        """Run every callback whose deadline has passed."""
        now = time.monotonic()
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, _, handle = heapq.heappop(heap)
            if handle.cancelled:
                continue
            try:
                handle.callback()
            except Exception:
                log.exception("timer callback failed")


def next_wait(now: float, deadline: float | None, heap: list[Any]) -> float:
    """Seconds ``epoll.poll`` may sleep: until the deadline or the first
    timer, whichever comes first (-1: no limit)."""
    wait = -1.0 if deadline is None else max(0.0, deadline - now)
    if heap:
        t = max(0.0, heap[0][0] - now)
        wait = t if wait < 0 else min(wait, t)
    return wait


class Inbox:
    """Callbacks handed to the loop by other threads."""

    __slots__ = ("_lock", "_queue", "fd")

    def __init__(self) -> None:
        self._queue: collections.deque[Callable[[], Any]] = collections.deque()
        self._lock = threading.Lock()
        #: Readable when callbacks wait: the loop's epoll watches it.
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def put(self, callback: Callable[[], Any]) -> None:
        with self._lock:
            self._queue.append(callback)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.fd, 1)

    def drain(self) -> None:
        """Run every waiting callback (in the loop's thread)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)
        while True:
            with self._lock:
                if not self._queue:
                    return
                callback = self._queue.popleft()
            try:
                callback()
            except Exception:
                log.exception("callback from another thread failed")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Signals:
    """Signals routed into the loop through a self-pipe (main thread only)."""

    __slots__ = ("_handlers", "_old_state", "_old_wakeup_fd", "_rsock", "_wsock")

    def __init__(self) -> None:
        self._rsock: socket.socket | None = None
        self._wsock: socket.socket | None = None
        self._handlers: dict[int, Callable[[int], Any]] = {}
        self._old_state: list[tuple[int, Any]] = []
        self._old_wakeup_fd: int | None = None

    @property
    def fd(self) -> int:
        """The descriptor the loop watches (-1 before ``install``)."""
        return -1 if self._rsock is None else self._rsock.fileno()

    def install(self, ep: select.epoll, handlers: dict[int, Callable[[int], Any]]) -> None:
        if self._rsock is None:
            rsock, wsock = socket.socketpair()
            rsock.setblocking(False)
            wsock.setblocking(False)
            self._rsock, self._wsock = rsock, wsock
            self._old_wakeup_fd = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
            ep.register(rsock.fileno(), select.EPOLLIN)
        for sig in handlers:
            self._old_state.append((sig, signal.signal(sig, _noop_signal_handler)))
        self._handlers.update(handlers)

    def drain(self, stopped: Callable[[], bool]) -> None:
        """Run the handlers of the signals received; stop early once
        ``stopped()`` (a handler closed the context)."""
        assert self._rsock is not None
        try:
            data = self._rsock.recv(256)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._handlers.get(signum)
            log.info("received signal %s", _signal_name(signum))
            if handler is not None:
                try:
                    handler(signum)
                except Exception:
                    log.exception("signal handler failed")
            if stopped():
                return

    def restore(self) -> None:
        """Put back the signal handlers and wakeup fd found at ``install``."""
        if self._rsock is None:
            return
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(self._old_wakeup_fd if self._old_wakeup_fd is not None else -1)
        for sig, old in reversed(self._old_state):
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)
        self._old_state.clear()
        self._rsock.close()
        if self._wsock is not None:
            self._wsock.close()
        self._rsock = self._wsock = None


def _noop_signal_handler(signum: int, frame: object) -> None:
    """The real work happens in the loop, woken by the wakeup fd."""


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
