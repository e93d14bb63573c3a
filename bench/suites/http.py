"""http (issue 16): ipc-httpd in front of ``ipc pongd`` against uvicorn.

A real HTTP load generator, Debian's ``wrk`` (one thread, keep-alive, POST
of a 64-byte body by a small Lua script that also prints the figures as
JSON), at 1 and 100 connections against:

* ipc-httpd in front of ``ipc pongd`` (two processes: the request goes on to
  a LibIPC service and back);
* uvicorn serving :func:`app`, a minimal ASGI echo application (one
  process), with ``--http h11`` (the HTTP parser ipc-httpd uses too) and
  with uvicorn's default (httptools when installed).

Everything (servers and wrk) pinned to one CPU; runs interleaved, medians.
Target (the issue): ipc-httpd >= 1.0x uvicorn --http h11 at 100 connections;
the other ratios are figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from .. import servers
from ..harness import BIN, ROOT, Harness, free_port, tool
from ..model import SuiteResult, fmt, fmt_rate, fmt_ratio, ratio, spread, status

NAME = "http"
TITLE = "HTTP: ipc-httpd (+ ipc pongd) vs uvicorn (h11, default)"

OURS = "ipc-httpd + ipc pongd"
H11 = "uvicorn --http h11"
AUTO = "uvicorn (default parser)"
LOADS = {"1 connection": 1, "100 connections": 100}
BODY = b"0123456789abcdef" * 4  # 64 bytes

#: The wrk script: POST BODY; at the end one JSON line of figures.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = "%s"
wrk.headers["Content-Type"] = "application/octet-stream"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%%d,"duration_us":%%d,"errors":%%d,"non2xx":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50), latency:percentile(99)))
end
"""


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The peer: an ASGI application that answers each POST with its body."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/octet-stream")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def missing() -> str | None:
    absent = servers.daemon_missing("httpd", "ipc-httpd")
    if absent:
        return absent
    if tool("wrk") is None:
        return "wrk not installed (apt-get install -y wrk)"
    return None


def _uvicorn_missing() -> str | None:
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        return "uvicorn not installed (pip install uvicorn)"
    return None


def _wrk(h: Harness, port: int, path: str, connections: int, script: str) -> dict:
    argv = [
        *h.pin(True),
        tool("wrk") or "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(h.cfg.duration))}s",
        "-s",
        script,
        f"http://127.0.0.1:{port}{path}",
    ]
    h.record(argv)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=h.cfg.duration + 60)
    figures: dict = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            figures = json.loads(line)
    if out.returncode != 0 or not figures:
        return {"exit": out.returncode or -1, "stderr": (out.stderr or out.stdout)[-400:]}
    seconds = figures["duration_us"] / 1e6
    bad = figures["errors"] + figures["non2xx"]
    result = {
        "exit": 0,
        "rate": figures["requests"] / seconds if seconds else 0.0,
        "p50_us": figures["p50_us"],
        "p99_us": figures["p99_us"],
        "errors": bad,
    }
    if bad:
        result["stderr"] = f"{bad} errors or non-2xx answers"
    return result


def _uvicorn(h: Harness, parser: str | None) -> int:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.suites.http:app",
        "--app-dir",
        ROOT,
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--log-level",
        "warning",
        "--no-access-log",
    ] + (["--http", parser] if parser else [])
    h.start(f"uvicorn-{parser or 'auto'}", argv, nofile=servers.nofile(), ready=("tcp", port))
    return port


def run(h: Harness, res: SuiteResult) -> None:
    d = h.mkdir("http")
    script = h.tmp / "post.lua"
    script.write_text(WRK_SCRIPT % BODY.decode())
    servers.pongd(h, d)
    port = free_port()
    h.start(
        "ipc-httpd",
        [
            BIN / "ipc-httpd",
            "-q",
            *servers.UNCAPPED,
            "--rundir",
            d,
            "--listen",
            f"127.0.0.1:{port}",
        ],
        nofile=servers.nofile(),
        ready=("tcp", port),
    )
    targets = {OURS: (port, "/pong")}
    absent = _uvicorn_missing()
    if absent:
        res.notes.append(f"{absent}: not compared")
    else:
        targets[H11] = (_uvicorn(h, "h11"), "/")
        targets[AUTO] = (_uvicorn(h, None), "/")
    variants = {
        (load, name): (lambda p=p, path=path, c=c: _wrk(h, p, path, c, str(script)))
        for load, c in LOADS.items()
        for name, (p, path) in targets.items()
    }
    figs = h.measure(variants)  # type: ignore[arg-type]
    res.raw = {" / ".join(k): v for k, v in figs.items()}
    t = res.table(
        "keep-alive POST of 64 bytes, wrk -t1 (medians, pinned to one CPU)",
        ["load", "server", "req/s", "p50 µs", "p99 µs", "ours vs this", "run spread", "note"],
    )
    for (load, name), r in figs.items():
        ours = figs[(load, OURS)]
        t.rows.append(
            [
                load,
                name,
                fmt_rate(r.get("rate")),
                fmt(r.get("p50_us"), 0),
                fmt(r.get("p99_us"), 0),
                fmt_ratio(ratio(ours.get("rate"), r.get("rate"))),
                spread(r),
                status(r),
            ]
        )

    def rate(load: str, name: str) -> float | None:
        return figs.get((load, name), {}).get("rate")

    res.check_ratio(
        f"100 connections: req/s, ipc-httpd / {H11}",
        rate("100 connections", OURS),
        rate("100 connections", H11),
        ">=",
        1.0,
        "req/s",
        show=fmt_rate,
    )
    res.notes.append(
        "ipc-httpd is two processes (the daemon and ipc pongd, a LibIPC service) on the "
        "one CPU, uvicorn one: each request makes one more hop through a Unix socket. "
        "At 1 connection every request waits for the previous one, so the extra hop "
        "shows in full."
    )
