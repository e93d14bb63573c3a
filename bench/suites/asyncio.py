"""asyncio (issue 17): ipc_core.asyncio against the Context equivalents.

Two figures, each a ratio to Context in the same run, everything pinned on
one CPU (taskset -c 0), medians of the runs:

* client: closed-loop ping-pong of 64-byte messages against `ipc pongd` at 1
  and 100 connections, by a Python client written with Context
  (write/wait_event) and one written with ipc_core.asyncio (one task per
  connection: send, recv). Both clients are this module
  (``python -m bench.suites.asyncio client MODE ...``); each reports its
  messages per second over the measured time, after a warm-up.
* service: the C load generator (bench/c/loadgen, 1 and 100 connections)
  against an echo service written with Context (the event loop of the
  examples) and one written with ipc_core.asyncio (``serve``, one task per
  client): ``python -m bench.suites.asyncio service MODE ...``.

With uvloop importable, the asyncio rows are also measured on uvloop (not a
dependency: the report says whether it was there).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from .. import servers
from ..harness import ROOT, Harness
from ..model import SuiteResult, fmt, fmt_rate, fmt_ratio, ratio, spread, status

NAME = "asyncio"
TITLE = "asyncio: ipc_core.asyncio vs Context (client ping-pong, service under loadgen)"

CONNS = {"1 connection": 1, "100 connections": 100}
PAYLOAD = b"x" * 64
CONTEXT, ASYNCIO, UVLOOP = "Context", "ipc_core.asyncio", "ipc_core.asyncio + uvloop"
TARGET = 0.7


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def modes() -> list[str]:
    return [CONTEXT, ASYNCIO] + ([UVLOOP] if uvloop_available() else [])


_MODE_ARG = {CONTEXT: "context", ASYNCIO: "asyncio", UVLOOP: "uvloop"}


def missing() -> str | None:
    return servers.c_tools_missing() or servers.daemon_missing("ipc", "ipc")


def _command(*args: Any) -> list[str]:
    return [sys.executable, "-m", "bench.suites.asyncio", *map(str, args)]


def _env() -> dict[str, str]:
    """The children import this module (and uvloop wherever the parent found it)."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


# ------------------------------------------------------------------ the suite


def _client(h: Harness, rundir: Path, mode: str, conns: int) -> dict:
    argv = h.pin(True) + _command(
        "client", _MODE_ARG[mode], rundir, conns, h.cfg.duration, h.cfg.warmup
    )
    h.record(argv)
    try:
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env={**os.environ, **_env()},
            timeout=h.cfg.duration + h.cfg.warmup + 60,
        )
    except subprocess.TimeoutExpired:
        return {"exit": -1, "stderr": "the client did not finish (stalled)"}
    if out.returncode != 0:
        tail = " | ".join(out.stderr.strip().splitlines()[-3:])
        return {"exit": out.returncode, "stderr": tail or f"exit status {out.returncode}"}
    result: dict = json.loads(out.stdout.strip().splitlines()[-1])
    result["exit"] = 0
    return result


def _measure_clients(h: Harness) -> dict:
    d = h.mkdir("asyncio-clients")
    pongd = servers.pongd(h, d, pinned=True)
    try:
        variants = {
            (label, mode): partial(_client, h, d, mode, n)
            for label, n in CONNS.items()
            for mode in modes()
        }
        return h.measure(variants)
    finally:
        h.stop(pongd)


def _measure_services(h: Harness) -> dict:
    d = h.mkdir("asyncio-services")
    started = {}
    try:
        for mode in modes():
            name = _MODE_ARG[mode]
            started[mode] = h.start(
                f"{name} echo service",
                _command("service", name, d, name),
                pinned=True,
                env=_env(),
                ready=("unix", d / name),
            )
        variants = {
            (label, mode): partial(
                h.loadgen, ["--unix", d / _MODE_ARG[mode], "-c", n, *h.lg_time()], pinned=True
            )
            for label, n in CONNS.items()
            for mode in modes()
        }
        return h.measure(variants)
    finally:
        for proc in started.values():
            h.stop(proc)


