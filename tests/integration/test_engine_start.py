"""A failed start says what failed and leaves nothing behind (issue 11, item 14).

Real processes: the daemon must exit non-zero with one line naming the flag
and the address, and the run directory must hold none of its sockets or locks
(a stale socket file misleads clients and `ipc ls`)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.helpers import BIN, connectable, start_listening_daemon, wait_for


@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def run_to_failure(command: str, rundir, *args: str) -> str:
    """Run ``command`` expecting a quick failure; return its stderr."""
    proc = subprocess.run(
        [str(BIN / command), *args],
        env={**os.environ, "RUNDIR": str(rundir)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def leftovers(rundir) -> list[str]:
    return sorted(p.name for p in rundir.iterdir())


def test_busy_listen_port_names_the_flag_and_leaves_nothing(rundir, busy_port):
    err = run_to_failure("ipc-tcpd", rundir, "--listen", f"127.0.0.1:{busy_port}")
    assert f"ipc-tcpd: --listen 127.0.0.1:{busy_port}: address in use\n" in err, err
    assert leftovers(rundir) == []  # no tcp, tcp.ctl, tcp.lock, tcp.ctl.lock


def test_busy_metrics_port_names_the_flag_and_leaves_nothing(rundir, busy_port):
    err = run_to_failure(
        "ipc-tcpd", rundir, "--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{busy_port}"
    )
    assert f"ipc-tcpd: --metrics 127.0.0.1:{busy_port}: address in use\n" in err, err
    assert leftovers(rundir) == []


def test_websocketd_on_a_busy_port_leaves_no_ws_ctl(rundir, busy_port):
    err = run_to_failure("ipc-websocketd", rundir, "--listen", f"127.0.0.1:{busy_port}")
    assert f"--listen 127.0.0.1:{busy_port}: address in use" in err, err
    assert leftovers(rundir) == []


def test_second_instance_names_the_flag_and_leaves_the_first_alone(rundir, procs):
    start_listening_daemon(
        procs, "ipc-tcpd", "--listen", "127.0.0.1:0", env={"RUNDIR": str(rundir)}
    )
    wait_for(lambda: connectable(rundir / "tcp.ctl"), what="first ipc-tcpd")
    before = leftovers(rundir)
    err = run_to_failure("ipc-tcpd", rundir, "--listen", "127.0.0.1:0")
    assert "already running" in err and "(use --service-name to run another)" in err, err
    assert leftovers(rundir) == before
    assert connectable(rundir / "tcp") and connectable(rundir / "tcp.ctl")
    # ipcd too, and ipc-websocketd's control service names --control-name.
    ipcd = procs.start(BIN / "ipcd", env={"RUNDIR": str(rundir)})
    wait_for(lambda: connectable(rundir / "ipc.ctl") or ipcd.poll() is not None, what="ipcd")
    err = run_to_failure("ipcd", rundir)
    assert "already running" in err and "(use --service-name to run another)" in err, err
    start_listening_daemon(
        procs, "ipc-websocketd", "--listen", "127.0.0.1:0", env={"RUNDIR": str(rundir)}
    )
    err = run_to_failure("ipc-websocketd", rundir, "--listen", "127.0.0.1:0")
    assert "(use --control-name to run another)" in err, err
