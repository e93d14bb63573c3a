"""scale (issue 7): idle connections and connect/close cycles through ipc-tcpd."""

from __future__ import annotations

import time
from functools import partial

from .. import holds, servers
from ..harness import Harness, fd_count, rss_kib, wait_for
from ..model import SuiteResult, fmt

NAME = "scale"
TITLE = "Scale: idle connections and connect/close cycles"

RSS_SLACK_KIB = 1024  # what "RSS back to baseline" tolerates (allocator noise)
HANDSHAKE_TIMEOUT = 5.0  # ipc-tcpd's default --handshake-timeout


def missing() -> str | None:
    return servers.c_tools_missing() or servers.daemon_missing("tcpd", "ipc-tcpd")


def run(h: Harness, res: SuiteResult) -> None:
    d = h.mkdir("scale", 0o711)  # hitch's worker (user nobody) must reach the socket
    echo = servers.echo_server(h, d / "pong")
    res.raw = {}
    _many(h, res, d)
    _compare(h, res, d)
    _cycles(h, res, d)
    _exhaustion(h, res, d)
    h.stop(echo)


def _many(h: Harness, res: SuiteResult, d) -> None:
    want, limit = h.cfg.scale_hold, servers.nofile()
    n = min(want, (limit - 64) // 2)  # a relayed connection costs 2 descriptors
    r = holds.hold(h, partial(servers.ipc_tcpd, h, d), n)
    res.raw["many"] = r
    t = res.table(f"{n:,} idle connections through ipc-tcpd", holds.HEADERS)
    holds.add_rows(t, [r])
    t.rows[-1][-1] += (
        f"; fds idle {r['idle_fds']}, held {r.get('fds', '-')}, after {r.get('after_fds', '-')}"
    )
    limited = n < want
    res.check(
        f"{want:,} idle connections held by ipc-tcpd",
        None if limited else float(r.get("held", 0)),
        ">=",
        want,
        unit="conns",
        detail=(
            f"not measurable here: RLIMIT_NOFILE hard limit {limit:,} and no "
            f"CAP_SYS_RESOURCE to raise it; held {r.get('held', 0):,} (the most "
            "that fits: 2 fds per relayed connection)"
        )
        if limited
        else f"set up in {fmt(r.get('setup_seconds'), 1)} s",
    )
    res.check(
        f"ipc-tcpd RSS per held connection (at {r.get('held', n):,})",
        r.get("rss_per_conn") if r.get("exit") == 0 else None,
        "<=",
        20,
        unit="KiB",
        detail=f"{fmt(r['idle_rss'] / 1024, 1)} MiB idle, "
        f"{fmt(r.get('rss', 0) / 1024, 1)} MiB holding",
    )
    if limited:
        res.notes.append(
            f"{want:,} connections through ipc-tcpd need {2 * want + 10:,}+ descriptors in "
            f"the daemon; this machine's hard RLIMIT_NOFILE is {limit:,} and root here lacks "
            f"CAP_SYS_RESOURCE, so {n:,} were held instead."
        )


def _compare(h: Harness, res: SuiteResult, d) -> None:
    n = h.cfg.ws_hold
    certs = servers.make_certs(h)
    sock = d / "pong"
    candidates = [
        ("ipc-tcpd", None, partial(servers.ipc_tcpd, h, d)),
        ("socat", servers.peer_missing("socat"), partial(servers.socat, h, sock)),
        (
            "ipc-tlsd",
            servers.daemon_missing("tlsd", "ipc-tlsd"),
            partial(servers.ipc_tlsd, h, d, certs),
        ),
        ("stunnel", servers.peer_missing("stunnel4"), partial(servers.stunnel, h, sock, certs)),
        ("hitch", servers.peer_missing("hitch"), partial(servers.hitch, h, sock, certs)),
        (
            "ipc-websocketd",
            servers.daemon_missing("websocketd", "ipc-websocketd"),
            partial(servers.ipc_websocketd, h, d),
        ),
        ("websocketd", servers.peer_missing("websocketd"), partial(servers.websocketd, h)),
        ("websockify", servers.peer_missing("websockify"), partial(servers.websockify, h, sock)),
    ]
    results = []
    for name, why, start in candidates:
        if why:
            res.notes.append(f"{name} not compared: {why}")
            continue
        results += holds.hold_cached(h, name, start, n, fallback=n // 2)
    res.raw["compare"] = results
    t = res.table(
        f"{n:,} idle connections: memory of each server (one round trip each, then idle)",
        holds.HEADERS,
    )
    holds.add_rows(t, results)
    res.notes.append(
        "Compare servers of the same protocol: tcp (ipc-tcpd, socat), tls (ipc-tlsd, "
        "stunnel, hitch; all with the same EC P-256 certificate), ws (ipc-websocketd, "
        "websocketd, websockify). hitch runs one worker as user nobody (it refuses root). "
        "RSS sums the process tree (socat and websockify fork per connection, websocketd "
        "runs one `cat` each): PSS is the fairer figure for those."
    )


def _cycles(h: Harness, res: SuiteResult, d) -> None:
    n = h.cfg.cycles
    tcpd = servers.ipc_tcpd(h, d)
    pid = tcpd.proc.pid
    loops = 4
    try:
        h.loadgen([*tcpd.args, "--connect-rate", "-c", loops, "-n", 500 // loops, "-w", 0])
        time.sleep(1.0)
        base_fds, base_rss = fd_count(pid), rss_kib(pid)
        r = h.loadgen([*tcpd.args, "--connect-rate", "-c", loops, "-n", n // loops, "-w", 0])
        wait_for(lambda: fd_count(pid) <= base_fds, 5.0)
        time.sleep(0.5)
        fds, rss_now = fd_count(pid), rss_kib(pid)
        time.sleep(HANDSHAKE_TIMEOUT + 1)  # every handshake deadline has expired
        rss = rss_kib(pid)
        # a second batch: if the memory is reused, RSS stays put (retention, not a leak)
        r2 = h.loadgen([*tcpd.args, "--connect-rate", "-c", loops, "-n", n // loops, "-w", 0])
        time.sleep(HANDSHAKE_TIMEOUT + 1)
        rss2 = rss_kib(pid)
    finally:
        h.stop(tcpd)
    done = r.get("connects", 0)
    res.raw["cycles"] = {
        "result": r,
        "base_fds": base_fds,
        "fds": fds,
        "base_rss": base_rss,
        "rss_now": rss_now,
        "rss": rss,
        "rss_second_batch": rss2,
        "second": r2,
    }
    t = res.table(
        f"{n:,} connect / round trip / close cycles through ipc-tcpd",
        [
            "cycles done",
            "rate /s",
            "fds before",
            "fds after",
            "RSS before MiB",
            "RSS just after MiB",
            f"RSS {HANDSHAKE_TIMEOUT + 1:g} s later MiB",
            "growth (later)",
            "RSS after a 2nd batch MiB",
            "note",
        ],
    )
    t.rows.append(
        [
            f"{done:,.0f}",
            fmt(r.get("rate")),
            str(base_fds),
            str(fds),
            fmt(base_rss / 1024, 2),
            fmt(rss_now / 1024, 2),
            fmt(rss / 1024, 2),
            f"{rss - base_rss:+,} KiB ({(rss - base_rss) * 1024 / max(done, 1):+.0f} B per cycle)",
            fmt(rss2 / 1024, 2),
            r.get("stderr", ""),
        ]
    )
    ok = r.get("exit") == 0 and done >= n
    res.check(
        f"{n:,} connect/close cycles: ipc-tcpd descriptors after / before",
        fds / base_fds if ok and base_fds > 0 else None,
        "<=",
        1.0,
        unit="of baseline",
        detail=f"{base_fds} before, {fds} after",
    )
    res.check(
        f"{n:,} connect/close cycles: ipc-tcpd RSS growth",
        float(rss - base_rss) if ok else None,
        "<=",
        RSS_SLACK_KIB,
        unit="KiB",
        detail=f"{base_rss / 1024:.2f} -> {rss / 1024:.2f} MiB; {rss2 / 1024:.2f} MiB after "
        f"a second batch of {n:,}",
    )
    res.notes.append(
        f"Connect/close cycles: 4 parallel loops of connect + TCPd handshake + one 64-byte "
        f"round trip + close (RST, no TIME_WAIT); the baseline is taken after a warm-up of "
        f"500 cycles; the descriptors are counted once they are back (at most 5 s), the "
        f"RSS then and again {HANDSHAKE_TIMEOUT + 1:g} s later (after ipc-tcpd's handshake "
        "deadlines have expired: see below). "
        f"RSS growth up to {RSS_SLACK_KIB} KiB counts as back to baseline (Python's "
        "allocator keeps some freed memory)."
    )
    if rss - base_rss > RSS_SLACK_KIB:
        res.notes.append(
            f"ipc-tcpd's RSS after {n:,} cycles: {rss_now - base_rss:+,} KiB just after, "
            f"{rss - base_rss:+,} KiB {HANDSHAKE_TIMEOUT + 1:g} s later, "
            f"{rss2 - base_rss:+,} KiB after a second batch of {n:,}. Investigated by hand "
            "with tracemalloc: the live Python objects of ipc-tcpd grew by under 1 KB over "
            "20,000 further cycles, so this is not a leak of objects. (1) Every connection's "
            "handshake deadline stays in the loop's timer heap, with the handshake objects "
            "its callback references, until it expires 5 s later even when the handshake "
            "finished at once (TimerHandle.cancel() only sets a flag): about 1.1 KB x "
            "connection rate x 5 s at the peak (the 'just after' column; ~24 MB at 4,500 "
            "connections/s). (2) The allocator keeps most of those pages afterwards and "
            "reuses them: RSS grows less with each batch (by hand, 6 batches of 10,000: "
            "+4.5, +2.7, +1.0, +1.0, 0, +1.0 MB)."
        )


def _exhaustion(h: Harness, res: SuiteResult, d) -> None:
    """ipc-tcpd started from a shell: soft RLIMIT_NOFILE 1024 (the usual default; the
    hard limit is higher) and more clients than 1024 descriptors allow. Does it raise
    its soft limit, and does it survive running out?"""
    soft, hard, n = 1024, servers.nofile(), 600
    tcpd = servers.ipc_tcpd(h, d, nofile_limit=f"{soft}:{hard}")
    proc = tcpd.proc
    try:
        r = h.loadgen([*tcpd.args, "--hold", n, "--hold-seconds", 1], timeout=60)
        time.sleep(0.5)
        alive = proc.alive()
        after = h.loadgen([*tcpd.args, "-d", 0.5, "-w", 0]) if alive else {}
        log = proc.log_tail(3)
    finally:
        h.stop(proc)
    res.raw["exhaustion"] = {"hold": r, "alive": alive, "after": after, "log": log}
    t = res.table(
        f"descriptors: ipc-tcpd started with RLIMIT_NOFILE soft {soft} / hard {hard:,} "
        f"(a shell's defaults), {n} clients (need {2 * n}+ descriptors)",
        ["clients' result", "ipc-tcpd afterwards", "a new client afterwards"],
    )
    held = r.get("exit") == 0
    t.rows.append(
        [
            f"all {n} held" if held else f"exit {r.get('exit')}: {r.get('stderr', '')}",
            "running" if alive else f"EXITED: {log.splitlines()[-1] if log else '?'}",
            (
                f"served ({fmt(after.get('rate'))} msg/s)"
                if after.get("exit") == 0
                else f"failed: {after.get('stderr', 'daemon gone')}"
            ),
        ]
    )
    res.notes.append(
        "Descriptors are not one of the issue's targets; they are checked because a relay "
        "holding many connections meets the limit. A server started from a shell gets the "
        f"soft limit ({soft}), whatever its --max-connections (default 10,000) says; the "
        "systemd units set LimitNOFILE=65536. "
        + (
            "ipc-tcpd does not raise its soft limit to the hard one (echo_server and loadgen "
            f"do): it can relay only ~{(soft - 20) // 2} connections unless started with "
            "`ulimit -n` raised; beyond that it closes the new ones (and keeps serving)."
            if not held
            else "ipc-tcpd raised its soft limit and held them all."
        )
        + ("" if alive else " ipc-tcpd died when it ran out of descriptors.")
    )
