"""core (issue 2): `ipc pongd` against the C epoll echo server, on a Unix socket."""

from __future__ import annotations

from functools import partial

from .. import servers
from ..harness import Harness
from ..model import SuiteResult, fairness, fmt, fmt_fair, fmt_rate, fmt_ratio, ratio, spread, status

NAME = "core"
TITLE = "Core: ipc pongd vs the C echo server (Unix socket, 64-byte messages)"

CLIENTS = {"1 client": ["-c", 1], "100 clients": ["-c", 100]}
C, PONGD, PYECHO = "C echo_server", "ipc pongd", "Python selectors echo"


def missing() -> str | None:
    return servers.c_tools_missing() or servers.daemon_missing("ipc", "ipc")


def _measure(h: Harness, pinned: bool, with_pyecho: bool) -> dict:
    d = h.mkdir("core-pinned" if pinned else "core-unpinned")
    started = [servers.echo_server(h, d / "echo", pinned), servers.pongd(h, d, pinned)]
    socks = {C: d / "echo", PONGD: d / "pong"}
    if with_pyecho:
        started.append(servers.pyecho(h, d / "pyecho", pinned))
        socks[PYECHO] = d / "pyecho"
    try:
        variants = {
            (clients, server): partial(
                h.loadgen, ["--unix", sock, *args, *h.lg_time()], pinned=pinned
            )
            for clients, args in CLIENTS.items()
            for server, sock in socks.items()
        }
        return h.measure(variants)
    finally:
        for proc in started:
            h.stop(proc)


def run(h: Harness, res: SuiteResult) -> None:
    pinned = _measure(h, True, with_pyecho=True)
    unpinned = _measure(h, False, with_pyecho=False)
    res.raw = {
        "pinned": {" / ".join(k): v for k, v in pinned.items()},
        "unpinned": {" / ".join(k): v for k, v in unpinned.items()},
    }

    t = res.table(
        "figures (medians)",
        [
            "clients",
            "server",
            "CPUs",
            "msg/s",
            "p50 µs",
            "p99 µs",
            "max/min per client",
            "vs C",
            "run spread",
            "note",
        ],
    )
    for label, figs in (("pinned (cpu 0)", pinned), ("unpinned", unpinned)):
        for (clients, server), r in figs.items():
            base = figs[(clients, C)]
            t.rows.append(
                [
                    clients,
                    server,
                    label,
                    fmt_rate(r.get("rate")),
                    fmt(r.get("p50_us"), 1),
                    fmt(r.get("p99_us"), 1),
                    fmt_fair(r),
                    fmt_ratio(ratio(r.get("rate"), base.get("rate"))),
                    spread(r),
                    status(r),
                ]
            )

    one_c, one_p = pinned[("1 client", C)], pinned[("1 client", PONGD)]
    hun_c, hun_p = pinned[("100 clients", C)], pinned[("100 clients", PONGD)]
    res.check(
        "1 client ping-pong: pongd / C (msg/s)",
        ratio(one_p.get("rate"), one_c.get("rate")),
        ">=",
        0.35,
        aim=0.5,
        detail=f"{fmt_rate(one_p.get('rate'))} vs {fmt_rate(one_c.get('rate'))} msg/s",
    )
    res.check(
        "100 clients: pongd / C (msg/s)",
        ratio(hun_p.get("rate"), hun_c.get("rate")),
        ">=",
        0.25,
        detail=f"{fmt_rate(hun_p.get('rate'))} vs {fmt_rate(hun_c.get('rate'))} msg/s",
    )
    p99 = hun_p.get("p99_us")
    res.check(
        "100 clients: pongd p99 latency",
        None if p99 is None else p99 / 1000,
        "<=",
        3.0,
        unit="ms",
        detail=f"C: {fmt((hun_c.get('p99_us') or 0) / 1000, 2)} ms",
    )
    res.check(
        "100 clients: pongd fairness (max/min messages per client)",
        fairness(hun_p),
        "<=",
        2.0,
        unit="",
        detail=f"{hun_p.get('per_conn_max', 0):.0f} / {hun_p.get('per_conn_min', 0):.0f}",
    )
    res.notes.append(
        "The Python selectors echo (bench/pyecho.py) echoes raw bytes without parsing "
        "frames: it is what a naive single-threaded Python server costs, a reference point "
        "for pongd (which decodes every frame into a message and builds the reply)."
    )
