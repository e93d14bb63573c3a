"""The unit files in ``systemd/``: installed by ``make install``, accepted by
``systemd-analyze verify``, and hardened the way docs/deployment.md says.

``systemd-analyze verify`` checks that every ExecStart program exists, so the
units are verified as ``make install DESTDIR=... BINDIR=<this venv>`` writes
them: the same rewrite a real installation does, pointing at programs that
exist here. It runs offline and without systemd as PID 1. It reports unknown
keys and bad values as warnings with exit status 0, so any output fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BIN, ROOT

UNITS = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze")
DAEMONS = {
    "ipcd": None,
    "ipc-tcpd": "tcpd",
    "ipc-tlsd": "tlsd",
    "ipc-websocketd": "websocketd",
    "ipc-httpd": "httpd",
}  # daemon -> its socket's FileDescriptorName
TEMPLATES = ("ipc-pongd@.service", "ipc-service@.service", "ipc-exec@.service")
RUNDIR = "/run/libipc"
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> key -> every value (a key may repeat, as SystemCallFilter=)."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"{key}= appears {len(values)} times in [{section}]"
    return values[0]


def service_files() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``make install`` into a DESTDIR, programs from this venv; the unit directory."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    dest = tmp_path_factory.mktemp("destdir")
    out = subprocess.run(
        ["make", "-s", "install", f"DESTDIR={dest}", "PREFIX=/usr", f"BINDIR={BIN}"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()
    yield dest / "usr/lib/systemd/system"


def test_every_daemon_has_a_unit() -> None:
    names = {p.name for p in UNITS.iterdir()}
    for daemon, fdname in DAEMONS.items():
        assert f"{daemon}.service" in names
        if fdname:
            assert f"{daemon}.socket" in names
    assert set(TEMPLATES) <= names
    assert {"libipc.sysusers", "libipc.tmpfiles"} <= names


def test_units_run_the_projects_commands() -> None:
    """Every ExecStart names a console script of pyproject.toml (or, in the
    generic template, the instance's program)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for path in service_files():
        program = one(parse_unit(path), "ExecStart").split()[0]
        assert program.startswith("/usr/local/bin/"), path.name
        name = program.removeprefix("/usr/local/bin/")
        assert name in scripts or name == "%i", f"{path.name}: unknown program {name}"


def test_make_install_layout(installed: Path) -> None:
    dest = installed.parents[3]
    for path in [*UNITS.glob("*.service"), *UNITS.glob("*.socket")]:
        target = installed / path.name
        assert target.is_file(), target
        assert (target.stat().st_mode & 0o777) == 0o644
        assert "/usr/local/bin/" not in target.read_text()
        assert target.read_text() == path.read_text().replace("/usr/local/bin/", f"{BIN}/")
    for kind in ("sysusers", "tmpfiles"):
        conf = dest / f"usr/lib/{kind}.d/libipc.conf"
        assert conf.read_text() == (UNITS / f"libipc.{kind}").read_text()


def _verify(unit_dir: Path, names: list[str]) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", *names],
        cwd=unit_dir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "PAGER": "cat"},
    )


@needs_analyze
def test_systemd_analyze_verify(installed: Path) -> None:
    # Templates are verified through an instance (verify would otherwise make
    # up the instance "i", and ipc-service@i would run a program "i").
    # ipc-service@ipc runs "ipc", which exists.
    for template, instance in zip(TEMPLATES, ("pong", "ipc", "counter"), strict=True):
        link = installed / template.replace("@", f"@{instance}")
        if not link.exists():
            link.symlink_to(template)
    names = sorted(p.name for p in installed.iterdir() if p.name not in TEMPLATES)
    result = _verify(installed, names)
    assert result.returncode == 0 and not result.stdout and not result.stderr, (
        f"systemd-analyze verify {' '.join(names)}:\n{result.stdout}{result.stderr}"
    )


@needs_analyze
def test_systemd_analyze_verify_is_not_vacuous(installed: Path, tmp_path: Path) -> None:
    """The check above would see a mistake: a bad key, a missing program."""
    broken = tmp_path / "broken.service"
    text = (installed / "ipc-tcpd.service").read_text()
    broken.write_text(
        text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes").replace(
            "Wants=ipc-tcpd.socket", ""
        )
    )
    result = _verify(tmp_path, ["broken.service"])
    assert "NoNewPrivilege" in result.stderr
    missing = tmp_path / "missing.service"
    missing.write_text(
        text.replace(f"{BIN}/ipc-tcpd", f"{BIN}/no-such-program").replace(
            "Wants=ipc-tcpd.socket", ""
        )
    )
    assert _verify(tmp_path, ["missing.service"]).returncode != 0


