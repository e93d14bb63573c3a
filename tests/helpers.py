"""Helpers shared by the tests: polling, connectability, managed processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes from a blocking socket (EOFError if it ends)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket) -> bytes:
    """Read one LibIPC message (u32 big-endian length + payload)."""
    (n,) = struct.unpack(">I", recv_exact(sock, 4))
    return recv_exact(sock, n)


def connectable(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(os.fsencode(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def tcp_connectable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Processes:
    """Starts commands and guarantees they are stopped at the end of a test."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, *args: str | os.PathLike[str], env: dict[str, str] | None = None, **kwargs
    ) -> subprocess.Popen[bytes]:
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen([str(a) for a in args], env=full_env, **kwargs)
        self.procs.append(proc)
        return proc

    def ipc(self, *args: str, **kwargs) -> subprocess.Popen[bytes]:
        return self.start(BIN / "ipc", *args, **kwargs)

    def pongd(
        self, rundir: Path, name: str = "pong", *, handoff: bool = False, **kwargs
    ) -> subprocess.Popen[bytes]:
        """``ipc pongd``; relayed by ipc-tcpd unless ``handoff`` (the tests of
        the relay keep testing the relay; tests/integration/test_handoff.py
        tests hand-offs)."""
        flag = () if handoff else ("--no-handoff",)
        proc = self.ipc("pongd", name, *flag, env={"RUNDIR": str(rundir)}, **kwargs)
        wait_for(lambda: connectable(rundir / name) or proc.poll() is not None, what=f"{name} up")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream:
                    stream.close()


class LogReader:
    """Drains a process's stderr in a thread so that logs can be asserted on
    and a chatty daemon never blocks on a full pipe."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        import threading

        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 10.0) -> str:
        """Return the first log line containing ``needle`` (or fail)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if needle in line:
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    log = "".join(self.lines)
                    raise AssertionError(f"log line {needle!r} not seen; log:\n{log}")
                if self.proc.poll() is not None and seen == len(self.lines):
                    self._cond.wait(0.2)
                    if seen == len(self.lines):
                        raise AssertionError(
                            f"process exited ({self.proc.returncode}) before {needle!r}; log:\n"
                            + "".join(self.lines)
                        )
                self._cond.wait(min(left, 0.5))


def start_listening_daemon(
    procs: Processes, command: str, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], LogReader, int]:
    """Start ``command`` (e.g. ``ipc-tcpd``) listening on an ephemeral port;
    return the process, its log reader and the port it bound."""
    import re

    proc = procs.start(BIN / command, *args, env=env)
    logs = LogReader(proc)
    line = logs.wait_for("listening on")
    match = re.search(r"listening on (?:\[[^\]]+\]|[^:\s]+):(\d+)", line)
    assert match, line
    return proc, logs, int(match.group(1))


@dataclass(frozen=True)
class Pki:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path


def make_pki(directory: Path) -> Pki:
    from daemons.engine import certs

    ca, ca_key = certs.make_ca("Test CA")
    leaf, leaf_key = certs.make_cert(ca, ca_key, "localhost", ["localhost", "127.0.0.1"])
    certs.write_cert(directory / "ca.pem", ca)
    certs.write_cert(directory / "server.pem", leaf)
    certs.write_key(directory / "server.key", leaf_key)
    return Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")


def pair_with_switch(**ctx_kwargs):
    """A Context switching two socketpairs:
    net_peer <-> [net_end ~switch~ local_end] <-> local_peer.
    Returns (ctx, net_peer, local_peer, net_fd, local_fd)."""
    from ipc_core import Context

    net_peer, net_end = socket.socketpair()
    local_peer, local_end = socket.socketpair()
    for s in (net_peer, local_peer):
        s.settimeout(5)
    ctx = Context(**ctx_kwargs)
    ctx.add_switch(net_end, local_end)
    return ctx, net_peer, local_peer, net_end.fileno(), local_end.fileno()


def pump(ctx, until, timeout: float = 5.0) -> list:
    """Run ``ctx``'s loop until ``until(events seen)`` holds (or fail)."""
    seen: list = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        assert time.monotonic() < deadline, "pump timed out"
        seen.append(ctx.wait_event(timeout=0.02))
    return seen
