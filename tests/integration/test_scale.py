"""Load and scale through every daemon, with real processes on loopback.

* 1000 concurrent clients x 1000 messages through ipc-tcpd, ipc-tlsd,
  ipc-websocketd (the C load generator, every byte verified) and through
  ipcd (a multiplexed Python client whose connections ipcd obtained from
  ipc-tcpd): every message echoed byte-exact, none lost.
* 10,000 concurrent idle connections through ipc-tcpd (the fd limit raised
  in the test): all served, the daemon's memory per held connection printed
  and checked against the target (<= 20 KiB).
* 10,000 connect/close cycles through each daemon: its open descriptors and
  RSS return to their baseline.

The local service is the C echo server from bench/c (the daemons are under
test, not a Python echo service). Figures are printed (``-s`` shows them;
docs/robustness.md records one run).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipc_core import encode
from ipc_core.framing import FrameDecoder
from ipc_core.routing import connect
from tests.helpers import BIN, ROOT, Pki, Processes, connectable, wait_for

pytestmark = pytest.mark.slow

BENCH_C = ROOT / "bench" / "c"
LOADGEN = BENCH_C / "build" / "loadgen"
ECHO_SERVER = BENCH_C / "build" / "echo_server"
CLIENTS = 1000
MESSAGES = 1000
HELD = 10_000
CYCLES = 10_000
#: Target of issue 7: daemon memory per held connection through ipc-tcpd.
MAX_KIB_PER_HELD_CONNECTION = 20


# -- tools --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> None:
    """Build bench/c (loadgen, echo_server) once; skip without a compiler."""
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.skip("gcc/make not installed: cannot build bench/c/loadgen")
    out = subprocess.run(["make", "-C", str(BENCH_C)], capture_output=True, timeout=120)
    if out.returncode != 0 or not LOADGEN.exists() or not ECHO_SERVER.exists():
        pytest.skip(f"bench/c does not build here: {out.stderr.decode()[-500:]}")


def loadgen(*args: str, timeout: float = 120) -> dict:
    out = subprocess.run([str(LOADGEN), "-q", *args], capture_output=True, timeout=timeout)
    assert out.returncode == 0, (out.returncode, out.stderr.decode()[-2000:])
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def nofile_limit(n: int) -> Iterator[int]:
    """Raise RLIMIT_NOFILE towards ``n`` for this process and the processes it
    starts from now on (the hard limit too when allowed: CAP_SYS_RESOURCE);
    yield the soft limit obtained; restore the old limits afterwards."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, old[1])))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (old[1], old[1]))
    try:
        yield resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


# -- the stack ------------------------------------------------------------------------------------


@pytest.fixture
def echo(tools: None, rundir: Path, procs: Processes) -> Path:
    """The C echo server as the local service ``echo``."""
    path = rundir / "echo"
    procs.start(ECHO_SERVER, "unix", path)
    wait_for(lambda: connectable(path), what="echo_server")
    return path


@dataclass
class Daemon:
    kind: str
    pid: int
    port: int

    def target(self, pki: Pki) -> list[str]:
        """loadgen flags that reach the service ``echo`` through this daemon."""
        base = ["--tcp", f"127.0.0.1:{self.port}"]
        if self.kind == "tcpd":
            return [*base, "--handshake", "echo"]
        if self.kind == "tlsd":
            return [
                *base,
                "--tls",
                "--ca",
                str(pki.ca),
                "--sni",
                "localhost",
                "--handshake",
                "echo",
            ]
        return [*base, "--ws", "/echo"]


def start(procs: Processes, kind: str, rundir: Path, pki: Pki, *extra: str) -> Daemon:
    command = {"tcpd": "ipc-tcpd", "tlsd": "ipc-tlsd", "websocketd": "ipc-websocketd"}[kind]
    # One load generator on one address: the per-source cap is for remote hosts.
    flags = ["--listen", "127.0.0.1:0", "-q", "--max-connections-per-ip", "0"]
    if kind == "tlsd":
        flags += ["--cert", str(pki.cert), "--key", str(pki.key)]
    if kind == "websocketd":
        flags += ["--ping-interval", "0"]
    # -q hides "listening on": read the port from the socket table instead.
    proc = procs.start(BIN / command, *flags, *extra, env={"RUNDIR": str(rundir)})
    port = wait_for(lambda: _listening_port(proc), what=f"{command} listening")
    return Daemon(kind, proc.pid, port)


