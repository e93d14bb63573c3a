"""websocketd's first example, with ``ipc exec``: a counter script behind
ipc-websocketd, in the real headless Chromium.

The page (ipc-websocketd's own origin) opens ``ws://.../counter``; each
connection runs its own ``count.sh``, which prints 1 to 10 with pauses and
its client's address, then exits: the browser gets the eleven messages, then
the close, and the service logs the script's exit. Twice: with
``ipc-websocketd --text`` (text frames; the daemon relays), and with its
default binary replies, where ipc-websocketd hands the connection over to
ipc exec, which answers the handshake and feeds the script over pipes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import BIN, LogReader, Processes, wait_for
from tests.integration.test_browser import CHROMIUM, chromium, start_websocketd

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)"),
    pytest.mark.timeout(90),
]

#: websocketd's count.sh (its README's first example), faster, and saying
#: whom it counts for.
COUNT_SH = """#!/bin/bash
echo "counting for $REMOTE_ADDR ($IPC_TRANSPORT, $PATH_INFO?$QUERY_STRING)"
for COUNT in $(seq 1 10); do
  echo $COUNT
  sleep 0.05
done
"""

OPEN = """(() => {
  window.got = []; window.wsClosed = null;
  const ws = new WebSocket(`ws://${location.host}/counter?from=browser`);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (e) => window.got.push(
    typeof e.data === "string" ? e.data : "binary:" + new TextDecoder().decode(e.data));
  ws.onclose = (e) => { window.wsClosed = {code: e.code, clean: e.wasClean}; };
})()"""


@pytest.mark.parametrize("text", [True, False], ids=["text-relayed", "binary-handed-over"])
def test_the_counter_script_in_chromium(
    rundir: Path, procs: Processes, tmp_path: Path, text: bool
) -> None:
    script = tmp_path / "count.sh"
    script.write_text(COUNT_SH)
    script.chmod(0o755)
    service = procs.start(
        BIN / "ipc", "exec", "--rundir", rundir, "counter", "--", script,
        env={"RUNDIR": str(rundir)},
    )  # fmt: skip
    logs = LogReader(service)
    logs.wait_for("serving")
    daemon_log = tmp_path / "websocketd.log"
    port = start_websocketd(procs, rundir, daemon_log, "--text" if text else "--binary")
    kind = "" if text else "binary:"
    with chromium() as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
        wait_for(
            lambda: (
                page.evaluate("document.readyState") == "complete"
                and page.evaluate("location.port") == str(port)
            ),
            15,
            what="the page loaded",
        )
        for _ in range(2):  # two connections: a process each, counting from 1
            page.evaluate(OPEN)
            wait_for(lambda: page.evaluate("window.wsClosed") is not None, 20, what="the close")
            got = page.evaluate("window.got")
            assert got[1:] == [f"{kind}{n}" for n in range(1, 11)], got
            assert got[0] == f"{kind}counting for 127.0.0.1 (ws, /counter?from=browser)", got
            closed = page.evaluate("window.wsClosed")
            assert closed["clean"] is True, json.dumps(closed)
    line = logs.wait_for("exited with status 0")
    assert re.search(r"count\.sh\[\d+\] \(ws 127\.0\.0\.1:\d+\)", line), line
    handed = daemon_log.read_text().count("handed over")
    assert handed == (0 if text else 2), daemon_log.read_text()
