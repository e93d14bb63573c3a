"""The benchmark harness still runs (not a benchmark: no figure is checked)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "bench" / "c" / "build"


@pytest.fixture(scope="module")
def c_tools() -> None:
    if not ((BUILD / "loadgen").exists() and (BUILD / "echo_server").exists()):
        if shutil.which("gcc") is None or shutil.which("make") is None:
            pytest.skip("gcc/make missing: cannot build bench/c")
        out = subprocess.run(
            ["make", "-s", "-C", str(ROOT / "bench" / "c")], capture_output=True, timeout=120
        )
        if out.returncode != 0:
            pytest.skip(f"bench/c does not build here: {out.stderr.decode()[-300:]}")


@pytest.mark.timeout(100)
def test_quick_core_prints_a_table(c_tools, tmp_path):
    out_md, out_json = tmp_path / "perf.md", tmp_path / "last.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--only",
            "core",
            "--no-write",
            "--out",
            str(out_md),
            "--json",
            str(out_json),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # bench.run then stops every server it started
        stdout, stderr = proc.communicate(timeout=20)
        pytest.fail(f"bench.run --quick --only core took more than 60 s:\n{stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-2000:]
    assert "SKIPPED" not in stdout, stdout
    assert "== targets" in stdout
    for name in ("C echo_server", "ipc pongd", "100 clients", "pongd / C"):
        assert name in stdout, stdout
    assert not out_md.exists() and not out_json.exists()  # --no-write
