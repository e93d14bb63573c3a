"""The peer information record and its wire form (pure)."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc_core.errors import ProtocolError, UsageError
from ipc_core.peerinfo import MAX_ENCODED, VERSION, PeerInfo, PeerInfoTooLarge, decode, encode

FINGERPRINT = "SHA256:" + ":".join(["AB"] * 32)

FULL = PeerInfo(
    transport="wss",
    client_address="203.0.113.5",
    client_port=51000,
    local_address="192.0.2.1",
    local_port=443,
    via="x-forwarded-for",
    proxy_address="10.0.0.1",
    tls_version="TLSv1.3",
    tls_cipher="TLS_AES_256_GCM_SHA384",
    tls_sni="chat.example.test",
    cert_subject="CN=alice,O=Example",
    cert_sans=("DNS:alice.example.test", "IP:192.0.2.9", "email:alice@example.test"),
    cert_sha256=FINGERPRINT,
    cert_verified=True,
    method="POST",
    path="/pong/caf%C3%A9",
    query=(("room", "1"), ("room", "2"), ("name", "zoë")),
    subprotocol="chat.v2",
    origin="https://example.test",
    user_agent="Mozilla/5.0",
    cookie="session=abc; theme=dark",
    authorization="Bearer xyz",
    token_name="alice",
)


def raw(**data: object) -> bytes:
    return json.dumps({"v": [1, 0], "transport": "tcp", **data}).encode()


def refused(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(data)


# -- round trips --------------------------------------------------------------------


def test_full_record_round_trips():
    assert decode(encode(FULL)) == FULL


def test_minimal_record_is_compact():
    wire = encode(PeerInfo(transport="tcp", client_address="192.0.2.7", client_port=4000))
    assert wire == b'{"v":[1,1],"transport":"tcp","client_address":"192.0.2.7","client_port":4000}'


def test_keys_follow_the_documented_order_and_defaults_are_left_out():
    data = json.loads(encode(FULL))
    assert list(data) == ["v"] + [f.name for f in dataclasses.fields(PeerInfo)]
    sparse = json.loads(encode(PeerInfo(transport="tls", cert_verified=False, query=())))
    assert sparse == {"v": list(VERSION), "transport": "tls"}


def test_text_is_utf8_not_escaped():
    assert "zoë".encode() in encode(FULL)


def test_query_value():
    assert FULL.query_value("room") == "1"
    assert FULL.query_value("none") is None


def test_record_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FULL.client_port = 1  # type: ignore[misc]


text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40)
maybe_text = st.none() | text
ports = st.none() | st.integers(0, 65535)


@st.composite
def records(draw):
    return PeerInfo(
        transport=draw(st.from_regex(r"[a-z][a-z0-9+.-]{0,15}", fullmatch=True)),
        client_address=draw(maybe_text),
        client_port=draw(ports),
        local_address=draw(maybe_text),
        local_port=draw(ports),
        via=draw(st.sampled_from([None, "proxy-protocol", "forwarded", "x-forwarded-for"])),
        proxy_address=draw(maybe_text),
        tls_version=draw(maybe_text),
        tls_cipher=draw(maybe_text),
        tls_sni=draw(maybe_text),
        cert_subject=draw(maybe_text),
        cert_sans=tuple(draw(st.lists(text, max_size=4))),
        cert_sha256=draw(st.sampled_from([None, FINGERPRINT])),
        cert_verified=draw(st.booleans()),
        path=draw(maybe_text),
        query=tuple(draw(st.lists(st.tuples(text, text), max_size=4))),
        subprotocol=draw(maybe_text),
        origin=draw(maybe_text),
        user_agent=draw(maybe_text),
        cookie=draw(maybe_text),
        authorization=draw(maybe_text),
        token_name=draw(maybe_text),
    )


@given(records())
def test_any_record_round_trips(record):
    assert decode(encode(record)) == record


# -- versions ---------------------------------------------------------------------------


def test_a_newer_minor_with_unknown_keys_is_read():
    data = json.dumps(
        {"v": [1, 7], "transport": "udp", "client_port": 53, "future": {"x": [1, None]}}
    ).encode()
    assert decode(data) == PeerInfo(transport="udp", client_port=53)


@pytest.mark.parametrize(
    ("version", "match"),
    [
        ([2, 0], r"version 2\.0, this library reads 1\.x"),
        ([0, 9], r"version 0\.9"),
        (1, "without a .major, minor. version"),
        ([1], "without a"),
        ([1, 0, 0], "without a"),
        ([1, -1], "without a"),
        ([True, 0], "without a"),
        (["1", "0"], "without a"),
        (None, "without a"),
    ],
)
def test_versions_refused(version, match):
    refused(json.dumps({"v": version, "transport": "tcp"}).encode(), match)


def test_no_version_no_transport():
    refused(b'{"transport":"tcp"}', "without a")
    refused(b'{"v":[1,0]}', "without a transport")


# -- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xff", "not UTF-8"),
        ("\ufeff{}".encode(), "byte-order mark"),
        (b"{", "not JSON"),
        (b"", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"v":[1,0],"transport":"tcp","client_port":NaN}', "not JSON"),
        (b'{"v":[1,0],"v":[1,0],"transport":"tcp"}', "not JSON"),
        (b"[" * 5000, "not JSON"),
        (raw(transport="TCP"), "transport: 'TCP' is not a transport name"),
        (raw(transport=""), "transport"),
        (raw(transport="a" * 17), "transport"),
        (raw(transport=5), "transport: expected a string, not int"),
        (raw(client_port=True), "client_port: expected a port"),
        (raw(client_port=65536), "client_port: expected a port"),
        (raw(local_port=-1), "local_port: expected a port"),
        (raw(local_port="443"), "local_port: expected a port"),
        (raw(client_port=1.0), "client_port: expected a port"),
        (raw(client_address=["x"]), "client_address: expected a string, not list"),
        (raw(cert_sans="DNS:x"), "cert_sans: expected a list"),
        (raw(cert_sans=[1]), "cert_sans: expected a string"),
        (raw(query=[["a"]]), r"query: expected \[name, value\] pairs"),
        (raw(query=[["a", 1]]), "query: expected a string"),
        (raw(query=["a=b"]), "query: expected"),
        (raw(cert_verified="yes"), "cert_verified: expected true or false"),
        (raw(cert_verified=1), "cert_verified: expected true or false"),
        (raw(via="carrier-pigeon"), "via: 'carrier-pigeon' is not one of"),
        (raw(cert_sha256="ab" * 32), "cert_sha256: expected SHA256:AB:CD"),
        (raw(origin="a\x00b"), "origin: a string holds NUL"),
        (b'{"v":[1,0],"transport":"tcp","cookie":"\\ud800"}', "cookie: a string holds a lone"),
    ],
)
def test_malformed_input_is_a_protocol_error(data, match):
    refused(data, match)


def test_oversize_is_refused_before_parsing():
    refused(b" " * (MAX_ENCODED + 1), f"of {MAX_ENCODED + 1} bytes, limit is {MAX_ENCODED}")


def test_encode_bound_is_exact_in_bytes():
    base = len(encode(PeerInfo(transport="ws", cookie="")))
    fits = PeerInfo(transport="ws", cookie="é" * ((MAX_ENCODED - base) // 2))
    assert len(encode(fits)) <= MAX_ENCODED
    exact = PeerInfo(transport="ws", cookie="x" * (MAX_ENCODED - base))
    assert len(encode(exact)) == MAX_ENCODED
    assert decode(encode(exact)) == exact
    over = PeerInfo(transport="ws", cookie="x" * (MAX_ENCODED - base + 1))
    with pytest.raises(PeerInfoTooLarge, match="request headers too large") as caught:
        encode(over)
    assert isinstance(caught.value, ProtocolError)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_protocol_errors(data):
    with contextlib.suppress(ProtocolError):
        decode(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=10,
)


@settings(max_examples=300)
@given(
    st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(PeerInfo)]), json_values)
)
def test_arbitrary_field_values_only_raise_protocol_errors(fields):
    data = json.dumps({"v": [1, 0], **fields}).encode()
    with contextlib.suppress(ProtocolError):
        decode(data)


# -- building a record --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"transport": "WS"}, "PeerInfo.transport"),
        ({"client_port": -1}, "PeerInfo.client_port: expected a port"),
        ({"cert_sans": ["DNS:x"]}, "PeerInfo.cert_sans: expected a list"),
        ({"query": (("a", "b", "c"),)}, "PeerInfo.query"),
        ({"via": "magic"}, "PeerInfo.via"),
        ({"cert_verified": None}, "PeerInfo.cert_verified"),
        ({"user_agent": "\udcff"}, "PeerInfo.user_agent: a string holds a lone surrogate"),
    ],
)
def test_building_a_bad_record_is_a_usage_error(kwargs, match):
    args = {"transport": "ws", **kwargs}
    with pytest.raises(UsageError, match=match):
        PeerInfo(**args)


def test_a_1_0_reader_and_a_1_1_record_understand_each_other():
    """1.1 added ``method``: a 1.0 record decodes (no method), and a record
    with a newer minor's unknown keys decodes too (they are ignored)."""
    old = decode(b'{"v":[1,0],"transport":"ws","path":"/pong"}')
    assert old.method is None and old.path == "/pong"
    newer = decode(b'{"v":[1,7],"transport":"http","method":"POST","color":"blue"}')
    assert newer.method == "POST"
