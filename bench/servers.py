"""How to start each server under test, and the loadgen arguments to reach it.

Every relay is put in front of an echo service on a Unix socket (normally
the C echo_server, so that the relay is what is measured).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .harness import BIN, ECHO_SERVER, LOADGEN, BenchError, Harness, Proc, free_port, tool

WANT_NOFILE = 65536  # RLIMIT_NOFILE for every server (10k relayed connections = 20k fds)
#: Every load generator connects from 127.0.0.1: lift the daemons' per-source
#: cap (--max-connections-per-ip, meant for remote hosts).
UNCAPPED = ("--max-connections-per-ip", "0")


@functools.cache
def nofile() -> int:
    """WANT_NOFILE if we may raise the hard limit that far, else the hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= WANT_NOFILE:
        return WANT_NOFILE
    probe = subprocess.run(
        ["prlimit", f"--nofile={WANT_NOFILE}:{WANT_NOFILE}", "true"], capture_output=True
    )
    return WANT_NOFILE if probe.returncode == 0 else hard


@dataclass
class Target:
    tool: str  # display name
    proto: str  # tcp, tls, ws
    proc: Proc
    args: list  # loadgen arguments that reach the echo service through it


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    bundle: Path  # cert + key in one file (hitch)
    how: str


class Restartable:
    """A server under test that is started again if it died between two runs (the
    death is recorded by Harness.stop as an incident, with its log), so that one
    crash costs one run, not all the following ones."""

    def __init__(self, h: Harness, start) -> None:
        self.h, self.start = h, start
        self.target: Target = start()

    @property
    def tool(self) -> str:
        return self.target.tool

    @property
    def proc(self) -> Proc:
        return self.target.proc

    def loadgen(self, args: list) -> dict:
        if not self.target.proc.alive():
            self.h.stop(self.target)
            self.target = self.start()
        return self.h.loadgen([*self.target.args, *args])


def c_tools_missing() -> str | None:
    if not (ECHO_SERVER.exists() and LOADGEN.exists()):
        return "bench/c tools not built (make -C bench/c)"
    return None


def daemon_missing(module: str, command: str) -> str | None:
    """None if our daemon `command` (module daemons.<module>) can be run."""
    if importlib.util.find_spec(f"daemons.{module}") is None:
        return f"daemons/{module}.py not present yet"
    if not (BIN / command).exists():
        return f"{command} not installed in the venv (pip install -e .)"
    return None


def peer_missing(*commands: str) -> str | None:
    missing = [c for c in commands if tool(c) is None]
    if missing:
        return (
            f"{', '.join(missing)} not installed "
            f"(apt-get install -y socat stunnel4 websocketd python3-websockify hitch)"
        )
    return None


# --- echo services --------------------------------------------------------


def echo_server(h: Harness, sock: Path, pinned: bool = True) -> Proc:
    return h.start(
        "echo_server",
        [ECHO_SERVER, "unix", sock],
        pinned=pinned,
        nofile=nofile(),
        ready=("unix", sock),
    )


def pongd(
    h: Harness, rundir: Path, pinned: bool = True, name: str = "pong", handoff: bool = True
) -> Proc:
    """``ipc pongd``; ``handoff=False``: ipc-tcpd relays it (``--no-handoff``)."""
    return h.start(
        "pongd",
        [BIN / "ipc", "pongd", "--rundir", rundir, name, *(() if handoff else ("--no-handoff",))],
        pinned=pinned,
        nofile=nofile(),
        ready=("unix", rundir / name),
    )


def pyecho(h: Harness, sock: Path, pinned: bool = True) -> Proc:
    return h.start(
        "pyecho",
        [sys.executable, Path(__file__).with_name("pyecho.py"), sock],
        pinned=pinned,
        nofile=nofile(),
        ready=("unix", sock),
    )


# --- relays ---------------------------------------------------------------


