"""A small HTTP reverse proxy that can be told, at runtime, to refuse requests: S3 having a bad minute.

It runs in the test process on a thread, with a real listening socket on 127.0.0.1, so the relay's worker
processes reach it like any S3 endpoint (point their `S3_ENDPOINT_URL` at `proxy.url`):

    proxy = FaultyProxy("http://127.0.0.1:<moto port>").start()
    proxy.refuse("503", match=FaultyProxy.multipart_requests)   # UploadPart, Complete, Abort answer 503 SlowDown
    proxy.wait_refused(10)                                       # until 10 requests were refused
    proxy.heal()                                                 # forward everything again
    proxy.stop()

Modes:
- ``"503"``: the request body is read, then answered ``503 SlowDown`` with S3's XML error body (boto3 retries
  it, then raises ``ClientError`` with code ``SlowDown``); a throttle, so boto3 waits up to 1, 2, 4, 8 s
  between its tries.
- ``"500"``: the same with ``500 InternalError`` ("please try again"); not a throttle, so boto3's tries
  follow each other within a fraction of a second and a refused call fails fast.
- ``"reset"``: the request is read, then the TCP connection is closed with an RST (SO_LINGER 0), no answer
  at all (boto3 sees a connection reset / closed connection).

A refused request never reaches the upstream, so a refusal changes nothing there. `refuse(count=N)` heals by
itself after N refusals; otherwise refusals last until `heal()`. `match(method, path_with_query)` limits the
refusals to some requests (others are forwarded). Counters: `refused`, `forwarded`, and `seen` (the
method and path of every request, in order).

Forwarding is simple and complete enough for boto3 against moto: the whole request body is read
(Content-Length or chunked), sent upstream on a fresh connection with the same method, path and headers
(hop-by-hop headers dropped), and the whole answer is relayed with its status and headers. Bodies are held
in memory, which is fine for test objects.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

Mode = Literal["503", "500", "reset"]
Matcher = Callable[[str, str], bool]

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "expect", "proxy-connection"})
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>faulty-proxy</RequestId></Error>")
INTERNAL_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
                  b"<Message>We encountered an internal error. Please try again.</Message>"
                  b"<RequestId>faulty-proxy</RequestId></Error>")
UPSTREAM_TIMEOUT = 30.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultyProxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: pytest would show it as captured stderr of every test

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline(1024).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024).strip():
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(16)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        proxy = self.server.proxy
        mode = proxy._decide(self.command, self.path)
        if mode == "reset":
            self._reset()
        elif mode == "503":
            self._answer(503, [("Content-Type", "application/xml")], SLOW_DOWN)
        elif mode == "500":
            self._answer(500, [("Content-Type", "application/xml")], INTERNAL_ERROR)
        else:
            self._forward(body)

    def _reset(self) -> None:
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _forward(self, body: bytes) -> None:
        upstream = self.server.proxy.upstream
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        if self.command in ("GET", "HEAD", "DELETE") and not body:
            headers.pop("Content-Length")
        conn = http.client.HTTPConnection(upstream.hostname or "127.0.0.1", upstream.port or 80,
                                          timeout=UPSTREAM_TIMEOUT)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            status = response.status
            out = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
        except OSError:
            self._answer(502, [("Content-Type", "text/plain")], b"upstream unreachable")
            return
        finally:
            conn.close()
        self._answer(status, out, payload, keep_length=self.command == "HEAD")

    def _answer(self, status: int, headers: list[tuple[str, str]], payload: bytes, *,
                keep_length: bool = False) -> None:
        try:
            self.send_response_only(status)
            for name, value in headers:
                if name.lower() == "content-length" and not keep_length:
                    continue
                self.send_header(name, value)
            if not keep_length:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815 - http.server's naming

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):  # the socket was reset on purpose
            pass


class FaultyProxy:
    """A reverse proxy to `upstream` (an http:// URL) that refuses requests on demand (module docstring)."""

    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = urlsplit(upstream)
        if self.upstream.scheme != "http" or not self.upstream.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self._server = _Server((host, port), _Handler)
        self._server.proxy = self
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._mode: Mode | None = None
        self._match: Matcher | None = None
        self._left: int | None = None
        self.refused = 0
        self.forwarded = 0
        self.seen: list[tuple[str, str]] = []

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"FaultyProxy(url={self.url!r}, upstream={self.upstream.geturl()!r}, mode={self._mode!r})"

    # --- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> FaultyProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"faulty-proxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.heal()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults -------------------------------------------------------------------------------------------------
    def refuse(self, mode: Mode, *, match: Matcher | None = None, count: int | None = None) -> None:
        """Refuse matching requests (all if match is None) in `mode`, until heal() or `count` refusals."""
        if mode not in ("503", "500", "reset"):
            raise ValueError(f"unknown mode {mode!r}")
        if count is not None and count <= 0:
            raise ValueError("count must be positive")
        with self._cond:
            self._mode, self._match, self._left = mode, match, count

    def heal(self) -> None:
        """Forward every request again."""
        with self._cond:
            self._mode, self._match, self._left = None, None, None
            self._cond.notify_all()

    @property
    def refusing(self) -> bool:
        with self._cond:
            return self._mode is not None

    def wait_refused(self, n: int, timeout: float = 60.0) -> None:
        """Block until at least n requests were refused in total; TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.refused >= n, timeout):
                raise TimeoutError(f"only {self.refused} of {n} requests refused within {timeout}s")

    @staticmethod
    def multipart_requests(method: str, path: str) -> bool:
        """Matcher for requests on an open multipart upload: UploadPart, CompleteMultipartUpload, Abort."""
        return "uploadId=" in path

    def _decide(self, method: str, path: str) -> Mode | None:
        with self._cond:
            self.seen.append((method, path))
            mode = self._mode
            if mode is not None and (self._match is None or self._match(method, path)):
                self.refused += 1
                if self._left is not None:
                    self._left -= 1
                    if self._left == 0:
                        self._mode, self._match, self._left = None, None, None
                self._cond.notify_all()
                return mode
            self.forwarded += 1
            return None
