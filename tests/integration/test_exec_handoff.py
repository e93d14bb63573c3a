"""``ipc exec`` taking WebSocket connections over from ipc-websocketd (issue 15).

ipc-websocketd gives an undecided WebSocket connection to a service whose
lock carries ``handoff-websocket``; ``ipc exec`` answers the 101 itself and
relays between the client's socket and the program's two pipes
(daemons/engine/piperelay.py). Everything here is end to end: real
ipc-websocketd and ``ipc exec`` processes, real programs, websockets
clients or hand-written ones on 127.0.0.1; /proc tells whether a program
runs, is a zombie, blocks, and how many descriptors ``ipc exec`` holds.

Whether a connection was handed over is read from two places: the daemon's
log (``-> 'NAME' handed over``) and the program itself (a probe says whether
its stdin and stdout are pipes: relayed programs get a socket).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode

from ipc_core import encode
from tests.helpers import BIN, recv_msg, wait_for
from tests.integration.test_ipc_exec import (  # noqa: F401  (start_exec: a fixture)
    PRINTENV,
    alive,
    framed_program,
    script,
    start_exec,
)
from tests.integration.test_websocketd import (  # noqa: F401  (websocketd: a fixture)
    WsDaemon,
    raw_upgrade,
    websocketd,
)

pytestmark = pytest.mark.timeout(120)

#: Says what its stdin and stdout are and its environment (one JSON line),
#: then echoes each line with a prefix.
PROBE = r"""#!PYTHON
import json, os, stat, sys
def kind(fd):
    mode = os.fstat(fd).st_mode
    return "fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "other"
print(json.dumps({"stdin": kind(0), "stdout": kind(1), "env": dict(os.environ)}), flush=True)
for line in sys.stdin:
    print("echo:" + line.rstrip("\n"), flush=True)
"""


def probe(tmp_path: Path) -> Path:
    return script(tmp_path, "probe.py", PROBE.replace("PYTHON", sys.executable, 1))


def handoffs(daemon: WsDaemon, service: str) -> int:
    """How many connections ipc-websocketd says it handed to ``service``."""
    return daemon.log.count(f"-> {service!r} handed over")


def as_bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


def recv(ws, timeout: float = 10) -> bytes:
    return as_bytes(ws.recv(timeout=timeout))


def close_code(ws, timeout: float = 10) -> int | None:
    """Read until the connection closes; the close code the server sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=timeout)
    return None if info.value.rcvd is None else info.value.rcvd.code


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def frame(payload: bytes, opcode: Opcode = Opcode.BINARY) -> bytes:
    """One masked client frame."""
    return Frame(opcode, payload).serialize(mask=True)


class FrameReader:
    """Server frames from a raw socket, one at a time: (opcode, payload)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock, self.buf = sock, bytearray()
        sock.settimeout(timeout)

    def next(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 2:
                n, at = self.buf[1] & 0x7F, 2
                if n == 126:
                    n, at = int.from_bytes(self.buf[2:4], "big"), 4
                elif n == 127:
                    n, at = int.from_bytes(self.buf[2:10], "big"), 10
                if len(self.buf) >= at + n:
                    opcode, payload = self.buf[0] & 0x0F, bytes(self.buf[at : at + n])
                    del self.buf[: at + n]
                    return opcode, payload
            chunk = self.sock.recv(1 << 20)
            assert chunk, "closed by ipc exec"
            self.buf += chunk


def read_frames(sock: socket.socket, timeout: float) -> tuple[list[tuple[int, bytes]], float]:
    """Unmasked server frames until EOF (or a reset): their (opcode, payload),
    and when the end came (time.monotonic())."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    ended = time.monotonic()
    frames = []
    while len(data) >= 2:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        at = 2
        if n == 126:
            (n,) = struct.unpack_from(">H", data, 2)
            at = 4
        elif n == 127:
            (n,) = struct.unpack_from(">Q", data, 2)
            at = 10
        frames.append((opcode, data[at : at + n]))
        data = data[at + n :]
    return frames, ended