def ipc_tcpd(
    h: Harness,
    rundir: Path,
    pinned: bool = True,
    service: str = "pong",
    nofile_limit: int | str | None = None,
) -> Target:
    port = free_port()
    proc = h.start(
        "ipc-tcpd",
        [BIN / "ipc-tcpd", "-q", *UNCAPPED, "--rundir", rundir, "--listen", f"127.0.0.1:{port}"],
        pinned=pinned,
        nofile=nofile_limit or nofile(),
        ready=("tcp", port),
    )
    return Target("ipc-tcpd", "tcp", proc, ["--tcp", f"127.0.0.1:{port}", "--handshake", service])


def socat(h: Harness, sock: Path, pinned: bool = True) -> Target:
    port = free_port()
    proc = h.start(
        "socat",
        [
            tool("socat"),
            f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=512",
            f"UNIX-CONNECT:{sock}",
        ],
        pinned=pinned,
        nofile=nofile(),
        ready=("tcp", port),
    )
    return Target("socat", "tcp", proc, ["--tcp", f"127.0.0.1:{port}"])


def make_certs(h: Harness) -> Certs:
    """A throwaway CA and a server certificate for localhost/127.0.0.1."""
    d = h.mkdir("certs", 0o755)
    ipc = BIN / "ipc"
    if importlib.util.find_spec("daemons.engine.certs") and ipc.exists():
        if not (d / "localhost.pem").exists():  # made once per run (tls and ws use them)
            subprocess.run([ipc, "cert", "ca", "--out", d], check=True, capture_output=True)
            subprocess.run(
                [ipc, "cert", "server", "--ca-dir", d, "--out", d, "localhost", "127.0.0.1"],
                check=True,
                capture_output=True,
            )
        ca, cert, key = d / "ca.pem", d / "localhost.pem", d / "localhost.key"
        how = "`ipc cert ca` + `ipc cert server localhost 127.0.0.1` (EC P-256)"
    else:
        ca = cert = d / "cert.pem"
        key = d / "key.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
                key,
                "-out",
                cert,
                "-days",
                "2",
            ],
            check=True,
            capture_output=True,
        )
        how = "openssl req -x509 (self-signed EC P-256)"
    bundle = d / "bundle.pem"
    bundle.write_bytes(cert.read_bytes() + key.read_bytes())
    for f in (cert, key, bundle):
        f.chmod(0o644)  # hitch's workers run as nobody; throwaway files
    return Certs(ca, cert, key, bundle, how)


def _tls_args(port: int, certs: Certs) -> list:
    return ["--tcp", f"127.0.0.1:{port}", "--tls", "--ca", certs.ca, "--sni", "localhost"]


def ipc_tlsd(h: Harness, rundir: Path, certs: Certs, pinned: bool = True) -> Target:
    port = free_port()
    proc = h.start(
        "ipc-tlsd",
        [
            BIN / "ipc-tlsd",
            "-q",
            *UNCAPPED,
            "--rundir",
            rundir,
            "--listen",
            f"127.0.0.1:{port}",
            "--cert",
            certs.cert,
            "--key",
            certs.key,
        ],
        pinned=pinned,
        nofile=nofile(),
        ready=("tcp", port),
    )
    return Target("ipc-tlsd", "tls", proc, [*_tls_args(port, certs), "--handshake", "pong"])


def stunnel(h: Harness, sock: Path, certs: Certs, pinned: bool = True) -> Target:
    port = free_port()
    conf = h.tmp / f"stunnel-{port}.conf"
    conf.write_text(
        "foreground = yes\npid =\ndebug = crit\nsyslog = no\n"
        f"[bench]\naccept = 127.0.0.1:{port}\nconnect = {sock}\n"
        f"cert = {certs.cert}\nkey = {certs.key}\n"
    )
    h.note(f"# {conf.name}: " + conf.read_text().strip().replace("\n", "; "))
    exe = tool("stunnel4") or tool("stunnel")
    proc = h.start("stunnel", [exe, conf], pinned=pinned, nofile=nofile(), ready=("tcp", port))
    return Target("stunnel", "tls", proc, _tls_args(port, certs))


