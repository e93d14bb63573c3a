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
  examples) and with ipc_core.asyncio in its two shapes: ``serve(name,
  handler)`` (one task per client: ``async for message in conn: await
  conn.send(message)``) and ``serve(name, protocol=Echo)`` (a
  MessageProtocol: callbacks, no task per client):
  ``python -m bench.suites.asyncio service MODE ...``.
* asyncio's own floor, in the same run, without ipc_core.asyncio: a bare
  ``asyncio.BufferedProtocol`` echo of the same frames (FrameDecoder, one
  ``transport.write`` per reply, no task) and a bare task-per-client echo
  over the same protocol (one future per message, ``send`` a plain call).
  They say how close to Context a service on the standard asyncio loop can
  come at all, in each shape.

With uvloop importable, the asyncio rows are also measured on uvloop (not a
dependency: the report says whether it was there).
"""

from __future__ import annotations

import asyncio
import collections
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
PROTOCOL = "ipc_core.asyncio protocol="
UVLOOP_PROTOCOL = "ipc_core.asyncio protocol= + uvloop"
FLOOR_PROTOCOL = "floor: bare asyncio BufferedProtocol"
FLOOR_TASK = "floor: bare asyncio task per client"
TARGET = 0.7


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def modes() -> list[str]:
    """The clients."""
    return [CONTEXT, ASYNCIO] + ([UVLOOP] if uvloop_available() else [])


def service_modes() -> list[str]:
    uv = [UVLOOP, UVLOOP_PROTOCOL] if uvloop_available() else []
    return [CONTEXT, ASYNCIO, PROTOCOL, FLOOR_TASK, FLOOR_PROTOCOL, *uv]


_MODE_ARG = {
    CONTEXT: "context",
    ASYNCIO: "asyncio",
    UVLOOP: "uvloop",
    PROTOCOL: "asyncio-protocol",
    UVLOOP_PROTOCOL: "uvloop-protocol",
    FLOOR_PROTOCOL: "floor-protocol",
    FLOOR_TASK: "floor-task",
}


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
        for mode in service_modes():
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
            for mode in service_modes()
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
    for what, figs, mode in (
        ("client", clients, ASYNCIO),
        ("service", services, ASYNCIO),
        ("service protocol=", services, PROTOCOL),
    ):
        for label in CONNS:
            ours, theirs = figs[(label, mode)], figs[(label, CONTEXT)]
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
    res.notes.append(
        "The two service shapes: 'ipc_core.asyncio' is serve(name, handler), one task per "
        "client, a future and a task step per message (asyncio's streams); 'protocol=' is "
        "serve(name, protocol=Echo), a MessageProtocol whose message_received runs in the "
        "transport's read callback (asyncio's Protocol): no task per client, no task switch "
        "per message."
    )
    res.notes.append(
        "The 'floor' rows use no ipc_core.asyncio: a bare asyncio.BufferedProtocol echo "
        "(FrameDecoder, one transport.write per reply) and a bare task-per-client echo over "
        "it (a future per message, no checks, no limits). They are what the standard asyncio "
        "loop costs by itself: when the task floor is below the target, no task-per-client "
        "API on that loop can meet it. ipc_core.asyncio coalesces the small replies of a "
        "busy loop turn into one burst of writes (a peer pinned to the same CPU is woken "
        "once per burst, not once per reply), which is how its rows can pass the bare floors "
        "at 100 connections; at 1 connection it writes at once, as the floors do."
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


async def protocol_service(rundir: Path, name: str) -> None:
    from ipc_core.asyncio import Connection, MessageProtocol, serve

    class Echo(MessageProtocol):
        def connection_made(self, conn: Connection) -> None:
            self.conn = conn

        def message_received(self, message: bytes) -> None:
            self.conn.send(message)

    async with serve(name, protocol=Echo, rundir_path=rundir) as server:
        server.handle_signals()
        await server.serve_forever()


# asyncio's floor: the same frames on the same loop with no ipc_core.asyncio
# (no limits, no back-pressure, no run directory; the socket is bound here).

_FLOOR_BUFFER = memoryview(bytearray(256 * 1024))


class _FloorProtocol(asyncio.BufferedProtocol):
    """Echo in the read callback: decode, one transport.write per reply."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from ipc_core.framing import FrameDecoder

        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.decoder = FrameDecoder()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _FLOOR_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        from ipc_core.framing import header

        write = self.transport.write
        for message in self.decoder.feed(_FLOOR_BUFFER[:nbytes]):
            write(header(len(message)) + message)

    def eof_received(self) -> bool:
        return False


class _FloorTask(_FloorProtocol):
    """A task per client, a future per message, send a plain call."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.queue: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.gone = False
        self.loop = asyncio.get_running_loop()
        self.loop.create_task(self.echo())

    def buffer_updated(self, nbytes: int) -> None:
        messages = self.decoder.feed(_FLOOR_BUFFER[:nbytes])
        if messages:
            self.queue.extend(messages)
            self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def recv(self) -> bytes | None:
        while not self.queue:
            if self.gone:
                return None
            self.waiter = self.loop.create_future()
            await self.waiter
        return self.queue.popleft()

    def send(self, message: bytes) -> None:
        from ipc_core.framing import header

        self.transport.write(header(len(message)) + message)

    async def echo(self) -> None:
        while (message := await self.recv()) is not None:
            self.send(message)


async def floor_service(rundir: Path, name: str, factory: type[_FloorProtocol]) -> None:
    import signal

    path = rundir / name
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set_result, None)
    server = await loop.create_unix_server(factory, str(path), backlog=1024)
    try:
        await stop
    finally:
        server.close()
        path.unlink(missing_ok=True)


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
        name = argv[3]
        if mode == "context":
            context_service(rundir, name)
        elif mode == "floor-protocol":
            asyncio.run(floor_service(rundir, name, _FloorProtocol))
        elif mode == "floor-task":
            asyncio.run(floor_service(rundir, name, _FloorTask))
        elif mode.endswith("-protocol"):
            _asyncio_run(protocol_service(rundir, name), mode.removesuffix("-protocol"))
        else:
            _asyncio_run(asyncio_service(rundir, name), mode)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
