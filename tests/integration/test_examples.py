"""The examples the docs show must run as shown."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import ROOT, connectable, wait_for


def test_upper_service_and_client(rundir, procs):
    env = {"RUNDIR": str(rundir), "PYTHONPATH": str(ROOT)}
    service = procs.start(sys.executable, ROOT / "examples" / "upper_service.py", env=env)
    wait_for(lambda: connectable(rundir / "upper") or service.poll() is not None, what="upper")
    out = subprocess.run(
        [sys.executable, ROOT / "examples" / "upper_client.py", "hello", "world"],
        env=dict(os.environ, **env),
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"HELLO\nWORLD\n"
    service.terminate()
    assert service.wait(5) == 0
    assert not (rundir / "upper").exists()
