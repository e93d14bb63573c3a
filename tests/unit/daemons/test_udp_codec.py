"""ipc-udpd's pure rules (daemons/codecs/udp.py): --listen ADDRESS=SERVICE,
the outbound request udp://HOST:PORT, the largest datagram per family."""

from __future__ import annotations

import socket

import pytest

from daemons.codecs.udp import (
    MAX_IPV4_PAYLOAD,
    MAX_IPV6_PAYLOAD,
    UdpTarget,
    max_payload,
    parse_udp_target,
)
from daemons.udpd import parse_udp_listen


@pytest.mark.parametrize(
    ("spec", "family", "host", "port", "service"),
    [
        (":5140=syslog", socket.AF_UNSPEC, None, 5140, "syslog"),
        ("127.0.0.1:0=pong", socket.AF_INET, "127.0.0.1", 0, "pong"),
        ("[::1]:5140=a=b", socket.AF_INET6, "::1", 5140, "a=b"),
        ("localhost:53=dns", socket.AF_UNSPEC, "localhost", 53, "dns"),
    ],
)
def test_parse_listen(spec: str, family: int, host: str | None, port: int, service: str) -> None:
    parsed = parse_udp_listen(spec)
    assert (parsed.address.family, parsed.address.host, parsed.address.port) == (
        family,
        host,
        port,
    )
    assert parsed.service == service
    assert str(parsed) == spec if host != "::1" else str(parsed) == "[::1]:5140=a=b"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (":5140", "ADDRESS=SERVICE"),
        (":5140=", "ADDRESS=SERVICE"),
        ("unix:/run/x=pong", "not Unix sockets"),
        (":99999=pong", "bad port"),
        ("::1:5140=pong", "brackets"),
        (":5140=a/b", "bad service"),
        (":5140=" + "x" * 101, "bad service"),
    ],
)
def test_parse_listen_errors(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_udp_listen(spec)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("udp://127.0.0.1:5140", UdpTarget("127.0.0.1", 5140)),
        ("UDP://127.0.0.1:5140/", UdpTarget("127.0.0.1", 5140)),
        ("udp://[::1]:53/dns", UdpTarget("::1", 53, "dns")),
        ("udp://example.org:514/syslog", UdpTarget("example.org", 514, "syslog")),
    ],
)
def test_parse_target(text: str, expected: UdpTarget) -> None:
    assert parse_udp_target(text) == expected


def test_target_str() -> None:
    assert str(UdpTarget("::1", 53)) == "udp://[::1]:53"
    assert str(UdpTarget("10.0.0.1", 53, "dns")) == "udp://10.0.0.1:53"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("tcp://127.0.0.1:9000/pong", "expected udp://"),
        ("127.0.0.1:5140", "expected udp://"),
        ("udp://127.0.0.1", "missing port"),
        ("udp://127.0.0.1:0", "port 0"),
        ("udp://127.0.0.1:70000", "bad port"),
        ("udp://::1:53", "brackets"),
        ("udp://host name:53", "bad host"),
        ("udp://127.0.0.1:53/a\nb", "bad service"),
    ],
)
def test_parse_target_errors(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_udp_target(text)


def test_max_payload() -> None:
    assert max_payload(("192.0.2.1", 5)) == MAX_IPV4_PAYLOAD == 65507
    assert max_payload(("::ffff:192.0.2.1", 5, 0, 0)) == MAX_IPV4_PAYLOAD
    assert max_payload(("2001:db8::1", 5, 0, 0)) == MAX_IPV6_PAYLOAD == 65527
    assert max_payload(("fe80::1%eth0", 5, 0, 2)) == MAX_IPV6_PAYLOAD
    assert max_payload("unix") == MAX_IPV4_PAYLOAD
