"""Idle connections: hold N through a server and read its memory meanwhile."""

from __future__ import annotations

import time
from collections.abc import Callable

from .harness import Harness, descendants, fd_count, pss_kib, rss_kib, wait_for
from .model import Table, fmt

# (tool, n) -> result: the ws and scale suites measure some of the same servers
_cache: dict[tuple[str, int], dict] = {}

HEADERS = [
    "server",
    "protocol",
    "connections held",
    "processes",
    "RSS idle MiB",
    "RSS held MiB",
    "RSS/conn KiB",
    "PSS held MiB",
    "PSS/conn KiB",
    "note",
]


def hold(h: Harness, start: Callable, n: int, settle: float = 0.3) -> dict:
    """Start a fresh server with start() -> servers.Target, hold n idle connections
    (one round trip each) through it, return its memory idle and while holding."""
    target = start()
    key = (target.tool, n)
    pid = target.proc.pid
    try:
        time.sleep(settle)
        out = {
            "tool": target.tool,
            "proto": target.proto,
            "n": n,
            "idle_rss": rss_kib(pid),
            "idle_pss": pss_kib(pid),
            "idle_fds": fd_count(pid),
        }

        def at_hold(count: int) -> None:
            time.sleep(settle)
            out.update(
                rss=rss_kib(pid),
                pss=pss_kib(pid),
                fds=fd_count(pid),
                procs=1 + len(descendants(pid)),
                holding=count,
            )

        r = h.loadgen(
            [*target.args, "--hold", n, "--hold-seconds", h.cfg.hold_seconds],
            on_holding=at_hold,
            timeout=120 + n / 50,
        )
        # after the client closed everything: are the descriptors given back?
        wait_for(lambda: fd_count(pid) <= out["idle_fds"], 5.0)
        out.update(after_fds=fd_count(pid), after_rss=rss_kib(pid), alive=target.proc.alive())
    finally:
        h.stop(target)
    out.update(
        exit=r.get("exit"),
        held=r.get("held", 0) if r.get("exit") == 0 else 0,
        setup_seconds=r.get("setup_seconds"),
        error=r.get("stderr", ""),
    )
    if "rss" in out and out.get("holding"):
        out["rss_per_conn"] = (out["rss"] - out["idle_rss"]) / out["holding"]
        out["pss_per_conn"] = (out["pss"] - out["idle_pss"]) / out["holding"]
    _cache[key] = out
    return out


def hold_cached(
    h: Harness, tool: str, start: Callable, n: int, fallback: int | None = None
) -> list[dict]:
    """hold(), reusing a result measured earlier in this run; if it fails and
    `fallback` is given, also measure `fallback` connections (for a per-connection
    figure of a server that cannot reach n)."""
    first = _cache.get((tool, n)) or hold(h, start, n)
    results = [first]
    if first.get("exit") != 0 and fallback and fallback < n:
        results.append(_cache.get((tool, fallback)) or hold(h, start, fallback))
    return results


def add_rows(table: Table, results: list[dict]) -> None:
    for r in results:
        failed = r.get("exit") != 0
        note = (
            f"FAILED at {r['n']}: {r.get('error') or 'exit ' + str(r.get('exit'))}"
            if failed
            else f"setup {fmt(r.get('setup_seconds'), 1)} s"
        )
        table.rows.append(
            [
                r["tool"],
                r["proto"],
                f"{r.get('held', 0):,} of {r['n']:,}",
                fmt(r.get("procs")),
                fmt(r["idle_rss"] / 1024, 1),
                fmt(r["rss"] / 1024, 1) if "rss" in r else "-",
                fmt(r.get("rss_per_conn"), 1) if not failed else "-",
                fmt(r["pss"] / 1024, 1) if "pss" in r else "-",
                fmt(r.get("pss_per_conn"), 1) if not failed else "-",
                note,
            ]
        )
