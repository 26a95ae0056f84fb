"""A real local HTTP receiver for notify_url deliveries, for tests.

    with serve_receiver("/hooks/relay", fail_first=1) as (url, handler):
        ...  # POST to url
        headers, body = handler.seen[0]

Each `serve_receiver` makes its own handler class, so `seen` and the answers are per receiver.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver(BaseHTTPRequestHandler):
    """Answers 503 to the first `fail_first` POSTs, then `status`; keeps (lower-cased headers, body) of each in
    `seen` (append under `lock`; read a copy under it while deliveries may still come)."""

    seen: list[tuple[dict[str, str], bytes]]
    status: int
    fail_first: int
    lock: threading.Lock

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        with cls.lock:
            cls.seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
            status = 503 if len(cls.seen) <= cls.fail_first else cls.status
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serve_receiver(path: str, *, status: int = 204, fail_first: int = 0) -> Iterator[tuple[str, type[Receiver]]]:
    """Serve a fresh `Receiver` on a free 127.0.0.1 port; yields (its URL ending in `path`, the handler class)."""
    handler = type("Receiver", (Receiver,), {"seen": [], "status": status, "fail_first": fail_first,
                                             "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{path}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
