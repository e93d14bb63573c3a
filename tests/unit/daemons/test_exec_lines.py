"""ipc exec's program-side layers (daemons/codecs/lines.py), Sans-I/O: any
chunking of the program's output gives the same messages, the fast hooks
agree with the general path, over-long lines are refused, memory stays one
line."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemons.codecs.lines import LineLayer, LineTooLong, RawLayer
from ipc_core import FrameDecoder, PeerClosed, encode


def messages(stream: bytes, limit: int = 1 << 20) -> list[bytes]:
    return FrameDecoder(limit).feed(stream)


def test_lines_become_messages_without_their_newline() -> None:
    layer = LineLayer(100)
    assert messages(layer.receive_data(b"one\ntwo\r\nthr")) == [b"one", b"two"]
    assert messages(layer.receive_data(b"ee\n\n")) == [b"three", b""]
    with pytest.raises(PeerClosed):
        layer.receive_data(b"")


@given(st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b), max_size=8), st.data())
def test_any_chunking_gives_the_same_messages(lines: list[bytes], data: st.DataObject) -> None:
    text = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    layer = LineLayer(1000)
    out = b""
    start = 0
    for cut in [*cuts, len(text)]:
        chunk = text[start:cut]
        start = cut
        if not chunk:
            continue
        fast = layer.fast_receive(chunk)
        out += fast if fast is not None else layer.receive_data(chunk)
    expected = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    assert messages(out) == expected


def test_the_fast_hook_declines_an_unfinished_line_and_consumes_nothing() -> None:
    layer = LineLayer(100)
    assert layer.fast_receive(b"no newline") is None
    assert layer.receive_data(b"no newline") == b""
    assert layer.fast_receive(b" yet\n") is None  # a line is pending: general path
    assert messages(layer.receive_data(b" yet\n")) == [b"no newline yet"]
    assert messages(layer.fast_receive(b"a\nb\n") or b"") == [b"a", b"b"]


def test_a_line_at_the_limit_passes_one_byte_more_is_refused() -> None:
    layer = LineLayer(10)
    assert messages(layer.receive_data(b"x" * 10 + b"\n")) == [b"x" * 10]
    assert messages(layer.fast_receive(b"x" * 10 + b"\r\n") or b"") == [b"x" * 10]
    assert layer.fast_receive(b"x" * 11 + b"\n") is None
    with pytest.raises(LineTooLong):
        LineLayer(10).receive_data(b"x" * 11 + b"\n")
    # Without a newline in sight: refused as soon as the line is too long.
    layer = LineLayer(10)
    layer.receive_data(b"x" * 6)
    with pytest.raises(LineTooLong):
        layer.receive_data(b"x" * 6)


def test_messages_become_lines() -> None:
    layer = LineLayer(100)
    stream = encode(b"hello") + encode(b"") + encode(b"a\nb")
    layer.send(stream[:3])
    assert layer.data_to_send() == b""
    layer.send(stream[3:])
    assert layer.data_to_send() == b"hello\n\na\nb\n"
    assert layer.fast_send(encode(b"fast")) == b"fast\n"


def test_raw_mode_each_read_is_a_message_cut_at_the_limit() -> None:
    layer = RawLayer(4)
    assert messages(layer.receive_data(b"abcdefghij")) == [b"abcd", b"efgh", b"ij"]
    assert layer.fast_receive(b"abcdef") is None
    assert messages(layer.fast_receive(b"abc") or b"") == [b"abc"]
    layer.send(encode(b"xy") + encode(b"z"))
    assert layer.data_to_send() == b"xyz"
    assert layer.fast_send(encode(b"pq")) == b"pq"
    with pytest.raises(PeerClosed):
        layer.receive_data(b"")
