"""Shared fixtures: short run directories and processes that always stop."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Pki, Processes, make_pki


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
