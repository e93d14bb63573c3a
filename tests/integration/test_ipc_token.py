"""``ipc token``: the real CLI mints tokens ipc-websocketd's verifier accepts.

Every test runs the installed ``ipc`` program (a subprocess) and checks its
output with :mod:`daemons.engine.tokens`, the code the daemon uses: a token
the command prints must verify, refusals are one message and exit status 2
(bad argument) or 1 (a token refused by ``check``), never a traceback.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

from daemons.engine import tokens
from daemons.engine.tokens import TokenStatus
from tests.helpers import BIN, ROOT

pytestmark = pytest.mark.timeout(60)


def ipc(*args: str | Path, stdin: str | None = None, umask: int | None = None):
    def preexec() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.run(
        [str(BIN / "ipc"), "token", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=30,
        preexec_fn=preexec if umask is not None else None,
    )


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "token.secret"
    out = ipc("secret", path)
    assert out.returncode == 0, out.stderr
    return path


def test_secret_is_random_private_and_never_overwritten(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    out = ipc("secret", first, umask=0)  # the mode does not depend on the umask
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert ipc("secret", second).returncode == 0
    secret = tokens.load_secret_file(first)  # what ipc-websocketd --token-secret reads
    assert len(secret) >= tokens.MIN_SECRET_BYTES
    assert secret != tokens.load_secret_file(second)
    before = first.read_bytes()
    again = ipc("secret", first)
    assert again.returncode == 2
    assert "exists; not overwritten" in again.stderr and "Traceback" not in again.stderr
    assert first.read_bytes() == before


def test_new_prints_one_token_the_daemon_verifies(secret_file: Path) -> None:
    before = time.time()
    out = ipc(
        "new", "--secret-file", secret_file, "--name", "alice",
        "--service", "pong", "--service", "chat-*", "--ttl", "1h",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.count("\n") == 1 and out.stdout.startswith("v1.")
    token = out.stdout.strip()
    secret = tokens.load_secret_file(secret_file)
    now = time.time()
    for service in ("pong", "chat-7"):
        result = tokens.verify_signed(token, secret, service, now=now)
        assert result.ok, result
        assert result.name == "alice" and result.services == ("pong", "chat-*")
        assert result.expires is not None and before + 3600 - 1 <= result.expires <= now + 3600
    assert tokens.verify_signed(token, secret, "other", now=now).status is (
        TokenStatus.WRONG_SERVICE
    )
    assert tokens.verify_signed(token, b"x" * 32, "pong", now=now).status is TokenStatus.BAD
    later = tokens.verify_signed(token, secret, "pong", now=now + 3600 + 2 * tokens.DEFAULT_SKEW)
    assert later.status is TokenStatus.EXPIRED


@pytest.mark.parametrize(
    ("ttl", "seconds"), [("90s", 90), ("15m", 900), ("2d", 172800), ("45", 45)]
)
def test_ttl_units(secret_file: Path, ttl: str, seconds: int) -> None:
    before = int(time.time())
    out = ipc("new", "--secret-file", secret_file, "--name", "a", "--service", "p", "--ttl", ttl)
    assert out.returncode == 0, out.stderr
    result = tokens.verify_signed(
        out.stdout.strip(), tokens.load_secret_file(secret_file), "p", now=time.time()
    )
    assert result.expires is not None
    assert before + seconds <= result.expires <= int(time.time()) + seconds


@pytest.mark.parametrize("ttl", ["0", "0s", "367d", "-5m", "1y", "abc", "1e3", ""])
def test_ttl_out_of_bounds_is_refused(secret_file: Path, ttl: str) -> None:
    out = ipc("new", "--secret-file", secret_file, "--name", "a", "--service", "p", "--ttl", ttl)
    assert out.returncode == 2, out
    assert "--ttl" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_not_before(secret_file: Path) -> None:
    start = int(time.time()) + 7200
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
    secret = tokens.load_secret_file(secret_file)
    for when in (iso, f"@{start}"):
        out = ipc(
            "new", "--secret-file", secret_file, "--name", "a", "--service", "p",
            "--ttl", "1h", "--not-before", when,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        token = out.stdout.strip()
        early = tokens.verify_signed(token, secret, "p", now=time.time())
        assert early.status is TokenStatus.NOT_YET_VALID, early
        assert early.expires == start + 3600  # the lifetime counts from --not-before
        assert tokens.verify_signed(token, secret, "p", now=start + 10).ok
    bad = ipc(
        "new", "--secret-file", secret_file, "--name", "a", "--service", "p",
        "--not-before", "next tuesday",
    )  # fmt: skip
    assert bad.returncode == 2 and "--not-before" in bad.stderr


def test_a_secret_others_can_read_is_refused(secret_file: Path) -> None:
    secret_file.chmod(0o644)
    out = ipc("new", "--secret-file", secret_file, "--name", "a", "--service", "p")
    assert out.returncode == 2
    assert "accessible to others" in out.stderr and f"chmod o= {secret_file}" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    check = ipc("check", "--secret-file", secret_file, "v1.a.b")
    assert check.returncode == 2 and "accessible to others" in check.stderr


def test_unusable_secret_files_and_names(tmp_path: Path, secret_file: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too short\n")
    short.chmod(0o600)
    cases = [
        (["--secret-file", short, "--name", "a", "--service", "p"], "at least 32"),
        (["--secret-file", tmp_path / "none", "--name", "a", "--service", "p"], "No such file"),
        (["--secret-file", secret_file, "--name", "a b", "--service", "p"], "spaces"),
        (["--secret-file", secret_file, "--name", "a", "--service", "a/b"], "'/'"),
        (["--secret-file", secret_file, "--name", "a"], "--service"),
    ]
    for args, words in cases:
        out = ipc("new", *args)
        assert out.returncode == 2, (args, out)
        assert words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        assert out.stdout == ""


def test_check_says_whose_and_until_when(secret_file: Path) -> None:
    token = ipc(
        "new", "--secret-file", secret_file, "--name", "alice",
        "--service", "pong", "--service", "chat-*", "--ttl", "2h",
    ).stdout.strip()  # fmt: skip
    out = ipc("check", "--secret-file", secret_file, token)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "valid"
    assert "name:       alice" in lines
    assert "services:   pong, chat-*" in lines
    assert any(line.startswith("expires:") and "UTC (in 1 h 59 min)" in line for line in lines)
    assert ipc("check", "--secret-file", secret_file, "--service", "chat-1", token).returncode == 0
    piped = ipc("check", "--secret-file", secret_file, "-", stdin=token + "\n")
    assert piped.returncode == 0 and piped.stdout == out.stdout


def test_check_says_why_a_token_is_refused(secret_file: Path, tmp_path: Path) -> None:
    secret = tokens.load_secret_file(secret_file)
    good = tokens.mint(secret, "bob", ["pong"], now=time.time(), ttl=600)
    expired = tokens.mint(secret, "bob", ["pong"], now=time.time() - 7200, ttl=60)
    other = tmp_path / "other"
    assert ipc("secret", other).returncode == 0
    foreign = tokens.mint(tokens.load_secret_file(other), "eve", ["pong"], now=time.time(), ttl=60)
    payload, mac = good.split(".")[1:]
    tampered = f"v1.{payload[:-2]}AA.{mac}"
    cases = [
        (["--service", "chat"], good, "refused (wrong service, HTTP 403): token of 'bob' is not"),
        ([], expired, "refused (expired, HTTP 401): token of 'bob' expired"),
        ([], foreign, "refused (bad, HTTP 401): signed token with a wrong signature"),
        ([], tampered, "refused (bad, HTTP 401)"),
        ([], "v2.abc.def", "refused (bad, HTTP 401): unknown token version"),
    ]
    for extra, token, words in cases:
        out = ipc("check", "--secret-file", secret_file, *extra, token)
        assert out.returncode == 1, (token, out)
        assert out.stdout.startswith(words), out.stdout
        assert "Traceback" not in out.stderr
    expired_out = ipc("check", "--secret-file", secret_file, expired).stdout
    assert "name:       bob" in expired_out and " ago" in expired_out


def test_the_token_commands_are_listed() -> None:
    out = subprocess.run([str(BIN / "ipc"), "--help"], capture_output=True, text=True, timeout=30)
    assert "token" in out.stdout.split("Commands:")[1]


def test_the_documented_python_minting_verifies(secret_file: Path) -> None:
    """docs/who-is-calling.md's few lines of Python, run as shown (the path
    of the secret replaced): the daemon's verifier accepts their token."""
    page = (ROOT / "docs" / "who-is-calling.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    (snippet,) = [b for b in blocks if "def mint(" in b]
    snippet = "\n".join(line.removeprefix("   ") for line in snippet.splitlines())
    assert snippet.count('"/etc/libipc/token.secret"') == 1
    namespace: dict[str, object] = {}
    exec(snippet.replace('"/etc/libipc/token.secret"', repr(str(secret_file))), namespace)
    token = namespace["token"]
    assert isinstance(token, str)
    result = tokens.verify_signed(
        token, tokens.load_secret_file(secret_file), "chat-42", now=time.time()
    )
    assert result.ok and result.name == "alice" and result.services == ("chat-*",), result
    check = ipc("check", "--secret-file", secret_file, "--service", "chat-42", token)
    assert check.returncode == 0, check.stdout