def run(h: Harness, res: SuiteResult) -> None:
    clients = _measure_clients(h)
    services = _measure_services(h)
    res.raw = {
        "clients": {" / ".join(k): v for k, v in clients.items()},
        "services": {" / ".join(k): v for k, v in services.items()},
        "uvloop": uvloop_available(),
    }
    t = res.table(
        "figures (medians, pinned on cpu 0)",
        [
            "what",
            "connections",
            "written with",
            "msg/s",
            "vs Context",
            "client CPU µs/msg",
            "run spread",
            "note",
        ],
    )
    for what, figs in (
        ("client ping-pong vs ipc pongd", clients),
        ("echo service under loadgen", services),
    ):
        for (label, mode), r in figs.items():
            base = figs[(label, CONTEXT)]
            t.rows.append(
                [
                    what,
                    label,
                    mode,
                    fmt_rate(r.get("rate")),
                    fmt_ratio(ratio(r.get("rate"), base.get("rate"))),
                    fmt(r.get("cpu_us"), 1),
                    spread(r),
                    status(r),
                ]
            )
    for what, figs in (("client", clients), ("service", services)):
        for label in CONNS:
            ours, theirs = figs[(label, ASYNCIO)], figs[(label, CONTEXT)]
            res.check(
                f"{what}, {label}: asyncio / Context (msg/s)",
                ratio(ours.get("rate"), theirs.get("rate")),
                ">=",
                TARGET,
                detail=f"{fmt_rate(ours.get('rate'))} vs {fmt_rate(theirs.get('rate'))} msg/s",
            )
    res.notes.append(
        "uvloop "
        + (
            "is installed: the '+ uvloop' rows run the same asyncio code on its loop."
            if uvloop_available()
            else "is not installed (not a dependency): no uvloop rows; `pip install uvloop`"
            " adds them."
        )
    )
    res.notes.append(
        "Both clients are closed loops (one 64-byte message in flight per connection) in one "
        "process pinned to the CPU pongd is pinned to; the services are echo loops of the same "
        "shape as examples/upper_service.py, one process each."
    )


# --------------------------------------------------- the measured programs


def context_client(rundir: Path, conns: int, duration: float, warmup: float) -> tuple[float, float]:
    """Messages per second, and this process's CPU µs per message (a figure
    the other processes of a noisy machine disturb less than the rate)."""
    from ipc_core import Context, EventType

    message_rx = EventType.MESSAGE_RX
    with Context(rundir_path=rundir) as ctx:
        fds = [ctx.connect_service("pong") for _ in range(conns)]
        for fd in fds:
            ctx.write(fd, PAYLOAD)
        count = 0
        start = time.perf_counter() + warmup
        end = start + duration
        counted_from = None
        cpu = 0.0
        while True:
            event = ctx.wait_event(timeout=1.0)
            if event.type is not message_rx and time.perf_counter() > end + 5:
                raise SystemExit("stalled: no answer from pongd for a second")
            if event.type is message_rx:
                ctx.write(event.fd, PAYLOAD)
                count += 1
                if count & 255 == 0:
                    now = time.perf_counter()
                    if counted_from is None and now >= start:
                        counted_from, count, start, cpu = count, 0, now, time.process_time()
                    elif counted_from is not None and now >= end:
                        used = time.process_time() - cpu
                        return count / (now - start), used / count * 1e6


async def asyncio_client(
    rundir: Path, conns: int, duration: float, warmup: float
) -> tuple[float, float]:
    from ipc_core.asyncio import connect

    counts = [0]
    stop = False

    async def one() -> None:
        async with connect("pong", rundir_path=rundir) as conn:
            while not stop:
                await conn.send(PAYLOAD)
                await conn.recv()
                counts[0] += 1

    tasks = [asyncio.create_task(one()) for _ in range(conns)]
    await asyncio.sleep(warmup)
    before, t0, cpu0 = counts[0], time.perf_counter(), time.process_time()
    await asyncio.sleep(duration)
    after, t1, cpu1 = counts[0], time.perf_counter(), time.process_time()
    stop = True
    await asyncio.gather(*tasks)
    done = max(after - before, 1)
    return (after - before) / (t1 - t0), (cpu1 - cpu0) / done * 1e6


def context_service(rundir: Path, name: str) -> None:
    from ipc_core import Context, EventType

    message_rx = EventType.MESSAGE_RX
    with Context(rundir_path=rundir) as ctx:
        ctx.service_init(name)
        ctx.handle_signals()
        for event in ctx:
            if event.type is message_rx:
                ctx.write(event.fd, event.message)  # type: ignore[arg-type]


async def asyncio_service(rundir: Path, name: str) -> None:
    from ipc_core.asyncio import Connection, serve

    async def echo(conn: Connection) -> None:
        async for message in conn:
            await conn.send(message)

    async with serve(name, echo, rundir_path=rundir) as server:
        server.handle_signals()
        await server.serve_forever()


def _asyncio_run(coro: Any, mode: str) -> Any:
    if mode == "uvloop":
        import uvloop  # type: ignore[import-not-found]  # optional

        return uvloop.run(coro)
    return asyncio.run(coro)


def main(argv: list[str]) -> None:
    role, mode, rundir = argv[0], argv[1], Path(argv[2])
    if role == "client":
        conns, duration, warmup = int(argv[3]), float(argv[4]), float(argv[5])
        if mode == "context":
            rate, cpu = context_client(rundir, conns, duration, warmup)
        else:
            rate, cpu = _asyncio_run(asyncio_client(rundir, conns, duration, warmup), mode)
        print(json.dumps({"rate": rate, "cpu_us": cpu}))
    elif role == "service":
        if mode == "context":
            context_service(rundir, argv[3])
        else:
            _asyncio_run(asyncio_service(rundir, argv[3]), mode)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
