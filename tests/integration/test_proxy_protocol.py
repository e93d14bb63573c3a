"""ipc-tcpd and ipc-tlsd with --proxy-protocol, real processes, raw clients.

The clients write PROXY headers by hand (``encode_v1``/``encode_v2``) from
127.0.0.1, the listed source, or from 127.0.0.2 (a client socket bound
there), which is not listed: every address of 127.0.0.0/8 is local on
Linux, so both reach a daemon listening on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from daemons.codecs.proxy import Endpoint, encode_v1, encode_v2
from ipc_core import encode
from tests.helpers import BIN, LogReader, Pki, recv_exact, recv_msg, start_listening_daemon

pytestmark = pytest.mark.timeout(60)

FRONTEND = Endpoint("192.0.2.10", 9000)


def client(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def served(s: socket.socket, payload: bytes = b"hello") -> bool:
    assert recv_exact(s, 2) == b"ok"
    s.sendall(encode(payload))
    return recv_msg(s) == payload


def closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def tcpd(rundir: Path, procs) -> tuple[LogReader, int]:
    """pongd, and ipc-tcpd requiring a PROXY header from 127.0.0.1 only."""
    procs.pongd(rundir)
    _proc, logs, port = start_listening_daemon(
        procs,
        "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        "--proxy-protocol",
        "127.0.0.1/32",
        "--handshake-timeout",
        "2",
        env={"RUNDIR": str(rundir)},
    )
    return logs, port


def test_startup_says_who_must_send_a_header(tcpd) -> None:
    logs, _port = tcpd
    line = logs.wait_for("PROXY protocol header required")
    assert "from 127.0.0.1/32" in line and "refused from any other source" in line


@pytest.mark.parametrize("version", [1, 2])
def test_a_header_from_the_listed_proxy_names_the_client(tcpd, version: int) -> None:
    logs, port = tcpd
    encode_header = encode_v1 if version == 1 else encode_v2
    s = client(port)
    s.sendall(encode_header(Endpoint("203.0.113.5", 40000 + version), FRONTEND) + b"pong")
    assert served(s)
    s.sendall(encode(b"again"))
    assert recv_msg(s) == b"again"
    line = logs.wait_for(f"203.0.113.5:{40000 + version}")
    assert "-> 'pong'" in line


def test_header_name_and_first_message_in_one_segment(tcpd) -> None:
    _logs, port = tcpd
    s = client(port)
    s.sendall(encode_v2(Endpoint("203.0.113.6", 1), FRONTEND) + b"pong\n" + encode(b"first"))
    assert recv_exact(s, 2) == b"ok"
    assert recv_msg(s) == b"first"


def test_header_split_over_segments(tcpd) -> None:
    _logs, port = tcpd
    header = encode_v1(Endpoint("203.0.113.7", 7), FRONTEND)
    s = client(port)
    for piece in (header[:3], header[3:20], header[20:], b"pong"):
        s.sendall(piece)
        time.sleep(0.3)  # a pause inside the header is not the end of a name
    assert served(s)


def test_a_header_from_an_unlisted_source_is_refused(tcpd) -> None:
    logs, port = tcpd
    spoof = client(port, source="127.0.0.2")
    spoof.sendall(encode_v1(Endpoint("10.9.9.9", 1), FRONTEND) + b"pong")
    assert closed_by_peer(spoof)
    line = logs.wait_for("not listed in --proxy-protocol")
    assert "127.0.0.2:" in line and "10.9.9.9" not in line
    # The same source without a header is an ordinary client.
    plain = client(port, source="127.0.0.2")
    plain.sendall(b"pong")
    assert served(plain)


def test_a_listed_source_without_a_header_is_refused(tcpd) -> None:
    logs, port = tcpd
    s = client(port)
    s.sendall(b"pong")
    assert closed_by_peer(s)
    line = logs.wait_for("no PROXY protocol header")
    assert "127.0.0.1:" in line and "b'pong'" in line


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "lone CR or LF"),
        (b"PROXY TCP4 1.2.3.456 5.6.7.8 1 2\r\npong", "address '1.2.3.456'"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff", "limit is"),
    ],
    ids=["v1-lf", "v1-address", "v2-oversize"],
)
def test_a_malformed_header_is_refused_others_unaffected(tcpd, data: bytes, reason: str) -> None:
    logs, port = tcpd
    good = client(port)
    good.sendall(encode_v2(Endpoint("203.0.113.8", 8), FRONTEND) + b"pong")
    assert served(good)
    bad = client(port)
    bad.sendall(data)
    assert closed_by_peer(bad)
    assert "127.0.0.1:" in logs.wait_for(reason)
    good.sendall(encode(b"still here"))
    assert recv_msg(good) == b"still here"


def test_per_source_limit_counts_the_client_the_header_names(rundir: Path, procs) -> None:
    procs.pongd(rundir)
    _proc, logs, port = start_listening_daemon(
        procs,
        "ipc-tcpd",
        "--listen",
        "127.0.0.1:0",
        "--proxy-protocol",
        "127.0.0.1",
        "--max-connections-per-ip",
        "2",
        env={"RUNDIR": str(rundir)},
    )
    kept = []
    for n in range(2):
        s = client(port)
        s.sendall(encode_v2(Endpoint("10.0.0.1", 5000 + n), FRONTEND) + b"pong")
        assert served(s)
        kept.append(s)
    third = client(port)
    third.sendall(encode_v2(Endpoint("10.0.0.1", 5002), FRONTEND) + b"pong")
    assert closed_by_peer(third)
    assert "from 10.0.0.1 (--max-connections-per-ip)" in logs.wait_for("--max-connections-per-ip")
    # Every connection comes from 127.0.0.1, yet another named client is served.
    other = client(port)
    other.sendall(encode_v1(Endpoint("10.0.0.2", 6000), FRONTEND) + b"pong")
    assert served(other)
    for s in kept:
        s.sendall(encode(b"kept"))
        assert recv_msg(s) == b"kept"


def test_unix_listener_with_the_word_unix(rundir: Path, procs, tmp_path: Path) -> None:
    procs.pongd(rundir)
    path = tmp_path / "tcpd.sock"
    proc = procs.start(
        BIN / "ipc-tcpd",
        "--listen",
        f"unix:{path}",
        "--proxy-protocol",
        "unix",
        env={"RUNDIR": str(rundir)},
    )
    logs = LogReader(proc)
    logs.wait_for("listening on")
    assert "from Unix-socket peers" in logs.wait_for("PROXY protocol header required")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(path))
    s.sendall(encode_v2(Endpoint("198.51.100.4", 4444), FRONTEND) + b"pong")
    assert served(s)
    assert "-> 'pong'" in logs.wait_for("198.51.100.4:4444")
    bare = socket.socket(socket.AF_UNIX)
    bare.settimeout(5)
    bare.connect(str(path))
    bare.sendall(b"pong")
    assert closed_by_peer(bare)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ten", "'ten' is not an IP network"),
        ("10.0.0.1/8", "host bits set (did you mean 10.0.0.0/8?)"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not an IP network"),
    ],
)
@pytest.mark.parametrize("command", ["ipc-tcpd", "ipc-tlsd"])
def test_a_bad_cidr_is_a_usage_error(command: str, value: str, message: str) -> None:
    out = subprocess.run(
        [BIN / command, "--proxy-protocol", "127.0.0.1", "--proxy-protocol", value],
        capture_output=True,
        timeout=30,
    )
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert "--proxy-protocol" in err and message in err
    assert "Traceback" not in err


def test_a_bad_cidr_from_the_environment_names_the_variable() -> None:
    env = dict(os.environ, IPC_TCPD_PROXY_PROTOCOL="127.0.0.1 nope")
    out = subprocess.run([BIN / "ipc-tcpd"], capture_output=True, timeout=30, env=env)
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert "IPC_TCPD_PROXY_PROTOCOL" in err and "'nope'" in err


# -- ipc-tlsd: the header first, then TLS -----------------------------------------------


@pytest.fixture
def tlsd(rundir: Path, procs, pki: Pki) -> tuple[LogReader, int]:
    procs.pongd(rundir)
    _proc, logs, port = start_listening_daemon(
        procs,
        "ipc-tlsd",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        str(pki.cert),
        "--key",
        str(pki.key),
        "--proxy-protocol",
        "127.0.0.1/32",
        "--handshake-timeout",
        "2",
        env={"RUNDIR": str(rundir)},
    )
    return logs, port


def tls(raw: socket.socket, pki: Pki) -> ssl.SSLSocket:
    return ssl.create_default_context(cafile=pki.ca).wrap_socket(raw, server_hostname="localhost")


@pytest.mark.parametrize("version", [1, 2])
def test_tlsd_header_then_tls(tlsd, pki: Pki, version: int) -> None:
    logs, port = tlsd
    encode_header = encode_v1 if version == 1 else encode_v2
    raw = client(port)
    raw.sendall(encode_header(Endpoint("203.0.113.9", 9000 + version), FRONTEND))
    s = tls(raw, pki)
    s.sendall(b"pong")
    assert served(s)
    assert "-> 'pong'" in logs.wait_for(f"203.0.113.9:{9000 + version}")


def test_tlsd_tls_without_a_header_from_the_listed_source_is_refused(tlsd, pki: Pki) -> None:
    logs, port = tlsd
    try:
        s = tls(client(port), pki)
        s.sendall(b"pong")
        assert s.recv(10) == b""
    except (ssl.SSLError, OSError):
        pass  # refused during the TLS handshake: what we expect
    line = logs.wait_for("no PROXY protocol header")
    # repr() quotes with " when the random ClientHello bytes hold a '.
    assert re.search(r"first bytes b['\"]\\x16\\x03", line), line


def test_tlsd_unlisted_client_speaks_tls_directly(tlsd, pki: Pki) -> None:
    logs, port = tlsd
    s = tls(client(port, source="127.0.0.2"), pki)
    s.sendall(b"pong")
    assert served(s)
    spoof = client(port, source="127.0.0.2")
    spoof.sendall(encode_v2(Endpoint("10.1.1.1", 1), FRONTEND))
    assert closed_by_peer(spoof)
    assert "127.0.0.2:" in logs.wait_for("not listed in --proxy-protocol")
