import os
import socket
import stat

import pytest

from ipc_core import (
    Context,
    InvalidServiceName,
    RunDirectoryError,
    ServiceBusy,
    ServiceError,
    door_path,
    is_local_only,
    list_services,
    service_alive,
    service_marks,
)
from ipc_core.rundir import bind_service, check_rundir, validate_name


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


# ------------------------------------------------- peer-info mark and door


def test_peer_info_service_is_marked_and_has_a_door(rundir):
    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        ctx.service_init("pong")
        assert (rundir / "chat.lock").read_bytes() == b"peer-info\n"
        assert service_marks("chat", rundir) == {"peer-info"}
        assert service_marks("chat") == {"peer-info"}  # $RUNDIR by default
        assert service_marks("pong", rundir) == frozenset()
        assert not is_local_only("chat", rundir)
        assert door_path("chat", rundir) == rundir / "chat.door"
        mode = (rundir / "chat.door").stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        assert not (rundir / "pong.door").exists()


def test_a_lock_carries_both_marks_one_per_line(rundir):
    with Context() as ctx:
        ctx.service_init("both", local_only=True, peer_info=True)
        assert (rundir / "both.lock").read_bytes() == b"local-only\npeer-info\n"
        assert service_marks("both", rundir) == {"local-only", "peer-info"}
        assert is_local_only("both", rundir)


@pytest.mark.parametrize(
    ("content", "marks"),
    [
        (b"", set()),
        (b"local-only", {"local-only"}),
        (b"peer-info\nlocal-only\n", {"local-only", "peer-info"}),
        (b"Peer-Info\n\xff\n \npeer info\n", set()),
        (b"peer-info\n" + b"x" * 300, {"peer-info"}),  # a cut-off line is not a mark
    ],
)
def test_service_marks_reads_whole_lines_that_look_like_marks(rundir, content, marks):
    (rundir / "svc.lock").write_bytes(content)
    assert service_marks("svc", rundir) == marks


@pytest.mark.parametrize("name", ["missing", "", "a/b", "..", "x" * 300])
def test_service_marks_empty_without_a_readable_lock(rundir, name):
    assert service_marks(name, rundir) == frozenset()


def test_door_names_are_reserved(rundir):
    with Context() as ctx, pytest.raises(InvalidServiceName, match=r"'\.door'.*reserved"):
        ctx.service_init("chat.door")
    with pytest.raises(InvalidServiceName, match="reserved"):
        bind_service("x.door", rundir, peer_info=True)
    assert list(rundir.iterdir()) == []
    assert validate_name("chat.doors", rundir) == "chat.doors"
    with Context() as ctx:
        ctx.service_init("chat.doors")  # only the exact suffix is reserved


def test_list_services_does_not_list_doors(rundir):
    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        assert list_services(rundir) == [("chat", True)]


def test_close_removes_the_door_before_the_lock(rundir):
    with Context() as ctx:
        fd = ctx.service_init("chat", peer_info=True)
        door_fds = set(ctx.descriptors) - {fd}
        assert len(door_fds) == 1
        ctx.close(fd)
        assert sorted(p.name for p in rundir.iterdir()) == []
        assert ctx.descriptors == []  # the door's listener went with the service
        assert not service_alive("chat", rundir)
        ctx.service_init("chat", peer_info=True)  # and the name is free again
        assert (rundir / "chat.door").exists()


def test_service_socket_close_removes_the_door(rundir):
    svc = bind_service("chat", rundir, peer_info=True)
    assert svc.door is not None and svc.door_path == rundir / "chat.door"
    svc.close()
    assert list(rundir.iterdir()) == []


def _stale(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def test_stale_door_is_replaced(rundir):
    # A crashed peer-info instance leaves its marked lock and both sockets.
    _stale(rundir / "chat")
    _stale(rundir / "chat.door")
    (rundir / "chat.lock").write_bytes(b"peer-info\n")
    stale_ino = (rundir / "chat.door").stat().st_ino
    with Context() as ctx:
        ctx.service_init("chat", peer_info=True)
        assert (rundir / "chat.door").stat().st_ino != stale_ino
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(rundir / "chat.door"))  # a live door now
        probe.close()


def test_plain_service_taking_over_drops_the_mark_and_the_stale_door(rundir):
    _stale(rundir / "chat")
    _stale(rundir / "chat.door")
    (rundir / "chat.lock").write_bytes(b"local-only\npeer-info\n")
    with Context() as ctx:
        ctx.service_init("chat")
        assert service_marks("chat", rundir) == frozenset()
        assert not (rundir / "chat.door").exists()
        assert sorted(p.name for p in rundir.iterdir()) == ["chat", "chat.lock"]


def test_door_path_that_is_not_a_socket(rundir):
    (rundir / "chat.door").write_text("someone else's")
    # a plain service does not need the path: it leaves it alone
    with Context() as ctx:
        ctx.service_init("chat")
    assert (rundir / "chat.door").read_text() == "someone else's"
    # a peer-info service needs it: refused, nothing removed, lock released
    with pytest.raises(ServiceError, match="not a socket"):
        bind_service("chat", rundir, peer_info=True)
    assert (rundir / "chat.door").read_text() == "someone else's"
    assert not service_alive("chat", rundir)


