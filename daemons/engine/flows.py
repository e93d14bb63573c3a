"""The flow table of a datagram daemon (ipc-udpd): pure logic, no I/O.

UDP has no connections, so the daemon makes its own: every remote
``address:port`` that sends a datagram is a *flow*, with its own LibIPC
connection to the local service (the service tells its clients apart the way
it does for TCP). Nothing in UDP says a flow has ended, so a flow that
carries no datagram either way for ``timeout`` seconds expires; and nothing
stops a sender from inventing addresses, so the table is bounded in total
(``max_flows``) and per source (``max_per_source``: an IPv4 address or an
IPv6 /64, :func:`daemons.engine.daemon.source_key`).

Why Sans-I/O: the table's rules (limits, expiry order) are tested with a
fake clock and no socket; the daemon calls :meth:`FlowTable.touch` with the
loop's time on every datagram and :meth:`FlowTable.expired` from a periodic
sweep. Every operation is O(1) but :meth:`expired`, which is O(expired):
flows are kept in order of last activity (an ordered dict, moved to the end
when touched), so the sweep stops at the first flow still alive.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Flow", "FlowLimits", "FlowTable"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class FlowLimits:
    """How many flows may exist, and how long a silent one lives.

    ``max_per_source`` 0 means no per-source limit; ``timeout`` 0 means flows
    never expire (only the service or a stop ends them)."""

    max_flows: int = 10000
    max_per_source: int = 64
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.max_flows < 1 or self.max_per_source < 0 or self.timeout < 0:
            raise ValueError(f"bad flow limits: {self}")


@dataclass(eq=False)
class Flow(Generic[K]):
    """One remote address's flow: its key, the source it is counted under,
    when it last carried a datagram, and whatever the daemon attaches
    (``state``: its local connection, a refusal...)."""

    key: K
    source: str | None
    last: float
    state: Any = None
    #: Datagrams carried (both ways); the daemon counts them.
    datagrams: int = field(default=0)


class FlowTable(Generic[K]):
    """Flows by key, in order of last activity, with their limits."""

    def __init__(self, limits: FlowLimits) -> None:
        self.limits = limits
        self._flows: OrderedDict[K, Flow[K]] = OrderedDict()
        self._sources: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: object) -> bool:
        return key in self._flows

    def __iter__(self) -> Iterator[Flow[K]]:
        return iter(list(self._flows.values()))

    def get(self, key: K) -> Flow[K] | None:
        """The flow of ``key``, or None (does not count as activity)."""
        return self._flows.get(key)

    def count(self, source: str) -> int:
        """Flows open now from ``source``."""
        return self._sources.get(source, 0)

    def refusal(self, source: str | None) -> tuple[str, str] | None:
        """``(kind, reason)`` if a new flow from ``source`` would be one too
        many, else None. ``kind`` is ``"too many flows"`` or ``"too many flows
        from one address"`` (a metric label)."""
        if len(self._flows) >= self.limits.max_flows:
            return (
                "too many flows",
                f"{len(self._flows)} flows open (--max-flows {self.limits.max_flows})",
            )
        cap = self.limits.max_per_source
        if source is not None and cap and self._sources.get(source, 0) >= cap:
            return (
                "too many flows from one address",
                f"{cap} flows open from {source} (--max-flows-per-ip)",
            )
        return None

    def open(self, key: K, source: str | None, now: float, state: Any = None) -> Flow[K]:
        """Add a flow (the caller checked :meth:`refusal`); it is the newest."""
        if key in self._flows:
            raise KeyError(f"flow {key!r} exists already")
        flow: Flow[K] = Flow(key, source, now, state)
        self._flows[key] = flow
        if source is not None:
            self._sources[source] = self._sources.get(source, 0) + 1
        return flow

    def touch(self, flow: Flow[K], now: float) -> None:
        """``flow`` carried a datagram at ``now``: it lives ``timeout`` more."""
        flow.last = now
        flow.datagrams += 1
        if self._flows.get(flow.key) is flow:
            self._flows.move_to_end(flow.key)

    def remove(self, flow: Flow[K]) -> bool:
        """Forget ``flow`` (False if it was not, or no longer, in the table)."""
        if self._flows.get(flow.key) is not flow:
            return False
        del self._flows[flow.key]
        if flow.source is not None:
            left = self._sources[flow.source] - 1
            if left:
                self._sources[flow.source] = left
            else:
                del self._sources[flow.source]
        return True

    def expired(self, now: float) -> list[Flow[K]]:
        """Remove and return the flows silent for ``timeout`` seconds or more,
        oldest first (none when ``timeout`` is 0)."""
        timeout = self.limits.timeout
        if timeout <= 0:
            return []
        gone: list[Flow[K]] = []
        for flow in self._flows.values():
            if now - flow.last < timeout:
                break
            gone.append(flow)
        for flow in gone:
            self.remove(flow)
        return gone

    def next_expiry(self) -> float | None:
        """When the oldest flow expires if silent until then (None: no flow,
        or no timeout)."""
        if not self._flows or self.limits.timeout <= 0:
            return None
        oldest = next(iter(self._flows.values()))
        return oldest.last + self.limits.timeout
