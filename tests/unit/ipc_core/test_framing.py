import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc_core.errors import MessageTooLarge
from ipc_core.framing import FrameDecoder, FrameScanner, encode, header


def test_encode_matches_the_reference_example():
    assert encode(b"hello") == bytes.fromhex("00000005") + b"hello"
    assert header(5) == b"\x00\x00\x00\x05"


def test_empty_payload_round_trips():
    d = FrameDecoder()
    assert d.feed(encode(b"")) == [b""]
    assert d.pending == 0


def test_many_messages_in_one_feed():
    d = FrameDecoder()
    stream = b"".join(encode(b"m%d" % i) for i in range(5000))
    assert d.feed(stream) == [b"m%d" % i for i in range(5000)]


def test_split_at_every_byte_boundary():
    messages = [b"", b"a", b"hello world", bytes(range(256)) * 3]
    stream = b"".join(encode(m) for m in messages)
    for cut in range(len(stream) + 1):
        d = FrameDecoder()
        out = d.feed(stream[:cut]) + d.feed(stream[cut:])
        assert out == messages, cut


def test_one_byte_at_a_time():
    messages = [b"x" * 1000, b"", b"yz"]
    d = FrameDecoder()
    out = []
    for b in b"".join(encode(m) for m in messages):
        out += d.feed(bytes([b]))
    assert out == messages


@pytest.mark.parametrize("length", [17, 2**31, 2**32 - 1])
def test_oversize_detected_from_header_alone(length):
    d = FrameDecoder(max_message_size=16)
    with pytest.raises(MessageTooLarge) as info:
        d.feed(struct.pack(">I", length))  # no body at all
    assert info.value.length == length
    assert d.pending == 0  # nothing was buffered for the announced body


def test_limit_is_inclusive():
    d = FrameDecoder(max_message_size=3)
    assert d.feed(encode(b"abc")) == [b"abc"]


def test_pending_never_exceeds_one_frame():
    d = FrameDecoder(max_message_size=100)
    d.feed(struct.pack(">I", 100) + b"x" * 50)
    assert d.pending == 54


def test_take_pending_hands_over_partial_frame():
    d = FrameDecoder()
    d.feed(encode(b"done") + b"\x00\x00")
    assert d.take_pending() == b"\x00\x00"
    assert d.pending == 0


@settings(max_examples=300, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=300), max_size=30),
    cuts=st.lists(st.integers(min_value=0), max_size=40),
)
def test_any_chunking_gives_the_same_messages(messages, cuts):
    stream = b"".join(encode(m) for m in messages)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    d = FrameDecoder()
    s = FrameScanner()
    out = []
    frames = 0
    for chunk in chunks:
        out += d.feed(chunk)
        frames += s.scan(chunk)
    assert out == messages
    assert frames == len(messages)
    assert d.pending == 0 and s.at_boundary


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=200))
def test_garbage_only_raises_message_too_large(data, cut):
    d = FrameDecoder(max_message_size=64)
    s = FrameScanner(max_message_size=64)
    for obj in (d.feed, s.scan):
        try:
            obj(data[:cut])
            obj(data[cut:])
        except MessageTooLarge:
            pass
    assert d.pending <= 4 + 64


@pytest.mark.parametrize("split", range(1, 8))
def test_scanner_rejects_oversize_header_split_anywhere(split):
    stream = encode(b"ok") + struct.pack(">I", 1000) + b"zz"
    s = FrameScanner(max_message_size=100)
    with pytest.raises(MessageTooLarge):
        s.scan(stream[:split])
        s.scan(stream[split:])
