"""Per-job callback tokens and API bearer tokens (apps and operators: `Caller`), compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kling_relay.shared.secret import NamedToken
from kling_relay.shared.settings import Secret


def callback_token(secret: Secret, job_id: str) -> str:
    """HMAC-SHA256 of the job id: the token in a job's callback URL, unguessable without CALLBACK_SECRET."""
    return hmac.digest(secret.reveal().encode(), job_id.encode(), hashlib.sha256).hex()


def callback_token_ok(secret: Secret, job_id: str, token: str | None) -> bool:
    if not token:
        return False
    return hmac.compare_digest(callback_token(secret, job_id).encode(), token.encode("utf-8", "replace"))


def bearer_value(authorization: str | None) -> bytes | None:
    """The credentials of an `Authorization: Bearer <token>` header (the scheme is case-insensitive, RFC 7235)."""
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    return authorization[7:].strip().encode("utf-8", "replace")


def bearer_token_number(authorization: str | None, tokens: Iterable[Secret]) -> int | None:
    """Which of `tokens` (1-based) the Bearer header carries, or None; compares with every token (no early exit).

    Ops events record this number as "who", never any part of the token itself.
    """
    given = bearer_value(authorization)
    if given is None:
        return None
    return token_number(given, tokens)


def token_number(given: bytes, tokens: Iterable[Secret]) -> int | None:
    """Which of `tokens` (1-based) equals `given`, or None; compares with every token (no early exit)."""
    found = None
    for number, token in enumerate(tokens, start=1):
        if hmac.compare_digest(token.reveal().encode(), given) and found is None:
            found = number
    return found


def bearer_ok(authorization: str | None, tokens: Iterable[Secret]) -> bool:
    """True when the Authorization header is `Bearer <one of tokens>`."""
    return bearer_token_number(authorization, tokens) is not None


@dataclass(frozen=True)
class Caller:
    """Who a `/v1` request comes from: the name of its token and whether it may act as an operator.

    An app (a token of API_TOKENS) sees and acts on its own jobs only; an operator (OPS_TOKENS) on every job and
    the ops routes. Backwards compatible rule: while OPS_TOKENS is unset, every API token is also an operator
    (a one-app relay keeps its status and resume routes); once it is set, app tokens lose them.
    """

    name: str
    ops: bool

    @property
    def app_scope(self) -> str | None:
        """The app whose jobs this caller may see: its own name, or None (all jobs) for an operator."""
        return None if self.ops else self.name


def identify(authorization: str | None, api_tokens: Sequence[NamedToken],
             ops_tokens: Sequence[NamedToken] | None) -> Caller | None:
    """The caller whose token the Bearer header carries, or None; compares with every token (no early exit)."""
    given = bearer_value(authorization)
    if given is None:
        return None
    everyone = [*api_tokens, *(ops_tokens or ())]
    number = token_number(given, everyone)
    if number is None:
        return None
    token = everyone[number - 1]
    return Caller(token.name, ops=number > len(api_tokens) or ops_tokens is None)
