"""A complete LibIPC client: sends its arguments, prints the replies."""

import sys

from ipc_core import Context, EventType

with Context() as ctx:
    fd = ctx.connect_service("upper")  # honours IPC_NETWORK (see docs/ipcd.md)
    for word in sys.argv[1:]:
        ctx.write(fd, word.encode())
    waiting = len(sys.argv) - 1
    ctx.set_timer(5.0)  # a TIMER event if nothing happens for 5 s
    while waiting:
        event = ctx.wait_event()
        if event.type == EventType.MESSAGE_RX:
            print(event.message.decode())
            waiting -= 1
        elif event.type in (EventType.TIMER, EventType.DISCONNECTION):
            sys.exit("no answer from upper")
