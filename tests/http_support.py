"""A real HTTP server on the loopback interface with range requests, for reading remote COGs,
and faults to test against: a server that stalls, or drops the connection mid-body."""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.root = root
        self.fault: str | None = None  # None, "stall" or "drop"
        self.fault_after = 0  # bytes offset from which range requests meet the fault
        self.fault_only: set[str] | None = None  # file names that meet it (None: all)
        self.requests = 0
        #: body bytes sent, in all and per User-Agent (a test names each process by its agent)
        self.bytes_served = 0
        self.bytes_by_agent: Counter[str] = Counter()
        self.posted: list[bytes] = []
        self._count_lock = threading.Lock()
        self.stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: RangeServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_POST(self) -> None:
        """A recorded answer: ``<path>.post.json`` under the root (a STAC API's /search);
        the request's body is kept in ``server.posted``."""
        length = int(self.headers.get("Content-Length", 0))
        self.server.posted.append(self.rfile.read(length))
        path = self.server.root / (self.path.split("?")[0].strip("/") + ".post.json")
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/geo+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _sent(self, data: bytes) -> None:
        """Send ``data``, counted first: the client can see no byte before it is counted."""
        with self.server._count_lock:
            self.server.bytes_served += len(data)
            self.server.bytes_by_agent[self.headers.get("User-Agent", "")] += len(data)
        self.wfile.write(data)

    def _serve(self, head: bool) -> None:
        self.server.requests += 1
        path = self.server.root / (self.path.split("?")[0].lstrip("/") or "index.json")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start >= size:
                self.send_error(416)
                return
            status = 206
        with open(path, "rb") as f:  # only the range: a large scene is not read whole
            f.seek(start)
            body = f.read(end + 1 - start)
        faulty = m is not None and start >= self.server.fault_after
        if self.server.fault_only is not None and path.name not in self.server.fault_only:
            faulty = False
        if faulty and self.server.fault == "stall":
            self.server.stop.wait(120)  # until the test ends: the client must time out
            return
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        mtime = path.stat().st_mtime
        self.send_header("ETag", f'"{hashlib.md5(f"{size}-{mtime}".encode()).hexdigest()}"')
        self.send_header("Last-Modified", email.utils.formatdate(mtime, usegmt=True))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        if faulty and self.server.fault == "drop":
            self._sent(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._sent(body)


@contextlib.contextmanager
def serve(root: Path) -> Iterator[RangeServer]:
    server = RangeServer(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        time.sleep(0.05)


if __name__ == "__main__":  # serve a folder: python -m tests.http_support DIR PORT
    import sys

    RangeServer(Path(sys.argv[1]), int(sys.argv[2])).serve_forever()
