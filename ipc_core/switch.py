"""Switching: the vocabulary for joining two descriptors.

A switched pair forwards everything read on one end to the other end, inside
the :class:`~ipc_core.Context` loop. There are three ways to say how one end
(usually the network end) turns bytes into LibIPC messages and back:

* nothing: the end already carries the LibIPC stream (``u32`` length +
  payload), as a TCP connection after the TCPd handshake does. Chunks are
  forwarded unchanged, their frame boundaries checked against the size limit.
* reference-style callbacks, ``set_switch_callbacks(fd, in_cb, out_cb)``:
  ``in_cb(fd)`` reads from ``fd`` itself and returns ``(SwitchResult,
  payload)``; ``out_cb(fd, payload)`` writes one message to ``fd`` itself and
  returns a :class:`SwitchResult`. This keeps the reference's API.
* a Sans-I/O :class:`Layer` (TLS, WebSocket, ...), ``set_switch_codec(fd,
  layer)``: the loop does every read and write and the layer only converts
  bytes. This is what our daemons use: no I/O outside the loop.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol, runtime_checkable


class SwitchResult(enum.IntEnum):
    """What a switch callback reports (the reference's codes)."""

    NO_ERROR = 0
    ERROR = 1
    FD_CLOSING = 2
    IGNORE = 3


InCallback = Callable[[int], "tuple[SwitchResult, bytes | None]"]
OutCallback = Callable[[int, bytes], SwitchResult]


@runtime_checkable
class Layer(Protocol):
    """A Sans-I/O protocol layer between a network descriptor and LibIPC.

    ``receive_data`` takes bytes read from the network (``b""`` = EOF) and
    returns the LibIPC stream bytes to deliver to the local end; ``send``
    takes LibIPC stream bytes from the local end; ``data_to_send`` returns
    the bytes the layer wants written to the network (after every call).
    Bad input raises :class:`~ipc_core.errors.ProtocolError`, an orderly
    close by the peer :class:`~ipc_core.errors.PeerClosed`. ``send`` may be
    given a memoryview of the loop's read buffer, valid only during the call:
    copy whatever is kept.

    A layer may also offer the optional fast hooks :class:`FastReceive` and
    :class:`FastSend`, used only when the partner end carries the plain
    LibIPC stream; the loop looks for them once, when the layer is set.
    """

    def receive_data(self, data: bytes) -> bytes: ...

    def send(self, data: bytes | bytearray | memoryview) -> None: ...

    def data_to_send(self) -> bytes: ...

    def close(self) -> None: ...


#: A fast hook's shape: one read's or one message's bytes in, bytes or None out.
FastHook = Callable[["bytes | bytearray | memoryview"], "bytes | None"]


@runtime_checkable
class FastReceive(Protocol):
    """A :class:`Layer` that can decode one read in one call.

    ``fast_receive(data)`` gets exactly one read's bytes and returns the
    (non-empty) LibIPC stream they decode to when nothing else came of them
    (nothing to send back, no close, no error); on None the loop calls
    ``receive_data(data)`` with the same bytes, which must then finish the
    job (the hook may have consumed them). It saves the interactive case a
    round of calls.
    """

    def fast_receive(self, data: bytes | bytearray | memoryview) -> bytes | None: ...


@runtime_checkable
class FastSend(Protocol):
    """A :class:`Layer` that can encode one whole message in one call.

    ``fast_send(data)`` gets exactly one whole LibIPC message (header and
    payload) and returns its wire bytes, or None having consumed nothing (the
    loop then calls ``send``).
    """

    def fast_send(self, data: bytes | bytearray | memoryview) -> bytes | None: ...


_CLASS_HOOKS: dict[tuple[type, str], bool] = {}


def fast_receive_of(layer: object) -> FastHook | None:
    """``layer.fast_receive`` if it has that hook (:class:`FastReceive`), else None."""
    return _hook(layer, "fast_receive")


def fast_send_of(layer: object) -> FastHook | None:
    """``layer.fast_send`` if it has that hook (:class:`FastSend`), else None."""
    return _hook(layer, "fast_send")


def _hook(layer: object, name: str) -> FastHook | None:
    """The Protocols say what the hooks are; this says whether a layer has
    one, cheaply. ``isinstance`` against a runtime Protocol walks its members
    on every call (~45 us on Python 3.11, paid per connection), so the answer
    is kept per class; a hook set on the instance (:class:`StackedLayer`)
    counts too."""
    own = getattr(layer, "__dict__", None)
    if own is not None and name in own:
        hook: FastHook | None = own[name]
        return hook
    key = (type(layer), name)
    has = _CLASS_HOOKS.get(key)
    if has is None:
        has = _CLASS_HOOKS[key] = callable(getattr(type(layer), name, None))
    return getattr(layer, name) if has else None


class StackedLayer:
    """Two layers on top of each other (e.g. WebSocket over TLS).

    ``lower`` touches the network; ``upper`` produces the LibIPC stream.
    When both have the fast hooks, so does the stack (``fast_receive`` and
    ``fast_send`` are then set on the instance): one call per direction
    through both, falling back to the general path as each layer does.
    """

    def __init__(self, lower: Layer, upper: Layer) -> None:
        self.lower = lower
        self.upper = upper
        # Plaintext the lower layer's fast_receive produced but the upper's
        # declined: the receive_data call that follows starts from it.
        self._plain: bytes | None = None
        hooks = (
            fast_receive_of(lower),
            fast_send_of(lower),
            fast_receive_of(upper),
            fast_send_of(upper),
        )
        if None not in hooks:
            self._lower_receive: FastHook
            self._lower_send: FastHook
            self._upper_receive: FastHook
            self._upper_send: FastHook
            (
                self._lower_receive,
                self._lower_send,
                self._upper_receive,
                self._upper_send,
            ) = hooks  # type: ignore[assignment]
            # Set on the instance: isinstance(stack, FastReceive) holds only then.
            self.fast_receive = self._fast_receive
            self.fast_send = self._fast_send

    def _fast_receive(self, data: bytes | bytearray | memoryview) -> bytes | None:
        plain = self._lower_receive(data)
        if plain is None:
            return None  # receive_data(data) -> lower.receive_data(data) finishes
        out = self._upper_receive(plain)
        if out is None:
            self._plain = plain  # the lower layer consumed data: continue from here
        return out

    def _fast_send(self, data: bytes | bytearray | memoryview) -> bytes | None:
        wire = self._upper_send(data)
        if wire is None:
            return None  # nothing consumed
        out = self._lower_send(wire)
        if out is None:  # the upper layer consumed data: finish as send() would
            self.lower.send(wire)
            out = self.lower.data_to_send()
        return out

    def receive_data(self, data: bytes) -> bytes:
        plain, self._plain = self._plain, None
        if plain is None:
            plain = self.lower.receive_data(data)  # EOF raises here
        if not plain:
            self._push_down()
            return b""
        try:
            out = self.upper.receive_data(plain)
        finally:
            self._push_down()
        return out

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.upper.send(data)
        self._push_down()

    def data_to_send(self) -> bytes:
        self._push_down()
        return self.lower.data_to_send()

    def close(self) -> None:
        self.upper.close()
        self._push_down()
        self.lower.close()

    def _push_down(self) -> None:
        pending = self.upper.data_to_send()
        if pending:
            self.lower.send(pending)
