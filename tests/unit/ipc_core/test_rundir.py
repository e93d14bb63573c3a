import socket
import stat

import pytest

from ipc_core import Context, InvalidServiceName, ServiceBusy, list_services, service_alive
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
