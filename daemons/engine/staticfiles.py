"""Static files over plain HTTP, for a daemon whose port also serves pages
(ipc-websocketd's demo page or ``--static DIR``; an HTTP daemon later).

Why in the engine: serving files is I/O (reads on each request, inside the
loop) shared by the protocol commands, not a protocol of its own; it moved
out of ``websocketd.py`` (issue 14) to keep that module the WebSocket
handshake and its flags. The request itself (method, path, the answer's
head) stays with the command's Sans-I/O HTTP handling.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import weakref
from pathlib import Path

__all__ = ["MAX_STATIC_FILE", "SHARED_BODY", "SharedBody", "StaticFiles", "content_type"]

log = logging.getLogger("ipc.daemon.static")

#: Static files are read inside the loop: keep them small.
MAX_STATIC_FILE = 4 * 1024 * 1024
#: Bodies from this size on are shared between the requests that fetch the
#: same version of a file, and queued as they are rather than copied into
#: each response: 60 clients that never read a 4 MiB file hold it once.
SHARED_BODY = 64 * 1024
#: Content-Type by extension, before mimetypes (which varies by host).
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
}


def content_type(name: str) -> str:
    """Content-Type by extension (our table first: mimetypes varies by host)."""
    suffix = Path(name).suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


class StaticFiles:
    """Files under one directory, for plain HTTP GETs on the WebSocket port.

    Safe against path traversal: the URL path is percent-decoded, then any
    segment starting with ``.`` (``..``, ``.``, dotfiles) is refused and the
    resolved file (symlinks followed) must still be inside the root. A
    directory means its ``index.html``. Files are read on each request (edits
    show at once) and inside the loop, hence :data:`MAX_STATIC_FILE`.

    Memory: a body of :data:`SHARED_BODY` bytes or more is one object for
    every request of the same version of the file (device, inode, size,
    mtime) while any of them is still being sent, so clients that never read
    cost a reference each, not a copy each.
    """

    def __init__(self, root: str | Path, *, name: str = "ipc") -> None:
        self.name = name
        self.root = Path(root).resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"{root}: not a directory")
        self._shared: weakref.WeakValueDictionary[tuple[int, ...], SharedBody] = (
            weakref.WeakValueDictionary()
        )

    def find(self, url_path: str) -> tuple[bytes | bytearray, str] | None:
        """The body and Content-Type for a decoded URL path, or None (404)."""
        parts = [p for p in url_path.split("/") if p]
        if any(p.startswith(".") or "\\" in p or "\0" in p for p in parts):
            return None
        target = self.root.joinpath(*parts)
        try:
            if target.is_dir():
                target = target / "index.html"
            real = target.resolve(strict=True)
            if not real.is_relative_to(self.root) or not real.is_file():
                return None
            st = real.stat()
            if st.st_size > MAX_STATIC_FILE:
                log.warning("%s: not serving %s: over %d bytes", self.name, real, MAX_STATIC_FILE)
                return None
            return self._body(real, st), content_type(real.name)
        except (OSError, RuntimeError, ValueError):
            return None

    def _body(self, real: Path, st: os.stat_result) -> bytes | bytearray:
        if st.st_size < SHARED_BODY:
            return real.read_bytes()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        body = self._shared.get(key)
        if body is None:
            body = SharedBody(real.read_bytes())
            if len(body) == st.st_size:  # not changed while we read it
                self._shared[key] = body
        return body


class SharedBody(bytearray):
    """A file body that requests share (a weak reference can point at it)."""

    __slots__ = ("__weakref__",)
