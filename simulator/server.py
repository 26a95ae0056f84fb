"""The threaded HTTP/1.1 server: reads a request, asks the app for a Reply, and carries it out.

Built on http.server so the socket is fully ours: a Reply may wait, drop the connection without a
response, stream a body at a limited rate, or close mid-body after announcing the full length.
Request bodies are read with Content-Length or chunked encoding, up to MAX_BODY bytes. Logs show the
method, the path without its query string (result URLs carry signatures) and the status, as JSON fields.
"""

from __future__ import annotations

import logging
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kling_relay.simulator.app import SimulatorApp
from kling_relay.simulator.errors import ApiError
from kling_relay.simulator.replies import Reply, Request, error_envelope

log = logging.getLogger("simulator")

MAX_BODY = 80 * 1024 * 1024  # four 10 MB images in base64, with room for JSON
RATE_CHUNK_MIN = 1024


class BodyError(Exception):
    pass


class SimHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, SimRequestHandler)
        self.app: SimulatorApp | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unhandled error serving %s", client_address)


class SimRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: SimHTTPServer

    def version_string(self) -> str:
        return "kling-simulator"

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    # -- reading ---------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            raise BodyError("invalid Content-Length") from None
        if length < 0 or length > MAX_BODY:
            raise BodyError("request body too large")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise BodyError("invalid chunked encoding") from None
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise BodyError("request body too large")
            parts.append(self.rfile.read(size))
            self.rfile.readline(16)

    def _dispatch(self) -> None:
        app = self.server.app
        assert app is not None
        try:
            body = self._read_body()
        except BodyError as exc:
            self.close_connection = True
            self._send(error_envelope(ApiError(1200, str(exc))))
            return
        parts = urlsplit(self.path)
        req = Request(method=self.command, path=parts.path or "/", query=parse_qs(parts.query),
                      headers=self.headers, body=body)
        try:
            reply = app.handle(req)
        except Exception:
            log.exception("handler crashed on %s %s", self.command, parts.path)
            reply = error_envelope(ApiError(5000))
        self._send(reply)

    # -- writing ---------------------------------------------------------------------------------
    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, reply: Reply) -> None:
        app = self.server.app
        if reply.delay > 0 and app is not None:
            app.stopping.wait(reply.delay)
        if reply.drop:
            log.info("%s %s dropped without a response", self.command, urlsplit(self.path).path)
            self._drop()
            return
        try:
            self._send_head(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if self.command == "HEAD":
            return
        if reply.stream is None:
            try:
                self.wfile.write(reply.body)
            except (BrokenPipeError, ConnectionResetError):  # e.g. gave up on a delayed answer
                self.close_connection = True
            return
        sent, complete = 0, False
        try:
            sent, complete = self._write_stream(reply)
        finally:
            if reply.on_finish is not None:
                reply.on_finish(sent, complete)

    def _send_head(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        length = reply.length if reply.stream is not None else len(reply.body)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _write_stream(self, reply: Reply) -> tuple[int, bool]:
        """Write the streamed body honouring rate and truncation; (bytes sent, whole body sent)."""
        assert reply.stream is not None
        limit = reply.length if reply.truncate_after is None else min(reply.length, reply.truncate_after)
        piece = max(RATE_CHUNK_MIN, reply.rate // 20) if reply.rate else None
        started = time.monotonic()
        sent = 0
        try:
            for chunk in reply.stream:
                chunk = chunk[:limit - sent]
                for i in range(0, len(chunk), piece or len(chunk) or 1):
                    part = chunk[i:i + piece] if piece else chunk
                    self.wfile.write(part)
                    sent += len(part)
                    if reply.rate:
                        ahead = sent / reply.rate - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)
                if sent >= limit and limit < reply.length:
                    break  # truncated on purpose; otherwise let the stream run out by itself
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
            return sent, False
        if sent < reply.length:
            self._drop()
            return sent, False
        return sent, True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.info("request", extra={"method": self.command, "path": urlsplit(self.path).path, "status": code})

    def log_message(self, format: str, *args: Any) -> None:
        log.info(format, *args, extra={"client": self.address_string()})
