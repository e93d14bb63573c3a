"""A real headless Chromium calls ipc-httpd with ``fetch()`` from a page of
another origin (ipc-websocketd's demo page): the CORS preflight (the body is
``application/octet-stream``, not a "simple" request), the POST through
``ipc pongd`` twice, and the refusal of an origin ``--cors`` does not name
(the page's fetch fails).

Chromium is driven over the DevTools Protocol like tests/integration/test_browser.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import Processes, start_listening_daemon, wait_for
from tests.integration.test_browser import CHROMIUM, DevTools, chromium, start_websocketd

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
