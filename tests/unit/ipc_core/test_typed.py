from dataclasses import dataclass

import pytest

from ipc_core import ProtocolError, TypeRegistry, UsageError
from ipc_core.routing import lookup_message, parse_lookup, parse_network


def make_registry(fmt):
    reg = TypeRegistry(fmt)

    @reg.register(1)
    @dataclass
    class Ping:
        seq: int
        text: str = ""

    @reg.register(200)
    @dataclass
    class Blob:
        items: list

    return reg, Ping, Blob


@pytest.mark.parametrize("fmt", ["json", "cbor"])
def test_round_trip(fmt):
    reg, Ping, Blob = make_registry(fmt)
    payload = reg.encode(Ping(3, "hé"))
    assert payload[0] == 1
    assert reg.decode(payload) == Ping(3, "hé")
    assert reg.decode(reg.encode(Blob([1, "a", None]))) == Blob([1, "a", None])


def test_json_wire_format_is_type_byte_then_json():
    reg, Ping, _ = make_registry("json")
    assert reg.encode(Ping(3)) == b'\x01{"seq":3,"text":""}'


@pytest.mark.parametrize("payload", [b"", b"\x09{}", b"\x01not json", b"\x01[1]", b'\x01{"x":1}'])
def test_bad_payloads_are_protocol_errors(payload):
    reg, _, _ = make_registry("json")
    with pytest.raises(ProtocolError):
        reg.decode(payload)


def test_registry_misuse():
    reg, Ping, _ = make_registry("json")
    with pytest.raises(UsageError):
        reg.register(1)
    with pytest.raises(UsageError):
        reg.register(256)
    with pytest.raises(UsageError):
        reg.encode(object())


def test_parse_network_tolerates_spaces_and_keeps_first():
    routes = parse_network(
        "audio tor://example.com/audio ;pong tls://pong.example.com:9443/pong ; pong x"
    )
    assert routes == {
        "audio": "tor://example.com/audio",
        "pong": "tls://pong.example.com:9443/pong",
    }
    assert parse_network("") == {}
    with pytest.raises(ProtocolError):
        parse_network("just-a-name")  # bad, and nothing usable besides
    assert parse_network("just-a-name; pong x") == {"pong": "x"}


def test_lookup_message_round_trip():
    msg = lookup_message("pong", "pong tcp://h:1/pong")
    assert msg == b"pong;pong tcp://h:1/pong"
    assert parse_lookup(msg) == ("pong", "pong tcp://h:1/pong")
    with pytest.raises(ProtocolError):
        parse_lookup(b"no separator")
