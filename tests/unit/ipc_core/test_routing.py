"""IPC_NETWORK parsing and the client's fallbacks (issue 11, item 17)."""

from __future__ import annotations

import logging

import pytest

from ipc_core import Context, ProtocolError, ServiceUnavailable
from ipc_core.routing import parse_network


def test_one_bad_directive_is_skipped_alone_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="ipc_core.routing"):
        routes = parse_network("pong tcp://h:1/pong ; oops ; audio tor://x/audio ; a b c")
    assert routes == {"pong": "tcp://h:1/pong", "audio": "tor://x/audio"}
    warned = [r.getMessage() for r in caplog.records]
    assert any("'oops'" in m for m in warned) and any("'a b c'" in m for m in warned)


def test_nothing_usable_is_still_an_error():
    with pytest.raises(ProtocolError, match="IPC_NETWORK directive 'just-a-name'"):
        parse_network("just-a-name ; ")
    assert parse_network(" ; ; ") == {}


def test_route_without_router_says_start_ipcd(rundir, monkeypatch):
    monkeypatch.setenv("IPC_NETWORK", "oops ; pong tcp://127.0.0.1:1/pong")
    with Context() as ctx, pytest.raises(ServiceUnavailable) as info:
        ctx.connect_service("pong", timeout=2)
    assert str(info.value) == (
        f"route for 'pong' via tcp://127.0.0.1:1/pong but no router at {rundir}/ipc: start ipcd"
    )


def test_route_without_router_falls_back_to_a_local_service(rundir, monkeypatch):
    monkeypatch.setenv("IPC_NETWORK", "pong tcp://127.0.0.1:1/pong")
    with Context() as srv, Context() as cli:
        srv.service_init("pong")
        fd = cli.connect_service("pong", timeout=2)
        assert fd in cli


def test_no_route_is_still_no_service(rundir, monkeypatch):
    monkeypatch.setenv("IPC_NETWORK", "other tcp://127.0.0.1:1/x")
    with Context() as ctx, pytest.raises(ServiceUnavailable, match="no service 'pong'"):
        ctx.connect_service("pong", timeout=2)
