"""Closed or failed TLS layers are freed by reference counting alone (issue 11, item 5).

A layer that kept a raised exception kept its traceback, whose frames hold
the layer: a cycle, so the layer and its buffers lived until the cyclic GC
ran (RSS 36 -> 365 MB with no connection open). Each test runs with the GC
off, drives a layer into an error or a close, drops it, and checks a weakref
to it is dead.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemons.codecs.tcp import TcpdClient, TcpdHandshake
from daemons.codecs.tls import TLSLayer
from daemons.codecs.tlswrap import TLSConnector, TLSHandshake
from daemons.engine import certs
from daemons.engine.tlsconfig import client_context, server_context
from ipc_core.errors import IPCError


@dataclass(frozen=True)
class PKI:
    ca: Path
    other_ca: Path
    server: tuple[Path, Path]
    carol: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = certs.make_ca("Test CA")
    other, _ = certs.make_ca("Other CA")
    certs.write_cert(d / "ca.pem", ca)
    certs.write_cert(d / "other.pem", other)
    pairs = {
        "server": certs.make_cert(ca, ca_key, "localhost", ["localhost"]),
        "carol": certs.make_cert(ca, ca_key, "carol", usage="client"),
    }
    for stem, (cert, key) in pairs.items():
        certs.write_cert(d / f"{stem}.pem", cert)
        certs.write_key(d / f"{stem}.key", key)
    return PKI(
        d / "ca.pem",
        d / "other.pem",
        (d / "server.pem", d / "server.key"),
        (d / "carol.pem", d / "carol.key"),
    )


@pytest.fixture(autouse=True)
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def error_name(call: Callable[..., Any], *args: Any) -> str:
    """Call, expect an IPCError; return its class name (holding nothing of it)."""
    try:
        call(*args)
    except IPCError as exc:
        return type(exc).__name__
    raise AssertionError(f"{call} raised nothing")


def server(pki: PKI, **kwargs: Any) -> TLSLayer:
    return TLSLayer(server_context(*pki.server, **kwargs), server_side=True)


def client(pki: PKI, ca: Path | None = None, cert: tuple[Path, Path] | None = None) -> TLSLayer:
    ctx = client_context(ca=ca or pki.ca, cert=cert and cert[0], key=cert and cert[1])
    return TLSLayer(ctx, server_side=False, server_hostname="localhost")


def opened(pki: PKI) -> tuple[TLSLayer, TLSLayer]:
    s, c = server(pki), client(pki)
    for _ in range(5):
        if data := c.data_to_send():
            s.receive_data(data)
        if data := s.data_to_send():
            c.receive_data(data)
    assert s.handshake_complete and c.handshake_complete
    return s, c


def test_server_refusing_garbage_is_freed(pki: PKI) -> None:
    s = server(pki)
    s.receive_data(b"\x16\x03\x01")  # a buffer in the BIO, too
    assert error_name(s.receive_data, b"GET / HTTP/1.1\r\n\r\n" * 100) == "ProtocolError"
    assert error_name(s.receive_data, b"") == "ProtocolError"  # kept, raised again
    s.data_to_send()
    assert s.closed
    ref = weakref.ref(s)
    del s
    assert ref() is None


def test_client_failing_verification_is_freed(pki: PKI) -> None:
    s, c = server(pki), client(pki, ca=pki.other_ca)
    s.receive_data(c.data_to_send())
    assert error_name(c.receive_data, s.data_to_send()) == "ProtocolError"
    refs = weakref.ref(s), weakref.ref(c)
    del s, c
    assert [r() for r in refs] == [None, None]


def test_refused_client_certificate_is_freed(pki: PKI) -> None:
    s = server(pki, client_ca=pki.ca, require_client_cert=True)
    c = client(pki)  # no client certificate
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    assert error_name(s.receive_data, c.data_to_send()) == "ProtocolError"
    refs = weakref.ref(s), weakref.ref(c)
    del s, c
    assert [r() for r in refs] == [None, None]


def test_close_kept_behind_data_is_freed(pki: PKI) -> None:
    s, c = opened(pki)
    c.send(b"x" * 100_000)
    c.close()
    assert s.receive_data(c.data_to_send()) == b"x" * 100_000  # the close is kept
    assert error_name(s.receive_data, b"") == "PeerClosed"
    assert error_name(s.receive_data, b"") == "PeerClosed"
    refs = weakref.ref(s), weakref.ref(c)
    del s, c
    assert [r() for r in refs] == [None, None]


def test_error_met_by_fast_receive_is_freed(pki: PKI) -> None:
    s, c = opened(pki)
    c.send(b"y" * 1000)
    record = bytearray(c.data_to_send())
    record[-1] ^= 1  # tampered: the MAC fails
    assert s.fast_receive(bytes(record)) is None
    assert error_name(s.receive_data, bytes(record)) == "ProtocolError"
    assert s.fast_send(b"z") is None  # failed: nothing more is encrypted
    refs = weakref.ref(s), weakref.ref(c)
    del s, c
    assert [r() for r in refs] == [None, None]


def test_eof_during_handshake_is_freed(pki: PKI) -> None:
    s, c = server(pki), client(pki)
    s.receive_data(c.data_to_send())
    assert error_name(s.receive_data, b"") == "PeerClosed"
    refs = weakref.ref(s), weakref.ref(c)
    del s, c
    assert [r() for r in refs] == [None, None]


def test_orderly_close_is_freed(pki: PKI) -> None:
    s, c = opened(pki)
    s.close()
    assert error_name(c.receive_data, s.data_to_send()) == "PeerClosed"
    refs = weakref.ref(s), weakref.ref(c)
    del s, c
    assert [r() for r in refs] == [None, None]


def test_tls_handshake_refusing_a_client_is_freed(pki: PKI) -> None:
    """tlswrap: the allow-list refusal, with the TcpdHandshake inside."""
    conn = TLSConnector(
        client_context(ca=pki.ca, cert=pki.carol[0], key=pki.carol[1]),
        "localhost",
        TcpdClient("pong"),
    )
    hs = TLSHandshake(
        server_context(*pki.server, client_ca=pki.ca, require_client_cert=True),
        TcpdHandshake(lambda name: True),
        allow_client=["alice"],
        on_identity=lambda ident: None,
    )
    refused = ""
    for _ in range(10):
        if data := conn.data_to_send():
            try:
                hs.receive_data(data)
            except IPCError as exc:
                refused = str(exc)
                break
        if data := hs.data_to_send():
            conn.receive_data(data)
    assert "is not in --allow-client" in refused
    refs = weakref.ref(hs), weakref.ref(hs.tls), weakref.ref(conn), weakref.ref(conn.tls)
    del hs, conn
    assert [r() for r in refs] == [None] * 4


def test_tls_connector_refusing_a_server_is_freed(pki: PKI) -> None:
    conn = TLSConnector(client_context(ca=pki.other_ca), "localhost", TcpdClient("pong"))
    hs = TLSHandshake(
        server_context(*pki.server),
        TcpdHandshake(lambda name: True),
        on_identity=lambda ident: None,
    )
    hs.receive_data(conn.data_to_send())
    assert error_name(conn.receive_data, hs.data_to_send()) == "ProtocolError"
    refs = weakref.ref(hs), weakref.ref(conn), weakref.ref(conn.tls)
    del hs, conn
    assert [r() for r in refs] == [None] * 3
