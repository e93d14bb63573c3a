"""A complete LibIPC service: answers every message in upper case."""

from ipc_core import Context, Event, EventType

with Context() as ctx:
    ctx.service_init("upper")  # listens on $RUNDIR/upper
    ctx.handle_signals()  # Ctrl-C / SIGTERM: clean stop, socket removed
    for event in ctx:  # ends when the context is stopped
        match event:
            case Event(EventType.CONNECTION, fd):
                print("client", fd, "connected", flush=True)
            case Event(EventType.MESSAGE_RX, fd, message):
                ctx.write(fd, message.upper())
            case Event(EventType.DISCONNECTION, fd, reason=reason):
                print("client", fd, "left", reason or "", flush=True)
