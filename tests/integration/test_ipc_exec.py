"""``ipc exec``: real programs as services, real clients, real daemons.

Each test starts ``ipc exec`` as a subprocess in a fresh run directory and
talks to it over its Unix socket (a local client), through ipc-tcpd or
through ipc-websocketd (peer information as CGI variables). The programs
are real: ``cat``, bash scripts, Python scripts; the process table and
``/proc/PID/fd`` are read to prove that nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from ipc_core import encode
from tests.helpers import (
    BIN,
    LogReader,
    Processes,
    recv_exact,
    recv_msg,
    start_listening_daemon,
    wait_for,
)
from tests.integration.test_websocketd import websocketd  # noqa: F401

pytestmark = pytest.mark.timeout(90)

#: Prints its environment as one JSON line, then echoes lines.
PRINTENV = r"""#!/usr/bin/env python3
import json, os, sys
print(json.dumps(dict(os.environ)), flush=True)
for line in sys.stdin:
    print("echo:" + line.rstrip("\n"), flush=True)
"""


@dataclass
class Exec:
    """A running ``ipc exec``: its process, its log, its service."""

    proc: subprocess.Popen[bytes]
    logs: LogReader
    name: str
    rundir: Path

    def connect(self, timeout: float = 5.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(self.rundir / self.name))
        return s

    def children(self) -> list[int]:
        return children_of(self.proc.pid)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def children_of(pid: int) -> list[int]:
    """The live (or zombie) children of ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.fixture
def start_exec(rundir: Path, procs: Processes) -> Iterator[Callable[..., Exec]]:
    """``start_exec(NAME, *options, "--", PROGRAM, ARGS...)``: ipc exec, up."""

    def start(name: str, *args: str | Path, env: dict[str, str] | None = None) -> Exec:
        proc = procs.start(
            BIN / "ipc",
            "exec",
            "--rundir",
            rundir,
            name,
            *args,
            env={"RUNDIR": str(rundir), **(env or {})},
        )
        logs = LogReader(proc)
        logs.wait_for("serving")  # logged once listening (a probe would start a process)
        assert proc.poll() is None, logs.text()
        return Exec(proc, logs, name, rundir)

    yield start


def script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def ask(s: socket.socket, message: bytes) -> bytes:
    s.sendall(encode(message))
    return recv_msg(s)


def closed(s: socket.socket, timeout: float = 10.0) -> bool:
    """True once the service closed ``s`` (EOF or reset), reading what is left."""
    s.settimeout(timeout)
    with contextlib.suppress(ConnectionResetError):
        while s.recv(65536):
            pass
    return True


# --------------------------------------------------------------------- modes


def test_cat_in_line_mode_echoes_each_message_as_a_line(start_exec) -> None:
    ex = start_exec("cat", "--", "cat")
    with ex.connect() as s:
        assert ask(s, b"hello") == b"hello"
        assert ask(s, b"") == b""
        # A message with a newline is written as it is: two lines, two replies.
        s.sendall(encode(b"one\ntwo"))
        assert recv_msg(s) == b"one" and recv_msg(s) == b"two"
        big = b"x" * 200_000  # one long line, across many reads
        assert ask(s, big) == big
    with ex.connect() as a, ex.connect() as b:  # one process each
        assert ask(a, b"A") == b"A" and ask(b, b"B") == b"B"
        assert len(ex.children()) == 2


def test_framed_mode_passes_frames_through(start_exec) -> None:
    ex = start_exec("frames", "--framed", "--", "cat")
    with ex.connect() as s:
        for payload in (b"", b"a\nb", bytes(range(256)) * 100):
            assert ask(s, payload) == payload


def test_raw_mode_makes_each_read_a_message(start_exec, tmp_path: Path) -> None:
    prog = script(tmp_path, "raw.sh", "#!/bin/bash\nprintf 'no newline here'\nexec cat\n")
    ex = start_exec("raw", "--raw", "--", prog)
    with ex.connect() as s:
        assert recv_msg(s) == b"no newline here"
        assert ask(s, b"abc") == b"abc"  # the payload alone on stdin, no newline


def test_a_bash_script_with_state(start_exec, tmp_path: Path) -> None:
    prog = script(
        tmp_path,
        "count.sh",
        '#!/bin/bash\nn=0\nwhile read -r line; do n=$((n+1)); echo "$n: $line"; done\n',
    )
    ex = start_exec("bash", "--", prog)
    with ex.connect() as s:
        assert ask(s, b"a") == b"1: a"
        assert ask(s, b"b") == b"2: b"
        s.sendall(encode(b"crlf\r"))
        assert recv_msg(s) == b"3: crlf"  # a \r before the newline is dropped


