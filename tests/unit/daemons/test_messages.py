"""What the daemons say: pure checks of the functions that word log lines
and errors (the process-level checks are in tests/integration/test_first_hour.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from daemons.engine.addresses import parse_uri
from daemons.engine.listeners import exposed_addresses
from daemons.engine.listeners import peer_name as _peer_name
from daemons.engine.log import plural
from daemons.engine.options import help_epilog
from daemons.engine.outbound import _Attempt, _lost_reason
from daemons.engine.policy import ServiceAccess, exposure_warning, policy_summary
from daemons.ipcd import _missing_service
from ipc_core.context import _header_hint


def test_ipv4_mapped_peer_is_written_as_ipv4() -> None:
    assert _peer_name(("::ffff:127.0.0.1", 51212, 0, 0)) == "127.0.0.1:51212"
    assert _peer_name(("192.0.2.7", 1)) == "192.0.2.7:1"
    assert _peer_name(("2001:db8::1", 443, 0, 0)) == "[2001:db8::1]:443"
    assert _peer_name(("::ffff:1:2:3", 5, 0, 0)) == "[::ffff:1:2:3]:5"  # not a mapped address
    assert _peer_name("") == "unix-peer"


def test_plural() -> None:
    assert plural(1, "connection") == "1 connection"
    assert plural(0, "connection") == "0 connections"
    assert plural(2, "connection") == "2 connections"


def test_policy_summary() -> None:
    everything = policy_summary(ServiceAccess().protect("tcp-2"))
    assert everything.startswith("network peers may reach every local service except")
    assert "tcp-2" in everything and "*.ctl" in everything
    assert policy_summary(ServiceAccess(["pong", "chat*"], ["chat-admin"])) == (
        "network peers may reach only pong, chat*; never chat-admin"
    )


@pytest.fixture
def bound() -> Iterator[dict[str, socket.socket]]:
    """Sockets bound (not listening, no traffic) to the kinds of address."""
    socks = {}
    for key, family, address in [
        ("v4 loopback", socket.AF_INET, ("127.0.0.1", 0)),
        ("v6 loopback", socket.AF_INET6, ("::1", 0)),
        ("v4 any", socket.AF_INET, ("0.0.0.0", 0)),
        ("v6 any", socket.AF_INET6, ("::", 0)),
    ]:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            continue
        socks[key] = sock
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socks["unix"] = unix
    yield socks
    for sock in socks.values():
        sock.close()


def test_exposed_addresses(bound: dict[str, socket.socket]) -> None:
    loopback = [s for k, s in bound.items() if "loopback" in k or k == "unix"]
    assert exposed_addresses(loopback) == []
    wildcard = [s for k, s in bound.items() if "any" in k]
    exposed = exposed_addresses(wildcard)
    assert len(exposed) == len(wildcard) >= 1
    assert all(e.endswith("(every interface)") for e in exposed)


def test_exposure_warning() -> None:
    assert exposure_warning([], ServiceAccess()) is None
    assert exposure_warning(["[::]:9000 (every interface)"], ServiceAccess(["pong"])) is None
    warning = exposure_warning(["[::]:9000 (every interface)"], ServiceAccess())
    assert warning is not None
    assert "[::]:9000" in warning and "--allow" in warning and "no --allow" in warning


def test_connect_failure_is_worded_as_a_connect_failure() -> None:
    attempt = _Attempt(3, parse_uri("tcp://127.0.0.1:1/pong"), None, 0.0)  # type: ignore[arg-type]
    assert (
        _lost_reason(attempt, "write failed: Connection refused")
        == "connect to 127.0.0.1:1: Connection refused"
    )
    six = _Attempt(3, parse_uri("tcp://[::1]:1/pong"), None, 0.0)  # type: ignore[arg-type]
    assert _lost_reason(six, "read failed: No route to host") == (
        "connect to [::1]:1: No route to host"
    )
    # Once the remote answered, a reset is a reset, not a connect failure.
    attempt.received = True
    assert _lost_reason(attempt, "read failed: Connection refused") == (
        "read failed: Connection refused"
    )
    assert _lost_reason(attempt, None) == "connection closed"


def test_missing_service_wording() -> None:
    plain = _missing_service("db", None, "/run/libipc")
    assert plain == "no local service 'db' in /run/libipc"
    assert "daemon" not in plain
    tcp = _missing_service("tcp", "tcp://h:1/pong", "/run/libipc")
    assert "start ipc-tcpd" in tcp and "tcp:// routes" in tcp
    other = _missing_service("gopher", "gopher://h:1/x", "/r")
    assert "no protocol daemon serves gopher://" in other


@pytest.mark.parametrize(
    ("first_bytes", "hint"),
    [
        (b"GET ", "look like text"),
        (b"pong", "look like text"),
        (b"\x16\x03\x01\x02", "TLS handshake"),
        (b"\x7f\x00\x00\x00", ""),
        (b"\x01\x00\x00\x00", ""),
    ],
)
def test_oversize_header_hint(first_bytes: bytes, hint: str) -> None:
    text = _header_hint(int.from_bytes(first_bytes, "big"))
    assert (hint in text) if hint else text == ""
    if hint == "look like text":
        assert repr(first_bytes.decode()) in text


def test_help_epilog_keeps_the_examples_block() -> None:
    text = help_epilog([("ipc-tcpd --allow pong", "only pong"), ("a \\\nb", "")], ["Note."])
    block, note = text.split("\n\n")
    assert block.splitlines() == [
        "\b",
        "Examples:",
        "  ipc-tcpd --allow pong",
        "      only pong",
        "  a \\",
        "    b",
    ]
    assert note == "Note."
