import json
from dataclasses import dataclass
from typing import Literal

import cbor2
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


# ------------------------------------------- decode only what encode produces


def cbor_body(*raw: int) -> bytes:
    """A CBOR map {"items": <raw item>} for Blob (type 200)."""
    return bytes([200, 0xA1, 0x65]) + b"items" + bytes(raw)


@pytest.mark.parametrize(
    "item",
    [
        (0xF7,),  # undefined
        (0xF0,),  # simple value 16
        (0xF8, 0xFF),  # simple value 255
        (0xD9, 0x30, 0x39, 0x01),  # unknown tag 12345
        (0xD8, 0x1C, 0x81, 0xD8, 0x1D, 0x00),  # shared reference: a list containing itself
        (0xD9, 0x01, 0x02, 0x82, 0x01, 0x02),  # tag 258: a set
        (0xC1, 0x00),  # tag 1: a datetime
    ],
)
def test_cbor_values_encode_could_not_have_produced_are_refused(item):
    reg, _, _ = make_registry("cbor")
    with pytest.raises(ProtocolError):
        reg.decode(cbor_body(*item))


def test_cbor_shared_but_acyclic_references_are_refused():
    # [shareable [], ref 0, ref 0, ...]: a DAG, the way to blow up encode() exponentially.
    reg, _, _ = make_registry("cbor")
    body = bytes([0x83, 0xD8, 0x1C, 0x80, 0xD8, 0x1D, 0x00, 0xD8, 0x1D, 0x00])
    with pytest.raises(ProtocolError, match="shared"):
        reg.decode(cbor_body(*body))


def test_cbor_map_keys_must_be_strings():
    reg, _, _ = make_registry("cbor")
    with pytest.raises(ProtocolError):
        reg.decode(bytes([200, 0xA1, 0x01, 0x02]))  # {1: 2}


def test_whatever_decodes_encodes_back():
    """Every refused case above was accepted before and then broke encode()."""
    reg, _, Blob = make_registry("cbor")
    blob = reg.decode(cbor_body(0x83, 0x01, 0x61, 0x61, 0xF6))  # [1, "a", null]
    assert blob == Blob([1, "a", None])
    assert reg.decode(reg.encode(blob)) == blob


@pytest.mark.parametrize(
    "body",
    [
        b'{"seq":NaN}',
        b'{"seq":Infinity}',
        b'{"seq":-Infinity}',
        '{"seq":1}'.encode("utf-16"),
        '{"seq":1}'.encode("utf-16-le"),
        '{"seq":1}'.encode("utf-32"),
        b'\xef\xbb\xbf{"seq":1}',  # UTF-8 BOM
        b'{"seq":1,"seq":2}',  # duplicate key
        b'{"seq":1,"text":"\xff"}',  # not UTF-8
    ],
)
def test_json_bodies_encode_never_produces_are_refused(body):
    reg, _, _ = make_registry("json")
    with pytest.raises(ProtocolError):
        reg.decode(b"\x01" + body)


@pytest.mark.parametrize("fmt", ["json", "cbor"])
@pytest.mark.parametrize(
    "fields",
    [
        {"seq": "x"},
        {"seq": 1.5},
        {"seq": True},  # a bool is not an int here
        {"seq": None},
        {"seq": 1, "text": 3},
        {"seq": [1]},
    ],
)
def test_fields_are_checked_against_their_declared_types(fmt, fields):
    reg, _, _ = make_registry(fmt)
    body = json.dumps(fields).encode() if fmt == "json" else cbor2.dumps(fields)
    with pytest.raises(ProtocolError):
        reg.decode(b"\x01" + body)


def test_encode_refuses_what_it_could_not_decode():
    reg, Ping, _ = make_registry("json")
    with pytest.raises(UsageError):
        reg.encode(Ping(float("nan")))  # type: ignore[arg-type]


@dataclass
class Point:
    x: float
    y: float


@pytest.mark.parametrize("fmt", ["json", "cbor"])
def test_nested_and_generic_field_types_round_trip_and_are_checked(fmt):
    reg = TypeRegistry(fmt)

    @reg.register(7)
    @dataclass
    class Shape:
        name: str
        points: list[Point]
        tags: dict[str, int]
        size: tuple[int, int]
        note: str | None = None
        kind: Literal["a", "b"] = "a"

    shape = Shape("tri", [Point(0.0, 1.5), Point(2.0, 3.0)], {"z": 1}, (3, 4), None, "b")
    assert reg.decode(reg.encode(shape)) == shape
    good = {"name": "t", "points": [{"x": 1, "y": 2.5}], "tags": {}, "size": [1, 2]}
    decoded = reg.decode(b"\x07" + _dump(fmt, good))
    assert decoded.points == [Point(1.0, 2.5)] and decoded.size == (1, 2)
    for bad in (
        {**good, "points": [{"x": "1", "y": 2}]},
        {**good, "tags": {"z": "1"}},
        {**good, "size": [1, 2, 3]},
        {**good, "note": 5},
        {**good, "kind": "c"},
        {**good, "extra": 1},
        {"name": "t"},  # missing fields
    ):
        with pytest.raises(ProtocolError):
            reg.decode(b"\x07" + _dump(fmt, bad))


def _dump(fmt, data):
    return json.dumps(data).encode() if fmt == "json" else cbor2.dumps(data)


def test_deep_nesting_is_a_protocol_error_not_a_crash():
    reg, _, _ = make_registry("json")
    with pytest.raises(ProtocolError):
        reg.decode(b'\xc8{"items":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
