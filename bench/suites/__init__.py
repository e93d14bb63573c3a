"""One module per benchmark suite: NAME, TITLE, missing() -> reason or None, run(h, res)."""

from . import core

SUITES = {m.NAME: m for m in (core,)}
