"""Several hosts for real: two network namespaces joined by a veth pair.

Host A (namespace ``ipct-a-<pid>``, 10.231.N.1/30) runs ipcd and the
outbound sides of ipc-tcpd and ipc-tlsd; host B (``ipct-b-<pid>``,
10.231.N.2/30) runs ``ipc pongd`` and the inbound sides. Each host has its
own run directory. The test process plays a client on host A: it reaches
ipcd through A's run directory (Unix sockets are not scoped by network
namespaces), and every TCP byte crosses the veth link. No address outside
the namespaces made here is ever used.

Needs root (``ip netns add``); skipped with the reason otherwise. The
namespaces (and with them the veth pair) are deleted at the end, after every
process started in them has been stopped.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemons.engine import certs
from ipc_core import Context, PeerClosed, ServiceUnavailable
from tests.helpers import BIN, LogReader, Processes, connectable, wait_for

pytestmark = pytest.mark.netns

PID = os.getpid()
NET = f"10.231.{PID % 250}"  # a /30 of our own, in a range nobody routes here
ADDR_A, ADDR_B = f"{NET}.1", f"{NET}.2"
NS_A, NS_B = f"ipct-a-{PID}", f"ipct-b-{PID}"
VETH_A, VETH_B = f"ipa{PID}"[:15], f"ipb{PID}"[:15]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ip", *args], capture_output=True, timeout=10, check=check)


@dataclass(frozen=True)
class Hosts:
    rundir_a: Path
    rundir_b: Path
    ca: Path
    cert_b: Path
    key_b: Path

    def link(self, state: str) -> None:
        """Take host B's end of the link down or up. Host A keeps its route
        (its end only loses the carrier), so its packets vanish silently,
        as when a remote host or a cable goes away."""
        ip("-n", NS_B, "link", "set", VETH_B, state)


@pytest.fixture(scope="module")
def namespaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    made: list[str] = []
    try:
        for ns in (NS_A, NS_B):
            out = ip("netns", "add", ns, check=False)
            if out.returncode != 0:
                pytest.skip(f"ip netns add failed: {out.stderr.decode().strip()}")
            made.append(ns)
        ip(
            "link",
            "add",
            VETH_A,
            "netns",
            NS_A,
            "type",
            "veth",
            "peer",
            "name",
            VETH_B,
            "netns",
            NS_B,
        )
        for ns, dev, addr in ((NS_A, VETH_A, ADDR_A), (NS_B, VETH_B, ADDR_B)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        out = subprocess.run(
            ["ip", "netns", "exec", NS_A, "ping", "-c", "1", "-W", "2", ADDR_B],
            capture_output=True,
            timeout=10,
        )
        if out.returncode not in (0, None) and shutil.which("ping"):
            pytest.skip(f"the veth link does not carry traffic: {out.stdout.decode()}")
        yield tmp_path_factory.mktemp("netns")
    finally:
        for ns in made:
            ip("netns", "del", ns, check=False)


@pytest.fixture
def hosts(namespaces: Path, rundir: Path, procs: Processes) -> Iterator[Hosts]:
    """Both hosts with their daemons; every process stopped before the
    namespaces go (the module fixture deletes them)."""
    rundir_a, rundir_b = Path(str(rundir) + "-a"), rundir
    rundir_a.mkdir()
    pki = namespaces / "pki"
    if not pki.exists():
        pki.mkdir()
        ca, ca_key = certs.make_ca("netns CA")
        leaf, leaf_key = certs.make_cert(ca, ca_key, "host-b", ["host-b", ADDR_B])
        certs.write_cert(pki / "ca.pem", ca)
        certs.write_cert(pki / "b.pem", leaf)
        certs.write_key(pki / "b.key", leaf_key)
    h = Hosts(rundir_a, rundir_b, pki / "ca.pem", pki / "b.pem", pki / "b.key")
    try:
        yield h
    finally:
        procs.stop_all()
        h.link("up")
        shutil.rmtree(rundir_a, ignore_errors=True)


def run_in(
    procs: Processes, ns: str, rundir: Path, command: str, *args: str, ready: str | None = None
) -> tuple[subprocess.Popen[bytes], LogReader]:
    """Start BIN/command inside namespace ``ns`` (ip netns exec execs it: the
    pid is the daemon's)."""
    proc = procs.start("ip", "netns", "exec", ns, BIN / command, *args, env={"RUNDIR": str(rundir)})
    logs = LogReader(proc)
    if ready is not None:
        logs.wait_for(ready)
    return proc, logs


@dataclass
class Stack:
    logs_b: dict[str, LogReader]
    procs_a: dict[str, subprocess.Popen[bytes]]


def start_stack(
    procs: Processes, h: Hosts, connect_timeout: str = "2", peer_timeout: str = "3"
) -> Stack:
    """``peer_timeout``: how long the daemons keep a pair whose peer stopped
    acknowledging (TCP_USER_TIMEOUT + keepalive): the longest outage a
    session survives, and the bound on noticing a link dead for good."""
    # Host B: the service and the inbound daemons, on B's address only.
    pong, _ = run_in(procs, NS_B, h.rundir_b, "ipc", "pongd")
    wait_for(lambda: connectable(h.rundir_b / "pong"), what="pongd on B")
    _, tcpd_b = run_in(
        procs,
        NS_B,
        h.rundir_b,
        "ipc-tcpd",
        "--peer-timeout",
        peer_timeout,
        "--listen",
        f"{ADDR_B}:9000",
        "--allow",
        "pong",
        ready="listening on",
    )
    _, tlsd_b = run_in(
        procs,
        NS_B,
        h.rundir_b,
        "ipc-tlsd",
        "--peer-timeout",
        peer_timeout,
        "--listen",
        f"{ADDR_B}:9443",
        "--cert",
        str(h.cert_b),
        "--key",
        str(h.key_b),
        "--allow",
        "pong",
        ready="listening on",
    )
    # Host A: the router and the outbound daemons.
    ipcd, _ = run_in(procs, NS_A, h.rundir_a, "ipcd", "--timeout", "8")
    tcpd_a, _ = run_in(
        procs,
        NS_A,
        h.rundir_a,
        "ipc-tcpd",
        "--peer-timeout",
        peer_timeout,
        "--listen",
        "127.0.0.1:9000",
        "--connect-timeout",
        connect_timeout,
    )
    tlsd_a, _ = run_in(
        procs,
        NS_A,
        h.rundir_a,
        "ipc-tlsd",
        "--peer-timeout",
        peer_timeout,
        "--no-listen",
        "--ca",
        str(h.ca),
        "--connect-timeout",
        connect_timeout,
    )
    wait_for(
        lambda: all(connectable(h.rundir_a / n) for n in ("ipc", "tcp", "tls")),
        what="host A daemons",
    )
    return Stack({"tcp": tcpd_b, "tls": tlsd_b}, {"ipcd": ipcd, "tcp": tcpd_a, "tls": tlsd_a})


def route(scheme: str) -> str:
    port = 9000 if scheme == "tcp" else 9443
    return f"pong {scheme}://{ADDR_B}:{port}/pong"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_client_on_a_reaches_pong_on_b(
    hosts: Hosts, procs: Processes, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = start_stack(procs, hosts)
    monkeypatch.setenv("IPC_NETWORK", route(scheme))
    rng = random.Random(11)
    with Context(rundir_path=hosts.rundir_a) as ctx:
        fds = [ctx.connect_service("pong") for _ in range(5)]
        for _ in range(40):
            for fd in fds:
                payload = rng.randbytes(rng.choice([0, 1, 100, 5000, 70_000]))
                ctx.write(fd, payload)
                assert ctx.read(fd, timeout=5) == payload
    # B saw host A's address: the bytes crossed the veth link.
    line = stack.logs_b[scheme].wait_for(f"{ADDR_A}:")
    assert "'pong'" in line
    assert not (hosts.rundir_a / "pong").exists()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_link_cut_and_restored_mid_session(
    hosts: Hosts, procs: Processes, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host B drops off the link under an open session with data in flight,
    then comes back: TCP retransmits and the session carries on, nothing
    lost. While it is away, a new look-up fails at --connect-timeout."""
    stack = start_stack(procs, hosts, peer_timeout="15")  # well above the ~2 s outage
    monkeypatch.setenv("IPC_NETWORK", route(scheme))
    with Context(rundir_path=hosts.rundir_a) as ctx:
        fd = ctx.connect_service("pong")
        ctx.write(fd, b"before the cut")
        assert ctx.read(fd, timeout=5) == b"before the cut"
        hosts.link("down")
        try:
            for i in range(20):  # sent into the cut link: queued, retransmitted later
                ctx.write(fd, b"during %d" % i)
            t0 = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="no answer within 2"):
                ctx.connect_service("pong", timeout=15)
            failed_after = time.monotonic() - t0
            assert 1.5 < failed_after < 4, failed_after  # --connect-timeout 2
            time.sleep(max(0.0, 2.0 - failed_after))
        finally:
            hosts.link("up")
        t1 = time.monotonic()
        for i in range(20):
            assert ctx.read(fd, timeout=20) == b"during %d" % i
        recovered_after = time.monotonic() - t1
        ctx.write(fd, b"after")
        assert ctx.read(fd, timeout=5) == b"after"
        fd2 = ctx.connect_service("pong")
        ctx.write(fd2, b"new session")
        assert ctx.read(fd2, timeout=5) == b"new session"
    for name, proc in stack.procs_a.items():
        assert proc.poll() is None, name
    print(
        f"\n{scheme}: link down ~2 s mid-session: new look-up failed after "
        f"{failed_after:.2f} s; 20 messages sent into the cut arrived "
        f"{recovered_after:.2f} s after the link came back"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_link_cut_for_good_mid_session_fails_in_bounded_time(
    hosts: Hosts, procs: Processes, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host B never comes back: with data unacknowledged, host A's daemon
    closes the pair after --peer-timeout (3 s here) and the client sees the
    close. (Until 2098c8e nothing bounded it: ~15 min of kernel retransmits.)"""
    stack = start_stack(procs, hosts, peer_timeout="3")
    monkeypatch.setenv("IPC_NETWORK", route(scheme))
    with Context(rundir_path=hosts.rundir_a) as ctx:
        fd = ctx.connect_service("pong")
        ctx.write(fd, b"hello")
        assert ctx.read(fd, timeout=5) == b"hello"
        hosts.link("down")
        t0 = time.monotonic()
        ctx.write(fd, b"into the dead link")
        with pytest.raises((PeerClosed, ConnectionError)):
            ctx.read(fd, timeout=10)
        closed_after = time.monotonic() - t0
    for name, proc in stack.procs_a.items():
        assert proc.poll() is None, name
    print(
        f"\n{scheme}: host B gone for good: the client saw the close after "
        f"{closed_after:.1f} s (--peer-timeout 3)"
    )


def test_namespace_names_and_addresses_are_ours() -> None:
    """The guard rails, checked without root: private /30, our pid in every name."""
    assert re.fullmatch(r"10\.231\.\d{1,3}", NET)
    assert str(PID) in NS_A and str(PID) in NS_B
    assert len(VETH_A) <= 15 and len(VETH_B) <= 15
