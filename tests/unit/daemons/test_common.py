"""Tests for the engine's parsing and plumbing: addresses, URIs, policy, logging, click flags."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import stat
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from daemons.engine.addresses import DEFAULT_PORTS, Uri, parse_connect_target, parse_uri
from daemons.engine.listeners import ListenAddress, bound_address, open_listener, parse_listen
from daemons.engine.log import setup_logging
from daemons.engine.options import CommonOptions, common_options, listen_specs
from daemons.engine.policy import ServiceAccess, service_name_error

AF_INET, AF_INET6, AF_UNIX, AF_UNSPEC = (
    socket.AF_INET,
    socket.AF_INET6,
    socket.AF_UNIX,
    socket.AF_UNSPEC,
)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")

# --------------------------------------------------------------------------
# parse_listen
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (":9000", ListenAddress(AF_UNSPEC, None, 9000)),
        (":0", ListenAddress(AF_UNSPEC, None, 0)),
        ("127.0.0.1:9000", ListenAddress(AF_INET, "127.0.0.1", 9000)),
        ("0.0.0.0:9000", ListenAddress(AF_INET, "0.0.0.0", 9000)),
        ("[::1]:9000", ListenAddress(AF_INET6, "::1", 9000)),
        ("[::]:65535", ListenAddress(AF_INET6, "::", 65535)),
        ("localhost:9000", ListenAddress(AF_UNSPEC, "localhost", 9000)),
        ("example.com.:1", ListenAddress(AF_UNSPEC, "example.com.", 1)),
        ("unix:/path/to/sock", ListenAddress(AF_UNIX, path="/path/to/sock")),
        ("unix:rel/sock", ListenAddress(AF_UNIX, path="rel/sock")),
    ],
)
def test_parse_listen_accepts(spec: str, expected: ListenAddress) -> None:
    addr = parse_listen(spec)
    assert addr == expected
    assert str(addr) == spec


@pytest.mark.parametrize(
    ("spec", "detail"),
    [
        ("x", "missing port"),
        ("", "empty address"),
        ("9000", "missing ':' before the port (as in :9000)"),
        (":", "bad port"),
        (":-1", "bad port"),
        (":65536", "bad port"),
        ("host:99999", "bad port"),
        ("host:port", "bad port"),
        ("host:", "bad port"),
        (":9000 ", "bad port"),
        ("::1:9000", "need brackets"),
        ("[::1]", "missing port"),
        ("[::1]x", "unexpected"),
        ("[::1:9000", "missing ']'"),
        ("[1.2.3.4]:9000", "bad IPv6"),
        ("1.2.3:9000", "bad host"),
        ("999.1.1.1:9000", "bad host"),
        ("-bad:9000", "bad host"),
        ("a b:9000", "bad host"),
        ("user@host:9000", "bad host"),
        ("unix:", "unix socket path"),
        ("unix:/" + "x" * 200, "longer than"),
        ("tcp://host:9000", "need brackets"),
    ],
)
def test_parse_listen_rejects(spec: str, detail: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen(spec)
    msg = str(info.value)
    assert detail in msg
    assert "expected :PORT, HOST:PORT, [IPv6]:PORT or unix:PATH" in msg
    assert repr(spec) in msg


def test_parse_listen_message_format() -> None:
    with pytest.raises(
        ValueError,
        match=r"^missing port: expected :PORT, HOST:PORT, "
        r"\[IPv6\]:PORT or unix:PATH, got 'x'$",
    ):
        parse_listen("x")


# --------------------------------------------------------------------------
# open_listener / bound_address (real sockets on loopback and tmp_path)
# --------------------------------------------------------------------------


def _roundtrip(listener: socket.socket, family: int, address: object) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(address)
        listener.settimeout(5)  # accept() on the non-blocking listener, bounded
        conn, _ = listener.accept()
        with conn:
            client.sendall(b"ping")
            conn.settimeout(5)
            assert conn.recv(4) == b"ping"


def test_open_listener_ipv4() -> None:
    with open_listener(parse_listen("127.0.0.1:0")) as sock:
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        port = sock.getsockname()[1]
        assert port > 0
        assert bound_address(sock) == f"127.0.0.1:{port}"
        _roundtrip(sock, AF_INET, ("127.0.0.1", port))


@needs_ipv6
def test_open_listener_ipv6() -> None:
    with open_listener(parse_listen("[::1]:0")) as sock:
        port = sock.getsockname()[1]
        assert bound_address(sock) == f"[::1]:{port}"
        _roundtrip(sock, AF_INET6, ("::1", port))


@needs_ipv6
def test_open_listener_all_interfaces_is_dual_stack() -> None:
    with open_listener(parse_listen(":0")) as sock:
        assert sock.family == AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = sock.getsockname()[1]
        assert bound_address(sock) == f"[::]:{port}"
        _roundtrip(sock, AF_INET, ("127.0.0.1", port))
        _roundtrip(sock, AF_INET6, ("::1", port))


def test_open_listener_falls_back_to_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    real_socket = socket.socket

    def no_ipv6(family: int = AF_INET, *args: object, **kwargs: object) -> socket.socket:
        if family == AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", no_ipv6)
    with open_listener(parse_listen(":0")) as sock:
        assert sock.family == AF_INET
        assert bound_address(sock).startswith("0.0.0.0:")


@needs_ipv6
def test_explicit_ipv6_wildcard_is_v6only() -> None:
    with open_listener(parse_listen("[::]:0")) as v6:
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        port = v6.getsockname()[1]
        # The IPv4 wildcard on the same port can coexist.
        with open_listener(parse_listen(f"0.0.0.0:{port}")) as v4:
            assert v4.getsockname()[1] == port


def test_open_listener_hostname() -> None:
    with open_listener(parse_listen("localhost:0")) as sock:
        host = sock.getsockname()[0]
        assert host in ("127.0.0.1", "::1")


def test_open_listener_port_in_use() -> None:
    with open_listener(parse_listen("127.0.0.1:0")) as sock:
        port = sock.getsockname()[1]
        with pytest.raises(OSError):
            open_listener(parse_listen(f"127.0.0.1:{port}"))


def test_open_listener_unix(tmp_path) -> None:
    path = tmp_path / "d.sock"
    with open_listener(parse_listen(f"unix:{path}")) as sock:
        assert sock.getblocking() is False
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert bound_address(sock) == f"unix:{path}"
        _roundtrip(sock, AF_UNIX, str(path))
        # A live socket is never replaced.
        with pytest.raises(OSError, match="another process"):
            open_listener(parse_listen(f"unix:{path}"))


def test_open_listener_unix_replaces_stale_socket(tmp_path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # leaves the file, nobody listening
    with open_listener(parse_listen(f"unix:{path}")) as sock:
        _roundtrip(sock, AF_UNIX, str(path))


def test_open_listener_unix_refuses_regular_file(tmp_path) -> None:
    path = tmp_path / "file"
    path.write_text("keep me")
    with pytest.raises(FileExistsError):
        open_listener(parse_listen(f"unix:{path}"))
    assert path.read_text() == "keep me"


def test_bound_address_abstract_unix() -> None:
    with socket.socket(AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(f"\0libipc-test-{os.getpid()}")
        assert bound_address(sock) == f"unix:@libipc-test-{os.getpid()}"


# --------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("tcp://192.0.2.7:9000/pong", Uri("tcp", "192.0.2.7", 9000, "pong")),
        ("tcp://[::1]:9000/pong", Uri("tcp", "::1", 9000, "pong")),
        ("tcp://example.com/pong", Uri("tcp", "example.com", 9000, "pong")),
        ("tls://pong.example.com/pong", Uri("tls", "pong.example.com", 9443, "pong")),
        ("ws://h/x", Uri("ws", "h", 8080, "x")),
        ("wss://[::1]/x", Uri("wss", "::1", 8443, "x")),
        ("TCP://h:1/x", Uri("tcp", "h", 1, "x")),
        ("tor://example.com:9050/audio", Uri("tor", "example.com", 9050, "audio")),
        ("unix://pong", Uri("unix", "", 0, "pong")),
    ],
)
def test_parse_uri(uri: str, expected: Uri) -> None:
    assert parse_uri(uri) == expected


def test_uri_helpers() -> None:
    uri = parse_uri("tcp://[::1]/pong")
    assert str(uri) == "tcp://[::1]:9000/pong"
    assert uri.address == ("::1", 9000)
    assert not uri.is_local
    local = parse_uri("unix://pong")
    assert local.is_local and str(local) == "unix://pong"
    with pytest.raises(ValueError):
        _ = local.address
    assert DEFAULT_PORTS == {"tcp": 9000, "tls": 9443, "ws": 8080, "wss": 8443}
    assert parse_uri("tor://h/x", {"tor": 9050}).port == 9050


@pytest.mark.parametrize(
    ("uri", "detail"),
    [
        ("tcp://host:9000", "missing service"),
        ("tcp://host:9000/", "missing service"),
        ("tcp://:9000/pong", "empty host"),
        ("tcp:///pong", "empty host"),
        ("tcp://host:x/pong", "bad port"),
        ("tcp://host:70000/pong", "bad port"),
        ("tcp://::1:9000/pong", "need brackets"),
        ("tcp://host/a/b", "contains '/'"),
        ("tcp://host/..", "not allowed"),
        ("tor://host/pong", "no default port"),
        ("host:9000/pong", "expected SCHEME://"),
        ("1tcp://h/p", "expected SCHEME://"),
        ("unix://", "service name is empty"),
        ("unix://a/b", "contains '/'"),
    ],
)
def test_parse_uri_rejects(uri: str, detail: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_uri(uri)
    assert detail in str(info.value)
    assert repr(uri) in str(info.value)


def test_parse_connect_target() -> None:
    assert parse_connect_target("[::1]:9000") == ("::1", 9000)
    assert parse_connect_target("h:1") == ("h", 1)
    assert parse_connect_target("h", default_port=7) == ("h", 7)
    with pytest.raises(ValueError, match="missing port in 'h'"):
        parse_connect_target("h")
    with pytest.raises(ValueError, match="empty host"):
        parse_connect_target(":9000")


# --------------------------------------------------------------------------
# Service names and access policy
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a/b", "/", "a\0b", "a\nb", "\x1f", "a\x7f", "x" * 101, "é" * 51, "\udcff"],
)
def test_service_name_error_refuses(name: str) -> None:
    assert service_name_error(name)


@pytest.mark.parametrize("name", ["pong", "x" * 100, "é" * 50, "a.b", "...", "a b", "-x"])
def test_service_name_error_accepts(name: str) -> None:
    assert service_name_error(name) is None


def test_access_default_allows_unprotected() -> None:
    access = ServiceAccess([], [])
    assert access.check("pong") is None
    for name in ("ipc", "tcp", "tls", "ws", "wss"):
        reason = access.check(name)
        assert reason and "protected" in reason and f"--allow {name}" in reason


def test_access_deny_wins() -> None:
    access = ServiceAccess(["pong", "tcp"], ["pong", "t*"])
    assert "denied" in (access.check("pong") or "")
    assert "--deny t*" in (access.check("tcp") or "")


def test_access_allow_list() -> None:
    access = ServiceAccess(["pong*", "audio"], [])
    assert access.check("pong") is None
    assert access.check("pong-2") is None
    assert access.check("audio") is None
    assert "not in the allow list" in (access.check("video") or "")
    assert access.check("Pong") is not None  # case-sensitive


def test_access_protected_needs_explicit_allow() -> None:
    assert ServiceAccess(["*"]).check("tcp") is not None
    assert ServiceAccess(["**"]).check("tcp") is not None
    assert ServiceAccess(["*"]).check("pong") is None
    assert ServiceAccess(["tcp"]).check("tcp") is None
    assert ServiceAccess(["t?p"]).check("tcp") is not None  # a glob never unlocks it
    assert ServiceAccess(["*", "ipc"]).check("ipc") is None


def test_access_protect_extra_names() -> None:
    base = ServiceAccess(["*"], [])
    access = base.protect("tcp-relay", "tcp")
    assert access.protected.count("tcp") == 1
    assert base.check("tcp-relay") is None  # original unchanged
    assert "protected" in (access.check("tcp-relay") or "")
    assert ServiceAccess(["tcp-relay"]).protect("tcp-relay").check("tcp-relay") is None


def test_access_invalid_name() -> None:
    assert "contains '/'" in (ServiceAccess().check("../x") or "")
    assert "empty" in (ServiceAccess().check("") or "")


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _log(fmt: str, env: dict[str, str], verbosity: int = 0) -> str:
    stream = io.StringIO()
    setup_logging(verbosity, fmt, stream=stream, env=env)
    log = logging.getLogger("daemons.test")
    log.debug("debug line")
    log.info("hello %s", "world", extra={"peer": "127.0.0.1:1"})
    log.warning("careful")
    return stream.getvalue()


@pytest.mark.usefixtures("restore_root_logger")
def test_logging_human_with_timestamps() -> None:
    lines = _log("auto", {}).splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("INFO daemons.test: hello world peer=127.0.0.1:1")
    assert lines[0][:4].isdigit()  # timestamp first


@pytest.mark.usefixtures("restore_root_logger")
@pytest.mark.parametrize("var", ["JOURNAL_STREAM", "INVOCATION_ID"])
def test_logging_auto_under_systemd_has_no_timestamps(var: str) -> None:
    lines = _log("auto", {var: "8:12345"}).splitlines()
    assert lines == [
        "INFO daemons.test: hello world peer=127.0.0.1:1",
        "WARNING daemons.test: careful",
    ]


@pytest.mark.usefixtures("restore_root_logger")
def test_logging_journal_priority_prefix(tmp_path) -> None:
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        setup_logging(0, "auto", stream=stream, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        logging.getLogger("j").warning("w")
    assert path.read_text() == "<4>WARNING j: w\n"


@pytest.mark.usefixtures("restore_root_logger")
def test_logging_human_forced_keeps_timestamps() -> None:
    out = _log("human", {"INVOCATION_ID": "x"})
    assert out.splitlines()[0][:4].isdigit()


@pytest.mark.usefixtures("restore_root_logger")
def test_logging_json() -> None:
    lines = _log("json", {}).splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["level"] for r in records] == ["info", "warning"]
    first = records[0]
    assert first["msg"] == "hello world"
    assert first["logger"] == "daemons.test"
    assert first["peer"] == "127.0.0.1:1"
    assert first["ts"].endswith("Z") and "T" in first["ts"]


@pytest.mark.usefixtures("restore_root_logger")
def test_logging_json_exception_and_odd_extras() -> None:
    stream = io.StringIO()
    setup_logging(0, "json", stream=stream, env={})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed", extra={"obj": object(), "n": 3})
    record = json.loads(stream.getvalue())
    assert "RuntimeError: boom" in record["exc"]
    assert record["n"] == 3 and record["obj"].startswith("<object")


@pytest.mark.usefixtures("restore_root_logger")
@pytest.mark.parametrize(
    ("verbosity", "level"),
    [
        (2, logging.DEBUG),
        (1, logging.DEBUG),
        (0, logging.INFO),
        (-1, logging.WARNING),
        (-2, logging.ERROR),
    ],
)
def test_logging_levels(verbosity: int, level: int) -> None:
    setup_logging(verbosity, "human", stream=io.StringIO(), env={})
    assert logging.getLogger().level == level


@pytest.mark.usefixtures("restore_root_logger")
def test_logging_is_idempotent() -> None:
    first = setup_logging(0, "human", stream=io.StringIO(), env={})
    second = setup_logging(0, "json", stream=io.StringIO(), env={})
    handlers = logging.getLogger().handlers
    assert second in handlers and first not in handlers


def test_logging_bad_format() -> None:
    with pytest.raises(ValueError, match="auto, human, json"):
        setup_logging(0, "xml")


# --------------------------------------------------------------------------
# click options and listen_specs
# --------------------------------------------------------------------------


def test_listen_specs_precedence() -> None:
    cli = [parse_listen("127.0.0.1:1")]
    assert listen_specs(cli, {"ADDRESS": "127.0.0.1:2"}) == cli
    assert listen_specs(["[::1]:3"], {}) == [parse_listen("[::1]:3")]
    assert listen_specs([], {"ADDRESS": "127.0.0.1:2"}) == [parse_listen("127.0.0.1:2")]
    assert listen_specs([], {"ADDRESS": " a:1  b:2 "}) == [parse_listen("a:1"), parse_listen("b:2")]
    assert listen_specs([], {}) == [parse_listen(":9000")]
    assert listen_specs([], {"ADDRESS": ""}, default=":9443") == [parse_listen(":9443")]
    with pytest.raises(ValueError, match="missing port"):
        listen_specs([], {"ADDRESS": "nonsense"})


def _command() -> tuple[click.Command, list[CommonOptions]]:
    seen: list[CommonOptions] = []

    @click.command(context_settings={"auto_envvar_prefix": "IPC_TESTD"})
    @click.option("--service-name", default="tcp")
    @common_options
    def main(common: CommonOptions, service_name: str) -> None:
        """Test daemon."""
        seen.append(common)
        click.echo(service_name)

    return main, seen


def test_common_options_defaults() -> None:
    main, seen = _command()
    result = CliRunner().invoke(main, [], env={"RUNDIR": None, "ADDRESS": None})
    assert result.exit_code == 0, result.output
    (opts,) = seen
    assert opts == CommonOptions(
        listen=(),
        allow=(),
        deny=(),
        rundir=None,
        log_format="auto",
        verbose=0,
        quiet=0,
        handshake_timeout=5.0,
        max_connections=10000,
        max_message_size=16 * 1024 * 1024,
        metrics=None,
    )
    assert opts.listen_addresses(":9000", env={}) == [parse_listen(":9000")]
    assert result.output == "tcp\n"


def test_common_options_flags() -> None:
    main, seen = _command()
    args = [
        "--listen",
        ":0",
        "-l",
        "unix:/tmp/x.sock",
        "--allow",
        "pong*",
        "--deny",
        "pong-x",
        "--rundir",
        "/tmp/r",
        "--log-format",
        "json",
        "-vv",
        "-q",
        "--handshake-timeout",
        "0.5",
        "--max-connections",
        "3",
        "--max-message-size",
        "0",
        "--metrics",
        "127.0.0.1:0",
        "--service-name",
        "relay",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (opts,) = seen
    assert opts.listen == (parse_listen(":0"), parse_listen("unix:/tmp/x.sock"))
    assert (opts.allow, opts.deny, opts.rundir) == (("pong*",), ("pong-x",), Path("/tmp/r"))
    assert (opts.log_format, opts.verbosity) == ("json", 1)
    assert (opts.handshake_timeout, opts.max_connections, opts.max_message_size) == (0.5, 3, 0)
    assert opts.metrics == parse_listen("127.0.0.1:0")
    access = opts.access("relay")
    assert access.check("pong") is None
    assert access.check("pong-x") is not None
    assert access.check("relay") is not None
    assert result.output == "relay\n"


def test_common_options_env_vars() -> None:
    main, seen = _command()
    env = {
        "IPC_TESTD_LISTEN": ":1 [::1]:2",
        "IPC_TESTD_ALLOW": "a b",
        "IPC_TESTD_VERBOSE": "2",
        "IPC_TESTD_MAX_CONNECTIONS": "7",
        "RUNDIR": "/run/ipc",
        "ADDRESS": "127.0.0.1:5",
    }
    result = CliRunner().invoke(main, [], env=env)
    assert result.exit_code == 0, result.output
    (opts,) = seen
    assert opts.listen == (parse_listen(":1"), parse_listen("[::1]:2"))
    assert opts.allow == ("a", "b")
    assert (opts.verbose, opts.max_connections, opts.rundir) == (2, 7, Path("/run/ipc"))
    # --listen from the environment wins over ADDRESS
    assert opts.listen_addresses(env=env) == list(opts.listen)


def test_common_options_address_fallback() -> None:
    main, seen = _command()
    env = {"ADDRESS": "127.0.0.1:5", "IPC_TESTD_LISTEN": None}
    assert CliRunner().invoke(main, [], env=env).exit_code == 0
    assert seen[0].listen_addresses(env=env) == [parse_listen("127.0.0.1:5")]


@pytest.mark.parametrize(
    ("args", "detail"),
    [
        (["--listen", "nonsense"], "missing port"),
        (["--metrics", "::1:80"], "need brackets"),
        (["--handshake-timeout", "0"], "handshake-timeout"),
        (["--max-connections", "0"], "max-connections"),
        (["--log-format", "xml"], "log-format"),
    ],
)
def test_common_options_bad_values(args: list[str], detail: str) -> None:
    main, seen = _command()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert detail in result.output
    assert not seen


def test_common_options_help_lists_flags() -> None:
    main, _ = _command()
    result = CliRunner().invoke(main, ["--help"])
    for flag in (
        "--listen",
        "--allow",
        "--deny",
        "--rundir",
        "--log-format",
        "--verbose",
        "--quiet",
        "--handshake-timeout",
        "--max-connections",
        "--max-message-size",
        "--metrics",
    ):
        assert flag in result.output
