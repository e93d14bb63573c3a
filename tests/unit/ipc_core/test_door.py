"""The door protocol's Sans-I/O half: offer and verdict frames, their readers."""

from __future__ import annotations

import json
import struct

import pytest

from ipc_core import PeerClosed, PeerInfo, PeerInfoTooLarge, ProtocolError, UsageError, door
from ipc_core.peerinfo import MAX_ENCODED, encode

INFO = PeerInfo(
    transport="wss",
    client_address="203.0.113.5",
    client_port=51000,
    path="/chat",
    query=(("room", "1"),),
    cert_verified=True,
)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def verdict_frame(obj: object) -> bytes:
    return frame(json.dumps(obj).encode())


# ------------------------------------------------------------------- frames


def test_offer_frame_is_one_libipc_frame_of_the_encoded_record():
    raw = door.offer_frame(INFO)
    assert raw == frame(encode(INFO))


def test_offer_frame_refuses_a_record_over_the_limit():
    with pytest.raises(PeerInfoTooLarge):
        door.offer_frame(PeerInfo(transport="ws", cookie="c" * MAX_ENCODED))


def test_accept_frame_is_the_documented_json():
    assert door.accept_frame() == frame(b'{"v":[1,0],"accept":true}')


def test_refuse_frame_is_the_documented_json():
    assert door.refuse_frame("go away") == frame(b'{"v":[1,0],"accept":false,"reason":"go away"}')


def test_refuse_reason_is_cut_to_512_utf8_bytes_without_splitting_a_character():
    raw = door.refuse_frame("é" * 1000)  # 2 bytes each
    reason = json.loads(raw[4:])["reason"]
    assert len(reason.encode()) == 512 and reason == "é" * 256
    raw = door.refuse_frame("a" + "€" * 300)  # 1 + 3*n: 511 is the longest whole cut
    reason = json.loads(raw[4:])["reason"]
    assert len(reason.encode()) == 511 and reason.endswith("€")


def test_refuse_reason_control_characters_are_replaced():
    raw = door.refuse_frame("line\nbreak\x1b[31m\x00\x7f\x85")
    reason = json.loads(raw[4:])["reason"]
    assert reason == "line\ufffdbreak\ufffd[31m\ufffd\ufffd\ufffd"


def test_refuse_reason_must_be_text():
    with pytest.raises(UsageError):
        door.refuse_frame(b"bytes")  # type: ignore[arg-type]


# ----------------------------------------------------------- verdict reader


def test_verdict_reader_reads_accept_and_refusal():
    assert door.VerdictReader().feed(door.accept_frame()) == door.Verdict(True, None)
    reader = door.VerdictReader()
    assert reader.feed(door.refuse_frame("full")) == door.Verdict(False, "full")
    assert reader.leftover == b""


def test_verdict_reader_byte_by_byte_then_leftover():
    message = frame(b"hello")
    data = door.accept_frame() + message + frame(b"more")
    reader = door.VerdictReader()
    verdict = None
    for i in range(len(door.accept_frame())):
        assert verdict is None
        verdict = reader.feed(data[i : i + 1])
    assert verdict == door.Verdict(True)
    assert reader.leftover == b""
    reader = door.VerdictReader()
    assert reader.feed(data[:3]) is None
    assert reader.feed(memoryview(data)[3:]) == door.Verdict(True)
    assert reader.leftover == message + frame(b"more")


def test_verdict_reader_eof_before_the_verdict_is_peer_closed():
    with pytest.raises(PeerClosed):
        door.VerdictReader().feed(b"")
    reader = door.VerdictReader()
    reader.feed(door.accept_frame()[:5])
    with pytest.raises(PeerClosed):
        reader.feed(b"")


def test_verdict_reader_refuses_an_oversize_length_before_the_body():
    reader = door.VerdictReader()
    with pytest.raises(ProtocolError, match="4097 bytes announced"):
        reader.feed(struct.pack(">I", door.MAX_VERDICT + 1))


