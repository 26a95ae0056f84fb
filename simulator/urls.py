"""Signed, expiring result URLs, like a CDN's.

`<public-url>/_sim/videos/<task_id>/<video_id>.mp4?expires=<unix seconds>&sig=<hmac>`: the signature
covers task, video and expiry with a key made at startup, so a URL cannot be extended by editing it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import quote

VIDEO_PATH_PREFIX = "/_sim/videos/"


class UrlSigner:
    def __init__(self, public_url: str) -> None:
        self.public_url = public_url.rstrip("/")
        self._key = secrets.token_bytes(32)

    def __repr__(self) -> str:
        return f"UrlSigner(public_url={self.public_url!r})"

    def _sig(self, task_id: str, video_id: str, expires: int) -> str:
        msg = f"{task_id}/{video_id}/{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def url(self, task_id: str, video_id: str, expires: int) -> str:
        path = f"{VIDEO_PATH_PREFIX}{quote(task_id)}/{quote(video_id)}.mp4"
        return f"{self.public_url}{path}?expires={expires}&sig={self._sig(task_id, video_id, expires)}"

    def valid(self, task_id: str, video_id: str, expires: int, sig: str) -> bool:
        return hmac.compare_digest(sig.encode(), self._sig(task_id, video_id, expires).encode())
