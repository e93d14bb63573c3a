"""ws (issue 5): ipc-websocketd against websockify and websocketd."""

from __future__ import annotations

from functools import partial

from .. import holds, servers
from ..harness import Harness
from ..model import SuiteResult, fmt, fmt_fair, fmt_rate, fmt_ratio, ratio, spread, status

NAME = "ws"
TITLE = "WebSocket: ipc-websocketd vs websockify and websocketd"

C100, BULK, WSS = "100 connections", "1 MiB messages (ipc pongd)", "100 connections, wss"
LOADS = {
    C100: ["-c", 100],
    BULK: ["-c", 1, "-s", "1M", "-i", 1],
    WSS: ["-c", 100],
}
OURS = "ipc-websocketd"
#: Which relays run which load, and in front of which service: the C echo
#: server for the 100 connections; `ipc pongd` for 1 MiB messages, because
#: websockify deadlocks against a service that echoes while it reads (see
#: the notes) and pongd reads a whole message before it answers.
ROWS = {
    C100: (OURS, "websockify", "websocketd"),
    BULK: (OURS, "websockify"),
    WSS: (OURS, "websockify", "websocketd"),  # figures only: the issue sets no target
}


def missing() -> str | None:
    return servers.c_tools_missing() or servers.daemon_missing("websocketd", "ipc-websocketd")


def _peers() -> list[str]:
    return [p for p in ("websockify", "websocketd") if not servers.peer_missing(p)]


def _starters(h: Harness, d, d_pong, certs) -> dict:
    """(load, relay) -> how to start the relay for that load."""
    echo_starters = {
        OURS: partial(servers.ipc_websocketd, h, d),
        "websockify": partial(servers.websockify, h, d / "pong"),
        "websocketd": partial(servers.websocketd, h),
    }
    pongd_starters = {
        OURS: partial(servers.ipc_websocketd, h, d_pong),
        # websockify relays the payload bytes as they are: the client puts the
        # LibIPC header in each message and reads LibIPC frames back (--ws-ipc)
        "websockify": partial(servers.websockify, h, d_pong / "pong", ipc_in_messages=True),
    }
    wss_starters = {
        OURS: partial(servers.ipc_websocketd, h, d, certs=certs),
        "websockify": partial(servers.websockify, h, d / "pong", certs=certs),
        "websocketd": partial(servers.websocketd, h, certs=certs),
    }
    by_load = {C100: echo_starters, BULK: pongd_starters, WSS: wss_starters}
    available = {OURS, *_peers()}
    return {
        (load, name): by_load[load][name]
        for load, names in ROWS.items()
        for name in names
        if name in available
    }


def run(h: Harness, res: SuiteResult) -> None:
    d, d_pong = h.mkdir("ws"), h.mkdir("ws-pongd")
    echo = servers.echo_server(h, d / "pong")
    pongd = servers.pongd(h, d_pong)
    starters = _starters(h, d, d_pong, servers.make_certs(h))
    for p in ("websockify", "websocketd"):
        if p not in _peers():
            res.notes.append(f"{servers.peer_missing(p)}: not compared")
    targets = {key: servers.Restartable(h, start) for key, start in starters.items()}
    try:
        variants = {
            key: partial(t.loadgen, [*LOADS[key[0]], *h.lg_time()]) for key, t in targets.items()
        }
        figs = h.measure(variants)
    finally:
        for t in targets.values():
            h.stop(t)
        h.stop(pongd)
    res.raw = {" / ".join(k): v for k, v in figs.items()}

    t = res.table(
        "figures (medians, pinned to one CPU)",
        [
            "load",
            "server",
            "msg/s",
            "MB/s",
            "p50 µs",
            "p99 µs",
            "max/min",
            "ours vs this",
            "run spread",
            "note",
        ],
    )
    for (load, name), r in figs.items():
        ours = figs[(load, OURS)]
        t.rows.append(
            [
                load,
                name,
                fmt_rate(r.get("rate")),
                fmt(r.get("mbps"), 1),
                fmt(r.get("p50_us"), 1),
                fmt(r.get("p99_us"), 1),
                fmt_fair(r),
                fmt_ratio(ratio(ours.get("rate"), r.get("rate"))),
                spread(r),
                status(r),
            ]
        )

    def rate(load: str, name: str, key: str = "rate") -> float | None:
        return figs.get((load, name), {}).get(key)

    for peer, target in (("websockify", 1.5), ("websocketd", 1.0)):
        res.check_ratio(
            f"100 connections: msg/s, ipc-websocketd / {peer}",
            rate(C100, OURS),
            rate(C100, peer),
            ">=",
            target,
            "msg/s",
            show=fmt_rate,
        )
    ours_mb, peer_mb = rate(BULK, OURS, "mbps"), rate(BULK, "websockify", "mbps")
    peer_err = figs.get((BULK, "websockify"), {}).get("error")
    res.check(
        "bulk 1 MiB messages: throughput, ipc-websocketd / websockify",
        ratio(ours_mb, peer_mb),
        ">=",
        1.0,
        detail=f"{fmt(ours_mb)} vs {fmt(peer_mb)} MB/s"
        if peer_mb is not None
        else f"{fmt(ours_mb)} MB/s vs websockify: {peer_err or 'not measured'}",
    )

    n = h.cfg.ws_hold
    held = holds.hold_cached(h, OURS, starters[(C100, OURS)], n)
    for name in ("websockify", "websocketd"):
        if (C100, name) in starters:
            held += holds.hold_cached(h, name, starters[(C100, name)], n, fallback=n // 2)
    t = res.table(f"{n:,} idle connections held (one round trip each, then idle)", holds.HEADERS)
    holds.add_rows(t, held)
    ours = held[0]
    res.check(
        f"{n:,} idle connections: ipc-websocketd RSS",
        ours.get("rss", 0) / 1024 if ours.get("exit") == 0 else None,
        "<=",
        100,
        unit="MiB",
        detail=f"{fmt(ours.get('rss_per_conn'), 1)} KiB per connection",
    )
    h.stop(echo)
    res.notes += [
        "100 connections: the echo service is the C echo_server for ipc-websocketd and "
        "websockify (websockify relays the bytes of each message to the Unix socket and sends "
        "what comes back as messages, without keeping boundaries: loadgen reads its replies "
        "with --ws-stream). websocketd runs `cat` per connection (--binary=true), which "
        "echoes the bytes: it is not the same service, and each connection costs it a process.",
        "1 MiB messages, one in flight: the service is `ipc pongd` for both. websockify "
        "relays payload bytes as they are, so loadgen puts the LibIPC header inside each "
        "message and reads LibIPC frames back (--ws-ipc); ipc-websocketd adds and strips the "
        "header itself. websockify cannot relay 1 MiB messages to the C echo_server, or "
        "several MiB in flight to pongd: for each message it calls a blocking send() of the "
        "whole payload and does not read the service meanwhile, the replies fill the socket "
        "buffers, the service stops reading, both wait for ever (seen with `ss -x`).",
        "websocketd is not given 1 MiB messages: it stalls on messages of a few hundred KB "
        "(its pipe to `cat`, see bench/c/README.md).",
        "ipc-websocketd runs with `-q --no-static` and its defaults (pings every 20 s).",
        "100 connections, wss: the same 64-byte ping-pong over TLS, every relay with the same "
        "EC P-256 certificate (ipc-websocketd --cert/--key, websockify --cert/--key "
        "--ssl-only, websocketd --ssl); figures only, issue 5 sets no wss target.",
    ]
