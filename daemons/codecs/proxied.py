"""The PROXY protocol in front of any daemon handshake: :class:`ProxiedHandshake`
and :class:`ProxyFront` (what ``--proxy-protocol CIDR`` installs as ``Daemon.front``).

Theory of operation
-------------------
A load balancer in TCP mode (HAProxy ``send-proxy-v2``) writes a PROXY header
first on every connection, then passes the client's stream through untouched:
the TCPd name, a TLS ClientHello, an HTTP upgrade. So the header is a layer
*below* every handshake, the way TLS is below the TCPd name in ipc-tlsd::

    network bytes -> ProxyGate (header, or the check that none is there)
                  -> inner handshake (TCPd, TLS then TCPd, WebSocket...)

:class:`ProxiedHandshake` feeds received bytes to a
:class:`~daemons.codecs.proxy.ProxyGate` until it yields a
:class:`~daemons.codecs.proxy.ProxyResult`, then hands the rest (and every
later byte) to the inner handshake, unchanged. Nothing is ever written before
the inner handshake speaks, so a wrapped handshake behaves exactly like the
bare one once the header is through.

Whether a header must come is decided per connection by the socket's peer
(:class:`~daemons.codecs.proxy.ProxyPolicy`): a listed source must send one
(its absence is an error), any other must not (a header from it is a client
forging its address, or a proxy the operator forgot to list). Both close the
connection with a reason the engine logs next to the peer's address.

What the header says reaches the engine through two optional capabilities of
:mod:`daemons.engine.handshake`: :attr:`ProxiedHandshake.client` (the real
client, for log names and ``--max-connections-per-ip``) and
:meth:`ProxiedHandshake.describe` (the peer information of a service that
asked for it). The class always has both (and the members of ``Settles``):
capabilities are decided once per class, so a wrapper answers None when it
has nothing to say rather than lacking the member.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, Protocol, cast, runtime_checkable

from ipc_core import Layer
from ipc_core.peerinfo import PeerInfo

from ..engine.handshake import (
    DescribesPeer,
    Front,
    Handshake,
    KnowsClient,
    Settles,
    describes_peer,
    hands_over,
    knows_client,
    settles,
)
from ..engine.trust import TrustedNetworks, peer_ip
from .proxy import (
    MAX_V2_TLV_BYTES,
    NeedData,
    ProxyGate,
    ProxyHeader,
    ProxyPolicy,
)

__all__ = [
    "HearsClient",
    "ProxiedHandshake",
    "ProxyFront",
    "describe_sources",
    "use_proxy_protocol",
]

log = logging.getLogger("ipc.daemon.proxy")


@runtime_checkable
class HearsClient(Protocol):
    """Optional, for a handshake behind the PROXY gate that logs on its own
    before the engine does (ipc-tlsd names a client certificate the moment
    TLS is up): told the header's client as soon as it is read, so its log
    line names the client rather than the proxy."""

    def client_named(self, client: tuple[str, int | None]) -> None: ...


#: Whether a class is a :class:`HearsClient`, decided once per class (an
#: ``isinstance`` with a runtime Protocol costs ~20 µs per connection).
_HEARS_CLIENT: dict[type, bool] = {}


def _hears_client(handshake: object) -> HearsClient | None:
    cls = type(handshake)
    known = _HEARS_CLIENT.get(cls)
    if known is None:
        known = _HEARS_CLIENT[cls] = isinstance(handshake, HearsClient)
    return cast(HearsClient, handshake) if known else None


#: How the peer information says where the client address came from.
VIA = "proxy-protocol"


class ProxiedHandshake:
    """``inner`` behind a PROXY header gate (see the module docstring).

    Implements :class:`~daemons.engine.handshake.Handshake` and, always,
    ``Settles``, ``KnowsClient`` and ``DescribesPeer``. ``addr`` is the
    socket's peer as ``accept()`` returned it (the proxy, for a listed source).
    """

    def __init__(self, gate: ProxyGate, inner: Handshake, addr: Any = None) -> None:
        self.gate = gate
        self.inner = inner
        self.addr = addr
        #: The header, once read (None: not yet, or an unlisted peer that sent none).
        self.header: ProxyHeader | None = None
        self._through = False  # the gate let the connection through
        # The inner handshake's optional capabilities, decided once (per class).
        self._inner_settles: Settles | None = settles(inner)
        self._inner_describes: DescribesPeer | None = describes_peer(inner)
        self._inner_client: KnowsClient | None = knows_client(inner)

    # -- what the engine reads ---------------------------------------------

    @property
    def service(self) -> str | None:
        return self.inner.service

    @property
    def finished(self) -> bool:
        return self.inner.finished

    @property
    def through(self) -> bool:
        """True once the header (or the check that none is there) is done."""
        return self._through

    @property
    def client(self) -> tuple[str, int | None] | None:
        """The real client: the inner handshake's if it learnt one (a trusted
        forwarding header behind the proxy), else the header's source; None
        before the header, for LOCAL/UNKNOWN headers (the socket's peer is the
        client), for a Unix-socket source and for unlisted peers."""
        if self._inner_client is not None:
            inner = self._inner_client.client
            if inner is not None:
                return inner
        header = self.header
        if header is None or header.source is None or header.family not in ("inet", "inet6"):
            return None
        return header.source.address, header.source.port

    @property
    def settle_after(self) -> float | None:
        """The inner handshake's pause rule once the gate is through; None
        inside the header (a pause there is not the end of a name). An
        unlisted peer whose first bytes could still begin a header (``PRO``:
        a service named so, without terminator) settles like the inner
        handshake: no more bytes means no header."""
        if self._inner_settles is None:
            return None
        if not self._through and (self.gate.trusted or not self.gate.holding):
            return None
        return self._inner_settles.settle_after

    def settle(self) -> None:
        if self._inner_settles is None:
            return
        if not self._through:
            if self.gate.trusted or not self.gate.holding:
                return
            self._pass(self.gate.release().rest)
        self._inner_settles.settle()

    # -- bytes -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes (b"" = EOF): the header first, then the inner handshake."""
        if self._through:
            self.inner.receive_data(data)
            return
        result = self.gate.feed(data)
        if isinstance(result, NeedData):
            return
        self.header = result.header
        if result.header is not None:
            client = self.client
            listener = _hears_client(self.inner)
            if client is not None and listener is not None:
                listener.client_named(client)
        self._pass(result.rest)

    def _pass(self, rest: bytes) -> None:
        self._through = True
        if rest:
            self.inner.receive_data(rest)

    def data_to_send(self) -> bytes:
        return self.inner.data_to_send()

    def accept(self) -> tuple[Layer | None, bytes]:
        return self.inner.accept()

    @property
    def handoff_mark(self) -> str:
        """The inner handshake's (``HandsOver``); any mark when it has none
        (``handover`` then returns None)."""
        inner = hands_over(self.inner)
        return inner.handoff_mark if inner is not None else "handoff"

    def handover(self) -> tuple[bytes, bytes] | None:
        """The inner handshake's hand-off (TCPd's), None if it has none (TLS)."""
        inner = hands_over(self.inner)
        return inner.handover() if inner is not None else None

    def reject(self, reason: str, status: int) -> None:
        """Before the header is through the inner handshake has not started
        (a TLS handshake would answer a refusal with records the peer never
        asked for): just close. Afterwards, the inner handshake's refusal."""
        if self._through:
            self.inner.reject(reason, status)

    # -- peer information ----------------------------------------------------

    def describe(self, info: PeerInfo) -> PeerInfo:
        """The header's client and local addresses, ``via`` and the proxy's
        address; then the inner handshake's facts. A LOCAL/UNKNOWN header or
        an unlisted peer leaves the socket's addresses as they are."""
        header = self.header
        if header is not None and header.source is not None:
            proxy_ip = peer_ip(self.addr)
            dst = header.destination
            info = dataclasses.replace(
                info,
                client_address=header.source.address,
                client_port=header.source.port,
                local_address=dst.address if dst is not None else info.local_address,
                local_port=dst.port if dst is not None else info.local_port,
                via=VIA,
                proxy_address=str(proxy_ip) if proxy_ip is not None else info.client_address,
            )
        if self._inner_describes is not None:
            info = self._inner_describes.describe(info)
        return info