def test_verdict_reader_takes_a_verdict_of_exactly_4_kib():
    body = {"v": [1, 0], "accept": False, "reason": ""}
    pad = door.MAX_VERDICT - len(json.dumps(body).encode())
    body["reason"] = "r" * pad
    raw = verdict_frame(body)
    assert len(raw) == 4 + door.MAX_VERDICT
    verdict = door.VerdictReader().feed(raw)
    assert verdict is not None and not verdict.accepted
    assert verdict.reason is not None and len(verdict.reason.encode()) == door.MAX_REASON


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[1, 0]",
        b'{"accept": true}',
        b'{"v": [2, 0], "accept": true}',
        b'{"v": [1], "accept": true}',
        b'{"v": "1.0", "accept": true}',
        b'{"v": [1, -1], "accept": true}',
        b'{"v": [1, 0]}',
        b'{"v": [1, 0], "accept": 1}',
        b'{"v": [1, 0], "accept": "yes"}',
        b'{"v": [1, 0], "accept": false, "reason": 42}',
        b'{"v": [1, 0], "accept": false, "reason": null}',
        b'{"v": [1, 0], "accept": true, "accept": false}',
        b'{"v": [1, 0], "accept": NaN}',
        b'\xef\xbb\xbf{"v": [1, 0], "accept": true}',
        b'{"v": [1, 0], "accept": true, "reason": "\xff"}',
    ],
)
def test_verdict_reader_refuses_malformed_verdicts(payload):
    with pytest.raises(ProtocolError):
        door.VerdictReader().feed(frame(payload))


def test_verdict_reader_ignores_unknown_keys_of_a_newer_minor():
    raw = verdict_frame({"v": [1, 7], "accept": True, "later": {"x": 1}})
    assert door.VerdictReader().feed(raw) == door.Verdict(True)


def test_verdict_reader_cleans_a_reason_for_the_log():
    raw = verdict_frame({"v": [1, 0], "accept": False, "reason": "a\r\nb\ud800"})
    assert door.VerdictReader().feed(raw) == door.Verdict(False, "a\ufffd\ufffdb\ufffd")


def test_verdict_reader_is_done_after_the_verdict():
    reader = door.VerdictReader()
    reader.feed(door.accept_frame())
    with pytest.raises(UsageError):
        reader.feed(b"x")


# ------------------------------------------------------------- offer reader


def test_offer_reader_reads_the_record_and_keeps_what_follows():
    message = frame(b"first message")
    reader = door.OfferReader()
    assert reader.feed(door.offer_frame(INFO) + message) == INFO
    assert reader.leftover == message


def test_offer_reader_any_chunking():
    data = door.offer_frame(INFO) + b"\0\0\0\1x"
    for size in (1, 2, 3, 5, 7, 64):
        reader = door.OfferReader()
        result = None
        for i in range(0, len(data), size):
            assert result is None
            result = reader.feed(data[i : i + size])
            if result is not None:
                tail = data[i + size :]
                break
        assert result == INFO
        assert reader.leftover + tail == b"\0\0\0\1x"


def test_offer_reader_bound_is_checked_on_the_header():
    reader = door.OfferReader()
    with pytest.raises(ProtocolError, match=f"{MAX_ENCODED + 1} bytes announced"):
        reader.feed(struct.pack(">I", MAX_ENCODED + 1))
    # exactly the limit is read (and then judged by the record's decoder)
    reader = door.OfferReader()
    assert reader.feed(struct.pack(">I", MAX_ENCODED) + b"{" * 100) is None
    with pytest.raises(ProtocolError, match="not JSON"):
        reader.feed(b"{" * (MAX_ENCODED - 100))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{}",
        b'{"v": [2, 0], "transport": "tcp"}',
        b'{"v": [1, 0]}',
        b'{"v": [1, 0], "transport": "tcp", "client_port": 70000}',
        b"\xff",
    ],
)
def test_offer_reader_refuses_a_bad_record(payload):
    with pytest.raises(ProtocolError):
        door.OfferReader().feed(frame(payload))


def test_offer_reader_eof_before_the_offer_is_peer_closed():
    reader = door.OfferReader()
    reader.feed(door.offer_frame(INFO)[:10])
    with pytest.raises(PeerClosed):
        reader.feed(b"")


def test_offer_reader_holds_at_most_the_bound():
    # a partial offer never holds more than its frame, whatever a feed brings
    raw = door.offer_frame(INFO)
    reader = door.OfferReader()
    assert reader.feed(raw[:-1]) is None
    assert len(reader._buf) == len(raw) - 1
    assert reader.feed(raw[-1:] + b"x" * 100_000) == INFO
    assert len(reader._buf) == 0 and len(reader.leftover) == 100_000
