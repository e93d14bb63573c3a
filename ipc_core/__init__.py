"""ipc_core: LibIPC for Python.

Local services listen on Unix sockets in a run directory, clients connect by
service name, messages are ``u32 big-endian length + payload``, and an
application is "init a service or a connection, then loop over events".
"""

from . import door
from ._doors import HandedOver
from .context import Context, ContextStopped, TimerHandle
from .errors import (
    InvalidServiceName,
    IPCError,
    MessageTooLarge,
    PeerClosed,
    PeerNotReading,
    ProtocolError,
    RunDirectoryError,
    ServiceBusy,
    ServiceError,
    ServiceUnavailable,
    UsageError,
)
from .events import Event, EventType
from .fdpass import recv_fd, send_fd
from .framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    FrameDecoder,
    FrameScanner,
    check_limit,
    encode,
    header,
)
from .peerinfo import PeerInfo, PeerInfoTooLarge
from .routing import ROUTER_SERVICE, connect_direct, parse_lookup, parse_network
from .rundir import (
    DEFAULT_RUNDIR,
    DOOR_SUFFIX,
    LOCK_SUFFIX,
    SUN_PATH_MAX,
    door_path,
    ensure_rundir,
    is_local_only,
    list_services,
    rundir,
    service_alive,
    service_marks,
    socket_path,
    validate_name,
)
from .switch import Layer, StackedLayer, SwitchResult
from .typed import TypeRegistry

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_RUNDIR",
    "DOOR_SUFFIX",
    "LOCK_SUFFIX",
    "ROUTER_SERVICE",
    "SUN_PATH_MAX",
    "Context",
    "ContextStopped",
    "Event",
    "EventType",
    "FrameDecoder",
    "FrameScanner",
    "HandedOver",
    "IPCError",
    "InvalidServiceName",
    "Layer",
    "MessageTooLarge",
    "PeerClosed",
    "PeerInfo",
    "PeerInfoTooLarge",
    "PeerNotReading",
    "ProtocolError",
    "RunDirectoryError",
    "ServiceBusy",
    "ServiceError",
    "ServiceUnavailable",
    "StackedLayer",
    "SwitchResult",
    "TimerHandle",
    "TypeRegistry",
    "UsageError",
    "check_limit",
    "connect_direct",
    "door",
    "door_path",
    "encode",
    "ensure_rundir",
    "header",
    "is_local_only",
    "list_services",
    "parse_lookup",
    "parse_network",
    "recv_fd",
    "rundir",
    "send_fd",
    "service_alive",
    "service_marks",
    "socket_path",
    "validate_name",
]
