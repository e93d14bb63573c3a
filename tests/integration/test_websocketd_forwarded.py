"""ipc-websocketd --trust-proxy CIDR end to end: forwarding headers believed
only from the networks named, read with the rightmost-untrusted rule, the
real client in the log and under --max-connections-per-ip. Real processes on
127.0.0.1 (the test client is the "proxy"), a websockets client, ipc pongd."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.helpers import BIN
from tests.integration.test_websocketd import REFUSED, echo, websocketd  # noqa: F401


def test_headers_from_an_untrusted_peer_mean_nothing(websocketd) -> None:  # noqa: F811
    daemon = websocketd("--trust-proxy", "127.0.0.2/32", "--trust-proxy", "10.0.0.0/8")
    headers = {"X-Forwarded-For": "198.51.100.7", "Forwarded": "for=192.0.2.9"}
    with daemon.connect(additional_headers=headers) as ws:
        assert echo(ws, b"x") == b"x"
    daemon.wait_log(r"INFO .* 127\.0\.0\.1:\d+ -> 'pong'")
    assert "198.51.100.7" not in daemon.log and "192.0.2.9" not in daemon.log
    # A rebound X-Forwarded-Host from an untrusted peer is not even looked at.
    with daemon.connect(additional_headers={"X-Forwarded-Host": "evil.example"}) as ws:
        assert echo(ws, b"y") == b"y"


def test_the_rightmost_untrusted_hop_is_the_client(websocketd) -> None:  # noqa: F811
    daemon = websocketd("--trust-proxy", "127.0.0.1/32", "--trust-proxy", "10.0.0.0/8")
    # The client wrote the first two hops itself; 10.1.2.3 is a trusted inner
    # proxy, so the walk from the right stops at 203.0.113.5.
    headers = {"X-Forwarded-For": "6.6.6.6, 203.0.113.5, 10.1.2.3"}
    with daemon.connect(additional_headers=headers) as ws:
        assert echo(ws, b"hop") == b"hop"
    daemon.wait_log(r"INFO .* 203\.0\.113\.5 \(via 127\.0\.0\.1:\d+\) -> 'pong'")
    # Garbage ends the walk at the last hop understood (here: the peer).
    with pytest.raises(InvalidStatus):
        daemon.connect("nope", additional_headers={"X-Forwarded-For": "203.0.113.5, evil x"})
    daemon.wait_log(r" 127\.0\.0\.1:\d+: no local service 'nope'")
    assert "evil x" not in daemon.log
    # Only X-Forwarded-For is read by default: a client's own Forwarded is ignored.
    with daemon.connect(additional_headers={"Forwarded": "for=192.0.2.9"}) as ws:
        assert echo(ws, b"z") == b"z"
    assert "192.0.2.9" not in daemon.log


def test_forwarded_mode_reads_rfc_7239(websocketd) -> None:  # noqa: F811
    daemon = websocketd(
        "--trust-proxy",
        "127.0.0.1",
        "--forwarded-header",
        "forwarded",
        "--host",
        "chat.example.com",
    )
    headers = {
        "Forwarded": 'for="[2001:db8::5]:4711";proto=https;host=chat.example.com',
        "X-Forwarded-For": "6.6.6.6",
    }
    # Same origin judged on the host and scheme the proxy reports.
    with daemon.connect(additional_headers=headers, origin="https://chat.example.com") as ws:
        assert echo(ws, b"7239") == b"7239"
    daemon.wait_log(r"\[2001:db8::5\]:4711 \(via 127\.0\.0\.1:\d+\) -> 'pong'")
    assert "6.6.6.6" not in daemon.log
    with pytest.raises(InvalidStatus) as info:
        daemon.connect(additional_headers=headers, origin="http://chat.example.com")
    assert info.value.response.status_code == 403


def test_the_per_ip_limit_counts_the_forwarded_client(websocketd) -> None:  # noqa: F811
    daemon = websocketd("--trust-proxy", "127.0.0.1/32", "--max-connections-per-ip", "2")

    def via(client: str):  # type: ignore[no-untyped-def]
        return daemon.connect(additional_headers={"X-Forwarded-For": client})

    with via("203.0.113.5") as one, via("203.0.113.5") as two:
        with pytest.raises(REFUSED):
            via("203.0.113.5")  # a third from the same client
        daemon.wait_log(r"2 connections open from 203\.0\.113\.5 \(--max-connections-per-ip\)")
        # Other clients behind the same proxy are not starved by it.
        with via("203.0.113.6") as three, via("2001:db8::1") as four:
            for ws in (one, two, three, four):
                assert echo(ws, b"ok") == b"ok"


def test_behind_a_tcp_balancer_headers_are_judged_by_the_proxy_header(
    websocketd,  # noqa: F811
) -> None:
    """--proxy-protocol and --trust-proxy together: the balancer (127.0.0.1)
    passes the HTTP proxy's connection on with a PROXY header naming it; the
    forwarding header is believed because of who the header names, never
    because of the balancer's own address."""
    daemon = websocketd("--proxy-protocol", "127.0.0.1", "--trust-proxy", "10.0.0.0/8")

    def through_balancer(source: str, xff: str) -> ClientConnection:
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
        sock.sendall(f"PROXY TCP4 {source} 127.0.0.1 5555 {daemon.port}\r\n".encode())
        headers = {"X-Forwarded-For": xff}
        return connect(daemon.url(), sock=sock, additional_headers=headers, open_timeout=5)

    # An HTTP proxy inside --trust-proxy, behind the balancer, names the client.
    with through_balancer("10.9.9.9", "198.51.100.4") as ws:
        assert echo(ws, b"l7") == b"l7"
    daemon.wait_log(r"198\.51\.100\.4 \(via 127\.0\.0\.1:\d+\) -> 'pong'")
    # A client straight through the balancer: the header names it, its own
    # X-Forwarded-For is not believed.
    with through_balancer("192.0.2.33", "198.51.100.5") as ws:
        assert echo(ws, b"l4") == b"l4"
    daemon.wait_log(r"192\.0\.2\.33:5555 \(via 127\.0\.0\.1:\d+\) -> 'pong'")
    assert "198.51.100.5" not in daemon.log


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--trust-proxy"], "requires an argument"),
        (["--trust-proxy", "yes"], "is not an IP network"),
        (["--trust-proxy", "10.0.0.1/8"], "host bits set"),
        (["--forwarded-header", "forwarded"], "needs --trust-proxy"),
    ],
)
def test_bad_trust_proxy_flags_are_usage_errors(rundir: Path, args: list[str], words: str) -> None:
    result = subprocess.run(
        [BIN / "ipc-websocketd", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        timeout=10,
        env={"RUNDIR": str(rundir), "PATH": "/usr/bin:/bin"},
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert words in stderr and "Traceback" not in stderr
