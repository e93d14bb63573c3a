"""ipc-websocketd --token-file / --token-secret end to end: real processes on
127.0.0.1, a websockets client, ipc pongd. A token is checked before the
upgrade (401 missing/bad/expired, 403 another service), wherever the browser
put it (query, cookie, subprotocol), reloaded on SIGHUP, and never logged."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from daemons.engine.tokens import mint
from tests.helpers import BIN, Processes
from tests.integration.test_websocketd import (  # noqa: F401
    WsDaemon,
    echo,
    http_get,
    still_serves,
    websocketd,
)

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefghi"
CAROL = "carol-token-0123456789abcdefg"
SECRET = b"0123456789abcdef0123456789abcdef-secret"


def private(path: Path, data: str | bytes) -> Path:
    """A file only its owner reads (the loaders refuse others' access)."""
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)
    return path


@pytest.fixture
def token_files(tmp_path: Path) -> tuple[Path, Path]:
    tokens = private(
        tmp_path / "tokens",
        f"# TOKEN NAME SERVICES\n{ALICE} alice pong\n{BOB} bob other,chat-*\n",
    )
    secret = private(tmp_path / "secret", SECRET + b"\n")
    return tokens, secret


def status_of(daemon: WsDaemon, service: str = "pong", **kwargs: object) -> int:
    with pytest.raises(InvalidStatus) as caught:
        daemon.connect(service, **kwargs)
    return caught.value.response.status_code


def test_missing_bad_expired_or_misplaced_tokens_are_refused_before_the_upgrade(
    websocketd,  # noqa: F811
    token_files: tuple[Path, Path],
) -> None:
    tokens, secret = token_files
    daemon = websocketd("--token-file", str(tokens), "--token-secret", str(secret))
    # One client in, and it stays unaffected by the refusals around it.
    with daemon.connect(f"pong?token={ALICE}") as ws:
        assert status_of(daemon) == 401
        daemon.wait_log(r"WARNING .*: 401 for service 'pong': missing: no token")
        assert status_of(daemon, "pong?token=nobody-has-this-token-000") == 401
        daemon.wait_log(r"401 for service 'pong': bad: unknown token \(token in the query\)")
        # A signed token whose lifetime (1 s) ended an hour ago, beyond the skew.
        expired = mint(SECRET, "carol", ["pong"], now=time.time() - 3600, ttl=1)
        assert status_of(daemon, f"pong?token={expired}") == 401
        daemon.wait_log(r"401 for service 'pong': expired: token of 'carol' expired \d+ s ago")
        forged = mint(b"another secret of 32 bytes or more", "mallory", ["pong"], now=0, ttl=9e9)
        assert status_of(daemon, f"pong?token={forged}") == 401
        daemon.wait_log(r"401 .*wrong signature")
        # Valid, but for other services: 403.
        assert status_of(daemon, f"pong?token={BOB}") == 403
        daemon.wait_log(r"403 for service 'pong': wrong service: token of 'bob' is not for")
        assert echo(ws, b"still here") == b"still here"
    # The refusal comes before the service is looked up: no token, no probing.
    assert status_of(daemon, "no-such-service") == 401
    log = daemon.log
    for secret_text in (ALICE, BOB, expired, forged):
        assert secret_text not in log