# ----------------------------------------------------------- modes, echo


@pytest.mark.parametrize("mode", ["line", "raw", "framed"])
def test_echo_through_the_handoff(start_exec, websocketd, mode: str) -> None:  # noqa: F811
    flags = {"line": (), "raw": ("--raw",), "framed": ("--framed",)}[mode]
    ex = start_exec("echo", *flags, "--", "cat")
    daemon = websocketd()
    big = os.urandom(100_000).hex().encode()  # 200 KB, no newline: one line
    with daemon.connect("echo") as ws:
        assert recv_after(ws, "hello") == b"hello"
        assert recv_after(ws, "héllo wörld ✓") == "héllo wörld ✓".encode()
        assert recv_after(ws, b"bin\x00\xffary") == b"bin\x00\xffary"
        if mode == "line":  # one message per line, each way
            ws.send(b"one\ntwo")
            assert recv(ws) == b"one" and recv(ws) == b"two"
        else:  # raw and framed: the message as it is
            assert recv_after(ws, b"one\ntwo") == b"one\ntwo"
        ws.send(big)  # bigger than a pipe buffer, both ways
        got = recv(ws)
        while mode == "raw" and len(got) < len(big):  # raw: each read a message
            got += recv(ws)
        assert got == big
        ws.send([b"frag", b"", b"men", b"ted"])  # a fragmented message: one message
        got = recv(ws)
        while mode == "raw" and len(got) < len(b"fragmented"):
            got += recv(ws)
        assert got == b"fragmented"
        assert ws.ping(b"are you there").wait(5)  # answered by ipc exec's layer
        assert recv_after(ws, b"after") == b"after"
    assert handoffs(daemon, "echo") == 1
    wait_for(lambda: not ex.children(), what="cat gone")


def recv_after(ws, message: str | bytes) -> bytes:
    ws.send(message)
    return recv(ws)


def test_many_messages_pipelined_keep_their_order(start_exec, websocketd) -> None:  # noqa: F811
    ex = start_exec("echo", "--", "cat")
    daemon = websocketd()
    with daemon.connect("echo") as ws:
        for i in range(2000):
            ws.send(b"m%d" % i)
        for i in range(2000):
            assert recv(ws) == b"m%d" % i
    assert handoffs(daemon, "echo") == 1
    wait_for(lambda: not ex.children(), what="cat gone")


def test_many_clients_at_once_each_get_their_own_replies(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
) -> None:
    ex = start_exec("many", "--raw", "--", "cat")
    daemon = websocketd()
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(daemon.connect("many")) for _ in range(30)]
        for round_ in range(10):
            for n, ws in enumerate(clients):
                ws.send(b"%d:%d" % (n, round_))
            for n, ws in enumerate(clients):
                assert recv(ws) == b"%d:%d" % (n, round_)
        assert len(ex.children()) == 30
    assert handoffs(daemon, "many") == 30
    wait_for(lambda: not ex.children(), what="every cat gone")


# ------------------------------------------------------- handed over or not


