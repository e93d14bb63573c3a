"""An echo service on ipc_core.Context, with or without peer information.

python -m bench.peerecho RUNDIR NAME [--peer-info]

The same program both ways, so that the identity suite measures what asking
for peer information costs (the door, the offer, the verdict), nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ipc_core import Context, EventType


def main(rundir: str, name: str, peer_info: bool) -> None:
    with Context(rundir_path=Path(rundir)) as ctx:
        ctx.service_init(name, peer_info=peer_info)
        ctx.handle_signals()
        write = ctx.write
        message_rx = EventType.MESSAGE_RX
        for event in ctx:
            if event.type is message_rx:
                write(event.fd, event.message)  # type: ignore[arg-type]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--peer-info" in sys.argv[3:])
