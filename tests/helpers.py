"""Helpers shared by the tests: polling, connectability, managed processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
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

    def pongd(self, rundir: Path, name: str = "pong", **kwargs) -> subprocess.Popen[bytes]:
        proc = self.ipc("pongd", name, env={"RUNDIR": str(rundir)}, **kwargs)
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
