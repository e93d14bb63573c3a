"""Which services a network peer may reach, and what peers can put in logs.

Issue 11: globs never unlock protected names (item 2), control services and
lock files are never reachable, a service marked ``local-only`` in the run
directory is protected under any name (item 1), and peer-controlled text
cannot forge or corrupt a log line (item 15).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from daemons.engine.log import escape_log_text, setup_logging
from daemons.engine.policy import (
    DEFAULT_PROTECTED,
    ServiceAccess,
    network_refusal,
    service_name_error,
)

GLOBS = ["*", "t*", "?*", "[a-z]*", "*c*", "*p*", "i*", "w*", "??", "???", "*s"]


@pytest.mark.parametrize("name", DEFAULT_PROTECTED)
@pytest.mark.parametrize("glob", GLOBS)
def test_no_glob_unlocks_a_protected_name(name: str, glob: str) -> None:
    access = ServiceAccess(allow=[glob])
    assert access.check(name) is not None


@pytest.mark.parametrize("name", DEFAULT_PROTECTED)
def test_the_exact_name_unlocks_a_protected_name(name: str) -> None:
    assert ServiceAccess(allow=[name]).check(name) is None
    assert ServiceAccess(allow=["*", name]).check(name) is None


def test_globs_still_select_ordinary_services() -> None:
    access = ServiceAccess(allow=["p*"])
    assert access.check("pong") is None
    assert access.check("echo") is not None


@pytest.mark.parametrize("name", ["tcp.ctl", "ipc.ctl", "pong.lock", "x.ctl"])
def test_control_services_and_locks_are_never_reachable(name: str) -> None:
    for allow in ([], ["*"], [name], ["*.ctl", "*.lock"]):
        reason = ServiceAccess(allow=allow).check(name)
        assert reason is not None and "never reachable" in reason


def test_a_daemon_protects_its_own_name() -> None:
    access = ServiceAccess(allow=["*"]).protect("tcp2")
    assert access.check("tcp2") is not None
    assert ServiceAccess(allow=["tcp2"]).protect("tcp2").check("tcp2") is None


def _mark(directory: Path, name: str, text: bytes) -> None:
    (directory / f"{name}.lock").write_bytes(text)


def test_local_only_services_are_protected_under_any_name(tmp_path: Path) -> None:
    _mark(tmp_path, "router2", b"local-only\n")
    _mark(tmp_path, "pong", b"")
    access = ServiceAccess(allow=["*", "r*"])
    reason = network_refusal(access, "router2", tmp_path)
    assert reason is not None and "local-only" in reason and "--allow router2" in reason
    assert network_refusal(access, "pong", tmp_path) is None
    assert network_refusal(access, "nothing-here", tmp_path) is None
    assert network_refusal(ServiceAccess(allow=["router2"]), "router2", tmp_path) is None


def test_a_symlinked_lock_is_not_followed_for_the_mark(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"local-only\n")
    (tmp_path / "evil.lock").symlink_to(target)
    # Not followed: the mark is not read through a link, and nothing breaks.
    assert network_refusal(ServiceAccess(), "evil", tmp_path) is None


# -- log lines ---------------------------------------------------------------------


HOSTILE = "a\nWARNING ipc.tcpd: forged\r\x1b[2J\x00\x7f\x9b\u2028end"


def test_escape_log_text_leaves_no_control_character() -> None:
    out = escape_log_text(HOSTILE)
    assert all(ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F for c in out)
    assert "\u2028" not in out
    assert out.startswith("a\\x0aWARNING") and "\\x1b[2J" in out and out.endswith("\\u2028end")
    assert escape_log_text("plain: é ü 日本") == "plain: é ü 日本"


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_a_peer_cannot_forge_a_log_line(fmt: str) -> None:
    stream = io.StringIO()
    handler = setup_logging(0, fmt, stream=stream, env={})
    try:
        logging.getLogger("ipc.test").warning("peer %s: bad path %r", HOSTILE, HOSTILE)
        logging.getLogger("ipc.test").info("ok", extra={"path": HOSTILE})
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    text = stream.getvalue()
    assert "\x1b" not in text and "\x00" not in text and "\r" not in text
    if fmt == "json":
        assert json.loads(lines[0])["msg"].startswith("peer a\n")  # JSON escapes it itself


# -- one rule for service names: the library's, plus the 100-byte policy ----------


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/", "a\0b", "a\nb", "\x1f", "a\x7f"])
def test_service_names_are_refused_by_the_library_rule_in_its_words(name: str) -> None:
    from ipc_core import InvalidServiceName, validate_name

    with pytest.raises(InvalidServiceName) as library:
        validate_name(name, Path("/"))
    assert service_name_error(name) == str(library.value)


def test_the_socket_path_limit_of_a_run_directory_is_the_library_s() -> None:
    long_dir = Path("/tmp/" + "d" * 40)
    name = "x" * 80  # within the 100-byte policy, too long for a socket there
    assert service_name_error(name) is None
    reason = service_name_error(name, long_dir)
    assert reason is not None and "too long for a socket path" in reason
    assert service_name_error("x" * 101) == "service name is 101 bytes long, the limit is 100"


def test_one_socket_path_limit() -> None:
    from daemons.engine.listeners import parse_listen
    from ipc_core import SUN_PATH_MAX

    assert parse_listen("unix:/" + "p" * (SUN_PATH_MAX - 1)).path
    with pytest.raises(ValueError, match=f"longer than {SUN_PATH_MAX} bytes"):
        parse_listen("unix:/" + "p" * SUN_PATH_MAX)
