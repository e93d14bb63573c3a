"""tls (issue 4): ipc-tlsd against stunnel, both in front of the same Unix echo service."""

from __future__ import annotations

from functools import partial

from .. import servers
from ..harness import Harness
from ..model import SuiteResult, fmt, fmt1, fmt_rate, fmt_ratio, ratio, spread, status

NAME = "tls"
TITLE = "TLS: ipc-tlsd vs stunnel (TLS -> Unix socket relay)"

PP, BULK, CONN = "1 connection ping-pong", "bulk 1 MiB, 4 in flight", "new connections/s"
LOADS = {PP: ["-c", 1], BULK: ["-c", 1, "-s", "1M", "-i", 4], CONN: ["--connect-rate", "-c", 4]}


def missing() -> str | None:
    return (
        servers.c_tools_missing()
        or servers.daemon_missing("tlsd", "ipc-tlsd")
        or servers.peer_missing("stunnel4")
    )


def run(h: Harness, res: SuiteResult) -> None:
    certs = servers.make_certs(h)
    h.note(f"# certificates: {certs.how}")
    d = h.mkdir("tls")
    echo = servers.echo_server(h, d / "pong")
    tlsd = servers.Restartable(h, partial(servers.ipc_tlsd, h, d, certs))
    stun = servers.Restartable(h, partial(servers.stunnel, h, d / "pong", certs))
    try:
        figs = h.measure(
            {
                (load, t.tool): partial(t.loadgen, [*args, *h.lg_time()])
                for load, args in LOADS.items()
                for t in (tlsd, stun)
            }
        )
    finally:
        for p in (stun, tlsd, echo):
            h.stop(p)
    res.raw = {" / ".join(k): v for k, v in figs.items()}

    t = res.table(
        "figures (medians, pinned to one CPU)",
        [
            "load",
            "relay",
            "rate /s",
            "MB/s",
            "p50 µs",
            "p99 µs",
            "per loop min/max",
            "rate vs stunnel",
            "p50 vs stunnel",
            "run spread",
            "note",
        ],
    )
    for (load, relay), r in figs.items():
        peer = figs[(load, "stunnel")]
        t.rows.append(
            [
                load,
                relay,
                fmt_rate(r.get("rate")),
                fmt(r.get("mbps"), 1),
                fmt(r.get("p50_us"), 1),
                fmt(r.get("p99_us"), 1),
                f"{fmt(r.get('per_conn_min'))}/{fmt(r.get('per_conn_max'))}",
                fmt_ratio(ratio(r.get("rate"), peer.get("rate"))),
                fmt_ratio(ratio(r.get("p50_us"), peer.get("p50_us"))),
                spread(r),
                status(r),
            ]
        )

    def get(load: str, relay: str, key: str) -> float | None:
        return figs[(load, relay)].get(key)

    res.check_ratio(
        "bulk 1 MiB, 4 in flight: throughput, ipc-tlsd / stunnel",
        get(BULK, "ipc-tlsd", "mbps"),
        get(BULK, "stunnel", "mbps"),
        ">=",
        1.0,
        "MB/s",
    )
    res.check_ratio(
        "new TLS connections/s, ipc-tlsd / stunnel",
        get(CONN, "ipc-tlsd", "rate"),
        get(CONN, "stunnel", "rate"),
        ">=",
        0.8,
        "/s",
    )
    res.check_ratio(
        "1 connection ping-pong: p50 latency, ipc-tlsd / stunnel",
        get(PP, "ipc-tlsd", "p50_us"),
        get(PP, "stunnel", "p50_us"),
        "<=",
        1.3,
        "µs",
        show=fmt1,
    )
    res.notes.append(
        f"Certificates: {certs.how}; loadgen verifies the server against the CA "
        "(`--ca`, `--sni localhost`). Same certificate and key for both relays; both "
        "negotiate what OpenSSL prefers (TLS 1.3). New connections: 4 parallel loops of "
        "connect + full TLS handshake (no session resumption) + TCPd handshake for ipc-tlsd "
        "+ one 64-byte round trip + close; the client's handshake work runs on the same "
        "pinned CPU for both."
    )
    res.notes.append(
        "stunnel runs its default threading model (one thread per connection) with "
        "`debug = crit`; ipc-tlsd runs with `-q` (warnings only)."
    )
