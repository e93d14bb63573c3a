"""The `ipc` tool as a user runs it."""

from __future__ import annotations

import os
import subprocess

from tests.helpers import BIN


def run(*args, rundir, input=None, timeout=20):
    env = dict(os.environ, RUNDIR=str(rundir))
    env.pop("IPC_NETWORK", None)
    return subprocess.run(
        [BIN / "ipc", *args], env=env, input=input, capture_output=True, timeout=timeout
    )


def test_send_and_cat(rundir, procs):
    procs.pongd(rundir)
    out = run("send", "pong", "hello", rundir=rundir)
    assert out.returncode == 0 and out.stdout == b"hello\n"
    out = run("cat", "pong", rundir=rundir, input=b"one\ntwo\n\nlast")
    assert out.returncode == 0
    assert out.stdout == b"one\ntwo\n\nlast\n"


def test_cat_raw_binary(rundir, procs):
    procs.pongd(rundir)
    data = bytes(range(256)) * 1000
    out = run("cat", "--raw", "pong", rundir=rundir, input=data)
    assert out.returncode == 0 and out.stdout == data


def test_missing_service_is_a_clear_error(rundir):
    for args in (("send", "nope", "x"), ("cat", "nope")):
        out = run(*args, rundir=rundir, input=b"")
        assert out.returncode == 1
        assert b"no service 'nope'" in out.stderr


def test_ls_alive_and_stale(rundir, procs):
    import socket

    procs.pongd(rundir)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(rundir / "ghost"))
    stale.close()
    out = run("ls", rundir=rundir)
    lines = out.stdout.decode().split("\n")
    assert any(line.split() == ["pong", "alive"] for line in lines)
    assert any(line.split() == ["ghost", "stale"] for line in lines)


def test_pongd_custom_name_and_invalid_name(rundir, procs):
    procs.pongd(rundir, "echo")
    assert run("send", "echo", "x", rundir=rundir).stdout == b"x\n"
    out = run("pongd", "a/b", rundir=rundir)
    assert out.returncode == 1 and b"contains '/'" in out.stderr


def test_pongd_survives_clients_that_leave_with_messages_in_flight(rundir, procs):
    """Pipelined messages read together, then the client is gone before the
    replies: pongd died of this once ("descriptor N is not in the context")."""
    import socket

    from ipc_core import encode

    pongd = procs.pongd(rundir)
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(rundir / "pong"))
        s.sendall(encode(b"x" * 70_000) * 3)
        s.close()
    assert run("send", "pong", "still here", rundir=rundir).stdout == b"still here\n"
    assert pongd.poll() is None


def test_route_without_router_is_one_clear_line(rundir):
    env = dict(os.environ, RUNDIR=str(rundir), IPC_NETWORK="typo; pong tcp://127.0.0.1:1/pong")
    out = subprocess.run(
        [BIN / "ipc", "send", "pong", "x"], env=env, capture_output=True, timeout=20
    )
    assert out.returncode == 1
    err = out.stderr.decode()
    assert "Traceback" not in err
    assert "ignoring bad directive 'typo'" in err  # the warning, one line
    last = err.strip().splitlines()[-1]
    assert last == (
        f"Error: route for 'pong' via tcp://127.0.0.1:1/pong but no router at {rundir}/ipc:"
        " start ipcd"
    )
