"""``--metrics`` and ``ipc status`` against a known workload on a real ipc-tcpd.

The workload is counted by hand (connections, messages and bytes each way,
handshake failures by reason), then read back twice: from the Prometheus
text on ``/metrics`` and, without HTTP, from the daemon's control service
``tcp.ctl`` through ``ipc status --json``. Both must agree with the count.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ipc_core import encode
from tests.helpers import BIN, LogReader, Processes, recv_exact, recv_msg, wait_for

PAYLOADS = [b"", b"hello", b"x" * 1000, bytes(range(256)) * 300]
CLIENTS = 3
Sample = tuple[str, frozenset[tuple[str, str]]]


def parse_metrics(text: str) -> dict[Sample, float]:
    """The samples of a Prometheus text page: ``(name, labels) -> value``."""
    samples: dict[Sample, float] = {}
    line_re = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = line_re.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
        samples[(name, pairs)] = float(value)
    return samples


def get(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture
def tcpd(rundir: Path, procs: Processes) -> tuple[int, int, LogReader]:
    """pongd and ipc-tcpd with --metrics; returns (port, metrics port, logs)."""
    procs.pongd(rundir)
    proc = procs.start(
        BIN / "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        env={"RUNDIR": str(rundir)},
    )
    logs = LogReader(proc)
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", logs.wait_for("listening on"))[1])
    metrics = int(
        re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", logs.wait_for("metrics on"))[1]
    )
    return port, metrics, logs


def settled_samples(metrics_port: int) -> dict[Sample, float]:
    """The samples once every connection of the workload is closed."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"

    def settled() -> dict[Sample, float] | None:
        samples = parse_metrics(http_get(url)[2])
        return samples if get(samples, "ipc_connections_open") == 0 else None

    result: dict[Sample, float] = wait_for(settled, what="every connection closed")
    return result


def run_workload(port: int) -> dict[str, float]:
    """Echo PAYLOADS on CLIENTS connections, plus four failed handshakes;
    return what the daemon should report."""
    for _ in range(CLIENTS):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"pong")
            assert recv_exact(sock, 2) == b"ok"
            for payload in PAYLOADS:
                sock.sendall(encode(payload))
                assert recv_msg(sock) == payload
    for name in (b"nope", b"ipc", b"tcp.ctl"):  # unknown, protected, control service
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(name)
            assert sock.recv(100) == b""  # refused: closed without "ok"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as quitter:
        quitter.sendall(b"po")  # leaves mid-handshake (a silent close is only debug-logged)
    stream_bytes = sum(4 + len(p) for p in PAYLOADS)
    return {
        "connections": CLIENTS + 4,
        "switched": CLIENTS,
        "messages": CLIENTS * len(PAYLOADS),
        "bytes": CLIENTS * stream_bytes,
    }


def test_metrics_match_a_known_workload(tcpd: tuple[int, int, LogReader]) -> None:
    port, metrics_port, logs = tcpd
    expected = run_workload(port)
    logs.wait_for("closed the connection during the handshake")
    samples = settled_samples(metrics_port)
    assert get(samples, "ipc_connections_total") == expected["connections"]
    assert get(samples, "ipc_switched_total") == expected["switched"]
    for direction in ("in", "out"):
        assert get(samples, "ipc_messages_total", direction=direction) == expected["messages"]
        assert get(samples, "ipc_bytes_total", direction=direction) == expected["bytes"]
    failures = {
        dict(labels)["reason"]: v
        for (name, labels), v in samples.items()
        if name == "ipc_handshake_failures_total"
    }
    assert failures == {"unknown service": 1, "refused": 2, "peer closed": 1}
    assert not [v for (name, _l), v in samples.items() if name == "ipc_errors_total" and v]


def test_metrics_http_surface(tcpd: tuple[int, int, LogReader]) -> None:
    _port, metrics_port, _logs = tcpd
    base = f"http://127.0.0.1:{metrics_port}"
    status, ctype, body = http_get(base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert "# TYPE ipc_connections_open gauge" in body
    assert "# TYPE ipc_connections_total counter" in body
    assert http_get(base + "/healthz")[:3:2] == (200, "ok\n")
    assert http_get(base + "/nothing")[0] == 404
    request = urllib.request.Request(base + "/metrics", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 405


def test_ipc_status_reads_the_same_counters(rundir: Path, tcpd: tuple[int, int, LogReader]) -> None:
    port, metrics_port, logs = tcpd
    expected = run_workload(port)
    logs.wait_for("closed the connection during the handshake")
    samples = settled_samples(metrics_port)
    out = subprocess.run(
        [BIN / "ipc", "status", "--json", "tcp"],
        capture_output=True,
        timeout=30,
        env={"RUNDIR": str(rundir), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()
    answer = json.loads(out.stdout)["tcp.ctl"]
    assert answer["daemon"] == "ipc-tcpd"
    metrics = answer["metrics"]
    assert metrics["ipc_connections_total"] == expected["connections"]
    assert metrics["ipc_switched_total"] == get(samples, "ipc_switched_total")
    by_direction = {s["labels"]["direction"]: s["value"] for s in metrics["ipc_bytes_total"]}
    assert by_direction == {"in": expected["bytes"], "out": expected["bytes"]}

    table = subprocess.run(
        [BIN / "ipc", "status"],
        capture_output=True,
        timeout=30,
        env={"RUNDIR": str(rundir), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert table.returncode == 0, table.stderr.decode()
    header, row = table.stdout.decode().splitlines()
    assert header.split()[:3] == ["SERVICE", "DAEMON", "PID"]
    cells = row.split()
    assert cells[:2] == ["tcp.ctl", "ipc-tcpd"]
    assert f"{expected['messages']}/{expected['messages']}" in cells


def test_ipc_status_without_daemons(rundir: Path) -> None:
    out = subprocess.run(
        [BIN / "ipc", "status"],
        capture_output=True,
        timeout=30,
        env={"RUNDIR": str(rundir), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 1
    assert "no daemon control service" in out.stderr.decode()
    out = subprocess.run(
        [BIN / "ipc", "status", "tcp"],
        capture_output=True,
        timeout=30,
        env={"RUNDIR": str(rundir), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 1 and "tcp.ctl" in out.stderr.decode()
