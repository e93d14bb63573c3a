"""exec (issue 15): ``ipc exec NAME -- cat`` behind ipc-websocketd against
websocketd running ``cat``: a program per WebSocket connection.

Both sides do the same work: each WebSocket message is written to a ``cat``
process's stdin, each read of its stdout becomes a message (``ipc exec
--raw``, ``websocketd --binary=true``). ipc exec's line mode (the default)
and ``--framed`` are measured too. ipc-websocketd hands each connection over
to ipc exec (lock mark ``handoff-websocket``), which answers the handshake
and feeds ``cat`` over pipes: one relay, as websocketd. The relayed path
(``ipc exec --no-handoff``: ipc-websocketd relays to ipc exec, which relays
to cat) is shown for reference. 100 connections, one 64-byte message in
flight each, every process (and with them the ``cat`` children) pinned to
one CPU, runs interleaved, medians. Memory per connection: the RSS (and PSS,
which shares the ``cat`` pages fairly) of every process involved, daemons
and children, while 100 connections are held, minus the idle figure, per
connection.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

from .. import servers
from ..harness import BIN, Harness, descendants, free_port, pss_kib, rss_kib, tool, wait_for
from ..model import SuiteResult, fmt, fmt_rate, fmt_ratio, ratio, spread, status

NAME = "exec"
TITLE = "ipc exec: a program per WebSocket connection, ipc-websocketd + ipc exec vs websocketd"

OURS = "ipc-websocketd + ipc exec --raw"
LINES = "ipc-websocketd + ipc exec (line mode)"
FRAMED = "ipc-websocketd + ipc exec --framed"
RELAYED = "ipc-websocketd + ipc exec --raw --no-handoff (relayed)"
PEER = "websocketd --binary=true"
CONNECTIONS = 100
SERVICE = "cat"


def missing() -> str | None:
    return (
        servers.c_tools_missing()
        or servers.daemon_missing("websocketd", "ipc-websocketd")
        or servers.daemon_missing("ipc_exec", "ipc")
        or servers.peer_missing("websocketd")
    )


def _ours(h: Harness, rundir: Path, mode: str, handoff: bool = True) -> servers.Target:
    """ipc exec NAME -- cat, then ipc-websocketd in front of it; the Target's
    ``extra`` processes are the service (for the memory figures)."""
    flags = ["--mode", mode, "--max-connections-per-ip", "0"]  # one source, 100 connections
    flags += [] if handoff else ["--no-handoff"]
    service = h.start(
        "ipc-exec",
        [BIN / "ipc", "exec", "-q", "--rundir", rundir, *flags, SERVICE, "--", "cat"],
        nofile=servers.nofile(),
        ready=("unix", rundir / SERVICE),
    )
    relay = servers.ipc_websocketd(h, rundir)
    relay.args = [a if a != "/pong" else f"/{SERVICE}" for a in relay.args]
    if mode != "framed":  # a read of cat's output is a message: the replies are a stream
        relay.args.append("--ws-stream")
    _EXTRA[id(relay)] = service.pid
    return relay


def _websocketd(h: Harness) -> servers.Target:
    """websocketd running cat per connection, binary (each read a message)."""
    port = free_port()
    proc = h.start(
        "websocketd",
        [
            tool("websocketd"),
            "--address=127.0.0.1",
            f"--port={port}",
            "--binary=true",
            "--loglevel=fatal",
            "cat",
        ],
        nofile=servers.nofile(),
        ready=("tcp", port),
    )
    return servers.Target(
        PEER, "ws", proc, ["--tcp", f"127.0.0.1:{port}", "--ws", "/", "--ws-stream"]
    )


#: Target id -> the pid of its second process (ours: the ipc exec service).
_EXTRA: dict[int, int] = {}


def _pids(target: servers.Target) -> list[int]:
    pids = [target.proc.pid]
    extra = _EXTRA.get(id(target))
    if extra is not None:
        pids.append(extra)
    return pids


def _memory(pids: list[int]) -> tuple[int, int, int]:
    """RSS KiB, PSS KiB and processes of ``pids`` and their descendants."""
    procs = sum(1 + len(descendants(p)) for p in pids)
    return sum(rss_kib(p) for p in pids), sum(pss_kib(p) for p in pids), procs


def _stop(h: Harness, target: servers.Target) -> None:
    """Stop a target and, for ours, its service (and with it every cat)."""
    h.stop(target)
    extra = _EXTRA.pop(id(target), None)
    for proc in list(h.procs):
        if proc.pid == extra:
            h.stop(proc)


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` and their descendants (live ones: a cat
    that exited took its figure with it; none exit during a measurement)."""
    total = 0
    for pid in [p for root in pids for p in (root, *descendants(root))]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def _ping_pong(h: Harness, target: servers.Restartable, load: list) -> dict:
    """One loadgen run, plus the servers' CPU per message (daemons and cats):
    a figure other work on the same CPU does not move, unlike msg/s."""
    pids = _pids(target.target)
    before = _cpu_seconds(pids)
    r = target.loadgen(load)
    used = _cpu_seconds(pids) - before
    if r.get("rate"):
        messages = r["rate"] * (h.cfg.duration + h.cfg.warmup)  # the warmup's too
        r["cpu_us_per_msg"] = used / messages * 1e6
    return r


