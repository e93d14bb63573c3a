"""Process management for the benchmarks.

A `Harness` owns a temporary directory and every process the benchmarks
start (servers in their own process group, loadgen runs); closing it (also on
Ctrl-C or an exception) stops them all and removes the directory. It also
keeps the exact command lines, for the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
C_DIR = ROOT / "bench" / "c"
ECHO_SERVER = C_DIR / "build" / "echo_server"
LOADGEN = C_DIR / "build" / "loadgen"
BIN = Path(sys.executable).parent  # the venv's bin: ipc, ipc-tcpd, ...


class BenchError(RuntimeError):
    """A benchmark could not run (a server did not start, a tool failed)."""


@dataclass
class Config:
    runs: int = 3
    duration: float = 3.0  # loadgen -d
    warmup: float = 0.5  # loadgen -w
    hold_seconds: float = 2.0
    ws_hold: int = 1000  # idle connections for the per-connection memory figures
    scale_hold: int = 10000  # idle connections through ipc-tcpd
    cycles: int = 10000  # connect/close cycles through ipc-tcpd
    cpu: str | None = "0"  # taskset -c CPU for the pinned figures
    quick: bool = False

    @classmethod
    def quick_config(cls) -> Config:
        return cls(
            runs=1,
            duration=1.0,
            warmup=0.2,
            hold_seconds=1.0,
            ws_hold=200,
            scale_hold=2000,
            cycles=2000,
            quick=True,
        )


def tool(name: str) -> str | None:
    """Path of an executable: the venv's bin first (ipc-*), then $PATH."""
    local = BIN / name
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- /proc ---------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """pid's child processes, recursively (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _field_kib(path: str, name: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int, tree: bool = True) -> int:
    """VmRSS of pid (+ its descendants): shared pages are counted once per process."""
    pids = [pid, *descendants(pid)] if tree else [pid]
    return sum(_field_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)


def pss_kib(pid: int, tree: bool = True) -> int:
    """Proportional set size of pid (+ descendants): shared pages split between sharers."""
    pids = [pid, *descendants(pid)] if tree else [pid]
    return sum(_field_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# --- statistics ----------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def median_result(results: list[dict]) -> dict:
    """Median of every numeric field over the runs that produced a result.

    Keeps `runs` (how many ran), `ok_runs`, the per-run values of the main
    metrics under `all_<key>`, and `error` (a stderr excerpt) if any run failed.
    """
    for r in results:
        if "rate" in r and not r["rate"]:  # loadgen finished, but nothing came back
            r.pop("rate")
            r["stderr"] = r.get("stderr") or "no reply at all in the measured time (stalled)"
            r["exit"] = r.get("exit") or -1
    good = [r for r in results if "rate" in r]
    out: dict = {"runs": len(results), "ok_runs": len(good)}
    keys = {
        k
        for r in good
        for k, v in r.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for k in sorted(keys):
        out[k] = median(r.get(k) for r in good)
    for k in ("rate", "mbps", "p50_us", "p99_us"):
        if any(k in r for r in good):
            out[f"all_{k}"] = [r.get(k) for r in good]
    bad = [r for r in results if r.get("exit", 0) not in (0,)]
    if bad:
        out["error"] = bad[-1].get("stderr", "") or f"exit status {bad[-1].get('exit')}"
        out["failed_runs"] = len(bad)
    return out


# --- processes -----------------------------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def _kill_group(popen: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left of it."""
    pgid = popen.pid  # started with start_new_session: pgid == pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout)
    # forked children (socat, websockify, websocketd's programs) may outlive
    # the leader for a moment: make sure the whole group is gone
    deadline = time.monotonic() + 2.0
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            break
        time.sleep(0.02)
    if popen.poll() is None:
        popen.kill()
        popen.wait()


