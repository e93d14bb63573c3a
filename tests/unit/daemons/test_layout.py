"""The daemons' tree keeps its shape (issue 13): three groups by role, the
dependency direction, and only public or private names taken from ipc_core.

Read from the source with ``ast`` (no import side effects): a new module
that breaks a rule fails here with its name and the offending import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ipc_core

ROOT = Path(__file__).resolve().parents[3] / "daemons"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, names) of every ``from X import ...`` in a module."""
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


MODULES = _modules()


def _group(module: str) -> str:
    if module.startswith("daemons.engine"):
        return "engine"
    if module.startswith("daemons.codecs"):
        return "codecs"
    return "command"


def test_three_groups_are_visible_in_the_tree() -> None:
    groups = {_group(m) for m in MODULES if m != "daemons"}
    assert groups == {"engine", "codecs", "command"}
    commands = {m for m in MODULES if _group(m) == "command" and m != "daemons"}
    assert {
        "daemons.ipc",
        "daemons.ipcd",
        "daemons.tcpd",
        "daemons.tlsd",
        "daemons.websocketd",
        "daemons.demo",
    } <= commands
    assert (ROOT / "static" / "index.html").is_file()  # where ipc-websocketd finds it


def test_the_engine_never_imports_a_codec_or_a_command() -> None:
    for name, path in MODULES.items():
        if _group(name) != "engine":
            continue
        for module, _names in _imports(name, path):
            if module.startswith("daemons"):
                assert _group(module) == "engine", f"{name} imports {module}"


#: The engine's modules that do I/O or drive a loop: a Sans-I/O codec never
#: needs them (it may use the engine's interfaces and pure helpers).
ENGINE_IO = {
    "daemons.engine",
    "daemons.engine.daemon",
    "daemons.engine.doors",
    "daemons.engine.outbound",
    "daemons.engine.startup",
    "daemons.engine.local",
    "daemons.engine.listeners",
    "daemons.engine.systemd",
    "daemons.engine.deadlines",
    "daemons.engine.metrics",
    "daemons.engine.options",
    "daemons.engine.log",
}


def test_codecs_never_import_the_engine_io_or_a_command() -> None:
    for name, path in MODULES.items():
        if _group(name) != "codecs":
            continue
        for module, _names in _imports(name, path):
            if module.startswith("daemons.engine"):
                assert module not in ENGINE_IO, f"{name} imports {module}"
            elif module.startswith("daemons"):
                assert _group(module) == "codecs", f"{name} imports {module}"


def test_ipc_core_names_are_public_or_private() -> None:
    """What the daemons take from ipc_core is in ``ipc_core.__all__`` or
    comes from a private module (``ipc_core._x``): nothing in between."""
    public = set(ipc_core.__all__)
    for name, path in MODULES.items():
        for module, names in _imports(name, path):
            if module != "ipc_core" and not module.startswith("ipc_core."):
                continue
            if module.startswith("ipc_core._"):
                continue
            hidden = [n for n in names if n not in public]
            assert not hidden, f"{name}: from {module} import {', '.join(hidden)}"
            assert names, f"{name}: import {module} (use the public names)"


def test_ipc_core_never_imports_the_daemons() -> None:
    core = Path(ipc_core.__file__).parent
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                modules = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                )
                assert not any(m.startswith("daemons") for m in modules), path


def test_optional_handshake_capabilities_are_declared_protocols() -> None:
    """The engine asks ``isinstance(h, Settles)`` once per connection, not
    ``getattr(h, "settle_after")`` on every read."""
    import ssl

    from daemons.codecs.tcp import TcpdHandshake
    from daemons.codecs.tlswrap import TLSHandshake
    from daemons.engine.handshake import NamesPeer, Settles

    tcp = TcpdHandshake()
    assert isinstance(tcp, Settles) and not isinstance(tcp, NamesPeer)
    wrapped = TLSHandshake(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tcp)
    assert isinstance(wrapped, Settles)
    assert wrapped.settle_after is None  # no pause rule before TLS is up
    source = (ROOT / "engine" / "daemon.py").read_text() + (
        ROOT / "codecs" / "tlswrap.py"
    ).read_text()
    assert "getattr(p.handshake" not in source and '"settle' not in source