def _hold(h: Harness, target: servers.Target, n: int) -> dict:
    pids = _pids(target)
    time.sleep(0.3)
    wait_for(lambda: _memory(pids)[2] == len(pids), 5.0)  # the readiness probe's cat gone
    idle_rss, idle_pss, _ = _memory(pids)
    out: dict = {"idle_rss": idle_rss, "idle_pss": idle_pss}

    def at_hold(count: int) -> None:
        time.sleep(0.3)
        rss, pss, procs = _memory(pids)
        out.update(rss=rss, pss=pss, procs=procs, holding=count)

    r = h.loadgen(
        [*target.args, "--hold", n, "--hold-seconds", h.cfg.hold_seconds],
        on_holding=at_hold,
        timeout=120,
    )
    out["exit"] = r.get("exit")
    out["error"] = r.get("stderr", "")
    if out.get("holding"):
        out["rss_per_conn"] = (out["rss"] - idle_rss) / out["holding"]
        out["pss_per_conn"] = (out["pss"] - idle_pss) / out["holding"]
    return out


def run(h: Harness, res: SuiteResult) -> None:
    starters = {
        OURS: partial(_ours, h, h.mkdir("exec-raw"), "raw"),
        LINES: partial(_ours, h, h.mkdir("exec-line"), "line"),
        FRAMED: partial(_ours, h, h.mkdir("exec-framed"), "framed"),
        PEER: partial(_websocketd, h),
        RELAYED: partial(_ours, h, h.mkdir("exec-relayed"), "raw", False),
    }
    targets = {name: servers.Restartable(h, start) for name, start in starters.items()}
    load = ["-c", CONNECTIONS, "-s", 64, *h.lg_time()]
    try:
        figs = h.measure({name: partial(_ping_pong, h, t, load) for name, t in targets.items()})
    finally:
        for t in targets.values():
            _stop(h, t.target)
    held = {}
    for name in (OURS, LINES, RELAYED, PEER):  # fresh servers: idle means never used
        target = starters[name]()
        try:
            held[name] = _hold(h, target, CONNECTIONS)
        finally:
            _stop(h, target)
    res.raw = {"figures": figs, "held": held}

    t = res.table(
        f"{CONNECTIONS} connections, 64-byte ping-pong, a cat per connection "
        "(medians, pinned to one CPU)",
        [
            "server",
            "msg/s",
            "p50 µs",
            "p99 µs",
            "server CPU µs/msg",
            "vs websocketd",
            "run spread",
            "note",
        ],
    )
    peer = figs[PEER]
    for name, r in figs.items():
        t.rows.append(
            [
                name,
                fmt_rate(r.get("rate")),
                fmt(r.get("p50_us"), 1),
                fmt(r.get("p99_us"), 1),
                fmt(r.get("cpu_us_per_msg"), 1),
                fmt_ratio(ratio(r.get("rate"), peer.get("rate"))),
                spread(r),
                status(r),
            ]
        )
    for name in (OURS, LINES, FRAMED):
        res.check_ratio(
            f"{CONNECTIONS} connections: msg/s, {name} / websocketd",
            figs[name].get("rate"),
            peer.get("rate"),
            ">=",
            1.0,
            "msg/s",
            show=fmt_rate,
        )
    t = res.table(
        f"memory with {CONNECTIONS} connections held (daemons + every cat)",
        ["server", "processes", "RSS idle MiB", "RSS held MiB", "RSS/conn KiB", "PSS/conn KiB"],
    )
    for name, r in held.items():
        ok = r.get("exit") == 0 and "rss" in r
        t.rows.append(
            [
                name,
                fmt(r.get("procs")),
                fmt(r["idle_rss"] / 1024, 1),
                fmt(r["rss"] / 1024, 1) if ok else f"FAILED: {r.get('error')}",
                fmt(r.get("rss_per_conn"), 1) if ok else "-",
                fmt(r.get("pss_per_conn"), 1) if ok else "-",
            ]
        )
    res.notes += [
        "The comparison: ipc exec against websocketd --binary=true, both running cat per "
        "connection, each read of cat's output one message (loadgen reads the replies as a "
        "stream, --ws-stream). websocketd's default line mode is not measured: loadgen sends "
        "binary frames, which websocketd in text mode writes without a newline, so cat's "
        "line never ends. ipc exec's line mode (its default: each message a line on stdin, "
        "each line of stdout a message) does more work than websocketd --binary and is held "
        "to the same target.",
        "Ours is two processes: ipc-websocketd (-q --no-static) and the service `ipc exec "
        "--mode MODE cat -- cat`. ipc-websocketd hands each WebSocket connection over to ipc "
        "exec (the service's lock carries `handoff-websocket`: peer information and the socket "
        "go through its door, before the 101), which answers the handshake and relays to cat "
        "over two pipes: one relay per message, as in websocketd (one Go process with pipes "
        "to each cat). `--no-handoff` (for reference): ipc-websocketd relays every message to "
        "ipc exec, which relays it to cat over a socket pair. Every process and every cat "
        "pinned to one CPU.",
        "--framed: cat echoes the LibIPC frames ipc exec writes, unchanged, so each "
        "WebSocket message comes back as one message (no --ws-stream needed).",
        "server CPU µs/msg: user + system time of the servers' processes (daemons and cats) "
        "during a run over the messages of the run (warmup included): the cost of a message, "
        "which other work on the shared CPU does not change as it changes msg/s.",
        "Memory: RSS counts the pages cat processes share once per process (each cat ~1-2 "
        "MiB, mostly the C library); PSS shares them out. Both include the cat children.",
    ]