def hitch(h: Harness, sock: Path, certs: Certs, pinned: bool = True) -> Target:
    """hitch refuses to run as root: its worker runs as nobody, so the socket
    and the directories above it must let nobody connect."""
    port = free_port()
    sock.chmod(0o666)
    for parent in (sock.parent, h.tmp):
        parent.chmod(0o711)
    argv = [
        tool("hitch"),
        f"--frontend=[127.0.0.1]:{port}",
        f"--backend={sock}",
        "--workers=1",
        "--quiet",
    ]
    if os.geteuid() == 0:
        argv.append("--user=nobody")
    proc = h.start(
        "hitch", [*argv, certs.bundle], pinned=pinned, nofile=nofile(), ready=("tcp", port)
    )
    return Target("hitch", "tls", proc, _tls_args(port, certs))


def ipc_websocketd(
    h: Harness, rundir: Path, pinned: bool = True, certs: Certs | None = None
) -> Target:
    """``certs``: wss (TLS with that certificate)."""
    port = free_port()
    # wss: a second instance in the same run directory needs its own control service
    tls = ["--cert", certs.cert, "--key", certs.key, "--control-name", "wss"] if certs else []
    proc = h.start(
        "ipc-websocketd",
        [
            BIN / "ipc-websocketd",
            "-q",
            *UNCAPPED,
            "--rundir",
            rundir,
            "--listen",
            f"127.0.0.1:{port}",
            "--no-static",
            *tls,
        ],
        pinned=pinned,
        nofile=nofile(),
        ready=("tcp", port),
    )
    client = _tls_args(port, certs) if certs else ["--tcp", f"127.0.0.1:{port}"]
    return Target("ipc-websocketd", "ws", proc, [*client, "--ws", "/pong"])


def websockify(
    h: Harness,
    sock: Path,
    pinned: bool = True,
    ipc_in_messages: bool = False,
    certs: Certs | None = None,
) -> Target:
    """``ipc_in_messages``: the service speaks LibIPC, so loadgen sends the
    header inside each message and parses the replies as LibIPC frames.
    ``certs``: wss (websockify then refuses plain ws)."""
    port = free_port()
    tls = [f"--cert={certs.cert}", f"--key={certs.key}", "--ssl-only"] if certs else []
    proc = h.start(
        "websockify",
        [tool("websockify"), *tls, f"--unix-target={sock}", f"127.0.0.1:{port}"],
        pinned=pinned,
        nofile=nofile(),
        ready=("tcp", port),
    )
    framing = "--ws-ipc" if ipc_in_messages else "--ws-stream"
    client = _tls_args(port, certs) if certs else ["--tcp", f"127.0.0.1:{port}"]
    return Target("websockify", "ws", proc, [*client, "--ws", "/", framing])


def websocketd(h: Harness, pinned: bool = True, certs: Certs | None = None) -> Target:
    """``certs``: wss (--ssl)."""
    port = free_port()
    tls = ["--ssl", f"--sslcert={certs.cert}", f"--sslkey={certs.key}"] if certs else []
    proc = h.start(
        "websocketd",
        [
            tool("websocketd"),
            "--address=127.0.0.1",
            f"--port={port}",
            "--binary=true",
            "--loglevel=fatal",
            *tls,
            "cat",
        ],
        pinned=pinned,
        nofile=nofile(),
        ready=("tcp", port),
    )
    client = _tls_args(port, certs) if certs else ["--tcp", f"127.0.0.1:{port}"]
    return Target("websocketd", "ws", proc, [*client, "--ws", "/", "--ws-stream"])


def require(reason: str | None) -> None:
    if reason:
        raise BenchError(reason)
