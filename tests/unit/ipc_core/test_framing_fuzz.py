"""Adversarial input for the Sans-I/O framing (FrameDecoder, FrameScanner).

Every test compares the objects with a ten-line reference model of the wire
format (:func:`model`) over random and hand-picked byte streams and random
chunkings, and checks the memory bound promised in ipc_core.framing: nothing
is ever allocated for an announced length, and no more than one frame
(header + limit) is held.
"""

from __future__ import annotations

import struct
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc_core.errors import MessageTooLarge
from ipc_core.framing import HEADER_SIZE, MAX_WIRE_LENGTH, FrameDecoder, FrameScanner, encode

EDGE_LENGTHS = (0, 1, 2**31, 2**32 - 1)
LIMITS = (0, 1, 5, 100, 65536, 2**31, 2**32 - 1)


def model(stream: bytes, limit: int) -> tuple[list[bytes], int, bool]:
    """Reference decoding: (complete payloads, offset after them, oversize?).

    With ``oversize`` True the offset is where the first bad header starts.
    """
    out: list[bytes] = []
    pos = 0
    while len(stream) - pos >= HEADER_SIZE:
        (n,) = struct.unpack_from(">I", stream, pos)
        if n > limit:
            return out, pos, True
        if pos + HEADER_SIZE + n > len(stream):
            break
        out.append(stream[pos + HEADER_SIZE : pos + HEADER_SIZE + n])
        pos += HEADER_SIZE + n
    return out, pos, False


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(stream) + 1) for p in points})
    return [stream[a:b] for a, b in zip([0, *marks], [*marks, len(stream)], strict=True)]


def big_header(n: int) -> bytes:
    return struct.pack(">I", n)


# -- strategies ------------------------------------------------------------------

payloads = st.binary(max_size=64)
# A stream that mostly follows the format, with garbage or a huge header
# mixed in: plain random bytes almost always start with an oversize length.
pieces = st.one_of(
    payloads.map(encode),
    st.sampled_from(EDGE_LENGTHS).map(big_header),
    st.binary(min_size=1, max_size=8),
)
streams = st.one_of(st.binary(max_size=300), st.lists(pieces, max_size=25).map(b"".join))


# -- edge lengths ------------------------------------------------------------------


@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("length", EDGE_LENGTHS)
def test_edge_lengths_against_every_limit(length: int, limit: int) -> None:
    """0, 1, 2^31, 2^32-1: within the limit the decoder waits for the body
    holding only what arrived; over it, both objects refuse at the header."""
    decoder, scanner = FrameDecoder(limit), FrameScanner(limit)
    head = big_header(length)
    tracemalloc.start()
    try:
        if length > limit:
            with pytest.raises(MessageTooLarge) as info:
                decoder.feed(head)
            assert (info.value.length, info.value.limit) == (length, limit)
            with pytest.raises(MessageTooLarge):
                scanner.scan(head)
            assert decoder.pending == 0
        else:
            body = b"\xaa" * min(length, 1000)
            out = decoder.feed(head + body)
            frames = scanner.scan(head + body)
            if length <= 1000:
                assert out == [body] and frames == 1 and scanner.at_boundary
            else:
                assert out == [] and frames == 0 and not scanner.at_boundary
                assert decoder.pending == HEADER_SIZE + 1000
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes allocated for an announced {length}"


def test_largest_wire_length_is_accepted_when_the_limit_allows_it() -> None:
    """limit = 2^32-1: a 2^32-1 announcement is legal; the body is buffered as
    it arrives (never pre-allocated), and a 1 MiB partial body costs ~1 MiB."""
    decoder = FrameDecoder(MAX_WIRE_LENGTH)
    scanner = FrameScanner(MAX_WIRE_LENGTH)
    tracemalloc.start()
    try:
        decoder.feed(big_header(MAX_WIRE_LENGTH))
        scanner.scan(big_header(MAX_WIRE_LENGTH))
        chunk = b"\x00" * 65536
        for _ in range(16):
            assert decoder.feed(chunk) == []
            assert scanner.scan(chunk) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.pending == HEADER_SIZE + 16 * 65536
    assert peak < 3 * 1024 * 1024


# -- headers split at every byte ---------------------------------------------------


def test_headers_split_at_every_byte_two_and_three_pieces() -> None:
    messages = [b"", b"a", b"\x00\x00\x00\x05", bytes(range(256)), b"", b"zz"]
    stream = b"".join(map(encode, messages))
    n = len(stream)
    for i in range(n + 1):
        for j in range(i, min(n, i + 9) + 1):  # every header boundary is within 9 bytes
            decoder, scanner = FrameDecoder(), FrameScanner()
            out: list[bytes] = []
            frames = 0
            for piece in (stream[:i], stream[i:j], stream[j:]):
                out += decoder.feed(piece)
                frames += scanner.scan(piece)
            assert out == messages, (i, j)
            assert frames == len(messages) and scanner.at_boundary and decoder.pending == 0