class ProxyFront:
    """``Daemon.front`` for ``--proxy-protocol``: every accepted connection's
    handshake behind a :class:`ProxiedHandshake` (the contract's ``Front``)."""

    def __init__(self, policy: ProxyPolicy) -> None:
        self.policy = policy

    @classmethod
    def from_networks(
        cls, trusted: TrustedNetworks, *, max_tlv_bytes: int = MAX_V2_TLV_BYTES
    ) -> ProxyFront:
        return cls(ProxyPolicy(trusted, max_tlv_bytes=max_tlv_bytes))

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str], **kwargs: Any) -> ProxyFront:
        return cls(ProxyPolicy.from_cidrs(cidrs, **kwargs))

    @property
    def trusted(self) -> TrustedNetworks:
        return self.policy.trusted

    def wrap(self, addr: Any, handshake: Handshake) -> Handshake:
        """``handshake`` behind the gate for a peer at ``addr`` (accept()'s)."""
        return ProxiedHandshake(self.policy.gate(addr), handshake, addr)

    def summary(self) -> str:
        """The start-up log line's words: who must send a header."""
        return (
            f"PROXY protocol header required from {describe_sources(self.trusted)} "
            "(it names the client); refused from any other source"
        )


def describe_sources(trusted: TrustedNetworks) -> str:
    """``127.0.0.1/32, 10.0.0.0/8 and Unix-socket peers`` for log lines."""
    names = [str(n) for n in trusted.networks]
    if trusted.trusts_unix:
        names.append("Unix-socket peers")
    if len(names) <= 1:
        return "".join(names) or "nobody"
    return ", ".join(names[:-1]) + " and " + names[-1]


class Gated(Protocol):
    """What :func:`use_proxy_protocol` sets (``daemons.engine.daemon.Daemon``)."""

    name: str
    front: Front | None
    trusted_proxies: TrustedNetworks | None


def use_proxy_protocol(daemon: Gated, trusted: TrustedNetworks) -> ProxyFront | None:
    """``--proxy-protocol``'s effect on a daemon (every command that has the
    flag): the gate in front of every accepted connection, the sources added
    to ``trusted_proxies`` (counted under the client their header names), and
    one log line saying who must send a header. Nothing without sources."""
    if not trusted:
        return None
    front = ProxyFront.from_networks(trusted)
    daemon.front = front
    daemon.trusted_proxies = trusted.union(daemon.trusted_proxies)
    log.info("%s: %s", daemon.name, front.summary())
    return front
