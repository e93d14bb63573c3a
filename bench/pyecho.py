"""A naive Python echo server (selectors, raw bytes): a reference point for pongd.

python -m bench.pyecho PATH
"""

import os
import selectors
import signal
import socket
import sys


def main(path: str) -> None:
    sel = selectors.DefaultSelector()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    srv.bind(path)
    srv.listen(1024)
    srv.setblocking(False)
    sel.register(srv, selectors.EVENT_READ)
    pending: dict[socket.socket, bytes] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            for key, events in sel.select():
                sock = key.fileobj
                if sock is srv:
                    conn, _ = srv.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = pending.pop(sock, None)
                    if data is None:
                        data = sock.recv(262144)
                        if not data:
                            raise ConnectionError
                    try:
                        sent = sock.send(data)
                    except BlockingIOError:
                        sent = 0
                except BlockingIOError:
                    continue
                except OSError:
                    sel.unregister(sock)
                    pending.pop(sock, None)
                    sock.close()
                    continue
                if sent < len(data):  # stop reading until the rest is gone
                    pending[sock] = data[sent:]
                    if not events & selectors.EVENT_WRITE:
                        sel.modify(sock, selectors.EVENT_WRITE)
                elif events & selectors.EVENT_WRITE:
                    sel.modify(sock, selectors.EVENT_READ)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main(sys.argv[1])
