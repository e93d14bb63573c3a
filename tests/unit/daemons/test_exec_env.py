"""ipc exec's program environment (daemons/engine/cgienv.py): the CGI names
for each transport, the TLS identity in mod_ssl's names, clean and bounded
values, the operator's part and its reserved names."""

from __future__ import annotations

import pytest

from daemons.engine.cgienv import (
    DEFAULT_PATH,
    MAX_VALUE,
    base_environment,
    clean_value,
    connection_environment,
)
from ipc_core import PeerInfo

FINGERPRINT = "SHA256:" + ":".join(["AB"] * 32)


def test_a_local_client() -> None:
    env = connection_environment({"PATH": DEFAULT_PATH}, "svc", None, local_pid=42, local_uid=0)
    assert env["IPC_TRANSPORT"] == "local" and env["IPC_SERVICE"] == "svc"
    assert env["IPC_CLIENT_PID"] == "42" and env["IPC_CLIENT_UID"] == "0"
    assert "REMOTE_ADDR" not in env and "PATH_INFO" not in env


def test_a_websocket_client() -> None:
    info = PeerInfo(
        transport="ws",
        client_address="203.0.113.5",
        client_port=5000,
        local_address="127.0.0.1",
        local_port=8080,
        via="x-forwarded-for",
        proxy_address="127.0.0.1",
        path="/chat%20room",
        query=(("a", "1"), ("b", "x y&z")),
        origin="https://example.com",
        user_agent="ua",
        cookie="c=1",
        authorization="Bearer t",
        subprotocol="chat.v1",
        token_name="alice",
    )
    env = connection_environment({}, "chat", info)
    assert env["REMOTE_ADDR"] == "203.0.113.5" and env["REMOTE_PORT"] == "5000"
    assert env["SERVER_ADDR"] == "127.0.0.1" and env["SERVER_PORT"] == "8080"
    assert env["PATH_INFO"] == "/chat room"
    assert env["QUERY_STRING"] == "a=1&b=x%20y%26z"
    assert env["REQUEST_URI"] == "/chat%20room?a=1&b=x%20y%26z"
    assert env["HTTP_ORIGIN"] == "https://example.com" and env["HTTP_USER_AGENT"] == "ua"
    assert env["HTTP_COOKIE"] == "c=1" and env["HTTP_AUTHORIZATION"] == "Bearer t"
    assert env["HTTP_SEC_WEBSOCKET_PROTOCOL"] == "chat.v1" and env["AUTH_TYPE"] == "Bearer"
    assert env["IPC_TOKEN_NAME"] == "alice" and env["IPC_VIA"] == "x-forwarded-for"
    assert env["IPC_PROXY_ADDR"] == "127.0.0.1" and env["IPC_TRANSPORT"] == "ws"
    assert "HTTPS" not in env and not any(k.startswith("SSL_") for k in env)


def test_a_tls_client_with_a_certificate() -> None:
    info = PeerInfo(
        transport="tls",
        client_address="::1",
        client_port=1,
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        tls_sni="svc.example",
        cert_subject="CN=alice,O=Example",
        cert_sans=("DNS:a.example", "DNS:b.example", "IP:192.0.2.1", "email:a@example.com"),
        cert_sha256=FINGERPRINT,
        cert_verified=True,
    )
    env = connection_environment({}, "svc", info)
    assert env["HTTPS"] == "on" and env["SERVER_NAME"] == "svc.example"
    assert env["SSL_PROTOCOL"] == "TLSv1.3" and env["SSL_CIPHER"] == "TLS_AES_256_GCM_SHA384"
    assert env["SSL_CLIENT_S_DN"] == "CN=alice,O=Example"
    assert env["SSL_CLIENT_VERIFY"] == "SUCCESS" and env["SSL_CLIENT_FINGERPRINT"] == FINGERPRINT
    assert env["SSL_CLIENT_SAN_DNS_0"] == "a.example" and env["SSL_CLIENT_SAN_DNS_1"] == "b.example"
    assert env["SSL_CLIENT_SAN_IPaddr_0"] == "192.0.2.1"
    assert env["SSL_CLIENT_SAN_Email_0"] == "a@example.com"
    assert "PATH_INFO" not in env  # not a web transport
    plain = connection_environment({}, "svc", PeerInfo(transport="tls"))
    assert plain["SSL_CLIENT_VERIFY"] == "NONE"


def test_values_are_clean_and_bounded() -> None:
    assert clean_value("a\r\nb\x00c\x1bd") == "a  bc d"
    long = clean_value("é" * MAX_VALUE)
    assert len(long.encode()) <= MAX_VALUE and long == "é" * (MAX_VALUE // 2)
    info = PeerInfo(transport="ws", user_agent="x\ny", cookie="k=" + "v" * 20000)
    env = connection_environment({}, "s", info)
    assert env["HTTP_USER_AGENT"] == "x y" and len(env["HTTP_COOKIE"]) == MAX_VALUE


def test_the_operators_part() -> None:
    env = base_environment(["HOME", "ABSENT"], [("GREETING", "hi")], {"HOME": "/root", "X": "1"})
    assert env == {"PATH": DEFAULT_PATH, "HOME": "/root", "GREETING": "hi"}
    assert base_environment(["PATH"], [], {"PATH": "/opt/bin"})["PATH"] == "/opt/bin"
    assert base_environment([], [("PATH", "/x")], {})["PATH"] == "/x"
    # The connection's variables win over nothing: the operator cannot set them.
    for pass_env, set_env in (
        (["REMOTE_ADDR"], []),
        ([], [("HTTP_X", "1")]),
        ([], [("SSL_CLIENT_S_DN", "CN=forged")]),
        ([], [("IPC_TRANSPORT", "tls")]),
        (["bad-name"], []),
        ([], [("OK", "nul\x00")]),
    ):
        with pytest.raises(ValueError):
            base_environment(pass_env, set_env, {})
