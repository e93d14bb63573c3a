"""A slow echo service, to put back-pressure on a relay.

    python bench/slowecho.py PATH [CHUNK_BYTES] [PAUSE_S]

One thread per connection, blocking and half-duplex: read up to CHUNK bytes,
write them all back (blocking until the relay takes them), sleep PAUSE, again.
While it is blocked writing it does not read, so a relay that stops reading
its replies while its own writes to the service are blocked deadlocks.
"""

import os
import signal
import socket
import sys
import threading
import time


def serve(conn: socket.socket, chunk: int, pause: float) -> None:
    with conn:
        try:
            while data := conn.recv(chunk):
                conn.sendall(data)
                time.sleep(pause)
        except OSError:
            pass


def main(path: str, chunk: int = 16384, pause: float = 0.002) -> None:
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(128)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=serve, args=(conn, chunk, pause), daemon=True).start()
    finally:
        os.unlink(path)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        args[0],
        int(args[1]) if len(args) > 1 else 16384,
        float(args[2]) if len(args) > 2 else 0.002,
    )