def test_the_program_gets_two_pipes_when_handed_over(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    start_exec("probe", "--", probe(tmp_path))
    daemon = websocketd()
    with daemon.connect("probe") as ws:
        info = json.loads(recv(ws))
        assert recv_after(ws, "x") == b"echo:x"
    assert info["stdin"] == "fifo" and info["stdout"] == "fifo", info
    assert handoffs(daemon, "probe") == 1
    # The framed mode too: its program gets pipes, not ipc-websocketd's socket.
    start_exec("probef", "--framed", "--", framed_program(tmp_path))
    with daemon.connect("probef") as ws:
        info = json.loads(recv(ws))
        assert recv_after(ws, b"y") == b"y"
    assert not info["socket"] and not info["same"], info
    assert handoffs(daemon, "probef") == 1


@pytest.mark.parametrize(
    "case", ["exec --no-handoff", "websocketd --no-handoff", "websocketd --text", "wss"]
)
def test_relayed_as_before_when_no_handoff_applies(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
    pki,
    case: str,
) -> None:
    exec_flags = ("--no-handoff",) if case == "exec --no-handoff" else ()
    ex = start_exec("probe", *exec_flags, "--", probe(tmp_path))
    client_tls: dict[str, ssl.SSLContext] = {}
    if case == "wss":
        daemon = websocketd("--cert", str(pki.cert), "--key", str(pki.key), scheme="wss")
        client_tls["ssl"] = ssl.create_default_context(cafile=str(pki.ca))
    elif case == "websocketd --text":
        daemon = websocketd("--text")
    elif case == "websocketd --no-handoff":
        daemon = websocketd("--no-handoff")
    else:
        daemon = websocketd()
    with daemon.connect("probe?q=1", **client_tls) as ws:
        first = ws.recv(timeout=10)
        if case == "websocketd --text":
            assert isinstance(first, str)  # the daemon's setting still applies
        info = json.loads(first)
        assert recv_after(ws, "relayed") == b"echo:relayed"
        assert ws.ping().wait(5)
    # Relayed: ipc exec's program talks over a socket, and the daemon says
    # nothing of a hand-off.
    assert info["stdin"] == "socket", info
    assert info["env"]["IPC_TRANSPORT"] == ("wss" if case == "wss" else "ws")
    assert info["env"]["QUERY_STRING"] == "q=1"
    assert handoffs(daemon, "probe") == 0
    wait_for(lambda: not ex.children(), what="the probe gone")


# -------------------------------------------------------------- peer info


def test_the_program_sees_the_client_through_the_handoff(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    prog = script(tmp_path, "printenv.py", PRINTENV.replace("python3", sys.executable, 1))
    start_exec("env", "--", prog)
    token = "secret-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token} alice env\n")
    tokens.chmod(0o600)
    daemon = websocketd("--token-file", str(tokens))
    entry = f"ipc.token.{token}"
    with daemon.connect(
        "env?room=lobby&n=%C3%A9",
        subprotocols=["chat.v2", entry],  # type: ignore[list-item]
        additional_headers={"Cookie": "theme=dark", "User-Agent": "handoff-test/1"},
    ) as ws:
        # The 101 came from ipc exec: it selected the subprotocol the daemon
        # chose (a browser fails a connection whose offer goes unanswered).
        assert ws.subprotocol == "chat.v2"
        mine = ws.local_address
        env = json.loads(recv(ws))
        assert recv_after(ws, "hi") == b"echo:hi"
    assert handoffs(daemon, "env") == 1
    assert env["IPC_TRANSPORT"] == "ws" and env["IPC_SERVICE"] == "env"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"] == str(mine[1])
    assert env["SERVER_PORT"] == str(daemon.port)
    assert env["PATH_INFO"] == "/env"
    assert env["QUERY_STRING"] == "room=lobby&n=%C3%A9"
    assert env["HTTP_COOKIE"] == "theme=dark" and env["HTTP_USER_AGENT"] == "handoff-test/1"
    assert env["IPC_TOKEN_NAME"] == "alice"
    assert env["HTTP_SEC_WEBSOCKET_PROTOCOL"] == "chat.v2"
    assert token not in json.dumps(env)


# -------------------------------------------------------------- lifecycle


def test_the_client_leaving_is_the_programs_eof(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    seen = tmp_path / "seen"
    prog = script(
        tmp_path,
        "eof.sh",
        f'#!/bin/bash\nwhile read -r line; do echo "$line"; done\necho eof >{seen}\n',
    )
    ex = start_exec("eof", "--grace", "30", "--", prog)
    daemon = websocketd()
    with daemon.connect("eof") as ws:
        assert recv_after(ws, "x") == b"x"
        (pid,) = ex.children()
    # EOF on stdin, long before the grace period's SIGTERM; reaped, no zombie.
    wait_for(lambda: seen.exists(), timeout=10, what="the program read EOF")
    wait_for(lambda: not alive(pid) and not ex.children(), what="the program reaped")
    ex.logs.wait_for("exited with status 0")
    assert "SIGTERM" not in ex.logs.text()


def test_the_program_exiting_closes_with_1000_after_its_output(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    prog = script(
        tmp_path,
        "bye.sh",
        '#!/bin/bash\nread -r x\necho "bye $x"\necho second\n'
        'head -c 300000 /dev/zero | tr "\\0" z\necho\necho last\nexit 3\n',
    )
    ex = start_exec("bye", "--", prog)
    daemon = websocketd()
    with daemon.connect("bye") as ws:
        ws.send("now")
        assert recv(ws) == b"bye now"
        assert recv(ws) == b"second"
        assert recv(ws) == b"z" * 300_000  # more than a pipe holds, then the exit
        assert recv(ws) == b"last"
        assert close_code(ws) == 1000
    ex.logs.wait_for("exited with status 3")
    wait_for(lambda: not ex.children(), what="bye.sh reaped")


def test_a_program_ignoring_eof_and_sigterm_is_killed_after_grace(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    prog = script(
        tmp_path,
        "stubborn.sh",
        "#!/bin/bash\ntrap '' TERM\necho ready\nwhile true; do sleep 0.05; done\n",
    )
    ex = start_exec("stubborn", "--grace", "0.5", "--", prog)
    daemon = websocketd()
    with daemon.connect("stubborn") as ws:
        assert recv(ws) == b"ready"
        (pid,) = ex.children()
    ex.logs.wait_for("SIGTERM")
    ex.logs.wait_for("killed by SIGKILL")
    wait_for(lambda: not alive(pid) and not ex.children(), what="stubborn gone")


def test_300_cycles_leave_no_child_and_no_descriptor(start_exec, websocketd) -> None:  # noqa: F811
    ex = start_exec("cycles", "--", "cat")
    daemon = websocketd()
    with daemon.connect("cycles") as ws:
        assert recv_after(ws, "warm") == b"warm"
    wait_for(lambda: not ex.children(), what="first cat gone")
    baseline = ex.fds()
    for i in range(300):
        with daemon.connect("cycles") as ws:
            assert recv_after(ws, b"%d" % i) == b"%d" % i
    assert handoffs(daemon, "cycles") == 301
    wait_for(lambda: not ex.children(), timeout=20, what="every cat reaped")
    wait_for(lambda: ex.fds() == baseline, timeout=10, what=f"back to {baseline} descriptors")
    assert ex.proc.poll() is None


# ------------------------------------------------------- bad input, limits


def test_a_message_over_the_limit_closes_with_1009(start_exec, websocketd) -> None:  # noqa: F811
    ex = start_exec("small", "--max-message-size", "1000", "--", "cat")
    daemon = websocketd()  # its own limit is 16 MiB: ipc exec's applies after the hand-off
    with daemon.connect("small") as ws:
        assert recv_after(ws, b"x" * 999) == b"x" * 999  # 999 bytes and a newline
        ws.send(b"x" * 1001)
        assert close_code(ws) == 1009
    with daemon.connect("small") as ws:  # over only once put together
        ws.send([b"x" * 600, b"x" * 600])
        assert close_code(ws) == 1009
    wait_for(lambda: not ex.children(), what="the programs stopped")
    with daemon.connect("small") as ws:
        assert recv_after(ws, b"fine") == b"fine"
    assert handoffs(daemon, "small") == 3


def test_a_program_line_over_the_limit_closes_its_client(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    prog = script(
        tmp_path, "long.sh", '#!/bin/bash\nread -r n\nhead -c "$n" /dev/zero | tr "\\0" x\necho\n'
    )
    ex = start_exec("long", "--max-message-size", "1000", "--", prog)
    daemon = websocketd()
    with daemon.connect("long") as ok:
        assert recv_after(ok, b"1000") == b"x" * 1000
        with daemon.connect("long") as ws:
            ws.send(b"5000")
            # Nothing of the long line; a close frame, not a bare reset.
            assert close_code(ws) == 1011
        ex.logs.wait_for("the program")
    wait_for(lambda: not ex.children(), what="the programs stopped")
    assert handoffs(daemon, "long") == 2


def test_invalid_utf8_text_closes_with_1007(start_exec, websocketd) -> None:  # noqa: F811
    ex = start_exec("utf", "--", "cat")
    daemon = websocketd()
    with daemon.connect("utf") as ws:
        assert recv_after(ws, "ok") == b"ok"
        ws.send(b"\xff\xfe", text=True)
        assert close_code(ws) == 1007
    wait_for(lambda: not ex.children(), what="cat gone")
    assert handoffs(daemon, "utf") == 1


def test_frames_behind_the_request_reach_the_program(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
) -> None:
    """Frames sent with the upgrade request, before the 101, are in the
    hand-off's early bytes: ipc exec parses them after the request."""
    ex = start_exec("early", "--", "cat")
    daemon = websocketd()
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    try:
        sock.sendall(
            f"GET /early HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            + frame(b"first")
            + frame(b"second" * 1000)
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101 "), head
        reader = FrameReader(sock, timeout=10)
        assert reader.next() == (Opcode.BINARY.value, b"first")
        assert reader.next() == (Opcode.BINARY.value, b"second" * 1000)
        sock.sendall(frame(b"\x03\xe8", Opcode.CLOSE))
        assert reader.next()[0] == Opcode.CLOSE.value
    finally:
        sock.close()
    wait_for(lambda: not ex.children(), what="cat gone")
    assert handoffs(daemon, "early") == 1


def test_a_vanished_client_stops_its_program(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    ex = start_exec("gone", "--grace", "0.5", "--", "sleep", "60")
    daemon = websocketd()
    baseline = ex.fds()
    for partial in (b"", frame(b"x" * 1000)[:300]):  # idle, or half a frame sent
        sock = raw_upgrade(daemon.port, "gone")
        sock.sendall(partial)
        (pid,) = wait_for(ex.children, what="sleep started")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, no close frame
        wait_for(lambda p=pid: not alive(p) and not ex.children(), what="sleep stopped")
    # A client process killed: the kernel closes its socket.
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom websockets.sync.client import connect\n"
            f"ws = connect('ws://127.0.0.1:{daemon.port}/gone')\n"
            "print('up', flush=True)\ntime.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None and client.stdout.readline() == b"up\n"
        (pid,) = wait_for(ex.children, what="sleep started")
        client.kill()
    finally:
        client.kill()
        client.wait(5)
        if client.stdout is not None:
            client.stdout.close()
    wait_for(lambda: not alive(pid) and not ex.children(), what="sleep stopped")
    assert handoffs(daemon, "gone") == 3
    wait_for(lambda: ex.fds() == baseline, what=f"back to {baseline} descriptors")
    assert ex.proc.poll() is None


def test_max_processes_refuses_a_handed_over_client_with_403(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
) -> None:
    ex = start_exec("one", "--max-processes", "1", "--", "cat")
    daemon = websocketd()
    with daemon.connect("one") as first:
        assert recv_after(first, "a") == b"a"
        baseline = ex.fds()
        for _ in range(3):
            with pytest.raises(InvalidStatus) as info:
                daemon.connect("one").close()
            assert info.value.response.status_code == 403
        ex.logs.wait_for("--max-processes")
        assert recv_after(first, "still") == b"still"
        # The refused hand-offs' sockets and doors are closed here.
        wait_for(lambda: ex.fds() == baseline, what=f"back to {baseline} descriptors")
    wait_for(lambda: not ex.children(), what="the first cat gone")
    with daemon.connect("one") as ws:
        assert recv_after(ws, "next") == b"next"
    assert handoffs(daemon, "one") == 2
    assert "Traceback" not in ex.logs.text() + daemon.log


def test_a_program_that_cannot_start_costs_only_its_client(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    prog = script(tmp_path, "flaky.sh", "#!/bin/bash\nexec cat\n")
    ex = start_exec("flaky", "--", prog)
    daemon = websocketd()
    with daemon.connect("flaky") as served:
        assert recv_after(served, "1") == b"1"
        baseline = ex.fds()
        prog.chmod(0o644)  # no longer executable
        with pytest.raises(InvalidStatus) as info:
            daemon.connect("flaky").close()
        assert info.value.response.status_code == 503
        ex.logs.wait_for("cannot start")
        assert recv_after(served, "2") == b"2"  # the running one is unaffected
        assert ex.fds() == baseline  # the failed start left no pipe open
        prog.chmod(0o755)
        with daemon.connect("flaky") as ws:
            assert recv_after(ws, "3") == b"3"
    assert "Traceback" not in ex.logs.text()


# ------------------------------------------------------------ back-pressure


def test_a_flooding_program_blocks_while_the_client_does_not_read(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    count = tmp_path / "count"
    prog = script(
        tmp_path,
        "flood.py",
        f"#!{sys.executable}\nimport os\n"
        f"fd = os.open({str(count)!r}, os.O_WRONLY | os.O_CREAT)\n"
        "line = b'f' * 1023 + b'\\n'\nn = 0\nwhile True:\n"
        "    os.write(1, line)\n    n += 1\n    os.pwrite(fd, b'%20d' % n, 0)\n",
    )
    ex = start_exec("flood", "--", prog)
    daemon = websocketd()
    before = ex.rss_kib()
    sock = raw_upgrade(daemon.port, "flood")  # never reads past the 101
    try:
        wait_for(count.exists, what="the flood started")

        def written() -> int:
            return int(count.read_text() or 0)

        last = [-1]

        def settled() -> bool:
            time.sleep(0.5)
            now = written()
            same, last[0] = now == last[0], now
            return same

        wait_for(settled, timeout=30, interval=0, what="the program blocked")
        time.sleep(1.0)
        assert written() == last[0], "the program kept writing"
        (pid,) = ex.children()
        assert state_of(pid) == "S", "the program is not blocked in write"
        assert ex.rss_kib() - before < 50 * 1024, "ipc exec buffered the flood"
    finally:
        sock.close()
    wait_for(lambda: not ex.children(), what="the flood stopped")


def test_a_client_flooding_a_program_that_never_reads_is_not_read(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
) -> None:
    ex = start_exec("sleepy", "--", "sleep", "60")
    daemon = websocketd()
    before = ex.rss_kib()
    sock = raw_upgrade(daemon.port, "sleepy")
    try:
        sock.setblocking(False)
        chunk = frame(b"x" * 65000)
        pending, sent, stalled_since = chunk, 0, None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                n = sock.send(pending)
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.0:
                    break
                time.sleep(0.01)
                continue
            sent += n
            pending = pending[n:] or chunk  # whole frames only
            stalled_since = None
        assert stalled_since is not None, f"{sent} bytes taken without stalling"
        assert sent < 64 * 1024 * 1024
        assert ex.rss_kib() - before < 50 * 1024, "ipc exec buffered the flood"
    finally:
        # A reset: a FIN would wait behind the bytes ipc exec does not read.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    wait_for(lambda: not ex.children(), what="sleep stopped")


def test_both_directions_congested_at_once_still_drain(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
) -> None:
    """A client that sends much more than it reads back from ``cat``: both
    of the relay's directions pause (its buffers are full), and both must
    resume once the client reads (a paused direction once stopped the
    other's writes: nothing ever moved again)."""
    ex = start_exec("both", "--framed", "--", "cat")
    daemon = websocketd()
    sock = raw_upgrade(daemon.port, "both")
    payload, count = b"y" * 65000, 300
    sender = threading.Thread(target=sock.sendall, args=(frame(payload) * count,), daemon=True)
    try:
        sender.start()
        time.sleep(2)  # nobody reads: everything fills up
        reader = FrameReader(sock, timeout=15)
        got = 0
        while got < len(payload) * count:
            opcode, data = reader.next()
            assert opcode == Opcode.BINARY.value and data == payload
            got += len(data)
        sender.join(15)
        assert not sender.is_alive()
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    wait_for(lambda: not ex.children(), what="cat gone")


def test_a_program_closing_its_stdin_lets_the_client_be_read_again(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The client flooded a program that does not read, so ipc exec stopped
    reading the client; the program then closes its stdin: what the client
    sends is dropped from now on, but read (its pings, its close)."""
    prog = script(
        tmp_path,
        "deaf.sh",
        "#!/bin/bash\nsleep 1.5\nexec 0<&-\necho deaf\nwhile true; do sleep 0.1; done\n",
    )
    ex = start_exec("deaf", "--grace", "0.5", "--", prog)
    daemon = websocketd()
    sock = raw_upgrade(daemon.port, "deaf")
    try:
        sock.setblocking(False)
        pending = b""
        with contextlib.suppress(BlockingIOError):
            while True:  # until the socket takes no more: ipc exec stopped reading
                pending = pending or frame(b"z" * 65000)  # whole frames only
                pending = pending[sock.send(pending) :]
        reader = FrameReader(sock, timeout=10)
        assert reader.next() == (Opcode.BINARY.value, b"deaf")
        # The rest of the flood, then a ping: taken only if ipc exec reads again.
        sock.sendall(pending + frame(b"still there?", Opcode.PING))
        assert reader.next() == (Opcode.PONG.value, b"still there?")
    finally:
        sock.close()
    wait_for(lambda: not ex.children(), what="deaf.sh stopped")


# --------------------------------------------------------------- keepalive


def test_a_client_that_never_answers_pings_is_closed(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
) -> None:
    ex = start_exec("quiet", "--ping-interval", "0.3", "--grace", "0.5", "--", "cat")
    daemon = websocketd()
    sock = raw_upgrade(daemon.port, "quiet")  # answers nothing, ever
    try:
        started = time.monotonic()
        (pid,) = wait_for(ex.children, what="cat started")
        frames, ended = read_frames(sock, timeout=10)
    finally:
        sock.close()
    assert any(op == Opcode.PING.value for op, _payload in frames), frames
    assert ended - started < 2.5, f"closed after {ended - started:.1f} s"
    wait_for(lambda: not alive(pid) and not ex.children(), what="cat stopped")
    ex.logs.wait_for("no pong")


def test_a_client_answering_pings_stays_connected(start_exec, websocketd) -> None:  # noqa: F811
    ex = start_exec("alive", "--ping-interval", "0.3", "--", "cat")
    daemon = websocketd()
    with daemon.connect("alive") as ws:
        assert recv_after(ws, "a") == b"a"
        time.sleep(1.6)  # five pings, each answered by websockets
        assert recv_after(ws, "b") == b"b"
        (pid,) = ex.children()
    wait_for(lambda: not alive(pid), what="cat gone")
    assert "no pong" not in ex.logs.text()


def test_stopping_ipc_exec_tells_its_clients_1001(start_exec, websocketd) -> None:  # noqa: F811
    ex = start_exec("stop", "--grace", "0.5", "--", "cat")
    daemon = websocketd()
    with daemon.connect("stop") as a, daemon.connect("stop") as b:
        assert recv_after(a, "a") == b"a" and recv_after(b, "b") == b"b"
        pids = ex.children()
        ex.proc.send_signal(signal.SIGTERM)
        assert ex.proc.wait(timeout=15) == 0
        assert close_code(a) == 1001 and close_code(b) == 1001  # going away
    assert not any(alive(p) for p in pids)


def test_exec_help_documents_the_handoff_options() -> None:
    out = subprocess.run(
        [BIN / "ipc", "exec", "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert "--no-handoff" in out and "--ping-interval" in out


# -- found in review: descriptors, tokens, the daemon's own limit ---------------------


def test_the_program_inherits_only_its_pipes(start_exec, websocketd, tmp_path: Path) -> None:  # noqa: F811
    """A handed-over socket arrives close-on-exec (MSG_CMSG_CLOEXEC): a later
    program must not hold an earlier client's connection."""
    prog = script(
        tmp_path,
        "fds.py",
        f"#!{sys.executable}\nimport os, sys\n"
        "print(' '.join(sorted(os.listdir('/proc/self/fd'))), flush=True)\n"
        "for line in sys.stdin:\n    print(line, end='', flush=True)\n",
    )
    start_exec("fds", "--", prog)
    daemon = websocketd()
    with daemon.connect("fds") as a, daemon.connect("fds") as b:
        for ws in (a, b):
            assert recv(ws) == b"0 1 2 3"  # 3 is the directory listdir opened
    assert handoffs(daemon, "fds") == 2


def test_a_closed_client_sees_the_end_while_a_later_client_runs(start_exec, websocketd) -> None:  # noqa: F811
    start_exec("pair", "--", "cat")
    daemon = websocketd()
    first = raw_upgrade(daemon.port, "pair")
    try:
        with daemon.connect("pair") as later:  # its program started after the first's
            assert recv_after(later, "x") == b"x"
            first.sendall(frame(b"\x03\xe8", Opcode.CLOSE))
            started = time.monotonic()
            frames, ended = read_frames(first, timeout=5)  # the close reply, then EOF
            assert frames and frames[-1][0] == Opcode.CLOSE.value
            assert ended - started < 2, "a later program holds the first client's socket"
    finally:
        first.close()


def test_a_token_subprotocol_alone_is_selected_by_the_101(
    start_exec,  # noqa: F811
    websocketd,  # noqa: F811
    tmp_path: Path,
) -> None:
    start_exec("env", "--", "cat")
    token = "secret-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token} alice env\n")
    tokens.chmod(0o600)
    daemon = websocketd("--token-file", str(tokens))
    entry = f"ipc.token.{token}"
    with daemon.connect("env", subprotocols=[entry]) as ws:
        assert ws.subprotocol == entry  # a browser fails the connection otherwise
        assert recv_after(ws, "x") == b"x"
    assert handoffs(daemon, "env") == 1


def test_tokens_never_reach_ipc_exec_log(start_exec, websocketd, tmp_path: Path) -> None:  # noqa: F811
    ex = start_exec("c", "-v", "--", "cat")
    token = "secret-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token} alice c\n")
    tokens.chmod(0o600)
    daemon = websocketd("--token-file", str(tokens))
    with daemon.connect(f"c?token={token}") as ws:
        assert recv_after(ws, "x") == b"x"
    with daemon.connect("c", subprotocols=["chat", f"ipc.token.{token}"]) as ws:
        assert recv_after(ws, "y") == b"y"
    assert handoffs(daemon, "c") == 2
    ex.logs.wait_for("exited with status 0")
    text = ex.logs.text()
    assert token not in text
    assert "connection open" not in text  # websockets' per-connection INFO lines: -vv only


def test_the_daemons_lower_message_limit_is_kept_by_relaying(start_exec, websocketd) -> None:  # noqa: F811
    start_exec("lim", "--", "cat")
    daemon = websocketd("--max-message-size", "1000")
    with daemon.connect("lim") as ws:
        assert recv_after(ws, b"x" * 999) == b"x" * 999
        ws.send(b"x" * 5000)
        assert close_code(ws) == 1009
    assert handoffs(daemon, "lim") == 0


def test_handoffs_the_daemon_withdraws_at_once_cost_nothing(
    start_exec,  # noqa: F811
    rundir: Path,
) -> None:
    """A daemon that gives up right after handing a connection over (its
    deadline passed): whether ipc exec saw the withdrawal before taking it or
    not, it keeps serving, and no program outlives its client."""
    from tests.integration.test_handoff_websocket_core import hand_over, tcp_pair

    ex = start_exec("w", "--grace", "0.5", "--", "cat")
    for _ in range(20):
        with tcp_pair() as (client, server):
            gate = hand_over(rundir, "w", server)
            gate.close()
            server.close()
            client.close()
    wait_for(lambda: not ex.children(), what="no program left")
    assert ex.proc.poll() is None and "Traceback" not in ex.logs.text()
    with ex.connect() as s:
        s.sendall(encode(b"still here"))
        assert recv_msg(s) == b"still here"
