"""The run directory as an attacker or a second user sees it (issue 11,
items 12 and 13): real ``ipc`` processes, some under another uid (setpriv)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BIN, connectable, wait_for

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to act as another user",
)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user can traverse, for run directories of any owner."""
    path = Path(tempfile.mkdtemp(prefix="ipc-sec-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody_env(env: dict[str, str]) -> dict[str, str]:
    """What a process run as nobody gets: no coverage measurement (under
    ``make test`` it could not write its data file here, and would say so on
    stderr, which these tests read)."""
    return {k: v for k, v in env.items() if not k.startswith("COVERAGE_")}


def ipc(*args: str, rundir: Path, as_nobody: bool = False, timeout: float = 20):
    env = dict(os.environ, RUNDIR=str(rundir))
    env.pop("IPC_NETWORK", None)
    if as_nobody:
        env = as_nobody_env(env)
    cmd = [*(AS_NOBODY if as_nobody else []), str(BIN / "ipc"), *args]
    return subprocess.run(
        cmd, env=env, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def one_line_error(out: subprocess.CompletedProcess[bytes]) -> str:
    """The command failed with exactly one line on stderr and no traceback."""
    err = out.stderr.decode()
    assert out.returncode != 0, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


@needs_root
def test_root_pongd_refuses_a_rundir_made_by_another_user(base):
    run = base / "run"
    run.mkdir(mode=0o770)
    os.chown(run, NOBODY, NOBODY)
    err = one_line_error(ipc("pongd", rundir=run))
    assert "belongs to uid 65534" in err and "RUNDIR=" in err
    assert list(run.iterdir()) == []


@needs_root
def test_root_pongd_does_not_follow_a_planted_lock_link(base):
    run = base / "run"
    run.mkdir(mode=0o770)
    elsewhere = base / "created-by-root"
    (run / "pong.lock").symlink_to(elsewhere)
    err = one_line_error(ipc("pongd", rundir=run))
    assert "symbolic link" in err
    assert not elsewhere.exists()


@needs_root
def test_root_pongd_refuses_a_symlinked_rundir(base):
    target = base / "elsewhere"
    target.mkdir()
    (target / "pong").write_text("not ours to delete")
    (base / "run").symlink_to(target)
    err = one_line_error(ipc("pongd", rundir=base / "run"))
    assert "symbolic link" in err
    assert (target / "pong").read_text() == "not ours to delete"


@needs_root
def test_group_member_takes_over_a_stale_lock(base):
    """A crashed instance's lock has the sockets' mode (0660): a member of
    the run directory's group restarts the service instead of a traceback."""
    run = base / "run"
    run.mkdir()
    os.chown(run, 0, NOBODY)
    os.chmod(run, 0o2770)  # setgid: files get the group
    env = dict(os.environ, RUNDIR=str(run))
    first = subprocess.Popen([BIN / "ipc", "pongd"], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: connectable(run / "pong"), timeout=10, what="root's pongd")
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: socket and lock stay
        first.wait(timeout=5)
    assert (run / "pong.lock").stat().st_mode & 0o777 == 0o660
    second = subprocess.Popen(
        [*AS_NOBODY, BIN / "ipc", "pongd"], env=as_nobody_env(env), stderr=subprocess.PIPE
    )
    try:
        wait_for(
            lambda: second.poll() is not None or (run / "pong").stat().st_uid == NOBODY,
            timeout=10,
            what="nobody's pongd",
        )
        assert second.poll() is None, second.stderr.read().decode()
        assert connectable(run / "pong")
    finally:
        second.terminate()
        second.wait(timeout=5)
        second.stderr.close()


@needs_root
@pytest.mark.parametrize(
    "command,mode",
    [
        (["pongd"], 0o700),  # root's: nobody may not enter it
        (["pongd"], 0o711),  # enter, not list
        (["pongd"], 0o755),  # list, not write
        (["ls"], 0o700),
        (["ls"], 0o711),
        (["status"], 0o700),
        (["status"], 0o711),
    ],
)
def test_rundir_without_permission_is_one_line_not_a_traceback(base, command, mode):
    run = base / "run"
    run.mkdir()
    os.chmod(run, mode)
    err = one_line_error(ipc(*command, rundir=run, as_nobody=True))
    assert "Permission denied" in err


@pytest.mark.parametrize("command", [["pongd"], ["ls"], ["status"]])
def test_rundir_that_is_a_file_is_one_line(base, command):
    f = base / "file"
    f.write_text("x")
    one_line_error(ipc(*command, "--rundir", str(f), rundir=base))
    one_line_error(ipc(*command, rundir=f))  # through $RUNDIR too
