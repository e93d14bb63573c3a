"""WebSocket over TLS as the relay drives it: StackedLayer(TLSLayer, WebSocketServerLayer)
against a TLS client layer and websockets' ClientProtocol, no sockets. The stack's
fast hooks must give exactly what its general path gives."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from daemons.codecs.tls import TLSLayer
from daemons.codecs.ws import WebSocketServerLayer
from daemons.engine.tlsconfig import client_context, server_context
from ipc_core import StackedLayer
from ipc_core.errors import PeerClosed
from ipc_core.framing import FrameDecoder, encode
from tests.helpers import Pki

Receive = Callable[[StackedLayer, bytes], bytes]


def general(stack: StackedLayer, data: bytes) -> bytes:
    return stack.receive_data(data)


def fast_first(stack: StackedLayer, data: bytes) -> bytes:
    """What the core's relay does with one read."""
    out = stack.fast_receive(data)  # type: ignore[attr-defined]
    return out if out is not None else stack.receive_data(data)


class Browser:
    """The client side: TLS, then a WebSocket client inside it."""

    def __init__(self, pki: Pki) -> None:
        self.tls = TLSLayer(
            client_context(ca=pki.ca), server_side=False, server_hostname="localhost"
        )
        self.ws = ClientProtocol(parse_uri("wss://localhost/pong"), max_size=None)

    def wire(self) -> bytes:
        """Everything the browser wants to send, as TLS records."""
        plain = b"".join(self.ws.data_to_send())
        if plain:
            self.tls.send(plain)
        return self.tls.data_to_send()

    def take(self, records: bytes) -> list:
        """Feed the server's records; return the WebSocket events."""
        if not records:  # b"" would mean EOF to the TLS layer
            return []
        plain = self.tls.receive_data(records)
        if plain:
            self.ws.receive_data(plain)
        return self.ws.events_received()


def opened(pki: Pki) -> tuple[StackedLayer, Browser]:
    server_tls = TLSLayer(server_context(pki.cert, pki.key), server_side=True)
    ws = WebSocketServerLayer()
    browser = Browser(pki)
    for _ in range(5):  # the TLS handshake
        out = browser.tls.data_to_send()
        if out:
            server_tls.receive_data(out)
        back = server_tls.data_to_send()
        if back:
            browser.tls.receive_data(back)
        if server_tls.handshake_complete and browser.tls.handshake_complete:
            break
    browser.ws.send_request(browser.ws.connect())
    ws.receive_data(server_tls.receive_data(browser.wire()))
    assert ws.request is not None and ws.accept() == b""
    stack = StackedLayer(server_tls, ws)
    [response] = browser.take(stack.data_to_send())
    assert isinstance(response, Response) and response.status_code == 101
    return stack, browser


def test_the_stack_has_fast_hooks_only_when_both_layers_do(pki: Pki) -> None:
    stack, _ = opened(pki)
    assert callable(stack.fast_receive) and callable(stack.fast_send)  # type: ignore[attr-defined]
    plain = StackedLayer(stack.lower, object())  # type: ignore[arg-type]
    assert not hasattr(plain, "fast_receive") and not hasattr(plain, "fast_send")


def test_one_message_each_way_in_one_call(pki: Pki) -> None:
    stack, browser = opened(pki)
    browser.ws.send_binary(b"hello")
    assert stack.fast_receive(browser.wire()) == encode(b"hello")  # type: ignore[attr-defined]
    wire = stack.fast_send(encode(b"reply"))  # type: ignore[attr-defined]
    [frame] = browser.take(wire)
    assert (frame.opcode, frame.data) == (Opcode.BINARY, b"reply")


def test_declines_end_in_the_general_paths_answer(pki: Pki) -> None:
    stack, browser = opened(pki)
    browser.ws.send_ping(b"p")  # TLS decrypts it, WebSocket declines: a pong is due
    assert stack.fast_receive(browser.wire()) is None  # type: ignore[attr-defined]
    assert stack.receive_data(b"ignored: the plaintext was kept") == b""
    [pong] = browser.take(stack.data_to_send())
    assert (pong.opcode, pong.data) == (Opcode.PONG, b"p")
    browser.ws.send_binary(b"one")
    browser.ws.send_binary(b"two")
    records = browser.wire()
    assert FrameDecoder().feed(fast_first(stack, records)) == [b"one", b"two"]
    browser.ws.send_close()
    with pytest.raises(PeerClosed):
        fast_first(stack, browser.wire())


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    messages=st.lists(st.binary(max_size=2000), min_size=1, max_size=6),
    per_read=st.integers(1, 3),
    pings=st.booleans(),
)
def test_fast_and_general_driving_give_the_same_messages(
    pki: Pki, messages: list[bytes], per_read: int, pings: bool
) -> None:
    results = []
    for receive in (general, fast_first):
        stack, browser = opened(pki)
        got: list[bytes] = []
        decoder = FrameDecoder()
        for i in range(0, len(messages), per_read):
            for message in messages[i : i + per_read]:
                browser.ws.send_binary(message)
                if pings:
                    browser.ws.send_ping(b"k")
            got += decoder.feed(receive(stack, browser.wire()))
            browser.take(stack.data_to_send())  # pongs
        replies = []
        for message in messages:
            wire = (
                stack.fast_send(encode(message))  # type: ignore[attr-defined]
                if receive is fast_first
                else None
            )
            if wire is None:
                stack.send(encode(message))
                wire = stack.data_to_send()
            replies += [f.data for f in browser.take(wire) if f.opcode is Opcode.BINARY]
        results.append((got, replies))
    assert results[0] == results[1] == (messages, messages)
