"""The engine every daemon shares: the I/O around the Sans-I/O codecs.

==============  ==========================================================
daemon          :class:`Daemon`: accept, handshakes, switching, limits,
                idle sweep, control service, signals, systemd notify
handshake       the interfaces a codec implements (Handshake, Connector)
deadlines       requests with a deadline (local clients that owe a request)
outbound        the local service that dials out (``tcp://`` URIs)
startup         building a daemon from its flags; :class:`StartupError`
listeners       ``--listen`` addresses, binding, TCP tuning, fd limit
addresses       host:port syntax and routing URIs (pure parsing)
policy          which services a network peer may reach
options         click: the suite's command style and shared flags
log             logging setup, escaping, throttling
metrics         Prometheus registry, /metrics responder, daemon counters
systemd         socket activation and sd_notify
tlsconfig       TLS contexts and the server policy flags
certs           a private CA: make, load, match and revoke certificates
==============  ==========================================================
"""