def test_a_line_over_the_limit_closes_that_client(start_exec, tmp_path: Path) -> None:
    prog = script(
        tmp_path, "long.sh", '#!/bin/bash\nread -r n\nhead -c "$n" /dev/zero | tr "\\0" x\necho\n'
    )
    ex = start_exec("long", "--max-message-size", "1000", "--", prog)
    with ex.connect() as ok:
        assert ask(ok, b"1000") == b"x" * 1000
    with ex.connect() as s:
        s.sendall(encode(b"5000"))
        assert closed(s)
    ex.logs.wait_for("line of more than 1000 bytes")


# ----------------------------------------------------------------- environment


def test_a_local_client_gets_a_scrubbed_environment(start_exec, tmp_path: Path) -> None:
    prog = script(tmp_path, "printenv.py", PRINTENV.replace("python3", sys.executable, 1))
    ex = start_exec(
        "env",
        "--env",
        "GREETING=hello world",
        "--pass-env",
        "KEEP_ME",
        "--",
        prog,
        env={"SECRET_TOKEN": "hunter2", "KEEP_ME": "kept", "LD_PRELOAD": "/nope.so"},
    )
    with ex.connect() as s:
        env = json.loads(recv_msg(s))
        assert ask(s, b"hi") == b"echo:hi"
    assert env["GREETING"] == "hello world" and env["KEEP_ME"] == "kept"
    assert "SECRET_TOKEN" not in env and "LD_PRELOAD" not in env and "RUNDIR" not in env
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["IPC_SERVICE"] == "env" and env["IPC_TRANSPORT"] == "local"
    assert env["IPC_CLIENT_PID"] == str(os.getpid())
    assert "REMOTE_ADDR" not in env and "QUERY_STRING" not in env


def test_through_ipc_tcpd_the_program_sees_the_client(
    start_exec, procs: Processes, rundir: Path, tmp_path: Path
) -> None:
    prog = script(tmp_path, "printenv.py", PRINTENV.replace("python3", sys.executable, 1))
    start_exec("env", "--", prog)
    _p, _logs, port = start_listening_daemon(
        procs, "ipc-tcpd", "--listen", "127.0.0.1:0", env={"RUNDIR": str(rundir)}
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"env")
        assert recv_exact(s, 2) == b"ok"
        env = json.loads(recv_msg(s))
        assert ask(s, b"over tcp") == b"echo:over tcp"
        mine = s.getsockname()
    assert env["IPC_TRANSPORT"] == "tcp"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"] == str(mine[1])
    assert env["SERVER_PORT"] == str(port) and env["SERVER_ADDR"] == "127.0.0.1"
    assert "IPC_CLIENT_PID" not in env and "HTTPS" not in env


def test_through_ipc_tlsd_the_program_sees_the_client_certificate(
    start_exec, procs: Processes, rundir: Path, tmp_path: Path
) -> None:
    from daemons.engine import certs
    from tests.integration.test_haproxy import make_tls_files
    from tests.integration.test_peer_info_tcp import start_tlsd, tls_context

    pki = make_tls_files(tmp_path)
    prog = script(tmp_path, "printenv.py", PRINTENV.replace("python3", sys.executable, 1))
    start_exec("env", "--", prog)
    _logs, port = start_tlsd(procs, rundir, pki)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with tls_context(pki, pki.client).wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"env")
        assert recv_exact(s, 2) == b"ok"
        env = json.loads(recv_msg(s))
        version, cipher = s.version(), s.cipher()
    assert env["IPC_TRANSPORT"] == "tls" and env["HTTPS"] == "on"
    assert env["SSL_PROTOCOL"] == version and env["SSL_CIPHER"] == (cipher or ("",))[0]
    assert env["SSL_TLS_SNI"] == "localhost" and env["SERVER_NAME"] == "localhost"
    assert env["SSL_CLIENT_S_DN"] == "CN=carol" and env["SSL_CLIENT_VERIFY"] == "SUCCESS"
    assert env["SSL_CLIENT_FINGERPRINT"] == certs.fingerprint(pki.client[0])
    assert env["SSL_CLIENT_SAN_DNS_0"] == "carol.example"
    assert env["SSL_CLIENT_SAN_IPaddr_0"] == "192.0.2.77"
    assert env["SERVER_PORT"] == str(port)