def _listening_port(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is not None:
        raise AssertionError(f"daemon exited: {proc.stderr.read().decode()[-2000:]}")
    inodes = set()
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                return int(fields[1].split(":")[1], 16)
    return None


# ================================================================================================
# 1000 clients x 1000 messages
# ================================================================================================


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["tcpd", "tlsd", "websocketd"])
def test_1000_clients_x_1000_messages(
    kind: str, rundir: Path, procs: Processes, pki: Pki, echo: Path
) -> None:
    d = start(procs, kind, rundir, pki)
    t0 = time.monotonic()
    r = loadgen(
        *d.target(pki),
        "-c",
        str(CLIENTS),
        "-n",
        str(MESSAGES),
        "-i",
        "100",
        "-s",
        "16",
        "-w",
        "0",
        "--verify",
    )
    elapsed = time.monotonic() - t0
    assert r["errors"] == 0 and r["mismatches"] == 0, r
    assert r["messages"] == CLIENTS * MESSAGES, r
    assert r["per_conn_min"] == r["per_conn_max"] == MESSAGES, r
    print(
        f"\n{kind}: {CLIENTS} clients x {MESSAGES} messages: {r['messages']} echoed and "
        f"verified byte-exact in {elapsed:.1f} s ({r['rate']:.0f} msg/s), 0 lost"
    )


