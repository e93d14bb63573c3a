"""identity (issue 14): what asking who is calling costs a new connection.

One ipc-tcpd, three echo services written on ipc_core (bench/peerecho.py):
the same program with and without peer information, so the difference is the
door (the offer, the service's verdict), and a plain one reached with a PROXY
v2 header first (ipc-tcpd --proxy-protocol 127.0.0.0/8: the client rotates
its source address over 127.0.0.2-201). The client (bench/connrate.py)
opens connections one after another: connect, name, ``ok``, one echo,
close. Everything pinned to one CPU; medians of runs interleaved (A B C A B
C...). No target in the issue: figures and ratios.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .. import servers
from ..harness import BIN, Harness, free_port
from ..model import SuiteResult, fmt, fmt_rate, fmt_ratio, ratio, spread, status

NAME = "identity"
TITLE = "Identity: connection set-up through ipc-tcpd with and without peer information"

PLAIN, INFO, PROXY = "plain service", "peer information (door)", "PROXY v2 header, plain service"
HERE = Path(servers.__file__).parent
TRUST = ("--proxy-protocol", "127.0.0.0/8")


def missing() -> str | None:
    return servers.daemon_missing("tcpd", "ipc-tcpd")


def _service(h: Harness, rundir: Path, name: str, peer_info: bool) -> None:
    argv = [sys.executable, HERE / "peerecho.py", rundir, name]
    h.start(
        f"peerecho-{name}",
        argv + (["--peer-info"] if peer_info else []),
        ready=("unix", rundir / name),
    )


def _client(h: Harness, port: int, service: str, proxy: bool) -> dict:
    argv = [
        *h.pin(True),
        sys.executable,
        str(HERE / "connrate.py"),
        str(port),
        service,
        str(h.cfg.duration),
    ] + (["--proxy"] if proxy else [])
    h.record(argv)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=h.cfg.duration + 60)
    if out.returncode != 0:
        return {"exit": out.returncode, "stderr": out.stderr[-400:]}
    return {"exit": 0, **json.loads(out.stdout)}


def run(h: Harness, res: SuiteResult) -> None:
    d = h.mkdir("identity")
    _service(h, d, "plain", False)
    _service(h, d, "asks", True)
    port, pport = free_port(), free_port()
    common = [BIN / "ipc-tcpd", "-q", *servers.UNCAPPED, "--rundir", d]
    h.start("ipc-tcpd", [*common, "--listen", f"127.0.0.1:{port}"], ready=("tcp", port))
    h.start(
        "ipc-tcpd-proxy",
        [*common, "--service-name", "tcp2", "--listen", f"127.0.0.1:{pport}", *TRUST],
        ready=("tcp", pport),
    )
    figs = h.measure(
        {
            PLAIN: lambda: _client(h, port, "plain", False),
            INFO: lambda: _client(h, port, "asks", False),
            PROXY: lambda: _client(h, pport, "plain", True),
        }
    )
    base = figs[PLAIN]
    t = res.table(
        "sequential connections: connect, name, ok, one echo, close (medians, pinned)",
        [
            "path",
            "conn/s",
            "p50 µs",
            "p99 µs",
            "rate vs plain",
            "p50 vs plain",
            "run spread",
            "note",
        ],
    )
    for key, r in figs.items():
        t.rows.append(
            [
                key,
                fmt_rate(r.get("rate")),
                fmt(r.get("p50_us"), 0),
                fmt(r.get("p99_us"), 0),
                fmt_ratio(ratio(r.get("rate"), base.get("rate"))),
                fmt_ratio(ratio(r.get("p50_us"), base.get("p50_us"))),
                spread(r),
                status(r),
            ]
        )
    res.raw = figs
    res.notes.append(
        "Peer information adds one exchange on a Unix socket per connection (the offer, "
        "then the service's verdict, read by the service as a CONNECTION event) and the "
        "record's encoding; the relay afterwards is the same switch."
    )
