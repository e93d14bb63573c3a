"""A real headless Chromium uses the demo page of ipc-websocketd to talk to ipc pongd.

Chromium is driven over the Chrome DevTools Protocol with the websockets
sync client (no extra dependency): navigate, type into the page's own input,
click its Send button, read the echo from the page's log. A screenshot goes
to /tmp/websocketd-demo.png for a human to look at.

With ``--token-secret`` the page passes its token (typed, or from the
page's ``?token=``) as the subprotocol ``ipc.token.<T>``, the only place a
browser lets a page put it; a refused handshake shows why on the page.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.helpers import BIN, Processes, wait_for

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path("/tmp/websocketd-demo.png")

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)"),
    pytest.mark.timeout(60),
]


class DevTools:
    """The few Chrome DevTools Protocol calls the test needs, over one page target."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._id = 0

    def call(self, method: str, timeout: float = 10, **params: Any) -> dict[str, Any]:
        self._id += 1
        call_id = self._id
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:  # events arrive in between: skip them
            reply = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")


@contextlib.contextmanager
def chromium() -> Iterator[DevTools]:
    """Start headless Chromium in its own process group; always kill the group."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-proxy-server",
                "--window-size=1000,760",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            active = Path(profile) / "DevToolsActivePort"

            def port() -> int | None:
                assert proc.poll() is None, "chromium exited"
                lines = active.read_text().split() if active.exists() else []
                return int(lines[0]) if lines else None

            cdp_port = wait_for(port, 20, what="chromium's DevTools port")
            with urllib.request.urlopen(f"http://127.0.0.1:{cdp_port}/json/list", timeout=5) as r:
                targets = json.load(r)
            page = next(t for t in targets if t["type"] == "page")
            with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
                yield DevTools(ws)
        finally:
            proc.terminate()  # chromium reaps its own helpers when asked nicely
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
            proc.wait(timeout=10)


def start_websocketd(procs: Processes, rundir: Path, log_path: Path, *args: str) -> int:
    with log_path.open("wb") as log:
        proc = procs.start(
            BIN / "ipc-websocketd",
            "--listen",
            "127.0.0.1:0",
            *args,
            env={"RUNDIR": str(rundir)},
            stderr=log,
        )

    def port() -> int | None:
        assert proc.poll() is None, log_path.read_text()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
        return int(match.group(1)) if match else None

    return wait_for(port, what="ipc-websocketd up")


STATUS = "document.getElementById('status')?.textContent || ''"
NOTICE = "document.getElementById('notice')?.textContent || ''"


def page_status(page: DevTools, prefix: str) -> str:
    """Wait until the page's status badge starts with ``prefix``. (Until a
    navigation commits, an expression runs on the previous document.)"""
    return wait_for(
        lambda: (lambda s: s if s.startswith(prefix) else None)(page.evaluate(STATUS)),
        15,
        what=f"the page's status {prefix!r}",
    )


def echo_through_page(page: DevTools, message: str) -> None:
    """Type ``message`` into the page, click Send, and see the echo in its log."""
    page.evaluate(f"""
        document.getElementById('message').value = {json.dumps(message)};
        document.getElementById('send').click();
    """)
    received = "[...document.querySelectorAll('#log li.rx .data')].map(e => e.textContent)"
    replies = wait_for(lambda: page.evaluate(received), 10, what="the echo in the page")
    assert replies == [message]
    sent = page.evaluate(
        "[...document.querySelectorAll('#log li.tx .data')].map(e => e.textContent)"
    )
    assert sent == [message]


def test_demo_page_echoes_through_pongd(rundir: Path, procs: Processes, tmp_path: Path) -> None:
    procs.pongd(rundir)
    log_path = tmp_path / "websocketd.log"
    port = start_websocketd(procs, rundir, log_path)
    message = "hello from chromium ✓"
    with chromium() as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
        page_status(page, "connected")  # the page connects to "pong" by itself
        echo_through_page(page, message)
        assert page.evaluate("document.getElementById('message').value") == ""
        assert page.evaluate("document.getElementById('notice').hidden") is True
        shot = page.call("Page.captureScreenshot", format="png")
        SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
    log = log_path.read_text()
    assert re.search(r"127\.0\.0\.1:\d+ -> 'pong'", log), log


def mint(secret: Path, name: str, service: str) -> str:
    out = subprocess.run(
        [str(BIN / "ipc"), "token", "new", "--secret-file", str(secret), "--name", name,
         "--service", service, "--ttl", "10m"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def test_demo_page_passes_its_token(rundir: Path, procs: Processes, tmp_path: Path) -> None:
    """ipc-websocketd --token-secret: without a token the page shows the
    refusal; a token for another service is refused too; the token of a
    link (?token=) is sent as a subprotocol and the echo works."""
    procs.pongd(rundir)
    secret = tmp_path / "token.secret"
    subprocess.run([str(BIN / "ipc"), "token", "secret", str(secret)], check=True, timeout=30)
    log_path = tmp_path / "websocketd.log"
    port = start_websocketd(procs, rundir, log_path, "--token-secret", str(secret))
    good, wrong = mint(secret, "alice", "pong"), mint(secret, "bob", "chat-*")
    base = f"http://127.0.0.1:{port}/"
    with chromium() as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=base)
        page_status(page, "refused")
        assert page.evaluate("document.getElementById('notice').hidden") is False
        notice = page.evaluate(NOTICE)
        assert "may require a token (HTTP 401)" in notice and "?token=" in notice, notice
        assert page.evaluate("document.getElementById('connect').disabled") is False
        wait_for(
            lambda: "401 for service 'pong'" in log_path.read_text(), 5, what="the daemon's 401"
        )

        page.call("Page.navigate", url=f"{base}?token={wrong}")
        page_status(page, "refused")
        assert 'not for service "pong" (HTTP 403)' in page.evaluate(NOTICE)
        wait_for(
            lambda: "403 for service 'pong'" in log_path.read_text(), 5, what="the daemon's 403"
        )

        page.call("Page.navigate", url=f"{base}?token={good}&service=pong")
        page_status(page, "connected")
        assert page.evaluate("document.getElementById('notice').hidden") is True
        # The token left the address bar; the socket selected its subprotocol.
        assert page.evaluate("location.search") == "?service=pong"
        assert page.evaluate("socket.protocol") == f"ipc.token.{good}"
        echo_through_page(page, "hello with a token")

        # A bad token typed into the field: refused, and the page says so.
        page.evaluate("""
            document.getElementById('disconnect').click();
            document.getElementById('token').value = 'v1.not.valid';
        """)
        page_status(page, "closed")
        page.evaluate("document.getElementById('connect').click()")
        page_status(page, "refused")
        assert "bad or expired (HTTP 401)" in page.evaluate(NOTICE)
    log = log_path.read_text()
    assert good not in log and wrong not in log, "a token in the daemon's log"
