"""Shared fixtures: short run directories and processes that always stop."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Pki, Processes, make_pki


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """Under CI (``CI=true``, as ``.ci/run`` runs) a skip is a failure.

    CI's machine is the reference: ``./dev.sh test`` installs every tool a
    test needs (Chromium, systemd, iproute2, openssl, gcc) and runs as root,
    so a skip there can only hide something broken (a tool that crashes at
    start looks like a missing one). On a developer's machine skips stay
    skips, and ``-ra`` lists them.
    """
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    if call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception):
        reason = str(call.excinfo.value)
        call.excinfo = None
        try:
            pytest.fail(f"skipped under CI, where nothing may be missing: {reason}")
        except pytest.fail.Exception:
            call.excinfo = pytest.ExceptionInfo.from_current()


@pytest.fixture
def rundir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh, short run directory (socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ipc-", dir="/tmp"))
    monkeypatch.setenv("RUNDIR", str(path))
    monkeypatch.delenv("IPC_NETWORK", raising=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def procs() -> Iterator[Processes]:
    p = Processes()
    yield p
    p.stop_all()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a localhost server certificate, made once per test session."""
    return make_pki(tmp_path_factory.mktemp("pki"))
