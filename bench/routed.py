"""Ping-pong with ipc pongd on a remote host, the socket obtained two ways.

python -m bench.routed direct PORT SECONDS
python -m bench.routed routed RUNDIR SECONDS   (IPC_NETWORK names pong's route)

``direct`` opens the TCP connection itself and does the TCPd handshake;
``routed`` asks ipcd (``ipc_core.routing.connect``), which with hand-offs
returns the same kind of TCP connection. The exchange afterwards is the same
code: one 16-byte message, wait for it back, again. Prints JSON.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def main(mode: str, where: str, seconds: float) -> None:
    if mode == "direct":
        sock = socket.create_connection(("127.0.0.1", int(where)))
        sock.sendall(b"pong\n")
        if recv_exact(sock, 2) != b"ok":
            raise SystemExit("no ok")
    else:
        from ipc_core.routing import connect

        sock = connect("pong", Path(where))
    sock.setblocking(True)
    tcp = 1 if sock.family in (socket.AF_INET, socket.AF_INET6) else 0
    msg = b"\x00\x00\x00\x10" + b"x" * 16
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        sock.sendall(msg)
        if recv_exact(sock, len(msg)) != msg:
            raise SystemExit("bad echo")
        n += 1
    elapsed = time.perf_counter() - start
    print(json.dumps({"rate": n / elapsed, "p50_us": elapsed / n * 1e6, "tcp_socket": tcp}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
