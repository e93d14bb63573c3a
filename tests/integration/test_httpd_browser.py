"""A real headless Chromium calls ipc-httpd with ``fetch()`` from a page of
another origin (ipc-websocketd's demo page): the CORS preflight (the body is
``application/octet-stream``, not a "simple" request), the POST through
``ipc pongd`` twice, and the refusal of an origin ``--cors`` does not name
(the page's fetch fails). The demo page's own "Send over HTTP" button
(``?http=PORT``) shows the echo in its log, or a clear error when nothing
answers; curl reaches the same daemon.

Chromium is driven over the DevTools Protocol like tests/integration/test_browser.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import Processes, start_listening_daemon, wait_for
from tests.integration.test_browser import (
    CHROMIUM,
    DevTools,
    chromium,
    page_status,
    start_websocketd,
)

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)"),
    pytest.mark.timeout(90),
]


def fetch(page: DevTools, url: str, body: str) -> str:
    """The page's own fetch(): the reply's status and text, or the error."""
    expression = f"""
        fetch({json.dumps(url)}, {{
            method: "POST",
            headers: {{"Content-Type": "application/octet-stream"}},
            body: {json.dumps(body)},
        }}).then(async r => r.status + " " + await r.text(), e => "error " + e.name)
    """
    result = page.call(
        "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
    )
    assert "exceptionDetails" not in result, result
    value = result["result"]["value"]
    assert isinstance(value, str)
    return value


def open_page(page: DevTools, port: int) -> None:
    page.call("Page.enable")
    page.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
    loaded = f"document.readyState === 'complete' && location.port === '{port}'"
    wait_for(lambda: page.evaluate(loaded), 15, what="the page loaded")


def test_fetch_from_another_origin(rundir: Path, procs: Processes, tmp_path: Path) -> None:
    procs.pongd(rundir)
    ws_port = start_websocketd(procs, rundir, tmp_path / "websocketd.log")
    origin = f"http://127.0.0.1:{ws_port}"
    _p, logs, port = start_listening_daemon(
        procs,
        "ipc-httpd",
        "--listen",
        "127.0.0.1:0",
        "--cors",
        origin,
        env={"RUNDIR": str(rundir)},
    )
    url = f"http://127.0.0.1:{port}/pong"
    with chromium() as page:
        open_page(page, ws_port)
        assert fetch(page, url, "hello from fetch ✓") == "200 hello from fetch ✓"
        assert fetch(page, url, "again") == "200 again"
    logs.wait_for("-> 'pong'")


def test_fetch_from_an_origin_not_allowed(rundir: Path, procs: Processes, tmp_path: Path) -> None:
    procs.pongd(rundir)
    ws_port = start_websocketd(procs, rundir, tmp_path / "websocketd.log")
    _p, logs, port = start_listening_daemon(
        procs,
        "ipc-httpd",
        "--listen",
        "127.0.0.1:0",
        "--cors",
        "https://app.example",
        env={"RUNDIR": str(rundir)},
    )
    with chromium() as page:
        open_page(page, ws_port)
        assert fetch(page, f"http://127.0.0.1:{port}/pong", "x") == "error TypeError"
    logs.wait_for("not allowed (--cors)")


HTTP_LOG = """[...document.querySelectorAll('#log li.http')]
    .map(e => [e.className, e.querySelector('.data').textContent])"""


def click_http(page: DevTools, message: str, count: int) -> list[list[str]]:
    """Put ``message`` in the page's message field, click "Send over HTTP",
    and wait until the log holds ``count`` HTTP lines; return them."""
    page.evaluate(f"""
        document.getElementById('message').value = {json.dumps(message)};
        document.getElementById('http-send').click();
    """)

    def lines() -> list[list[str]] | None:
        found = page.evaluate(HTTP_LOG)
        return found if len(found) >= count else None

    return wait_for(lines, 15, what=f"{count} HTTP lines in the page's log")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_page_http_button(rundir: Path, procs: Processes, tmp_path: Path) -> None:
    """The demo page as ``make run`` serves it: ipc-websocketd's page, an
    ipc-httpd that names the page's origin in --cors, ``?http=PORT``. The
    button POSTs the message (or "hello") and logs the echo; the WebSocket
    side of the page is unaffected. curl gets the same echo."""
    procs.pongd(rundir)
    ws_port = start_websocketd(procs, rundir, tmp_path / "websocketd.log")
    _p, logs, port = start_listening_daemon(
        procs,
        "ipc-httpd",
        "--listen",
        "127.0.0.1:0",
        "--cors",
        f"http://127.0.0.1:{ws_port}",
        env={"RUNDIR": str(rundir)},
    )
    message = "hello over HTTP ✓"
    with chromium() as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=f"http://127.0.0.1:{ws_port}/?http={port}")
        page_status(page, "connected")  # the WebSocket part, as before
        assert page.evaluate("document.getElementById('http-url').textContent") == (
            f"POST http://127.0.0.1:{port}/SERVICE"
        )
        assert click_http(page, message, 2) == [["tx http", message], ["rx http", message]]
        assert click_http(page, "", 4)[2:] == [["tx http", "hello"], ["rx http", "hello"]]
        # The WebSocket log lines are not the HTTP ones.
        ws_rx = "[...document.querySelectorAll('#log li.rx:not(.http)')].length"
        assert page.evaluate(ws_rx) == 0
    logs.wait_for("-> 'pong'")

    # The same daemon, as the demo's instructions say to type.
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--data-binary", "hello from curl",
         f"http://127.0.0.1:{port}/pong"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"hello from curl"


def test_demo_page_http_button_without_a_daemon(
    rundir: Path, procs: Processes, tmp_path: Path
) -> None:
    """Nothing listens on ``?http=PORT``: the page logs an error that says
    what to check, and stays usable."""
    procs.pongd(rundir)
    ws_port = start_websocketd(procs, rundir, tmp_path / "websocketd.log")
    port = free_port()
    with chromium() as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=f"http://127.0.0.1:{ws_port}/?http={port}")
        page_status(page, "connected")
        (line,) = click_http(page, "anyone?", 2)[1:]
        assert line[0] == "error http", line
        assert f"could not reach http://127.0.0.1:{port}/pong" in line[1], line
        assert f"--cors http://127.0.0.1:{ws_port}" in line[1], line
        page_status(page, "connected")
