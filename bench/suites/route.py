"""route (issue 18): a client routed through ipcd vs one that dials TCP itself.

Host B: ipc-tcpd and ipc pongd (hand-offs on). Host A: ipcd and ipc-tcpd,
whose outbound side hands the connected socket over, so ipcd gives the
client the TCP connection itself. The same Python client (bench/routed.py)
does ping-pong either way; pinned, interleaved medians. Target: routed at
least 0.9x the round-trip rate of direct.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .. import servers
from ..harness import BIN, Harness, free_port
from ..model import SuiteResult, fmt, fmt_rate, fmt_ratio, ratio, spread, status

NAME = "route"
TITLE = "Routed through ipcd (hand-off) vs a direct TCP connection"
HERE = Path(servers.__file__).parent
DIRECT, ROUTED = "direct TCP + TCPd handshake", "routed: IPC_NETWORK through ipcd"


def missing() -> str | None:
    return servers.daemon_missing("tcpd", "ipc-tcpd")


def _client(h: Harness, mode: str, where: str, env: dict[str, str]) -> dict:
    argv = [*h.pin(True), sys.executable, str(HERE / "routed.py"), mode, where]
    argv.append(str(h.cfg.duration))
    h.record(argv)
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=h.cfg.duration + 60, env={**os.environ, **env}
    )
    if out.returncode != 0:
        return {"exit": out.returncode, "stderr": out.stderr[-400:]}
    return {"exit": 0, **json.loads(out.stdout)}


def run(h: Harness, res: SuiteResult) -> None:
    b, a = h.mkdir("route-b"), h.mkdir("route-a")
    servers.pongd(h, b, handoff=True)
    port = free_port()
    h.start(
        "ipc-tcpd-b",
        [BIN / "ipc-tcpd", "-q", *servers.UNCAPPED, "--rundir", b, "--listen", f"127.0.0.1:{port}"],
        ready=("tcp", port),
    )
    h.start("ipcd", [BIN / "ipcd", "--rundir", a], ready=("unix", a / "ipc"))
    h.start(
        "ipc-tcpd-a",
        [BIN / "ipc-tcpd", "-q", "--rundir", a, "--listen", f"127.0.0.1:{free_port()}"],
        ready=("unix", a / "tcp"),
    )
    env = {"RUNDIR": str(a), "IPC_NETWORK": f"pong tcp://127.0.0.1:{port}/pong"}
    figs = h.measure(
        {
            DIRECT: lambda: _client(h, "direct", str(port), {}),
            ROUTED: lambda: _client(h, "routed", str(a), env),
        }
    )
    t = res.table(
        "1 connection ping-pong, 16-byte messages (medians, pinned)",
        ["client", "socket", "round trips/s", "µs each", "vs direct", "run spread", "note"],
    )
    for key, r in figs.items():
        t.rows.append(
            [
                key,
                {1: "TCP", 0: "Unix (a relay)"}.get(r.get("tcp_socket"), "-"),
                fmt_rate(r.get("rate")),
                fmt(r.get("p50_us"), 1),
                fmt_ratio(ratio(r.get("rate"), figs[DIRECT].get("rate"))),
                spread(r),
                status(r),
            ]
        )
    res.raw = figs
    res.check_ratio(
        "routed through ipcd: round trips/s vs a direct TCP connection",
        figs[ROUTED].get("rate"),
        figs[DIRECT].get("rate"),
        ">=",
        0.9,
        "round trips/s",
        show=fmt_rate,
    )