@pytest.mark.parametrize("path", service_files(), ids=lambda p: p.name)
def test_service_hardening(path: Path) -> None:
    unit = parse_unit(path)
    service = unit["Service"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictNamespaces": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "UMask": "0007",
        "ReadWritePaths": RUNDIR,
        "Environment": f"RUNDIR={RUNDIR}",
    }.items():
        assert one(unit, key) == value, f"{path.name}: {key}"
    families = set(one(unit, "RestrictAddressFamilies").split())
    assert families <= {"AF_UNIX", "AF_INET", "AF_INET6"} and "AF_UNIX" in families
    assert "@system-service" in service["SystemCallFilter"]
    if "DynamicUser" in service:  # an application: its own user, the common group
        assert one(unit, "DynamicUser") == "yes"
        assert one(unit, "SupplementaryGroups") == "libipc"
        assert "RuntimeDirectory" not in service  # it would chown the shared directory
    else:  # a daemon: the dedicated user, the shared RuntimeDirectory
        assert one(unit, "User") == "libipc" and one(unit, "Group") == "libipc"
        assert one(unit, "RuntimeDirectory") == "libipc"
        assert one(unit, "RuntimeDirectoryMode") == "2770"
        assert one(unit, "RuntimeDirectoryPreserve") == "yes"  # others still use it


@pytest.mark.parametrize("daemon", DAEMONS)
def test_daemon_units_notify_and_activation(daemon: str) -> None:
    unit = parse_unit(UNITS / f"{daemon}.service")
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert re.fullmatch(r"\d+s", one(unit, "WatchdogSec"))
    assert one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Restart") == "on-failure"
    fdname = DAEMONS[daemon]
    if fdname is None:  # ipcd: Unix sockets only
        assert one(unit, "PrivateNetwork") == "yes"
        assert one(unit, "RestrictAddressFamilies") == "AF_UNIX"
        return
    assert f"{daemon}.socket" in one(unit, "Wants", "Unit")
    socket_unit = parse_unit(UNITS / f"{daemon}.socket")
    assert one(socket_unit, "FileDescriptorName", "Socket") == fdname != "metrics"
    listen = one(socket_unit, "ListenStream", "Socket")
    assert listen.startswith("127.0.0.1:"), "safe default: loopback until configured"
    assert one(socket_unit, "WantedBy", "Install") == "sockets.target"


def test_sysusers_and_tmpfiles_agree() -> None:
    sysusers = [
        line.split()
        for line in (UNITS / "libipc.sysusers").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert sysusers[0][:3] == ["u", "libipc", "-"]
    tmpfiles = [
        line.split()
        for line in (UNITS / "libipc.tmpfiles").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert tmpfiles == [["d", RUNDIR, "2770", "libipc", "libipc", "-"]]


@pytest.mark.skipif(os.geteuid() != 0, reason="creating users and chown need root")
@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles not installed",
)
def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    """Applied to an empty root: the user, the group, the setgid directory."""
    (tmp_path / "etc").mkdir()
    for argv in (
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "libipc.sysusers")],
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNITS / "libipc.tmpfiles")],
    ):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
    uid, gid = (
        int(line.split(":")[2])
        for name in ("passwd", "group")
        for line in (tmp_path / "etc" / name).read_text().splitlines()
        if line.startswith("libipc:")
    )
    st = (tmp_path / "run/libipc").stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o2770, uid, gid)


@pytest.mark.parametrize("path", service_files(), ids=lambda p: p.name)
def test_every_unit_reads_its_env_file(path: Path) -> None:
    """docs/deployment.md: settings go in /etc/libipc/<unit>.env, read by
    every unit (a template instance: ipc-pongd@pong.env)."""
    unit = parse_unit(path)
    stem = path.name.removesuffix(".service").replace("@", "@%i")
    assert one(unit, "EnvironmentFile") == f"-/etc/libipc/{stem}.env"


@pytest.mark.parametrize("path", TEMPLATES, ids=str)
def test_templates_pass_ipc_args(path: str) -> None:
    """IPC_ARGS from the env file reaches the program (unset: no argument)."""
    assert one(parse_unit(UNITS / path), "ExecStart").endswith(" $IPC_ARGS")


@pytest.mark.parametrize("path", sorted(UNITS.glob("*.socket")), ids=lambda p: p.name)
def test_socket_units_bind_before_the_address_exists(path: Path) -> None:
    """A specific ListenStream= address (a drop-in) must not fail at boot,
    when the socket units start before the network is configured."""
    assert one(parse_unit(path), "FreeBind", "Socket") == "yes"