def test_a_valid_token_in_the_query_the_cookie_or_a_subprotocol(
    websocketd,  # noqa: F811
    token_files: tuple[Path, Path],
) -> None:
    tokens, secret = token_files
    daemon = websocketd("--token-file", str(tokens), "--token-secret", str(secret))
    with daemon.connect(f"pong?token={ALICE}") as ws:
        assert echo(ws, b"query") == b"query"
    with daemon.connect(additional_headers={"Cookie": f"theme=dark; ipc_token={ALICE}"}) as ws:
        assert echo(ws, b"cookie") == b"cookie"
    entry = f"ipc.token.{ALICE}"
    with daemon.connect(subprotocols=[entry]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == entry  # selected: a browser fails the connection otherwise
        assert echo(ws, b"subprotocol") == b"subprotocol"
    with daemon.connect(subprotocols=["chat.v2", entry]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat.v2"  # another offered one is selected instead
    signed = mint(SECRET, "dave", ["pong"], now=time.time(), ttl=300)
    with daemon.connect(f"pong?token={signed}") as ws:
        assert echo(ws, b"signed") == b"signed"
    # The page that asks for a token loads without one.
    status, _headers, body = http_get(daemon.http("/"))
    assert status == 200 and b"<html" in body.lower()


def test_a_token_narrows_allow_never_widens_it(
    websocketd,  # noqa: F811
    procs: Processes,
    rundir: Path,
    token_files: tuple[Path, Path],
) -> None:
    procs.pongd(rundir, "other")
    tokens, _secret = token_files
    daemon = websocketd("--token-file", str(tokens), "--allow", "pong")
    # bob's token is for "other", which runs; --allow pong still refuses it (404).
    assert status_of(daemon, f"other?token={BOB}") == 404
    daemon.wait_log(r"service 'other' is not in the allow list")
    with daemon.connect(f"pong?token={ALICE}") as ws:
        assert echo(ws, b"allowed") == b"allowed"


def test_sighup_reloads_the_token_file_and_a_broken_file_keeps_the_old_table(
    websocketd,  # noqa: F811
    token_files: tuple[Path, Path],
) -> None:
    tokens, _secret = token_files
    daemon = websocketd("--token-file", str(tokens))
    with daemon.connect(f"pong?token={ALICE}") as ws:
        assert echo(ws, b"before") == b"before"
    assert status_of(daemon, f"pong?token={CAROL}") == 401
    private(tokens, f"{CAROL} carol pong\n")  # alice removed, carol added
    daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[attr-defined]
    daemon.wait_log(r"reloaded 1 token from ")
    with daemon.connect(f"pong?token={CAROL}") as ws:
        assert echo(ws, b"new token") == b"new token"
    assert status_of(daemon, f"pong?token={ALICE}") == 401
    # A broken file: every problem logged with its line, the old table kept.
    private(tokens, f"{ALICE} alice\nshort bob pong\n")
    daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[attr-defined]
    daemon.wait_log(r"ERROR .*token reload failed, keeping the previous tokens: .*line 1: .*line 2")
    with daemon.connect(f"pong?token={CAROL}") as ws:
        assert echo(ws, b"kept") == b"kept"
    # A file others may read is refused too.
    private(tokens, f"{ALICE} alice pong\n").chmod(0o644)
    daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[attr-defined]
    daemon.wait_log(r"token reload failed, keeping the previous tokens: .*accessible to others")
    with daemon.connect(f"pong?token={CAROL}") as ws:
        assert echo(ws, b"kept again") == b"kept again"
    assert ALICE not in daemon.log and CAROL not in daemon.log


def test_the_token_is_never_logged_even_with_every_frame_logged(
    websocketd,  # noqa: F811
    token_files: tuple[Path, Path],
) -> None:
    tokens, secret = token_files
    daemon = websocketd("--token-file", str(tokens), "--token-secret", str(secret), "-vv")
    signed = mint(SECRET, "dave", ["pong"], now=time.time(), ttl=300)
    with daemon.connect(f"pong?a=1&token={ALICE}") as ws:
        assert echo(ws, b"q") == b"q"
    with daemon.connect(additional_headers={"Cookie": f"ipc_token={signed}"}) as ws:
        assert echo(ws, b"c") == b"c"
    with daemon.connect(subprotocols=[f"ipc.token.{ALICE}"]) as ws:  # type: ignore[list-item]
        assert echo(ws, b"s") == b"s"
    assert status_of(daemon, f"pong?token={BOB}") == 403
    status, _headers, _body = http_get(daemon.http(f"/?token={ALICE}"))  # the page's own URL
    assert status == 200
    daemon.wait_log(r"HTTP GET '/' -> 200")
    daemon.wait_log(r"< GET /pong\?a=1&token=\(token removed\)")  # websockets' own line
    log = daemon.log
    for secret_text in (ALICE, BOB, signed):
        assert secret_text not in log


@pytest.mark.parametrize(
    ("flag", "content", "mode", "words"),
    [
        ("--token-file", None, 0o600, "No such file"),
        ("--token-file", f"{ALICE} alice pong\n", 0o644, "accessible to others"),
        ("--token-file", "tooshort alice pong\n", 0o600, "line 1"),
        ("--token-secret", "short\n", 0o600, "at least 32"),
    ],
)
def test_a_bad_token_or_secret_file_at_start_is_a_usage_error(
    rundir: Path, tmp_path: Path, flag: str, content: str | None, mode: int, words: str
) -> None:
    path = tmp_path / "file"
    if content is not None:
        private(path, content).chmod(mode)
    result = subprocess.run(
        [BIN / "ipc-websocketd", "--listen", "127.0.0.1:0", flag, str(path)],
        capture_output=True,
        timeout=10,
        env={"RUNDIR": str(rundir), "PATH": "/usr/bin:/bin"},
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert flag in stderr and words in stderr
    assert "Traceback" not in stderr and ALICE not in stderr
