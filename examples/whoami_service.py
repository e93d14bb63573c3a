"""A complete LibIPC service that knows who is calling.

Behind ipc-websocketd (or ipc-tcpd, ipc-tlsd) a service normally sees a
Unix socket and nothing else. This one opts in to peer information
(``service_init(name, peer_info=True)``): every network client arrives with
a :class:`~ipc_core.PeerInfo` on its CONNECTION event, before its first
message. The service greets each client with who it is (transport,
address, TLS certificate, token name) and refuses, before any message:

* a client whose token names nobody (the daemon ran without
  ``--token-secret``/``--token-file``, or let it through anonymously);
* a client whose address is outside the ``--network`` given (if any);
* a local client (connected to ``$RUNDIR/whoami`` itself, so no daemon
  vouches for it), unless ``--local`` is given.

A refused network client gets HTTP 403 (WebSocket) or a closed connection
(TCP, TLS); the daemon logs the reason given here. Run it::

    python examples/whoami_service.py --network 192.0.2.0/24
    ipc-websocketd --token-secret /etc/libipc/token.secret
    # then, in a browser: ws://HOST:8080/whoami with the subprotocol ipc.token.<T>
"""

from __future__ import annotations

import argparse
import ipaddress
import logging

from ipc_core import Context, Event, EventType, PeerInfo

log = logging.getLogger("whoami")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def refusal(peer: PeerInfo | None, networks: list[Network], local: bool) -> str | None:
    """Why this client may not use the service, or None to serve it."""
    if peer is None:
        return None if local else "local clients are not served (no daemon vouches for them)"
    if not peer.token_name:
        return "a token is required"
    if networks:
        try:
            address = ipaddress.ip_address(peer.client_address or "")
        except ValueError:  # unknown, an obfuscated identifier, or none
            return f"client address {peer.client_address or 'unknown'!r} is not an IP"
        if not any(address in network for network in networks):
            return f"{address} is not in the allowed networks"
    return None


def greeting(peer: PeerInfo | None) -> str:
    """One line telling the client who it is, as the daemon saw it."""
    if peer is None:
        return "hello, local client: you connected to the Unix socket itself"
    words = [f"hello {peer.token_name}: {peer.transport}"]
    if peer.client_address is not None:
        port = f" port {peer.client_port}" if peer.client_port is not None else ""
        words.append(f"from {peer.client_address}{port}")
    if peer.via is not None:
        words.append(f"(said by {peer.proxy_address} with {peer.via})")
    if peer.tls_version is not None:
        words.append(f"over {peer.tls_version}")
    if peer.cert_subject is not None:
        trust = "verified" if peer.cert_verified else "unverified"
        words.append(f"with certificate {peer.cert_subject} ({trust})")
    if peer.path is not None:
        words.append(f"asking for {peer.path}")
    return " ".join(words)


def serve(name: str, networks: list[Network], local: bool) -> None:
    with Context() as ctx:
        ctx.service_init(name, peer_info=True)  # also listens on $RUNDIR/NAME.door
        ctx.handle_signals()  # Ctrl-C / SIGTERM: clean stop, sockets removed
        log.info("serving %r; networks: %s", name, ", ".join(map(str, networks)) or "any")
        for event in ctx:
            match event:
                case Event(EventType.CONNECTION, fd, peer=peer):
                    reason = refusal(peer, networks, local)
                    if reason is None:
                        log.info("client %d: %s", fd, greeting(peer))
                        ctx.write(fd, greeting(peer).encode())  # accepts, then greets
                    elif peer is None:
                        log.info("local client %d refused: %s", fd, reason)
                        ctx.close(fd)
                    else:
                        log.info("client %s refused: %s", peer.client_address, reason)
                        ctx.refuse(fd, reason)  # the daemon answers 403 and logs why
                case Event(EventType.MESSAGE_RX, fd, message):
                    # The record stays available for the connection's life.
                    peer = ctx.peer_info(fd)
                    who = (peer.token_name if peer else None) or "local"
                    ctx.write(fd, b"%s said: %s" % (who.encode(), message))


def main() -> None:
    parser = argparse.ArgumentParser(description="Greet each client with who it is.")
    parser.add_argument("--name", default="whoami", help="the service name (default: whoami)")
    parser.add_argument(
        "--network",
        action="append",
        default=[],
        metavar="CIDR",
        type=lambda text: ipaddress.ip_network(text, strict=False),
        help="serve clients from this network only (repeatable; default: any address)",
    )
    parser.add_argument("--local", action="store_true", help="also serve local clients")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    serve(args.name, args.network, args.local)


if __name__ == "__main__":
    main()
