"""Sans-I/O codecs: protocol objects with no sockets, no clocks, no threads.

==========  ==============================================================
tcp         the TCPd handshake, both sides (reference-compatible bytes)
tls         :class:`TLSLayer`: ``ssl.SSLObject`` over memory BIOs
ws          :class:`WebSocketServerLayer` on websockets' ``ServerProtocol``
tlswrap     TLS around any handshake or connector (ipc-tlsd, wss)
==========  ==============================================================

They implement :class:`ipc_core.Layer` and the engine's interfaces
(:mod:`daemons.engine.handshake`); the engine never imports them.
"""