@dataclass
class Harness:
    cfg: Config = field(default_factory=Config)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ipc-bench-")))
    procs: list[Proc] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    _clients: set = field(default_factory=set)
    incidents: list[str] = field(default_factory=list)  # servers that died on their own

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for popen in list(self._clients):
            _kill_group(popen, 1.0)
        self._clients.clear()
        for proc in reversed(self.procs):
            self._check_died(proc)
            _kill_group(proc.popen)
        self.procs.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- helpers --------------------------------------------------------

    def mkdir(self, name: str, mode: int = 0o700) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        return path

    def pin(self, pinned: bool) -> list[str]:
        return ["taskset", "-c", self.cfg.cpu] if pinned and self.cfg.cpu else []

    def record(self, argv: list[str]) -> str:
        """Keep the command line (temporary paths shown as $TMP) for the report."""
        return self.note(shlex.join(argv))

    def note(self, text: str) -> str:
        text = text.replace(str(self.tmp), "$TMP").replace(str(ROOT) + "/", "")
        text = re.sub(r"(127\.0\.0\.1\]?:|TCP-LISTEN:|--port=|stunnel-)\d+", r"\1$PORT", text)
        if text not in self.commands:
            self.commands.append(text)
        return text

    # --- servers --------------------------------------------------------

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        pinned: bool = True,
        nofile: int | str | None = None,
        env: dict | None = None,
        ready: tuple | None = None,
        timeout: float = 15.0,
    ) -> Proc:
        """Start a server in its own process group; wait until `ready` accepts.

        ready: ("unix", path) or ("tcp", port) or None.
        """
        full = self.pin(pinned)
        if nofile:  # N (soft = hard = N) or "SOFT:HARD"
            limits = nofile if isinstance(nofile, str) else f"{nofile}:{nofile}"
            full += ["prlimit", f"--nofile={limits}", "--"]
        full += [str(a) for a in argv]
        self.record(full)
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        with open(log, "wb") as logf:
            popen = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
                cwd=self.tmp,
            )
        proc = Proc(name, full, popen, log)
        self.procs.append(proc)
        if ready:
            try:
                self._wait_ready(proc, ready, timeout)
            except BaseException:
                self.stop(proc)
                raise
        return proc

    def _wait_ready(self, proc: Proc, ready: tuple, timeout: float) -> None:
        kind, where = ready
        deadline = time.monotonic() + timeout
        while True:
            if not proc.alive():
                raise BenchError(f"{proc.name} exited ({proc.popen.returncode}): {proc.log_tail()}")
            family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
            addr = str(where) if kind == "unix" else ("127.0.0.1", int(where))
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                try:
                    s.connect(addr)
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise BenchError(f"{proc.name} not ready after {timeout:.0f} s: {proc.log_tail()}")
            time.sleep(0.05)

    def stop(self, proc) -> None:
        """Stop a Proc (or anything with a .proc, like servers.Target) and its group."""
        proc = getattr(proc, "proc", proc)
        self._check_died(proc)
        _kill_group(proc.popen)
        if proc in self.procs:
            self.procs.remove(proc)

    def _check_died(self, proc: Proc) -> None:
        """Record a server that exited before we stopped it (with its last log lines)."""
        if proc.popen.poll() is not None and proc in self.procs:
            self.incidents.append(
                f"{proc.name} exited on its own (status {proc.popen.returncode}) before the "
                "end of its measurements; its last log lines: "
                + " | ".join(ln.strip() for ln in proc.log_tail(10).splitlines())
            )

    # --- load -----------------------------------------------------------

    def loadgen(
        self,
        args: list,
        *,
        pinned: bool = True,
        timeout: float | None = None,
        on_holding: Callable[[int], None] | None = None,
        nofile: int | None = None,
    ) -> dict:
        """Run loadgen; return its JSON result plus `exit` (and `stderr` on failure).

        on_holding(n) is called when loadgen prints `HOLDING n` (--hold mode),
        while the connections are open.
        """
        full = self.pin(pinned)
        if nofile:
            full += ["prlimit", f"--nofile={nofile}:{nofile}", "--"]
        full += [str(LOADGEN), *map(str, args), "-q"]
        self.record(full)
        if timeout is None:
            timeout = self.cfg.duration + self.cfg.warmup + self.cfg.hold_seconds + 90
        popen = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )
        self._clients.add(popen)
        timer = threading.Timer(timeout, _kill_group, (popen, 1.0))
        timer.start()
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.append(popen.stderr.read()), daemon=True)
        reader.start()
        result: dict = {}
        try:
            for line in popen.stdout:
                line = line.strip()
                if line.startswith("HOLDING") and on_holding:
                    on_holding(int(line.split()[1]))
                elif line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        result = json.loads(line)
            popen.wait()
            reader.join(5)
        finally:
            timer.cancel()
            if popen.poll() is None:
                _kill_group(popen, 1.0)
            self._clients.discard(popen)
        result["exit"] = popen.returncode
        if popen.returncode != 0:
            tail = "".join(err).strip().splitlines()[-3:]
            result["stderr"] = " | ".join(tail) or f"exit status {popen.returncode}"
        return result

    def measure(self, variants: dict[str, Callable[[], dict]]) -> dict[str, dict]:
        """Run every variant cfg.runs times, interleaved (A B C A B C ...), so
        that a noisy moment hits all of them; return the median results."""
        runs: dict[str, list[dict]] = {k: [] for k in variants}
        for _ in range(self.cfg.runs):
            for key, fn in variants.items():
                runs[key].append(fn())
        return {k: median_result(v) for k, v in runs.items()}

    def lg_time(self) -> list:
        """loadgen -d/-w arguments of this configuration."""
        return ["-d", self.cfg.duration, "-w", self.cfg.warmup]


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
