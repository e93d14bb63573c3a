"""ipc-websocketd's Host policy (DNS rebinding), origin scheme and log escaping: pure functions."""

from __future__ import annotations

import socket

import pytest

from daemons.websocketd import HostPolicy, same_origin, shown, split_host


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("LocalHost.:80", ("localhost", 80)),
        ("[0:0::1]:9", ("[::1]", 9)),
        ("[::1]", ("[::1]", None)),
        ("chat.example.com", ("chat.example.com", None)),
        ("a b", None),
        ("evil.example:", None),
        ("evil.example:99999", None),
        ("evil.example:+80", None),
        ("[zz]:80", None),
        ("[::1]80", None),
        ("évil.example", None),
        ("evil\x1b.example", None),
        ("", None),
    ],
)
def test_split_host(value: str, parsed: tuple[str, int | None] | None) -> None:
    assert split_host(value) == parsed


def listening(address: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family)
    sock.bind((address, 0))
    sock.listen()
    return sock


def test_a_loopback_listener_answers_to_loopback_names_on_its_port() -> None:
    with listening("127.0.0.1") as sock:
        port = sock.getsockname()[1]
        policy = HostPolicy.for_sockets([sock])
    for ok in [f"127.0.0.1:{port}", f"localhost:{port}", f"x.localhost:{port}", f"[::1]:{port}"]:
        assert policy.allows(ok), ok
    assert policy.allows(f"{socket.gethostname()}:{port}")
    # Loopback names with another port, or none: an SSH tunnel or a port
    # forward (ssh -L 18080:127.0.0.1:PORT) shows the browser its own port.
    for ok in [f"127.0.0.1:{port + 1}", "localhost:18080", "127.0.0.1", "[::1]:1"]:
        assert policy.allows(ok), ok
    for bad in [
        f"evil.example:{port}",
        f"{socket.gethostname()}:{port + 1}",
        f"localhost.evil.example:{port}",
        f"192.0.2.1:{port}",
    ]:
        assert not policy.allows(bad), bad


def test_a_wildcard_listener_knows_no_address_but_loopback() -> None:
    with listening("0.0.0.0") as sock:
        port = sock.getsockname()[1]
        policy = HostPolicy.for_sockets([sock], ["app.example"])
    assert policy.allows(f"127.0.0.1:{port}") and policy.allows(f"app.example:{port}")
    assert policy.allows("app.example")  # a --host name, behind a proxy: no port
    assert not policy.allows(f"0.0.0.0:{port}")
    assert not policy.allows(f"192.0.2.1:{port}")


def test_host_names_with_a_port_and_the_default_port() -> None:
    policy = HostPolicy(["127.0.0.1"], [80], extra=["api.example:8443", "tls.example:443"])
    policy.default_port = True
    assert policy.allows("127.0.0.1") and policy.allows("localhost")
    assert policy.allows("api.example:8443") and not policy.allows("api.example")
    assert policy.allows("tls.example") and policy.allows("tls.example:443")
    assert not policy.allows("api.example:80")
    with pytest.raises(ValueError, match="--host"):
        HostPolicy(extra=["not a host"])


def test_same_origin_compares_the_scheme() -> None:
    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080", "http")
    assert not same_origin("https://127.0.0.1:8080", "127.0.0.1:8080", "http")
    assert same_origin("https://chat.example.com", "chat.example.com", "https")
    assert same_origin("https://chat.example.com:443", "chat.example.com", "https")
    # Before the scheme counted, this http:// page (port 80) matched the https site.
    assert not same_origin("http://chat.example.com", "chat.example.com", "https")
    assert not same_origin("http://chat.example.com:443", "chat.example.com:443", "https")


def test_shown_escapes_what_could_forge_a_log_line() -> None:
    text = shown("/a\n2026-01-01 WARNING forged\x1b[31m\x00")
    assert "\n" not in text and "\x1b" not in text and "\x00" not in text
    assert text == repr("/a\n2026-01-01 WARNING forged\x1b[31m\x00")
    assert shown("x" * 300).endswith("'...") and len(shown("x" * 300)) < 210
    assert shown(None) == "(none)"