def test_a_refused_peer_info_service_leaves_no_door(rundir):
    (rundir / "chat").write_text("in the way")
    with pytest.raises(ServiceError, match="not a socket"):
        bind_service("chat", rundir, peer_info=True)
    assert not (rundir / "chat.door").exists()
    assert not service_alive("chat", rundir)


def test_close_leaves_a_replaced_door_path_alone(rundir):
    svc = bind_service("chat", rundir, peer_info=True)
    os.unlink(rundir / "chat.door")
    (rundir / "chat.door").write_text("someone else's")
    svc.close()
    assert (rundir / "chat.door").read_text() == "someone else's"


# ---------------------------------------------------- run directory safety


NOBODY = 65534


def test_check_rundir_owner_rule(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o770)
    os.chown(d, NOBODY, NOBODY)
    info = os.stat(d)
    check_rundir(info, d, uid=NOBODY)  # our own
    with pytest.raises(RunDirectoryError, match=r"belongs to uid 65534.*RUNDIR="):
        check_rundir(info, d, uid=1000)  # another non-root user's
    os.chown(d, 0, 0)
    check_rundir(os.stat(d), d, uid=NOBODY)  # root's is fine for anyone


@pytest.mark.parametrize(
    "mode,ok",
    [(0o700, True), (0o770, True), (0o2770, True), (0o777, False), (0o1777, False), (0o772, False)],
)
def test_check_rundir_mode_rule(tmp_path, mode, ok):
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, mode)
    if ok:
        check_rundir(os.stat(d), d)
    else:
        with pytest.raises(RunDirectoryError, match=r"writable by others.*RUNDIR="):
            check_rundir(os.stat(d), d)


def test_service_refuses_a_rundir_owned_by_another_user(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o770)
    os.chown(d, NOBODY, NOBODY)
    with Context(rundir_path=d) as ctx, pytest.raises(RunDirectoryError, match="belongs to uid"):
        ctx.service_init("pong")
    assert not (d / "pong.lock").exists()


def test_service_refuses_an_other_writable_rundir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(RunDirectoryError, match="writable by others"):
        bind_service("pong", d)
    assert list(d.iterdir()) == []


def test_symlinked_rundir_refused_and_nothing_deleted_behind_it(tmp_path):
    # The reproduction: a run directory that is a link made root's service
    # delete a socket elsewhere. Now nothing behind the link is touched.
    target = tmp_path / "victim"
    target.mkdir()
    victim = socket.socket(socket.AF_UNIX)
    victim.bind(str(target / "pong"))
    link = tmp_path / "run"
    link.symlink_to(target)
    try:
        with pytest.raises(RunDirectoryError, match=r"symbolic link.*RUNDIR="):
            bind_service("pong", link)
        assert stat.S_ISSOCK((target / "pong").lstat().st_mode)
        assert not (target / "pong.lock").exists()
    finally:
        victim.close()


def test_created_rundir_is_exactly_0770_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        svc = bind_service("pong", tmp_path / "a" / "run")
    finally:
        os.umask(old)
    svc.close()
    assert stat.S_IMODE((tmp_path / "a" / "run").stat().st_mode) == 0o770


def test_rundir_that_is_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirectoryError, match="not a directory"):
        bind_service("pong", f)


def test_planted_lock_symlink_is_refused_not_followed(rundir, tmp_path):
    # The reproduction: a planted pong.lock link made root create a file elsewhere.
    elsewhere = tmp_path / "created-elsewhere"
    (rundir / "pong.lock").symlink_to(elsewhere)
    with pytest.raises(ServiceError, match="symbolic link"):
        bind_service("pong", rundir)
    assert not elsewhere.exists()


@pytest.mark.parametrize("kind", ["file", "symlink", "dir"])
def test_only_a_stale_socket_is_unlinked(rundir, tmp_path, kind):
    path = rundir / "pong"
    keep = tmp_path / "keep"
    keep.write_text("data")
    if kind == "file":
        path.write_text("not a socket")
    elif kind == "symlink":
        path.symlink_to(keep)
    else:
        path.mkdir()
    with pytest.raises(ServiceError, match="not a socket"):
        bind_service("pong", rundir)
    assert os.path.lexists(path) and keep.read_text() == "data"


def test_close_leaves_a_replaced_socket_path_alone(rundir):
    svc = bind_service("pong", rundir)
    os.unlink(rundir / "pong")
    (rundir / "pong").write_text("someone else's")
    svc.close()
    assert (rundir / "pong").read_text() == "someone else's"


def test_list_services_unreadable_rundir_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirectoryError, match="not a directory"):
        list_services(f)


def test_extra_marks_are_written_and_checked(tmp_path):
    import pytest as _pytest

    from ipc_core import UsageError, service_marks
    from ipc_core.rundir import bind_service

    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    service = bind_service("out", d, local_only=True, marks=("hands-over",))
    try:
        assert service_marks("out", d) == frozenset({"local-only", "hands-over"})
    finally:
        service.close()
    for bad in ("Bad", "a b", "x\n", ""):
        with _pytest.raises(UsageError):
            bind_service("out2", d, marks=(bad,))
