"""LibIPC framing, Sans-I/O: ``u32 big-endian length`` then ``length`` bytes.

Three tools, none of which touches a socket:

* :func:`encode` / :func:`header` build a frame (``header`` lets a sender use
  ``sendmsg([header, payload])`` and never concatenate).
* :class:`FrameDecoder` turns any chunking of a stream into payloads: a frame
  split over many feeds, many frames in one feed, empty payloads.
* :class:`FrameScanner` validates a stream that is forwarded as-is (a relay):
  it only tracks where frame boundaries fall, so forwarding a 1 MiB message
  costs O(1) Python work per chunk, not a copy.

Both enforce a maximum message size from the 4-byte header alone: an
oversize announcement raises :class:`MessageTooLarge` before any body byte is
buffered, so a peer cannot make us allocate what it announces.
"""

from __future__ import annotations

import struct

from .errors import MessageTooLarge

HEADER_SIZE = 4
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: Largest length the u32 header can carry.
MAX_WIRE_LENGTH = 0xFFFFFFFF

_HEADER = struct.Struct(">I")
_unpack_from = _HEADER.unpack_from
header = _HEADER.pack


def encode(payload: bytes | bytearray | memoryview) -> bytes:
    """Return one complete frame for ``payload``."""
    return _HEADER.pack(len(payload)) + bytes(payload)


def check_limit(max_message_size: int) -> int:
    """Validate a maximum message size setting and return it."""
    if not 0 <= max_message_size <= MAX_WIRE_LENGTH:
        raise ValueError(f"max_message_size must be in 0..{MAX_WIRE_LENGTH}")
    return max_message_size


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the complete payloads.

    ``pending`` tells how many bytes are held for an unfinished frame; it
    never exceeds ``HEADER_SIZE + max_message_size``.
    """

    __slots__ = ("_buf", "max_message_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = check_limit(max_message_size)
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def take_pending(self) -> bytes:
        """Remove and return the bytes of the unfinished frame (when the stream
        is handed to something else, e.g. switched)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes; return every payload completed by them.

        Raises :class:`MessageTooLarge` as soon as a header announces more
        than the limit; the decoder is then unusable (the connection must
        close).
        """
        buf = self._buf
        if not buf:
            # Fast path: parse straight out of the caller's buffer and keep
            # only the unfinished tail.
            out, consumed = self._parse(data if type(data) is not bytearray else memoryview(data))
            if consumed < len(data):
                buf += data[consumed:]
            return out
        buf += data
        # Slice through a memoryview (bytes(bytearray[a:b]) would copy twice),
        # released before the bytearray is resized.
        with memoryview(buf) as view:
            out, consumed = self._parse(view)
        if consumed:
            del buf[:consumed]
        return out

    def _parse(self, data: bytes | bytearray | memoryview) -> tuple[list[bytes], int]:
        out: list[bytes] = []
        pos = 0
        end = len(data)
        limit = self.max_message_size
        while end - pos >= HEADER_SIZE:
            (length,) = _unpack_from(data, pos)
            if length > limit:
                raise MessageTooLarge(length, limit)
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            out.append(bytes(data[pos + HEADER_SIZE : stop]))
            pos = stop
        return out, pos


class FrameScanner:
    """Follows frame boundaries in a stream that is forwarded unchanged.

    ``scan(chunk)`` raises :class:`MessageTooLarge` if a header in the chunk
    announces an oversize message (its ``valid_bytes`` attribute tells how
    much of the chunk precedes the bad header, so a relay can still forward
    the good messages) and returns the number of frames that the chunk
    completed (useful for counters).
    """

    __slots__ = ("_body_left", "_head", "idle", "max_message_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = check_limit(max_message_size)
        self._body_left = 0  # bytes of the current body still to come
        self._head = b""  # partial header bytes (0..3)
        #: True when the bytes seen so far end exactly at a frame boundary (a
        #: relay may then check a chunk that is exactly one frame inline).
        self.idle = True

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly at a frame boundary."""
        return self.idle

    def scan(self, chunk: bytes | bytearray | memoryview) -> int:
        end = len(chunk)
        if self.idle and end >= HEADER_SIZE:
            # The common case of request/response traffic: exactly one frame.
            (length,) = _unpack_from(chunk)
            if length + HEADER_SIZE == end and length <= self.max_message_size:
                return 1
        try:
            return self._scan(chunk, end)
        finally:
            self.idle = not self._body_left and not self._head

    def _scan(self, chunk: bytes | bytearray | memoryview, end: int) -> int:
        limit = self.max_message_size
        pos = 0
        frames = 0
        if self._body_left:
            take = min(self._body_left, end)
            self._body_left -= take
            pos = take
            if self._body_left == 0:
                frames += 1
        if self._head and pos < end:
            need = HEADER_SIZE - len(self._head)
            head = self._head + bytes(chunk[pos : pos + need])
            pos += min(need, end - pos)
            if len(head) < HEADER_SIZE:
                self._head = head
                return frames
            self._head = b""
            (length,) = _unpack_from(head)
            if length > limit:
                raise _too_large(length, limit, 0)
            take = min(length, end - pos)
            pos += take
            self._body_left = length - take
            if self._body_left == 0:
                frames += 1
        while pos < end:
            if end - pos < HEADER_SIZE:
                self._head = bytes(chunk[pos:end])
                break
            (length,) = _unpack_from(chunk, pos)
            if length > limit:
                raise _too_large(length, limit, pos)
            pos += HEADER_SIZE
            take = min(length, end - pos)
            pos += take
            if take < length:
                self._body_left = length - take
                break
            frames += 1
        return frames


def _too_large(length: int, limit: int, valid_bytes: int) -> MessageTooLarge:
    exc = MessageTooLarge(length, limit)
    exc.valid_bytes = valid_bytes
    return exc
