"""One module per benchmark suite: NAME, TITLE, missing() -> reason or None, run(h, res)."""

from . import asyncio, core, exec, http, identity, route, scale, tcp, tls, udp, ws

SUITES = {m.NAME: m for m in (core, tcp, tls, ws, scale, identity, route, exec, udp, asyncio, http)}