@pytest.mark.parametrize("split", range(1, HEADER_SIZE))
@pytest.mark.parametrize("length", [2**31, 2**32 - 1])
def test_oversize_header_split_at_every_byte(split: int, length: int) -> None:
    good = encode(b"before")
    stream = good + big_header(length) + b"tail"
    at = len(good) + split
    decoder, scanner = FrameDecoder(1000), FrameScanner(1000)
    assert decoder.feed(stream[:at]) == [b"before"]
    assert scanner.scan(stream[:at]) == 1
    with pytest.raises(MessageTooLarge):
        decoder.feed(stream[at:])
    with pytest.raises(MessageTooLarge) as info:
        scanner.scan(stream[at:])
    assert info.value.valid_bytes == 0  # the bad header began in the earlier chunk


# -- thousands of tiny messages in one read ----------------------------------------


@pytest.mark.parametrize("payload", [b"", b"x", b"\x00\x00\x00\x00"])
def test_thousands_of_tiny_messages_in_one_read(payload: bytes) -> None:
    count = 50_000
    stream = encode(payload) * count
    t0 = time.perf_counter()
    out = FrameDecoder().feed(stream)
    frames = FrameScanner().scan(stream)
    elapsed = time.perf_counter() - t0
    assert len(out) == count and all(m == payload for m in out)
    assert frames == count
    assert elapsed < 5, f"{count} tiny messages took {elapsed:.2f} s"


def test_tiny_messages_behind_a_partial_frame() -> None:
    """The slow path (bytes already pending) handles a burst too."""
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00") == []
    out = decoder.feed(b"\x00\x01y" + encode(b"t") * 10_000 + b"\x00")
    assert out == [b"y"] + [b"t"] * 10_000
    assert decoder.pending == 1


# -- random streams against the model ------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    stream=streams,
    points=st.lists(st.integers(min_value=0), max_size=12),
    limit=st.sampled_from(LIMITS),
)
def test_decoder_matches_the_model_under_any_chunking(
    stream: bytes, points: list[int], limit: int
) -> None:
    expected, end, oversize = model(stream, limit)
    decoder = FrameDecoder(limit)
    got: list[bytes] = []
    raised = False
    for chunk in cut(stream, points):
        try:
            got += decoder.feed(chunk)
        except MessageTooLarge as exc:
            raised = True
            assert exc.limit == limit and exc.length > limit
            break
        # Never more than one unfinished frame held, whatever the peer sends.
        assert decoder.pending <= HEADER_SIZE + limit
    assert raised == oversize
    if oversize:
        # Payloads completed in the failing feed are dropped with it (the
        # connection closes anyway); everything delivered is a correct prefix.
        assert got == expected[: len(got)]
    else:
        assert got == expected
        assert decoder.pending == len(stream) - end


@settings(max_examples=400, deadline=None)
@given(
    stream=streams,
    points=st.lists(st.integers(min_value=0), max_size=12),
    limit=st.sampled_from(LIMITS),
)
def test_scanner_matches_the_model_under_any_chunking(
    stream: bytes, points: list[int], limit: int
) -> None:
    expected, end, oversize = model(stream, limit)
    scanner = FrameScanner(limit)
    frames = 0
    offset = 0  # where the current chunk starts in the stream
    for chunk in cut(stream, points):
        try:
            frames += scanner.scan(chunk)
        except MessageTooLarge as exc:
            assert oversize
            # valid_bytes: what a relay may still forward from this chunk,
            # i.e. up to the start of the bad header (0 if it began earlier).
            assert exc.valid_bytes == max(0, end - offset)
            break
        offset += len(chunk)
    else:
        assert not oversize
        assert frames == len(expected)
        assert scanner.at_boundary == (end == len(stream))


@settings(max_examples=200, deadline=None)
@given(stream=streams)
def test_decoder_one_byte_at_a_time(stream: bytes) -> None:
    expected, end, oversize = model(stream, 100)
    decoder = FrameDecoder(100)
    got: list[bytes] = []
    try:
        for b in stream:
            got += decoder.feed(bytes([b]))
    except MessageTooLarge:
        assert oversize
    else:
        assert not oversize and decoder.pending == len(stream) - end
    assert got == expected  # one byte per feed: nothing completed with the error