@pytest.mark.timeout(180)
def test_1000_clients_x_1000_messages_through_ipcd(
    rundir: Path, procs: Processes, echo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1000 clients get their connection from ipcd, which asks host A's
    ipc-tcpd to dial host B's ipc-tcpd (two run directories on loopback);
    then 1000 pipelined messages each, every stream compared byte for byte."""
    rundir_b = rundir
    rundir_a = Path(str(rundir) + "-a")
    rundir_a.mkdir()
    try:
        b = start(procs, "tcpd", rundir_b, None)  # type: ignore[arg-type]
        env_a = {"RUNDIR": str(rundir_a)}
        procs.start(BIN / "ipcd", "-q", env=env_a)
        procs.start(BIN / "ipc-tcpd", "--listen", "127.0.0.1:0", "-q", env=env_a)
        wait_for(
            lambda: connectable(rundir_a / "ipc") and connectable(rundir_a / "tcp"), what="host A"
        )
        monkeypatch.setenv("IPC_NETWORK", f"echo tcp://127.0.0.1:{b.port}/echo")
        t0 = time.monotonic()
        socks = [connect("echo", rundir_a, timeout=10) for _ in range(CLIENTS)]
        lookups = time.monotonic() - t0
        sent, received = _pipelined_echo(socks)
        elapsed = time.monotonic() - t0
        total = 0
        for s in socks:
            assert received[s] == sent[s]
            total += len(FrameDecoder().feed(received[s]))
            s.close()
        assert total == CLIENTS * MESSAGES
        print(
            f"\nipcd: {CLIENTS} look-ups in {lookups:.1f} s, then {total} messages echoed "
            f"byte-exact through ipc-tcpd x2 ({elapsed:.1f} s in all), 0 lost"
        )
    finally:
        shutil.rmtree(rundir_a, ignore_errors=True)


def _pipelined_echo(socks: list[socket.socket]) -> tuple[dict, dict]:
    """Send 1000 distinct 16-byte messages on every socket at once, read all
    echoes back; return what was sent and received per socket."""
    sel = selectors.DefaultSelector()
    sent: dict[socket.socket, bytes] = {}
    received: dict[socket.socket, bytearray] = {}
    out: dict[socket.socket, memoryview] = {}
    for n, s in enumerate(socks):
        s.setblocking(False)
        blob = b"".join(encode(b"%05d:%09d|" % (n, i)) for i in range(MESSAGES))
        sent[s], received[s], out[s] = blob, bytearray(), memoryview(blob)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    pending = len(socks)
    deadline = time.monotonic() + 120
    while pending:
        assert time.monotonic() < deadline, "echoes stopped arriving"
        for key, mask in sel.select(5):
            s = key.fileobj
            if mask & selectors.EVENT_WRITE and out[s]:
                with contextlib.suppress(BlockingIOError):
                    out[s] = out[s][s.send(out[s]) :]
                if not out[s]:
                    sel.modify(s, selectors.EVENT_READ)
            if mask & selectors.EVENT_READ:
                with contextlib.suppress(BlockingIOError):
                    chunk = s.recv(1 << 16)
                    assert chunk, "connection closed before every echo came back"
                    received[s] += chunk
                    if len(received[s]) == len(sent[s]):
                        sel.unregister(s)
                        pending -= 1
    return sent, received


# ================================================================================================
# 10,000 idle connections through ipc-tcpd
# ================================================================================================


@pytest.mark.timeout(180)
def test_10000_idle_connections_through_tcpd(
    rundir: Path, procs: Processes, pki: Pki, echo: Path
) -> None:
    """Each held connection costs ipc-tcpd two descriptors (network and local
    end): 10,000 need a limit above 20,000. Without CAP_SYS_RESOURCE the hard
    limit cannot be raised; the test then holds as many as it allows and says so."""
    with nofile_limit(2 * HELD + 1000) as limit:
        held = min(HELD, (limit - 100) // 2)
        if held < 1000:
            pytest.skip(f"RLIMIT_NOFILE is {limit}: too low to hold 1000 connections")
        d = start(procs, "tcpd", rundir, pki)
        loadgen(*d.target(pki), "-c", "50", "-n", "10", "-w", "0")  # warm the allocator
        time.sleep(0.3)
        base_rss, base_fds = rss_kib(d.pid), fd_count(d.pid)
        hold = subprocess.Popen(
            [str(LOADGEN), "-q", *d.target(pki), "--hold", str(held), "--hold-seconds", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            t0 = time.monotonic()
            assert hold.stdout is not None
            line = hold.stdout.readline().decode()
            setup = time.monotonic() - t0
            assert line.strip() == f"HOLDING {held}", (line, hold.stderr.read().decode()[-2000:])
            time.sleep(0.5)
            held_rss, held_fds = rss_kib(d.pid), fd_count(d.pid)
            # Still responsive while holding them all: a fresh round trip.
            r = loadgen(*d.target(pki), "-c", "1", "-n", "10", "-w", "0", "--verify")
            assert r["mismatches"] == 0 and r["errors"] == 0
        finally:
            hold.terminate()
            hold.wait(10)
            for stream in (hold.stdout, hold.stderr):
                stream.close()  # type: ignore[union-attr]
        per_conn = (held_rss - base_rss) / held
        note = (
            ""
            if held == HELD
            else (
                f" (RLIMIT_NOFILE hard limit {limit} cannot be raised here: {held} held, "
                f"not {HELD})"
            )
        )
        print(
            f"\ntcpd: {held} idle connections opened and round-tripped in {setup:.1f} s; "
            f"descriptors {base_fds} -> {held_fds}; RSS {base_rss / 1024:.1f} -> "
            f"{held_rss / 1024:.1f} MiB = {per_conn:.2f} KiB per held connection{note}"
        )
        assert held_fds - base_fds >= 2 * held  # network end + local end, all served
        assert per_conn <= MAX_KIB_PER_HELD_CONNECTION
        # Once they are gone, the descriptors are released.
        wait_for(lambda: fd_count(d.pid) <= base_fds, timeout=20, what="descriptors released")


# ================================================================================================
# 10,000 connect/close cycles
# ================================================================================================


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["tcpd", "tlsd", "websocketd"])
def test_10000_connect_close_cycles(
    kind: str, rundir: Path, procs: Processes, pki: Pki, echo: Path
) -> None:
    """The baseline is the daemon after a first round of cycles: the
    allocators' high-water mark (Python's arenas, OpenSSL's and glibc's heaps)
    is reached by then, so what a second round adds is what it leaks."""
    d = start(procs, kind, rundir, pki)  # default settings (5 s handshake deadline)
    cycle = [*d.target(pki), "--connect-rate", "-c", "10", "-w", "0"]
    start_rss = rss_kib(d.pid)
    # Warm-up round (TLS: 3000 handshakes, each costs ~1 ms of CPU).
    loadgen(*cycle, "-n", str(300 if kind == "tlsd" else CYCLES // 10))
    time.sleep(0.5)
    base_rss, base_fds = rss_kib(d.pid), fd_count(d.pid)
    t0 = time.monotonic()
    r = loadgen(*cycle, "-n", str(CYCLES // 10))
    elapsed = time.monotonic() - t0
    burst_rss = rss_kib(d.pid)
    assert r["errors"] == 0 and r["connects"] == CYCLES, r
    fds = wait_for(
        lambda: fd_count(d.pid) <= base_fds and fd_count(d.pid),
        timeout=10,
        what="descriptors back to the baseline",
    )
    time.sleep(0.5)
    rss = rss_kib(d.pid)
    print(
        f"\n{kind}: {CYCLES} connect/round-trip/close cycles in {elapsed:.1f} s; "
        f"descriptors {base_fds} -> {fds}; RSS {start_rss / 1024:.1f} (fresh) -> "
        f"{base_rss / 1024:.1f} (baseline, after a warm-up round) -> "
        f"{burst_rss / 1024:.1f} (right after) -> {rss / 1024:.1f} MiB"
    )
    assert fds == base_fds
    # OpenSSL's allocations fragment glibc's heap: a few MiB of noise there.
    tolerance = 8192 if kind == "tlsd" else 2048
    assert rss - base_rss <= tolerance, f"RSS grew by {rss - base_rss} KiB over {CYCLES} cycles"
    # And in all: 10 clients churning must not cost much more than a fresh
    # daemon (ipc-tlsd reached ~290 MiB when cancelled deadlines pinned
    # their handshakes, see test_cancelled_timer_releases_its_callback).
    assert rss - start_rss <= 32 * 1024, f"{kind}: {start_rss} -> {rss} KiB"


@pytest.mark.timeout(120)
def test_10000_lookup_cycles_through_ipcd(
    rundir: Path, procs: Processes, echo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = procs.start(BIN / "ipcd", "-q", env={"RUNDIR": str(rundir)})
    wait_for(lambda: connectable(rundir / "ipc"), what="ipcd")
    monkeypatch.setenv("IPC_NETWORK", "echo unix://echo")

    def cycles(n: int) -> None:
        for i in range(n):
            s = connect("echo", rundir)
            s.settimeout(5)  # a bound, should an echo never come
            s.sendall(encode(b"%d" % i))
            assert s.recv(64) == encode(b"%d" % i)
            s.close()

    cycles(CYCLES)  # warm-up round: the baseline is the daemon after it
    time.sleep(0.3)
    base_rss, base_fds = rss_kib(proc.pid), fd_count(proc.pid)
    t0 = time.monotonic()
    cycles(CYCLES)
    elapsed = time.monotonic() - t0
    fds = wait_for(
        lambda: fd_count(proc.pid) <= base_fds and fd_count(proc.pid),
        timeout=10,
        what="descriptors back to the baseline",
    )
    rss = rss_kib(proc.pid)
    print(
        f"\nipcd: {CYCLES} look-up/round-trip/close cycles in {elapsed:.1f} s; descriptors "
        f"{base_fds} -> {fds}; RSS {base_rss / 1024:.1f} -> {rss / 1024:.1f} MiB"
    )
    assert fds == base_fds
    assert rss - base_rss <= 2048


@pytest.mark.timeout(10)
def test_cancelled_timer_releases_its_callback(tmp_path: Path) -> None:
    """Each connection arms a handshake deadline (call_later) that is cancelled
    once the handshake is done; the cancelled handle must let go of its
    closure at once. (It did not: until 2098c8e every cancelled deadline
    pinned its handshake, and ipc-tlsd's SSLObject, for --handshake-timeout,
    and 10 clients in connect/close cycles drove ipc-tlsd from 36 to ~290 MiB;
    test_10000_connect_close_cycles[tlsd] now bounds that.)"""
    import gc
    import weakref

    from ipc_core import Context

    class Payload:
        pass

    with Context(rundir_path=tmp_path) as ctx:
        payload = Payload()
        ref = weakref.ref(payload)
        handle = ctx.call_later(60, lambda p=payload: p)
        handle.cancel()
        del payload
        gc.collect()
        assert ref() is None, "a cancelled timer still holds its callback's closure"
