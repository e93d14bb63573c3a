"""One module per benchmark suite: NAME, TITLE, missing() -> reason or None, run(h, res)."""

from . import core, identity, scale, tcp, tls, ws

SUITES = {m.NAME: m for m in (core, tcp, tls, ws, scale, identity)}
