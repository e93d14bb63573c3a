"""``make run``: the whole LibIPC stack on one machine, for a first look.

Starts, as child processes from this interpreter's bin directory, sharing one
run directory: ``ipc pongd`` (the echo service ``pong``), ``ipcd`` (the
router), ``ipc-tcpd`` on 127.0.0.1:9000, ``ipc-websocketd`` on
127.0.0.1:8080 with its demo page and ``ipc-httpd`` on 127.0.0.1:8000 (with
``--cors`` for the demo page's origin, so that the page may ``fetch()`` it).
It waits until each one is reachable, checks a round trip over every path
(printed, so a broken install says so at once), prints what to type or open,
and on Ctrl-C (SIGINT) or SIGTERM stops the children: SIGTERM, then SIGKILL
for any still alive after 5 seconds.

Why subprocesses and not one process: that is how the stack is deployed (one
daemon per unit, see ``systemd/``), so the demo shows the real thing, and a
daemon's crash or log lines stay its own. Readiness is polled (a socket file
that accepts, a port that accepts) because ``ipc pongd`` does not speak the
systemd notify protocol; the daemons do, and ``tests/integration`` checks it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from ipc_core import LOCK_SUFFIX, encode, ensure_rundir, service_alive
from ipc_core import rundir as default_rundir

from .engine.options import LibipcCommand, rundir_option

BIN = Path(sys.executable).parent
START_TIMEOUT = 15.0
STOP_GRACE = 5.0
CHECK_TIMEOUT = 5.0


@dataclass
class Child:
    """One process of the stack and how to tell that it is ready."""

    label: str
    argv: list[str]
    ready: Callable[[], bool]
    services: tuple[str, ...] = ()  # socket files it owns in the run directory
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)


class DemoError(Exception):
    """A reason to stop the demo, printed as is."""


# -- readiness -------------------------------------------------------------------


def unix_accepting(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(os.fsencode(path))
        except OSError:
            return False
    return True


def http_answering(host: str, port: int) -> bool:
    """A whole HTTP exchange, not a bare connect: a peer that connects and
    leaves is logged by the daemon as a failed handshake."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(b"HEAD / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def port_busy(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None. Binds like the daemons
    (SO_REUSEADDR), so a port in TIME_WAIT is not called busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (see: ss -ltnp 'sport = :{port}')"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


# -- self-checks -----------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise DemoError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def check_tcp(host: str, port: int, service: str, payload: bytes) -> bytes:
    """The TCPd handshake by hand (name, ``ok``), then one LibIPC message."""
    with socket.create_connection((host, port), timeout=CHECK_TIMEOUT) as sock:
        sock.sendall(service.encode())
        answer = _recv_exact(sock, 2)
        if answer != b"ok":
            raise DemoError(f"ipc-tcpd answered {answer!r} instead of b'ok'")
        sock.sendall(encode(payload))
        (length,) = struct.unpack(">I", _recv_exact(sock, 4))
        return _recv_exact(sock, length)


def check_websocket(host: str, port: int, service: str, payload: bytes) -> bytes:
    from websockets.sync.client import connect

    with connect(
        f"ws://{host}:{port}/{service}", open_timeout=CHECK_TIMEOUT, close_timeout=1
    ) as ws:
        ws.send(payload)
        reply = ws.recv(timeout=CHECK_TIMEOUT)
    return reply if isinstance(reply, bytes) else reply.encode()


def check_http(host: str, port: int, service: str, payload: bytes) -> bytes:
    """``POST /SERVICE`` as curl does: the body is the message, the reply the answer."""
    conn = http.client.HTTPConnection(host, port, timeout=CHECK_TIMEOUT)
    try:
        conn.request("POST", f"/{service}", body=payload)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise DemoError(f"ipc-httpd answered {response.status} {response.reason}: {body!r}")
    return body


def check_router(env: dict[str, str], service: str, uri: str, payload: str) -> bytes:
    """``ipc send`` with IPC_NETWORK: client -> ipcd -> ipc-tcpd -> TCP -> ipc-tcpd -> pong."""
    env = {**env, "IPC_NETWORK": f"{service} {uri}"}
    result = subprocess.run(
        [str(BIN / "ipc"), "send", service, payload],
        env=env,
        capture_output=True,
        timeout=3 * CHECK_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise DemoError(f"ipc send through ipcd failed: {result.stderr.decode().strip()}")
    return result.stdout.rstrip(b"\n")


# -- the stack -------------------------------------------------------------------


class Stack:
    """Start, watch and stop the children; a stop request is a flag that every
    wait loop checks, so a signal never interrupts a half-done step."""

    def __init__(self, rundir: Path, env: dict[str, str]) -> None:
        self.rundir = rundir
        self.env = env
        self.children: list[Child] = []
        self.stop_requested = False

    def request_stop(self, _signum: int = 0, _frame: object = None) -> None:
        self.stop_requested = True

    def start(self, child: Child) -> None:
        # Own process group: Ctrl-C in the terminal reaches only the demo, which
        # then stops the children in order (not mid-import, with a traceback).
        # And a parent-death signal: should the demo itself die (kill -9, a
        # crash), the kernel sends each child SIGTERM, so nothing is orphaned.
        child.proc = subprocess.Popen(
            child.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            process_group=0,
            preexec_fn=_die_with_parent,
        )
        self.children.append(child)
        deadline = time.monotonic() + START_TIMEOUT
        while not child.ready():
            if self.stop_requested:
                return
            self.check_alive()
            if time.monotonic() > deadline:
                raise DemoError(f"{child.label} not ready after {START_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def check_alive(self) -> None:
        for child in self.children:
            assert child.proc is not None
            code = child.proc.poll()
            if code is not None:
                raise DemoError(f"{child.label} exited unexpectedly (status {code})")

    def wait(self) -> None:
        while not self.stop_requested:
            self.check_alive()
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM everyone (last started first), SIGKILL after the grace time,
        then remove socket files a killed child could not remove itself."""
        alive = [c.proc for c in reversed(self.children) if c.proc and c.proc.poll() is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in alive:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in self.children:
            for name in child.services:
                _remove_stale(self.rundir, name)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the demo process goes away."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def say(text: str, *, err: bool = False) -> None:
    """Print for the user, if anyone still reads: with ``| tee`` stopped by the
    same Ctrl-C, stdout is a broken pipe, and a stop must not depend on it."""
    try:
        click.echo(text, err=err)
        (sys.stderr if err else sys.stdout).flush()
    except OSError:  # EPIPE (BrokenPipeError), EIO from a closed terminal
        _silence(sys.stderr if err else sys.stdout)


def _silence(stream: object) -> None:
    """Point a dead stream at /dev/null so that the interpreter's last flush
    at exit does not print 'Exception ignored ... BrokenPipeError'."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # type: ignore[attr-defined]
        os.close(devnull)


def _remove_stale(directory: Path, name: str) -> None:
    path = directory / name
    if path.exists() and not service_alive(name, directory):
        for stale in (path, Path(str(path) + LOCK_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def _command(name: str) -> str:
    """How the user should type ``name``: bare if on PATH, else its path."""
    path = BIN / name
    if shutil.which(name) == str(path):
        return name
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def page_url(host: str, ws_port: int, http_port: int | None) -> str:
    """The demo page's address; ``?http=PORT`` tells the page where ipc-httpd
    listens when that is not its default (8000)."""
    query = f"?http={http_port}" if http_port is not None and http_port != 8000 else ""
    return f"http://{host}:{ws_port}/{query}"


def cors_origins(host: str, ws_port: int) -> list[str]:
    """The demo page's origins, for ipc-httpd's ``--cors``: the page is served
    by ipc-websocketd, another port, so another origin than ipc-httpd's."""
    origins = [f"http://{host}:{ws_port}"]
    if host == "127.0.0.1":
        origins.append(f"http://localhost:{ws_port}")
    return origins


def instructions(
    rundir: Path, host: str, tcp_port: int, ws_port: int | None, http_port: int | None = None
) -> str:
    env_rundir = default_rundir()
    prefix = "" if env_rundir.resolve() == rundir.resolve() else f"RUNDIR={rundir} "
    ipc = prefix + _command("ipc")
    rows = [
        ("pong", str(rundir / "pong"), "ipc pongd: echoes every message"),
        ("router", str(rundir / "ipc"), "ipcd"),
        ("TCP", f"{host}:{tcp_port}", "ipc-tcpd"),
    ]
    if ws_port is not None:
        rows.append(("WebSocket", f"http://{host}:{ws_port}/", "ipc-websocketd"))
    if http_port is not None:
        rows.append(("HTTP", f"http://{host}:{http_port}/", "ipc-httpd"))
    width = max(len(where) for _, where, _ in rows)
    lines = ["", f"LibIPC demo running; run directory {rundir}"]
    lines += [f"  {what:<10} {where:<{width}}  ({who})" for what, where, who in rows]
    lines += [
        "",
        "Talk to pong:",
        f"  locally:          {ipc} send pong hello",
        f'  through TCP:      IPC_NETWORK="pong tcp://{host}:{tcp_port}/pong" '
        f"{ipc} send pong hello",
        f"  line by line:     {ipc} cat pong",
    ]
    if http_port is not None:
        lines.append(f"  through HTTP:     curl --data-binary hello http://{host}:{http_port}/pong")
    if ws_port is not None:
        lines.append(
            f"  from a browser:   open {page_url(host, ws_port, http_port)} (service: pong)"
        )
    lines += [
        f"  daemon counters:  {ipc} status",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def _websocketd_available() -> bool:
    return importlib.util.find_spec(".websocketd", __package__) is not None


def _httpd_available() -> bool:
    return (
        importlib.util.find_spec(".httpd", __package__) is not None and (BIN / "ipc-httpd").exists()
    )


@dataclass(frozen=True)
class Ports:
    """The network daemons' ports; None for a daemon the demo does not start."""

    tcp: int
    ws: int | None
    http: int | None


@click.command(
    cls=LibipcCommand,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="""\b
Examples:
  ./dev.sh run                                 ports 9000, 8080 and 8000
  ./dev.sh run --tcp-port 9100 --ws-port 8180 --http-port 8100
                                               when those are taken
  make run DEMO_ARGS="--no-websocket"          the same through make
""",
)
@rundir_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    metavar="ADDRESS",
    help="Address the network daemons listen on.",
)
@click.option(
    "--tcp-port",
    type=click.IntRange(1, 65535),
    default=9000,
    show_default=True,
    metavar="PORT",
    help="ipc-tcpd's port.",
)
@click.option(
    "--ws-port",
    type=click.IntRange(1, 65535),
    default=8080,
    show_default=True,
    metavar="PORT",
    help="ipc-websocketd's port (the demo page).",
)
@click.option("--no-websocket", is_flag=True, help="Do not start ipc-websocketd.")
@click.option(
    "--http-port",
    type=click.IntRange(1, 65535),
    default=8000,
    show_default=True,
    metavar="PORT",
    help="ipc-httpd's port (POST /pong).",
)
@click.option("--no-http", is_flag=True, help="Do not start ipc-httpd.")
def main(
    rundir: Path | None,
    host: str,
    tcp_port: int,
    ws_port: int,
    no_websocket: bool,
    http_port: int,
    no_http: bool,
) -> None:
    """Run the demo stack until Ctrl-C: the echo service pong, the router
    ipcd, ipc-tcpd, ipc-websocketd with its demo page and ipc-httpd, all on
    this host."""
    rundir = rundir or default_rundir()
    with_ws = not no_websocket and _websocketd_available()
    if not no_websocket and not with_ws:
        say("note: ipc-websocketd is not installed yet; skipping the WebSocket part", err=True)
    with_http = not no_http and _httpd_available()
    if not no_http and not with_http:
        say("note: ipc-httpd is not installed yet; skipping the HTTP part", err=True)
    ports = Ports(tcp_port, ws_port if with_ws else None, http_port if with_http else None)
    try:
        _preflight(rundir, host, ports)
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
    created = not rundir.exists()
    ensure_rundir(rundir)
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "IPC_NETWORK",
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
        )
    }
    env["RUNDIR"] = str(rundir)
    stack = Stack(rundir, env)
    old = {sig: signal.signal(sig, stack.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    failed: str | None = None
    try:
        _run(stack, host, ports)
    except DemoError as exc:
        failed = str(exc)
    finally:
        # The stop comes first and never depends on printing (see say()).
        try:
            say("stopping the demo...", err=True)
        finally:
            stack.stop()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if created:
                with contextlib.suppress(OSError):
                    rundir.rmdir()  # only if empty
    if failed:
        raise click.ClickException(failed)
    say("demo stopped", err=True)


def _preflight(rundir: Path, host: str, ports: Ports) -> None:
    """Refuse to start half a stack: busy ports or services already running."""
    for port in (ports.tcp, ports.ws, ports.http):
        if port is not None:
            problem = port_busy(host, port)
            if problem:
                raise DemoError(
                    f"{problem}; stop what uses it, or pick other ports: "
                    "./dev.sh run --tcp-port 9100 --ws-port 8180 --http-port 8100"
                )
    for name in ("pong", "ipc", "tcp"):
        with contextlib.suppress(OSError, ValueError):
            if service_alive(name, rundir):
                raise DemoError(
                    f"a service {name!r} is already running in {rundir} "
                    "(another demo?); stop it or use --rundir"
                )


def _run(stack: Stack, host: str, ports: Ports) -> None:
    rundir = stack.rundir
    tcp_port, ws_port, http_port = ports.tcp, ports.ws, ports.http
    bin_ = str(BIN)
    children = [
        Child(
            "ipc pongd",
            [f"{bin_}/ipc", "pongd", "pong"],
            lambda: unix_accepting(rundir / "pong"),
            ("pong",),
        ),
        Child(
            "ipcd",
            [f"{bin_}/ipcd", "-q"],
            lambda: unix_accepting(rundir / "ipc.ctl"),
            ("ipc", "ipc.ctl"),
        ),
        Child(
            "ipc-tcpd",
            [f"{bin_}/ipc-tcpd", "-q", "--listen", f"{host}:{tcp_port}"],
            # tcp.ctl appears after the TCP listener is bound: connections queue.
            lambda: unix_accepting(rundir / "tcp.ctl"),
            ("tcp", "tcp.ctl"),
        ),
    ]
    if ws_port is not None:
        children.append(
            Child(
                "ipc-websocketd",
                [f"{bin_}/ipc-websocketd", "-q", "--listen", f"{host}:{ws_port}"],
                lambda: http_answering(host, ws_port),
            )
        )
    if http_port is not None:
        # The page (ipc-websocketd's port) is another origin: let it fetch().
        origins = cors_origins(host, ws_port) if ws_port is not None else []
        cors = [arg for origin in origins for arg in ("--cors", origin)]
        children.append(
            Child(
                "ipc-httpd",
                [f"{bin_}/ipc-httpd", "-q", "--listen", f"{host}:{http_port}", *cors],
                # http.ctl appears after the listener is bound (as tcp.ctl); a
                # probe request would be logged as a 404 for the path "/".
                lambda: unix_accepting(rundir / "http.ctl"),
                ("http.ctl",),
            )
        )
    for child in children:
        stack.start(child)
        if stack.stop_requested:
            return
    _self_check(stack, host, ports)
    say(instructions(rundir, host, tcp_port, ws_port, http_port))
    stack.wait()


def _self_check(stack: Stack, host: str, ports: Ports) -> None:
    tcp_port, ws_port, http_port = ports.tcp, ports.ws, ports.http
    checks: list[tuple[str, Callable[[], bytes], bytes]] = [
        (
            "TCP (ipc-tcpd)",
            lambda: check_tcp(host, tcp_port, "pong", b"hello over TCP"),
            b"hello over TCP",
        ),
        (
            "router (ipcd -> ipc-tcpd)",
            lambda: check_router(
                stack.env, "pong", f"tcp://{host}:{tcp_port}/pong", "hello through ipcd"
            ),
            b"hello through ipcd",
        ),
    ]
    if ws_port is not None:
        checks.append(
            (
                "WebSocket (ipc-websocketd)",
                lambda: check_websocket(host, ws_port, "pong", b"hello over WebSocket"),
                b"hello over WebSocket",
            )
        )
    if http_port is not None:
        checks.append(
            (
                "HTTP (ipc-httpd)",
                lambda: check_http(host, http_port, "pong", b"hello over HTTP"),
                b"hello over HTTP",
            )
        )
    for label, check, expected in checks:
        started = time.monotonic()
        try:
            reply = check()
        except (OSError, subprocess.SubprocessError, http.client.HTTPException) as exc:
            raise DemoError(f"self-check {label} failed: {exc}") from None
        except Exception as exc:  # websockets' own errors: report, do not crash
            if isinstance(exc, DemoError):
                raise
            raise DemoError(f"self-check {label} failed: {exc!r}") from None
        if reply != expected:
            raise DemoError(f"self-check {label}: sent {expected!r}, got {reply!r}")
        say(
            f"self-check: {label}: pong answered {reply.decode()!r} "
            f"({(time.monotonic() - started) * 1000:.0f} ms)"
        )


if __name__ == "__main__":
    main(prog_name="./dev.sh run")
