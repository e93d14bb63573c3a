"""Peer information through ipc-websocketd, end to end: a real service that
opted in (``service_init(..., peer_info=True)``) behind a real daemon, over
ws and wss, reached by a websockets client. The service answers each message
with the record it got, so the test sees exactly what the service saw: the
request's path, query, origin and cookie without the token, the token's
name, the client a trusted proxy named; and a service that refuses makes the
browser side get 403."""

from __future__ import annotations

import json
import ssl
import sys
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from daemons.engine import certs
from tests.helpers import Processes, connectable, wait_for
from tests.integration.test_websocketd import echo, websocketd  # noqa: F401

ALICE = "alice-token-0123456789abcdef"

SERVICE = r"""
import sys
from ipc_core import Context, EventType
from ipc_core.peerinfo import encode

with Context() as ctx:
    ctx.service_init(sys.argv[1], peer_info=True)
    ctx.handle_signals()
    for event in ctx:
        if event.type is EventType.CONNECTION and event.peer is not None:
            deny = event.peer.query_value("deny")
            if deny is not None:
                ctx.refuse(event.fd, f"denied by the test: {deny}")
        elif event.type is EventType.MESSAGE_RX:
            peer = ctx.peer_info(event.fd)
            ctx.write(event.fd, encode(peer) if peer is not None else b"null")
"""


@pytest.fixture
def who(rundir: Path, procs: Processes, tmp_path: Path) -> str:
    """The service ``who`` (peer information), running."""
    script = tmp_path / "who_service.py"
    script.write_text(SERVICE)
    proc = procs.start(sys.executable, script, "who", env={"RUNDIR": str(rundir)})
    wait_for(lambda: connectable(rundir / "who") or proc.poll() is not None, what="who up")
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    return "who"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE} alice who,pong\n")
    path.chmod(0o600)
    return path


def seen(ws) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """What the service got, as JSON (the wire form of the record)."""
    return json.loads(echo(ws, b"who am I?"))


def test_a_peer_info_service_behind_ws_learns_the_request_and_the_client(
    websocketd,  # noqa: F811
    who: str,
    token_file: Path,
) -> None:
    daemon = websocketd("--token-file", str(token_file), "--trust-proxy", "127.0.0.1/32")
    origin = f"http://127.0.0.1:{daemon.port}"
    headers = {
        "Cookie": "theme=dark",
        "X-Forwarded-For": "203.0.113.7",
        "Authorization": "Bearer app-level",
        "User-Agent": "test-browser/1.0",
    }
    url = f"{who}?room=lobby&token={ALICE}&x=%C3%A9"
    with daemon.connect(url, origin=origin, additional_headers=headers) as ws:
        info = seen(ws)
    assert info["transport"] == "ws"
    assert info["path"] == "/who"
    assert info["query"] == [["room", "lobby"], ["x", "é"]]
    assert info["origin"] == origin
    assert info["cookie"] == "theme=dark"
    assert info["authorization"] == "Bearer app-level"
    assert info["user_agent"] == "test-browser/1.0"
    assert info["token_name"] == "alice"
    assert info["client_address"] == "203.0.113.7" and "client_port" not in info
    assert (info["via"], info["proxy_address"]) == ("x-forwarded-for", "127.0.0.1")
    assert (info["local_address"], info["local_port"]) == ("127.0.0.1", daemon.port)
    assert "subprotocol" not in info
    # The token in a cookie or a subprotocol: gone from what the service sees too.
    cookie = {"Cookie": f"a=1; ipc_token={ALICE}; b=2"}
    with daemon.connect(who, origin=origin, additional_headers=cookie) as ws:
        info = seen(ws)
    assert info["cookie"] == "a=1; b=2" and info["token_name"] == "alice"
    assert info["client_address"] == "127.0.0.1" and "via" not in info  # no header: the socket
    offered = ["chat.v2", f"ipc.token.{ALICE}"]
    with daemon.connect(who, origin=origin, subprotocols=offered) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "chat.v2"
        info = seen(ws)
    assert info["subprotocol"] == "chat.v2"
    assert ALICE not in daemon.log


def test_a_service_that_refuses_gives_the_browser_a_403(
    websocketd,  # noqa: F811
    who: str,
    token_file: Path,
) -> None:
    daemon = websocketd("--token-file", str(token_file))
    with pytest.raises(InvalidStatus) as caught:
        daemon.connect(f"{who}?deny=yes&token={ALICE}")
    assert caught.value.response.status_code == 403
    daemon.wait_log(r"service 'who' refused: denied by the test: yes")
    # Others are not affected; a plain service still works without a door.
    with daemon.connect(f"{who}?token={ALICE}") as ws:
        assert seen(ws)["token_name"] == "alice"
    with daemon.connect(f"pong?token={ALICE}") as ws:
        assert echo(ws, b"plain") == b"plain"


def test_over_wss_the_record_says_wss_and_the_tls_session(
    websocketd,  # noqa: F811
    who: str,
    tmp_path: Path,
) -> None:
    ca, ca_key = certs.make_ca("test CA")
    cert, key = certs.make_cert(ca, ca_key, "localhost", ["127.0.0.1", "localhost"])
    certs.write_cert(tmp_path / "ca.pem", ca)
    certs.write_cert(tmp_path / "server.pem", cert)
    certs.write_key(tmp_path / "server.key", key)
    daemon = websocketd(
        "--cert",
        str(tmp_path / "server.pem"),
        "--key",
        str(tmp_path / "server.key"),
        "--trust-proxy",
        "127.0.0.1/32",
        scheme="wss",
    )
    client_tls = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    origin = f"https://127.0.0.1:{daemon.port}"
    headers = {"X-Forwarded-For": "198.51.100.20", "Cookie": f"ipc_token={ALICE}"}
    with daemon.connect(
        f"{who}?room=tls", ssl=client_tls, origin=origin, additional_headers=headers
    ) as ws:
        info = seen(ws)
    assert info["transport"] == "wss"
    assert str(info["tls_version"]).startswith("TLSv1.")
    assert info["path"] == "/who" and info["query"] == [["room", "tls"]]
    assert info["origin"] == origin
    assert "cookie" not in info and "token_name" not in info  # no tokens configured
    assert (info["client_address"], info["via"]) == ("198.51.100.20", "x-forwarded-for")
    with pytest.raises(InvalidStatus) as caught:
        daemon.connect(f"{who}?deny=tls", ssl=client_tls, origin=origin)
    assert caught.value.response.status_code == 403
