"""The engine every daemon shares: the I/O around the Sans-I/O codecs.

==============  ==========================================================
daemon          :class:`Daemon`: one owner per descriptor, accept,
                handshakes, switching, limits, idle sweep, signals, systemd
handshake       the interfaces a codec implements (Handshake, Connector)
                and their optional capabilities (Settles, NamesPeer)
deadlines       requests with a deadline (Deadlines, RequestDeadlines)
local           the one non-blocking way to connect to a local service
control         /metrics, /healthz and the control service NAME.ctl
outbound        the local service that dials out (``tcp://`` URIs)
startup         building a daemon from its flags; start-up failures
errors          StartupError, LocalRefused, the Failure and ErrorKind values
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
