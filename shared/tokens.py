"""Per-job callback tokens and API bearer tokens, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from shared.settings import Secret


def callback_token(secret: Secret, job_id: str) -> str:
    """HMAC-SHA256 of the job id: the token in a job's callback URL, unguessable without CALLBACK_SECRET."""
    return hmac.new(secret.reveal().encode(), job_id.encode(), hashlib.sha256).hexdigest()


def callback_token_ok(secret: Secret, job_id: str, token: str | None) -> bool:
    if not token:
        return False
    return hmac.compare_digest(callback_token(secret, job_id).encode(), token.encode("utf-8", "replace"))


def bearer_ok(authorization: str | None, tokens: Iterable[Secret]) -> bool:
    """True when the Authorization header is `Bearer <one of tokens>`; checks every token (no early exit)."""
    if not authorization or not authorization.startswith("Bearer "):
        return False
    given = authorization[len("Bearer "):].strip().encode("utf-8", "replace")
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(token.reveal().encode(), given)
    return ok
