"""Connection set-up through ipc-tcpd, one after another: connect, (a PROXY
v2 header,) the service name, ``ok``, one echoed message, close.

python -m bench.connrate PORT SERVICE SECONDS [--proxy]

Prints one JSON object: connections/s and the set-up latency (connect to the
echo's arrival) percentiles in microseconds. Sequential on purpose: what is
measured is the path one connection takes, not how many run at once.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

_V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    body = (
        socket.inet_aton(client[0])
        + socket.inet_aton(server[0])
        + struct.pack(">HH", client[1], server[1])
    )
    return _V2 + b"\x21\x11" + struct.pack(">H", len(body)) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def main(port: int, service: str, seconds: float, proxy: bool) -> None:
    message = b"\x00\x00\x00\x04ping"
    name = service.encode() + b"\n"
    lat: list[float] = []
    end = time.perf_counter() + seconds
    started = time.perf_counter()
    n = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        # Source addresses rotate over 127.0.0.2-201: closing first leaves
        # TIME_WAIT behind, and one address would run out of ports.
        source = (f"127.0.0.{2 + n % 200}", 0)
        sock = socket.create_connection(("127.0.0.1", port), source_address=source)
        head = proxy_v2(("203.0.113.7", 40000 + n % 20000), ("127.0.0.1", port)) if proxy else b""
        sock.sendall(head + name)
        if recv_exact(sock, 2) != b"ok":
            raise SystemExit("no ok")
        sock.sendall(message)
        if recv_exact(sock, 8) != message:
            raise SystemExit("bad echo")
        lat.append(time.perf_counter() - t0)
        sock.close()
        n += 1
    elapsed = time.perf_counter() - started
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6

    print(json.dumps({"rate": n / elapsed, "p50_us": pct(0.5), "p99_us": pct(0.99), "n": n}))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), "--proxy" in sys.argv[4:])