def test_through_ipc_websocketd_the_program_sees_the_request(
    start_exec,
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    prog = script(tmp_path, "printenv.py", PRINTENV.replace("python3", sys.executable, 1))
    start_exec("env", "--", prog)
    tokens = tmp_path / "tokens"
    tokens.write_text("secret-token-0123456789abcdef alice env\n")
    tokens.chmod(0o600)
    daemon = websocketd("--token-file", str(tokens))
    origin = f"http://127.0.0.1:{daemon.port}"
    headers = {"Cookie": "theme=dark", "User-Agent": "test-agent/2", "Authorization": "Basic eA=="}
    url = "env?room=lobby&token=secret-token-0123456789abcdef&name=%C3%A9+x"
    with daemon.connect(url, origin=origin, additional_headers=headers) as ws:
        env = json.loads(ws.recv(timeout=5))
        ws.send("via websocket")
        assert ws.recv(timeout=5) in ("echo:via websocket", b"echo:via websocket")
    assert env["IPC_TRANSPORT"] == "ws" and env["IPC_SERVICE"] == "env"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"].isdigit()
    assert env["SERVER_PORT"] == str(daemon.port)
    assert env["PATH_INFO"] == "/env"
    assert env["QUERY_STRING"] == "room=lobby&name=%C3%A9%20x"  # the token is not passed on
    assert env["REQUEST_URI"] == "/env?room=lobby&name=%C3%A9%20x"
    assert env["HTTP_ORIGIN"] == origin
    assert env["HTTP_COOKIE"] == "theme=dark"
    assert env["HTTP_USER_AGENT"] == "test-agent/2"
    assert env["HTTP_AUTHORIZATION"] == "Basic eA==" and env["AUTH_TYPE"] == "Basic"
    assert env["IPC_TOKEN_NAME"] == "alice"
    assert "secret-token" not in json.dumps(env)


def test_reserved_or_bad_variables_are_usage_errors(rundir: Path) -> None:
    for args in (
        ["--env", "REMOTE_ADDR=1.2.3.4"],
        ["--pass-env", "HTTP_COOKIE"],
        ["--env", "NOEQUALS"],
        ["--env", "1BAD=x"],
    ):
        out = subprocess.run(
            [BIN / "ipc", "exec", "--rundir", rundir, "x", *args, "--", "cat"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 2, (args, out.stderr)
        assert b"Traceback" not in out.stderr
    assert not (rundir / "x").exists()


# ------------------------------------------------------------------- lifecycle


def test_a_program_exiting_with_an_error_closes_its_client(start_exec, tmp_path: Path) -> None:
    prog = script(tmp_path, "fail.sh", '#!/bin/bash\nread -r x\necho "bye $x"\nexit 3\n')
    ex = start_exec("fail", "--", prog)
    with ex.connect() as s:
        assert ask(s, b"now") == b"bye now"  # the last line arrives before the close
        assert closed(s)
    line = ex.logs.wait_for("exited with status 3")
    assert re.search(r"fail\.sh\[\d+\] \(local pid \d+\)", line)
    wait_for(lambda: not ex.children(), what="child reaped")


def test_stderr_goes_to_the_log_escaped_with_the_name_and_pid(start_exec, tmp_path: Path) -> None:
    prog = script(tmp_path, "warn.sh", "#!/bin/bash\necho 'careful \x1b[31mred' >&2\nexec cat\n")
    ex = start_exec("warn", "--", prog)
    with ex.connect() as s:
        assert ask(s, b"x") == b"x"
        line = ex.logs.wait_for("careful")
    assert re.search(r"warn\.sh\[\d+\]: careful \\x1b\[31mred", line), line


def test_a_program_that_cannot_run_costs_only_its_client(start_exec, tmp_path: Path) -> None:
    prog = script(tmp_path, "flaky.sh", "#!/bin/bash\nexec cat\n")
    ex = start_exec("flaky", "--", prog)
    with ex.connect() as served:
        assert ask(served, b"1") == b"1"
        prog.chmod(0o644)  # no longer executable
        with ex.connect() as s:
            assert closed(s)
        ex.logs.wait_for("cannot start")
        assert ask(served, b"2") == b"2"  # the running one is unaffected
        prog.chmod(0o755)
        with ex.connect() as s:
            assert ask(s, b"3") == b"3"


def test_leaving_closes_stdin_then_sigterm_then_sigkill(start_exec, tmp_path: Path) -> None:
    prog = script(
        tmp_path,
        "stubborn.sh",
        "#!/bin/bash\ntrap '' TERM\necho ready\nwhile true; do sleep 0.05; done\n",
    )
    ex = start_exec("stubborn", "--grace", "0.5", "--", prog)
    with ex.connect() as s:
        assert recv_msg(s) == b"ready"
        (pid,) = ex.children()
    ex.logs.wait_for("SIGTERM")
    ex.logs.wait_for("SIGKILL")
    ex.logs.wait_for("killed by SIGKILL")
    wait_for(lambda: not alive(pid) and not ex.children(), what="stubborn gone")


def test_stdin_closed_lets_a_well_behaved_program_end_at_once(start_exec, tmp_path: Path) -> None:
    ex = start_exec("cat", "--grace", "30", "--", "cat")
    with ex.connect() as s:
        assert ask(s, b"x") == b"x"
    # cat sees EOF on stdin and exits: long before the 30 s grace.
    wait_for(lambda: not ex.children(), timeout=5, what="cat gone")
    assert "SIGTERM" not in ex.logs.text()


def test_max_processes_refuses_beyond_the_limit(
    start_exec,
    websocketd,  # noqa: F811
) -> None:
    ex = start_exec("two", "--max-processes", "2", "--", "cat")
    a, b = ex.connect(), ex.connect()
    try:
        assert ask(a, b"a") == b"a"
        assert ask(b, b"b") == b"b"
        with ex.connect() as c:
            assert closed(c)
        ex.logs.wait_for("--max-processes")
        # Through ipc-websocketd the refusal is the service's: 403.
        daemon = websocketd()
        with pytest.raises(InvalidStatus) as info:
            daemon.connect("two").close()
        assert info.value.response.status_code == 403
        assert ask(a, b"still") == b"still"
    finally:
        a.close()
    wait_for(lambda: len(ex.children()) == 1, what="a's cat gone")
    with ex.connect() as c:
        assert ask(c, b"c") == b"c"
    b.close()


@pytest.mark.parametrize("handoff", ["--handoff", "--no-handoff"])
def test_max_connections_per_ip_counts_clients_through_a_daemon(
    start_exec,
    websocketd,  # noqa: F811
    handoff: str,
) -> None:
    """ipc-websocketd's own per-address cap no longer holds a handed-over
    connection: ipc exec counts programs per client address itself."""
    ex = start_exec("capped", "--max-connections-per-ip", "2", handoff, "--", "cat")
    daemon = websocketd()
    origin = f"http://127.0.0.1:{daemon.port}"
    with (
        daemon.connect("capped", origin=origin) as first,
        daemon.connect("capped", origin=origin) as second,
    ):
        for ws in (first, second):
            ws.send("hi")
            assert ws.recv(timeout=5) in (b"hi", "hi")
        with pytest.raises(InvalidStatus) as info:
            daemon.connect("capped", origin=origin).close()
        assert info.value.response.status_code == 403
        ex.logs.wait_for("--max-connections-per-ip")
        with ex.connect() as local:  # local clients are not counted
            assert ask(local, b"local") == b"local"
        first.close()
        wait_for(lambda: len(ex.children()) == 1, what="the first program gone")
        with daemon.connect("capped", origin=origin) as third:
            third.send("again")
            assert third.recv(timeout=5) in (b"again", "again")


def test_a_double_start_and_a_missing_program_exit_2(start_exec, rundir: Path) -> None:
    start_exec("busy", "--", "cat")
    out = subprocess.run(
        [BIN / "ipc", "exec", "--rundir", rundir, "busy", "--", "cat"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2 and b"already running" in out.stderr, out.stderr
    out = subprocess.run(
        [BIN / "ipc", "exec", "--rundir", rundir, "other", "--", "no-such-program-xyz"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2 and b"no-such-program-xyz" in out.stderr, out.stderr
    assert b"Traceback" not in out.stderr
    assert not (rundir / "other").exists()


def test_the_program_from_the_environment(start_exec) -> None:
    """The systemd unit's way: IPC_EXEC_PROGRAM and IPC_EXEC_ARGS (split like a shell)."""
    ex = start_exec(
        "envprog",
        env={
            "IPC_EXEC_PROGRAM": "sed",
            "IPC_EXEC_ARGS": "-u 's/a b/A B/'",
            "IPC_EXEC_GRACE": "1",
        },
    )
    with ex.connect() as s:
        assert ask(s, b"a b c") == b"A B c"


def test_sigterm_stops_the_service_and_every_program(start_exec, tmp_path: Path) -> None:
    ex = start_exec("stop", "--grace", "0.5", "--", "cat")
    with ex.connect() as a, ex.connect() as b:
        assert ask(a, b"a") == b"a" and ask(b, b"b") == b"b"
        pids = ex.children()
        assert len(pids) == 2
        ex.proc.send_signal(signal.SIGTERM)
        assert ex.proc.wait(timeout=10) == 0
    assert not any(alive(p) for p in pids)
    assert not (ex.rundir / "stop").exists() and not (ex.rundir / "stop.door").exists()


# --------------------------------------------------------- bounds and leaks


def test_thousands_of_connections_leave_no_zombie_and_no_descriptor(start_exec) -> None:
    ex = start_exec("cycles", "--", "cat")
    with ex.connect() as s:
        assert ask(s, b"warm") == b"warm"
    wait_for(lambda: not ex.children(), what="first cat gone")
    baseline = ex.fds()
    deadline = time.monotonic() + 20
    cycles = 0
    while cycles < 2000 and time.monotonic() < deadline:
        batch = [ex.connect() for _ in range(8)]
        for n, s in enumerate(batch):
            s.sendall(encode(b"%d" % n))
        for n, s in enumerate(batch):
            assert recv_msg(s) == b"%d" % n
            s.close()
        cycles += len(batch)
    assert cycles >= 1000, f"only {cycles} cycles in 20 s"
    wait_for(lambda: not ex.children(), timeout=20, what="every cat reaped")
    wait_for(lambda: ex.fds() == baseline, timeout=10, what=f"back to {baseline} descriptors")
    assert ex.proc.poll() is None


def test_a_program_that_never_reads_holds_the_client_back(start_exec) -> None:
    ex = start_exec("sleepy", "--", "sleep", "60")
    before = ex.rss_kib()
    with ex.connect() as s:
        s.setblocking(False)
        sent = 0
        chunk = encode(b"x" * 65000)
        pending = chunk
        stalled_since = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                n = s.send(pending)
                sent += n
                pending = pending[n:] or chunk  # whole frames only
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.0:
                    break
                time.sleep(0.01)
        assert stalled_since is not None, f"{sent} bytes taken without stalling"
        assert sent < 64 * 1024 * 1024
        assert ex.rss_kib() - before < 32 * 1024, "the service buffered the flood"


def test_a_program_that_floods_is_paused_while_the_client_does_not_read(
    start_exec,
) -> None:
    ex = start_exec("yes", "--", "yes", "flood")
    with ex.connect() as s:
        assert recv_msg(s) == b"flood"
        samples = []
        for _ in range(4):
            time.sleep(0.5)
            samples.append(ex.rss_kib())
        # Paused: the service's memory stays flat while nobody reads.
        assert max(samples) - min(samples) < 8 * 1024, samples
        (pid,) = ex.children()
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        assert state == "S", f"yes is {state}, not blocked in write"


def test_the_program_inherits_only_its_three_descriptors(start_exec, tmp_path: Path) -> None:
    prog = script(
        tmp_path,
        "fds.py",
        f"#!{sys.executable}\nimport os\nprint(' '.join(sorted(os.listdir('/proc/self/fd'))))\n",
    )
    ex = start_exec("fds", "--", prog)
    with ex.connect() as a, ex.connect() as b:  # a second client: nothing of the first
        for s in (a, b):
            # 3 is the directory listdir opened
            assert recv_msg(s) == b"0 1 2 3"


def test_a_background_process_holding_stdout_does_not_hold_the_client(
    start_exec, tmp_path: Path
) -> None:
    prog = script(tmp_path, "bg.sh", "#!/bin/bash\nsleep 30 &\necho $!\nexit 0\n")
    ex = start_exec("bg", "--", prog)
    with ex.connect() as s:
        background = int(recv_msg(s))
        started = time.monotonic()
        assert closed(s)
        assert time.monotonic() - started < 8
    ex.logs.wait_for("exited with status 0")
    ex.logs.wait_for("background processes still hold its output")
    wait_for(lambda: not alive(background), what="the background sleep gone")


def test_stderr_is_rate_bounded(start_exec, tmp_path: Path) -> None:
    prog = script(
        tmp_path,
        "chatty.sh",
        '#!/bin/bash\nfor i in $(seq 1 2000); do echo "noise $i" >&2; done\necho done\nexec cat\n',
    )
    ex = start_exec("chatty", "--stderr-rate", "10", "--", prog)
    with ex.connect() as s:
        assert recv_msg(s) == b"done"
        ex.logs.wait_for("lines dropped")
        assert ask(s, b"still served") == b"still served"
    logged = [line for line in ex.logs.text().splitlines() if ": noise " in line]
    assert 10 <= len(logged) <= 40, len(logged)  # 10 a second, and the run took a few


def test_out_of_descriptors_costs_only_the_new_clients(rundir: Path, procs: Processes) -> None:
    proc = procs.start(
        "prlimit", "--nofile=40:40", "--", BIN / "ipc", "exec", "--rundir", rundir,
        "tight", "--", "cat",
    )  # fmt: skip
    logs = LogReader(proc)
    logs.wait_for("serving")
    ex = Exec(proc, logs, "tight", rundir)
    clients = []
    try:
        for _ in range(30):  # 4 descriptors each: the limit is hit on the way
            clients.append(ex.connect())
        served = 0
        for n, s in enumerate(clients):
            try:
                if ask(s, b"%d" % n) == b"%d" % n:
                    served += 1
            except (OSError, EOFError):
                pass
        assert 0 < served < 30
        assert proc.poll() is None
    finally:
        for s in clients:
            s.close()
    wait_for(lambda: not children_of(proc.pid), what="every cat gone")
    with ex.connect() as s:
        assert ask(s, b"after") == b"after"
    assert "Traceback" not in logs.text()


# ------------------------------------------- --framed: the connection itself

#: Speaks LibIPC frames on fds 0/1: first a JSON frame saying what its stdin
#: is (a socket? blocking? whose? the environment), then echoes every frame.
FRAMED = r"""#!/usr/bin/env python3
import fcntl, json, os, socket, stat, struct

def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise SystemExit(0)
        data += chunk
    return data

def send(payload):
    data = struct.pack(">I", len(payload)) + payload
    while data:
        data = data[os.write(1, data):]

st = os.fstat(0)
info = {"socket": stat.S_ISSOCK(st.st_mode), "same": st.st_ino == os.fstat(1).st_ino,
        "blocking": not fcntl.fcntl(0, fcntl.F_GETFL) & os.O_NONBLOCK, "env": dict(os.environ)}
if info["socket"]:
    s = socket.socket(fileno=os.dup(0))
    cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    info["peer_pid"] = struct.unpack("3i", cred)[0]
    s.detach()
send(json.dumps(info).encode())
while True:
    (n,) = struct.unpack(">I", read_exact(4))
    send(read_exact(n))
"""


def framed_program(tmp_path: Path) -> Path:
    return script(tmp_path, "framed.py", FRAMED.replace("python3", sys.executable, 1))


def test_framed_mode_gives_the_program_the_connection_itself(start_exec, tmp_path: Path) -> None:
    ex = start_exec("direct", "--framed", "--", framed_program(tmp_path))
    with ex.connect() as s:
        info = json.loads(recv_msg(s))
        # stdin and stdout: one socket, blocking, whose other end is this client.
        assert info["socket"] and info["same"] and info["blocking"], info
        assert info["peer_pid"] == os.getpid()
        assert info["env"]["IPC_TRANSPORT"] == "local"
        assert info["env"]["IPC_CLIENT_PID"] == str(os.getpid())
        for payload in (b"", b"a\nb", bytes(range(256)) * 1000):
            assert ask(s, payload) == payload
        (pid,) = ex.children()
    # The client leaving is the program's EOF: it ends, and is reaped.
    wait_for(lambda: not ex.children() and not alive(pid), what="the program gone")
    ex.logs.wait_for("exited with status 0")


def test_framed_mode_through_ipc_tcpd(
    start_exec, procs: Processes, rundir: Path, tmp_path: Path
) -> None:
    start_exec("direct", "--framed", "--", framed_program(tmp_path))
    tcpd, _logs, port = start_listening_daemon(
        procs, "ipc-tcpd", "--listen", "127.0.0.1:0", env={"RUNDIR": str(rundir)}
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"direct")
        assert recv_exact(s, 2) == b"ok"
        info = json.loads(recv_msg(s))
        for payload in (b"over tcp", b"y" * 300_000):
            assert ask(s, payload) == payload
        mine = s.getsockname()
    assert info["socket"] and info["peer_pid"] == tcpd.pid  # the daemon's door connection
    env = info["env"]
    assert env["IPC_TRANSPORT"] == "tcp" and env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["REMOTE_PORT"] == str(mine[1]) and env["SERVER_PORT"] == str(port)


@pytest.mark.parametrize("handoff", [True, False], ids=["handed-over", "relayed"])
def test_framed_mode_through_ipc_websocketd(
    start_exec,
    websocketd,  # noqa: F811
    tmp_path: Path,
    handoff: bool,
) -> None:
    flag = "--handoff" if handoff else "--no-handoff"
    start_exec("direct", "--framed", flag, "--", framed_program(tmp_path))
    daemon = websocketd()
    with daemon.connect("direct?room=7", origin=f"http://127.0.0.1:{daemon.port}") as ws:
        info = json.loads(ws.recv(timeout=5))
        for payload in (b"binary", "text", b"z" * 200_000):
            ws.send(payload)
            got = ws.recv(timeout=5)
            assert (got if isinstance(got, bytes) else got.encode()) == (
                payload if isinstance(payload, bytes) else payload.encode()
            )
    if handoff:  # ipc exec holds the client's socket; the program has two pipes
        assert not info["socket"] and info["blocking"], info
    else:  # the program holds the daemon's door connection itself
        assert info["socket"] and info["peer_pid"] == daemon.proc.pid  # type: ignore[attr-defined]
    env = info["env"]
    assert env["IPC_TRANSPORT"] == "ws" and env["PATH_INFO"] == "/direct"
    assert env["QUERY_STRING"] == "room=7" and env["REMOTE_ADDR"] == "127.0.0.1"


def test_framed_mode_relays_a_client_whose_first_bytes_were_read(
    start_exec, rundir: Path, tmp_path: Path
) -> None:
    """A message that came with the door's offer was read by ipc exec: that
    client is relayed (its program gets a socket pair), and nothing is lost."""
    from ipc_core import door
    from tests.integration.test_peer_info_core import INFO, door_client

    ex = start_exec("direct", "--framed", "--", framed_program(tmp_path))
    with door_client(rundir, "direct", INFO, extra=encode(b"early")) as s:
        reader = door.VerdictReader()
        verdict = None
        while verdict is None:
            verdict = reader.feed(s.recv(65536))
        assert verdict.accepted
        rest = reader.leftover
        s.sendall(encode(b"later"))
        got = []
        buffered = bytearray(rest)
        while len(got) < 3:
            while len(buffered) < 4 or len(buffered) < 4 + int.from_bytes(buffered[:4], "big"):
                chunk = s.recv(65536)
                assert chunk, "closed"
                buffered += chunk
            n = int.from_bytes(buffered[:4], "big")
            got.append(bytes(buffered[4 : 4 + n]))
            del buffered[: 4 + n]
    info = json.loads(got[0])
    assert info["socket"] and info["peer_pid"] == ex.proc.pid  # relayed by ipc exec
    assert info["env"]["REMOTE_ADDR"] == INFO.client_address
    assert got[1:] == [b"early", b"later"]


def test_framed_mode_max_processes_refuses(
    start_exec,
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    ex = start_exec("one", "--framed", "--max-processes", "1", "--", framed_program(tmp_path))
    with ex.connect() as a:
        json.loads(recv_msg(a))
        with ex.connect() as b:
            assert closed(b)
        ex.logs.wait_for("--max-processes")
        daemon = websocketd()
        with pytest.raises(InvalidStatus) as info:
            daemon.connect("one").close()
        assert info.value.response.status_code == 403
        assert ask(a, b"still") == b"still"
    wait_for(lambda: not ex.children(), what="a's program gone")
    with ex.connect() as c:
        json.loads(recv_msg(c))
        assert ask(c, b"c") == b"c"


def test_framed_mode_lifecycle_exit_and_grace(start_exec, tmp_path: Path) -> None:
    # The program exiting ends the connection (ipc exec keeps no copy open).
    bye = script(tmp_path, "bye.sh", "#!/bin/bash\nprintf '\\0\\0\\0\\3bye'\nexit 3\n")
    ex = start_exec("bye", "--framed", "--", bye)
    with ex.connect() as s:
        assert recv_msg(s) == b"bye"
        assert closed(s)
    ex.logs.wait_for("exited with status 3")
    # The client leaving: the grace period, then SIGTERM, then SIGKILL.
    stubborn = script(
        tmp_path,
        "stubborn.sh",
        "#!/bin/bash\ntrap '' TERM\nprintf '\\0\\0\\0\\5ready'\nwhile true; do sleep 0.05; done\n",
    )
    ex = start_exec("stubborn", "--framed", "--grace", "0.5", "--", stubborn)
    with ex.connect() as s:
        assert recv_msg(s) == b"ready"
        (pid,) = ex.children()
    ex.logs.wait_for("SIGTERM")
    ex.logs.wait_for("killed by SIGKILL")
    wait_for(lambda: not alive(pid) and not ex.children(), what="stubborn gone")


def test_framed_mode_500_cycles_leave_no_process_and_no_descriptor(start_exec) -> None:
    ex = start_exec("cycles", "--framed", "--", "cat")
    with ex.connect() as s:
        assert ask(s, b"warm") == b"warm"
    wait_for(lambda: not ex.children(), what="first cat gone")
    baseline = ex.fds()
    cycles = 0
    deadline = time.monotonic() + 40
    while cycles < 500:
        assert time.monotonic() < deadline, f"only {cycles} cycles"
        batch = [ex.connect() for _ in range(10)]
        for n, s in enumerate(batch):
            s.sendall(encode(b"%d" % n))
        for n, s in enumerate(batch):
            assert recv_msg(s) == b"%d" % n
            s.close()
        cycles += len(batch)
    wait_for(lambda: not ex.children(), timeout=20, what="every cat reaped")
    wait_for(lambda: ex.fds() == baseline, timeout=10, what=f"back to {baseline} descriptors")
    assert ex.proc.poll() is None


def test_framed_mode_a_background_process_holding_the_connection_gets_sigterm(
    start_exec, tmp_path: Path
) -> None:
    prog = script(
        tmp_path,
        "bg.sh",
        "#!/bin/bash\nsleep 30 &\nprintf '\\0\\0\\0\\010%08d' $!\nexit 0\n",
    )
    ex = start_exec("bg", "--framed", "--", prog)
    with ex.connect() as s:
        background = int(recv_msg(s))
        started = time.monotonic()
        assert closed(s)  # the sleep held it until its SIGTERM
        assert time.monotonic() - started < 8
    ex.logs.wait_for("exited with status 0")
    ex.logs.wait_for("may still hold the connection: SIGTERM")
    wait_for(lambda: not alive(background), what="the background sleep gone")


def test_framed_mode_a_half_closing_client_gets_its_answer(start_exec, tmp_path: Path) -> None:
    """A client that shuts down its writing and waits: the program reads EOF,
    answers later than --grace, and is not stopped (the client is there)."""
    prog = script(
        tmp_path,
        "late.sh",
        "#!/bin/bash\ncat >/dev/null\nsleep 1\nprintf '\\0\\0\\0\\4late'\n",
    )
    ex = start_exec("late", "--framed", "--grace", "0.2", "--", prog)
    with ex.connect() as s:
        s.sendall(encode(b"question"))
        s.shutdown(socket.SHUT_WR)
        assert recv_msg(s) == b"late"
        assert closed(s)
    ex.logs.wait_for("exited with status 0")
    assert "SIGTERM" not in ex.logs.text()


def test_framed_mode_sigterm_stops_every_program(start_exec, tmp_path: Path) -> None:
    ex = start_exec("stopf", "--framed", "--grace", "0.5", "--", "cat")
    with ex.connect() as a, ex.connect() as b:
        assert ask(a, b"a") == b"a" and ask(b, b"b") == b"b"
        pids = ex.children()
        assert len(pids) == 2
        ex.proc.send_signal(signal.SIGTERM)
        assert ex.proc.wait(timeout=10) == 0
        assert closed(a) and closed(b)  # every copy of the connections gone
    assert not any(alive(p) for p in pids)
    assert not (ex.rundir / "stopf").exists() and not (ex.rundir / "stopf.door").exists()


def _upgrade(port: int, path: str = "/cat") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    "behind",
    [
        bytes((0x88, 0x82)) + b"\0\0\0\0" + (1000).to_bytes(2, "big"),  # a close
        bytes((0x82, 0x03)) + b"abc",  # an unmasked frame: a protocol error
    ],
    ids=["close", "unmasked"],
)
def test_a_handed_over_client_whose_request_ends_badly_costs_nothing(
    start_exec,
    websocketd,  # noqa: F811
    behind: bytes,
) -> None:
    """Bytes right behind the request reach ipc exec with the hand-off: a
    close or a bad frame there ends that client (101, then a close frame) and
    the program started for it; ipc exec serves the next one."""
    ex = start_exec("cat", "--grace", "0.5", "--", "cat")
    daemon = websocketd()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as s:
        s.sendall(_upgrade(daemon.port) + behind)
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    assert got.startswith(b"HTTP/1.1 101"), got
    head, _, frames = got.partition(b"\r\n\r\n")
    assert frames[:1] == b"\x88", got  # a close frame, then the end
    ex.logs.wait_for("WebSocket hand-off")
    wait_for(lambda: not ex.children(), what="its program gone")
    with daemon.connect("cat", origin=f"http://127.0.0.1:{daemon.port}") as ws:
        ws.send("next")
        assert ws.recv(timeout=5) in (b"next", "next")


def test_programs_inherit_nothing_ipc_exec_was_started_with(
    rundir: Path, procs: Processes, tmp_path: Path
) -> None:
    """A descriptor left open by ipc exec's parent (a shell's, a supervisor's)
    does not reach the programs: only stdin, stdout and stderr do."""
    prog = script(
        tmp_path,
        "fds.py",
        f"#!{sys.executable}\nimport os\n"
        "print(' '.join(sorted(os.listdir('/proc/self/fd'))), flush=True)\n",
    )
    leaked_r, leaked_w = os.pipe()
    try:
        proc = procs.start(
            BIN / "ipc", "exec", "--rundir", rundir, "fds", "--", prog,
            env={"RUNDIR": str(rundir)}, pass_fds=(leaked_r, leaked_w),
        )  # fmt: skip
        LogReader(proc).wait_for("serving")
    finally:
        os.close(leaked_r)
        os.close(leaked_w)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(rundir / "fds"))
        assert recv_msg(s) == b"0 1 2 3"  # 3 is the directory listdir opened
