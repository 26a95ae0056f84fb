"""Serving result videos at their signed, expiring URLs.

`GET|HEAD /_sim/videos/<task_id>/<video_id>.mp4?expires=&sig=`: a bad or missing signature or a past
expiry answers 403 (like a CDN or S3 presigned URL), an unknown video 404. The body is streamed from
the rendered file or generated on the fly (synthetic videos), never held in memory, with
Content-Length, `Accept-Ranges: bytes` and single-range support (206 / 416). The download knobs
(`download_rate`, `download_truncate_bytes`) apply to every body sent. A synthetic video's sha256 is
computed while it is first served whole (or, failing that, when stats are asked for).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from kling_relay.simulator.replies import Reply, Request
from kling_relay.simulator.synthetic import SyntheticVideo
from kling_relay.simulator.tasks import Video
from kling_relay.simulator.urls import VIDEO_PATH_PREFIX

if TYPE_CHECKING:
    from kling_relay.simulator.app import SimulatorApp

_PATH = re.compile(r"^([^/]+)/([^/]+)\.mp4$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 64 * 1024


def _text(status: int, message: str) -> Reply:
    return Reply(status=status, body=message.encode(), content_type="text/plain; charset=utf-8")


def _file_chunks(path: Path, start: int, end: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


def _hashing(chunks: Iterator[bytes], video: Video) -> Iterator[bytes]:
    """Pass chunks through, and record the sha256 if the whole stream was consumed."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        yield chunk
    video.sha256 = digest.hexdigest()


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end-exclusive) of a single satisfiable range, None for the whole body, 'bad' if 416."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # multi-range or other units: RFC 9110 lets a server ignore it
    first, last = match.groups()
    if not first and not last:
        return "bad"
    if not first:
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = min(size, int(last) + 1) if last else size
    if start >= size or start >= end:
        return "bad"
    return start, end


def serve(app: SimulatorApp, req: Request) -> Reply:
    app.stats.request(f"{req.method} {VIDEO_PATH_PREFIX}{{task_id}}/{{video_id}}.mp4")
    if req.method not in ("GET", "HEAD"):
        return _text(405, "method not allowed")
    match = _PATH.match(req.path[len(VIDEO_PATH_PREFIX):])
    expires_raw, sig = req.arg("expires"), req.arg("sig")
    if match is None or expires_raw is None or sig is None or not expires_raw.isdigit():
        return _text(403, "AccessDenied: missing or malformed signature")
    task_id, video_id = unquote(match.group(1)), unquote(match.group(2))
    expires = int(expires_raw)
    if not app.signer.valid(task_id, video_id, expires, sig):
        return _text(403, "AccessDenied: signature does not match")
    if time.time() >= expires:
        return _text(403, "AccessDenied: request has expired")
    video = app.engine.find_video(task_id, video_id)
    if video is None or (video.path is not None and not video.path.exists()):
        return _text(404, "NoSuchKey: the video does not exist")
    return _body_reply(app, req, task_id, video)


def _body_reply(app: SimulatorApp, req: Request, task_id: str, video: Video) -> Reply:
    size = video.size
    span = _byte_range(req.headers.get("Range"), size)
    headers = {"Accept-Ranges": "bytes"}
    if span == "bad":
        headers["Content-Range"] = f"bytes */{size}"
        return Reply(status=416, headers=headers, content_type="text/plain; charset=utf-8")
    start, end = span if isinstance(span, tuple) else (0, size)
    status = 200
    if isinstance(span, tuple):
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if video.path is not None:
        chunks = _file_chunks(video.path, start, end)
    elif video.sha256 is None and (start, end) == (0, size) and req.method == "GET":
        chunks = _hashing(SyntheticVideo(video.id, size).iter_range(), video)
    else:
        chunks = SyntheticVideo(video.id, size).iter_range(start, end)
    knobs = app.faults.knobs
    if req.method == "GET":
        app.stats.download(task_id, started=1)

    def finished(sent: int, complete: bool) -> None:
        if req.method == "GET":
            app.stats.download(task_id, completed=int(complete), bytes_sent=sent)

    return Reply(status=status, content_type="video/mp4", headers=headers, stream=chunks,
                 length=end - start, truncate_after=knobs.download_truncate_bytes,
                 rate=knobs.download_rate, on_finish=finished)
