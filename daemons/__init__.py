"""The protocol daemons and the ``ipc`` tool, in three groups.

* :mod:`daemons.engine`: what every daemon shares (listeners, handshakes,
  policy, metrics, systemd, the outbound side, logging, click options,
  certificates). It does the I/O around the codecs through
  :class:`ipc_core.Context`.
* :mod:`daemons.codecs`: Sans-I/O protocol objects (tcp, tls, ws, and
  tlswrap, TLS around any handshake): bytes in, events and bytes out, no
  sockets; tested by pumping bytes between two objects.
* one module per command: :mod:`~daemons.ipcd`, :mod:`~daemons.tcpd`,
  :mod:`~daemons.tlsd`, :mod:`~daemons.websocketd`, :mod:`~daemons.ipc` (the
  ``ipc`` tool; its subcommands :mod:`~daemons.ipc_status` and
  :mod:`~daemons.ipc_cert`) and :mod:`~daemons.demo` (``make run``).

Dependencies point one way: commands -> engine and codecs; codecs -> the
engine's interfaces (:mod:`daemons.engine.handshake`, ``policy``, ``certs``);
the engine never imports a codec or a command; nothing here is imported by
:mod:`ipc_core`.
"""
