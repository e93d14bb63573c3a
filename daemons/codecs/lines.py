"""The program side of ``ipc exec``, Sans-I/O: lines or raw reads <-> messages.

Why: ``ipc exec`` joins each client connection to one process's stdin and
stdout (one Unix socket pair, see :mod:`daemons.execservice`) inside the
Context's switch, so the loop does every read and write and these layers
only convert bytes, as the TLS and WebSocket layers do for the daemons.
Each is a :class:`ipc_core.Layer` on the program's end of the pair:
``receive_data`` takes what the program wrote and returns the LibIPC stream
for the client, ``send`` takes the client's LibIPC stream and queues what
the program reads.

Line mode (:class:`LineLayer`, websocketd's convention):

* each client message becomes one line on stdin: the payload, then ``\\n``.
  A message that holds newlines is written as it is: the program reads
  several lines (websocketd does the same); nothing is refused;
* each line the program writes becomes one message, without its ``\\n``
  (and without a ``\\r`` before it). A line longer than the maximum message
  size is a :class:`~ipc_core.ProtocolError`: the loop logs it and closes
  that client; memory per connection stays one line at most;
* what follows the last newline when the program closes its stdout is
  dropped (a line is not complete without its newline).

Raw mode (:class:`RawLayer`): each read of the program's output becomes one
message (cut at the maximum message size); each client message's payload
is written to stdin as it is, with nothing around it.

Framed mode needs no layer: the program speaks LibIPC frames itself.
"""

from __future__ import annotations

from ipc_core import FrameDecoder, PeerClosed, ProtocolError, header

__all__ = ["LineLayer", "LineTooLong", "RawLayer"]

_NL = 0x0A
_CR = 0x0D


class LineTooLong(ProtocolError):
    """The program wrote a line longer than the maximum message size."""


def _line_frame(line: bytes | bytearray | memoryview) -> bytes:
    """One message for one line (its ``\\n`` already removed)."""
    if line and line[-1] == _CR:
        line = line[:-1]
    return header(len(line)) + line


class LineLayer:
    """Line mode (see the module docstring); ``max_line`` is the client's
    maximum message size."""

    __slots__ = ("_decoder", "_out", "_partial", "max_line")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._partial = bytearray()  # the program's unfinished line
        self._decoder = FrameDecoder(max_line)  # the client's unfinished frame
        self._out = bytearray()

    # ---------------------------------------------------- program -> client

    def receive_data(self, data: bytes) -> bytes:
        if not data:
            raise PeerClosed("the program closed its output")
        partial = self._partial
        start = 0
        frames = []
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if partial:
                partial += data[start:end]
                line: bytes | bytearray = partial
            else:
                line = data[start:end]
            if len(line) > self.max_line + (1 if line.endswith(b"\r") else 0):
                raise LineTooLong(f"the program wrote a line of more than {self.max_line} bytes")
            frames.append(_line_frame(line))
            if partial:
                partial = self._partial = bytearray()
            start = end + 1
        if start < len(data):
            partial += data[start:]
            if len(partial) > self.max_line + 1:
                raise LineTooLong(f"the program wrote a line of more than {self.max_line} bytes")
        return b"".join(frames)

    def fast_receive(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """The interactive case in one call: no unfinished line, the read ends
        with a newline. Declines (consuming nothing) otherwise."""
        if self._partial or not data or data[-1] != _NL:
            return None
        raw = bytes(data)
        if raw.count(b"\n") == 1:
            if len(raw) > self.max_line + 1 and not (
                len(raw) == self.max_line + 2 and raw[-2] == _CR
            ):
                return None  # receive_data raises LineTooLong
            return _line_frame(raw[:-1])
        lines = raw.split(b"\n")
        lines.pop()
        limit = self.max_line
        for line in lines:
            if len(line) > limit and not (len(line) == limit + 1 and line[-1] == _CR):
                return None
        return b"".join([_line_frame(line) for line in lines])

    def fast_line(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """The commonest read, one whole line: its message (no header), or
        None (nothing consumed) for anything else."""
        if self._partial or not data or data[-1] != _NL:
            return None
        raw = bytes(data)
        if raw.find(b"\n") != len(raw) - 1:
            return None
        line = raw[:-2] if len(raw) > 1 and raw[-2] == _CR else raw[:-1]
        return line if len(line) <= self.max_line else None

    # ---------------------------------------------------- client -> program

    def send(self, data: bytes | bytearray | memoryview) -> None:
        out = self._out
        for payload in self._decoder.feed(data):
            out += payload
            out.append(_NL)

    def fast_send(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """One whole frame (header included) -> its line."""
        return bytes(data[4:]) + b"\n"

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = bytes(out)
        out.clear()
        return data

    def close(self) -> None:
        """Nothing to say to a program: its stdin is closed with the socket."""


class RawLayer:
    """Raw mode (see the module docstring)."""

    __slots__ = ("_decoder", "_out", "max_message_size")

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max(1, max_message_size)
        self._decoder = FrameDecoder(max_message_size)
        self._out = bytearray()

    def receive_data(self, data: bytes) -> bytes:
        if not data:
            raise PeerClosed("the program closed its output")
        size = self.max_message_size
        if len(data) <= size:
            return header(len(data)) + data
        return b"".join(
            header(len(piece)) + piece
            for piece in (data[i : i + size] for i in range(0, len(data), size))
        )

    def fast_receive(self, data: bytes | bytearray | memoryview) -> bytes | None:
        if len(data) > self.max_message_size:
            return None
        return header(len(data)) + bytes(data)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        for payload in self._decoder.feed(data):
            self._out += payload

    def fast_send(self, data: bytes | bytearray | memoryview) -> bytes | None:
        return bytes(data[4:])

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = bytes(out)
        out.clear()
        return data

    def close(self) -> None:
        """Nothing to say to a program: its stdin is closed with the socket."""
