import os
import socket
import stat

import pytest

from ipc_core import (
    Context,
    InvalidServiceName,
    ServiceBusy,
    is_local_only,
    list_services,
    service_alive,
)
from ipc_core.rundir import bind_service, validate_name


@pytest.mark.parametrize("name", ["", "a/b", "nul\0", ".", "..", "x" * 200, "tab\tname"])
def test_invalid_names_are_refused(rundir, name):
    with pytest.raises(InvalidServiceName):
        validate_name(name, rundir)
    with Context() as ctx, pytest.raises(InvalidServiceName):
        ctx.service_init(name)


@pytest.mark.parametrize("name", ["pong", "audio-1", "a.b", "ws_x"])
def test_valid_names(rundir, name):
    assert validate_name(name, rundir) == name


def test_rundir_created_0770_and_socket_0660(rundir):
    sub = rundir / "nested"
    with Context(rundir_path=sub) as ctx:
        ctx.service_init("pong")
        assert stat.S_IMODE(sub.stat().st_mode) == 0o770
        mode = (sub / "pong").stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660


def test_double_start_refused_with_clear_error(rundir):
    with Context() as a, Context() as b:
        a.service_init("pong")
        with pytest.raises(ServiceBusy, match="already running"):
            b.service_init("pong")
        assert service_alive("pong", rundir)


def test_stale_socket_is_replaced(rundir):
    # A crashed instance leaves a socket file behind but no lock holder.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(rundir / "pong"))
    stale.close()
    assert list_services(rundir) == [("pong", False)]
    with Context() as ctx:
        ctx.service_init("pong")
        assert list_services(rundir) == [("pong", True)]


def test_close_removes_socket_and_lock(rundir):
    with Context() as ctx:
        fd = ctx.service_init("pong")
        assert (rundir / "pong").exists()
        ctx.close(fd)
        assert not (rundir / "pong").exists()
        assert not (rundir / "pong.lock").exists()
        assert not service_alive("pong", rundir)


def test_restart_after_close(rundir):
    for _ in range(3):
        svc = bind_service("pong", rundir)
        svc.close()


# ------------------------------------------------------------ local-only mark


def test_local_only_service_is_marked_in_its_lock(rundir):
    with Context() as ctx:
        ctx.service_init("ipc", local_only=True)
        ctx.service_init("pong")
        assert (rundir / "ipc.lock").read_bytes() == b"local-only\n"
        assert (rundir / "pong.lock").read_bytes() == b""
        assert is_local_only("ipc", rundir)
        assert is_local_only("ipc")  # $RUNDIR by default
        assert not is_local_only("pong", rundir)


def test_normal_service_taking_over_a_name_clears_the_mark(rundir):
    # A crashed local-only instance leaves its marked lock behind.
    (rundir / "pong.lock").write_bytes(b"local-only\n")
    assert is_local_only("pong", rundir)
    with Context() as ctx:
        ctx.service_init("pong")
        assert not is_local_only("pong", rundir)
        assert (rundir / "pong.lock").read_bytes() == b""


def test_local_only_service_taking_over_truncates_old_content(rundir):
    (rundir / "ipc.lock").write_bytes(b"x" * 100)
    svc = bind_service("ipc", rundir, local_only=True)
    try:
        assert (rundir / "ipc.lock").read_bytes() == b"local-only\n"
    finally:
        svc.close()


@pytest.mark.parametrize("name", ["missing", "", "a/b", "..", "x" * 300])
def test_is_local_only_false_without_a_readable_lock(rundir, name):
    assert is_local_only(name, rundir) is False


def test_is_local_only_ignores_links_and_fifos(rundir, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"local-only\n")
    (rundir / "a.lock").symlink_to(target)
    os.mkfifo(rundir / "b.lock")  # O_NONBLOCK: no hang on a FIFO without writer
    assert is_local_only("a", rundir) is False
    assert is_local_only("b", rundir) is False


def test_lock_gets_the_sockets_mode_whatever_the_umask(rundir):
    old = os.umask(0o077)
    try:
        svc = bind_service("pong", rundir)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE((rundir / "pong.lock").stat().st_mode) == 0o660
    finally:
        svc.close()
