"""Under CI a skip is a failure (tests/conftest.py): a test that skips because
a tool "is missing" must not hide a tool that crashes, on the machine where
everything is installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import pytest

def test_skips_at_run_time():
    pytest.skip("the tool is missing")

@pytest.mark.skipif(True, reason="a marker says so")
def test_skips_by_marker():
    pass

def test_passes():
    pass
"""


def _run_probe(ci: str | None) -> subprocess.CompletedProcess[str]:
    probe = Path(__file__).with_name(f"_probe_ci_skips_{os.getpid()}.py")
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    try:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=Path(__file__).parents[2],
            check=False,
        )
    finally:
        probe.unlink()


def test_under_ci_a_skip_fails_the_run() -> None:
    result = _run_probe("true")
    assert result.returncode == 1, result.stdout
    assert result.stdout.count("skipped under CI, where nothing may be missing") >= 2
    assert "the tool is missing" in result.stdout and "a marker says so" in result.stdout


def test_elsewhere_a_skip_stays_a_skip() -> None:
    result = _run_probe(None)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 2 skipped" in result.stdout
