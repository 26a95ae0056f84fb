"""Sign-in to the operators' dashboard: which tokens may sign in, and the sessions kept in Redis.

A dashboard session is a random id in the (signed, HttpOnly, SameSite=Strict) session cookie; Redis keeps
`kr:dashboard:session:<sha256(id)>` with the number of the token that signed in, a fingerprint of that token
(HMAC with the session key, never the token) and the session's CSRF token, expiring SESSION_SECONDS after sign-in.
Signing out deletes it, so a copied cookie is useless afterwards; a token removed from the settings ends its
sessions (the fingerprint no longer matches any token). Tokens are compared in constant time (`shared/tokens.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis

from kling_relay.shared import keys
from kling_relay.shared.settings import Secret, Settings
from kling_relay.shared.tokens import token_number

SESSION_SECONDS = 12 * 3600
_SESSION_KEY_LABEL = b"kling-relay dashboard session key v1"


def signin_tokens(settings: Settings) -> Sequence[Secret]:
    """Operators only: DASHBOARD_TOKENS when set, else OPS_TOKENS, else (no operator tokens at all: every API
    token is an operator, `shared/tokens.py: Caller`) API_TOKENS."""
    return settings.dashboard_tokens or settings.ops_tokens or settings.api_tokens


def session_key(settings: Settings) -> bytes:
    """The key that signs session cookies: derived from CALLBACK_SECRET (no setting of its own)."""
    return hmac.new(settings.callback_secret.reveal().encode(), _SESSION_KEY_LABEL, hashlib.sha256).digest()


def _fingerprint(key: bytes, token: Secret) -> str:
    return hmac.new(key, b"token:" + token.reveal().encode(), hashlib.sha256).hexdigest()


def _id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass(frozen=True)
class DashboardSession:
    session_id: str
    token_number: int
    csrf: str


def sign_in(client: redis.Redis, settings: Settings, given: str) -> DashboardSession | None:
    """A new session if `given` is one of the sign-in tokens, else None."""
    tokens = signin_tokens(settings)
    number = token_number(given.strip().encode("utf-8", "replace"), tokens) if given else None
    if number is None:
        return None
    session = DashboardSession(secrets.token_urlsafe(32), number, secrets.token_urlsafe(32))
    name = keys.dashboard_session(_id_hash(session.session_id))
    pipe = client.pipeline(transaction=True)
    pipe.hset(name, mapping={"token": number, "csrf": session.csrf,
                             "fingerprint": _fingerprint(session_key(settings), tokens[number - 1])})
    pipe.expire(name, SESSION_SECONDS)
    pipe.execute()
    return session


def current(client: redis.Redis, settings: Settings, session_id: object) -> DashboardSession | None:
    """The session with this id while it lasts and its token is still a sign-in token, else None."""
    if not isinstance(session_id, str) or not 20 <= len(session_id) <= 100:
        return None
    record = cast(dict[str, str], client.hgetall(keys.dashboard_session(_id_hash(session_id))))
    if not record:
        return None
    key = session_key(settings)
    still = False
    for token in signin_tokens(settings):
        if hmac.compare_digest(_fingerprint(key, token), record.get("fingerprint", "")):
            still = True
    if not still:
        return None
    return DashboardSession(session_id, int(record["token"]), record["csrf"])


def sign_out(client: redis.Redis, session_id: object) -> None:
    if isinstance(session_id, str) and session_id:
        client.delete(keys.dashboard_session(_id_hash(session_id)))
