"""Kling's error codes, in one table: what each means and what the relay does about it (docs/kling-contract.md).

Every other module asks this table: the client (`kling.kind_for_code`: the kind of error a code raises), flow
control (which codes pause submission, and why: `auth` or `account`; which throttle), and the direct lookup
(which refusals mean "this route does not understand the id": fall back to scanning the list).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Handling(StrEnum):
    """What the relay does when Kling answers a code."""

    RETRY = "retry"  # a server-side problem: the same request may simply be sent again later
    THROTTLE = "throttle"  # too fast / too many in flight: back off, using no attempt
    REJECT = "reject"  # the request itself is refused: resending it fails again
    NOT_FOUND = "not_found"  # no such task (or, on create, no such resource)
    PAUSE_AUTH = "pause_auth"  # credentials or IP allow-list: every call fails alike until fixed
    PAUSE_ACCOUNT = "pause_account"  # balance, resource pack, permissions: creates fail while reads may work


@dataclass(frozen=True)
class Code:
    code: int
    http_status: int
    meaning: str
    handling: Handling


TABLE: dict[int, Code] = {c.code: c for c in (
    Code(1000, 401, "authentication failed", Handling.PAUSE_AUTH),
    Code(1001, 401, "authorization header empty", Handling.PAUSE_AUTH),
    Code(1002, 401, "authorization token invalid", Handling.PAUSE_AUTH),
    Code(1003, 401, "authorization token not yet valid", Handling.PAUSE_AUTH),
    Code(1004, 401, "authorization token expired", Handling.PAUSE_AUTH),
    Code(1100, 429, "account exception", Handling.PAUSE_ACCOUNT),
    Code(1101, 429, "account in arrears", Handling.PAUSE_ACCOUNT),
    Code(1102, 429, "resource pack used up or expired", Handling.PAUSE_ACCOUNT),
    # The relay sends one model: a missing permission is the account's, not the request's.
    Code(1103, 403, "no permission for the resource or model", Handling.PAUSE_ACCOUNT),
    Code(1200, 400, "invalid request parameters", Handling.REJECT),
    Code(1201, 400, "invalid parameter value", Handling.REJECT),
    Code(1202, 404, "invalid request method", Handling.REJECT),
    Code(1203, 404, "requested resource does not exist", Handling.NOT_FOUND),
    Code(1300, 400, "platform policy triggered", Handling.REJECT),
    Code(1301, 400, "content safety policy triggered", Handling.REJECT),
    Code(1302, 429, "requests too fast (rate limit)", Handling.THROTTLE),
    Code(1303, 429, "concurrency or QPS above the resource pack's limit", Handling.THROTTLE),
    Code(1304, 429, "IP allow-list policy", Handling.PAUSE_AUTH),
    Code(5000, 500, "server error", Handling.RETRY),
    Code(5001, 503, "service temporarily unavailable", Handling.RETRY),
    Code(5002, 504, "server timeout", Handling.RETRY),
)}

TOKEN_EXPIRED = 1004  # the one auth code worth a single retry with a fresh token
#: Refusals of a direct lookup that mean "this route does not understand the id": scan the list instead.
LOOKUP_FALLBACK_CODES = frozenset({1200, 1201, 1202, 1203})


def _codes(*handlings: Handling) -> frozenset[int]:
    return frozenset(c.code for c in TABLE.values() if c.handling in handlings)


AUTH_CODES = _codes(Handling.PAUSE_AUTH)
ACCOUNT_CODES = _codes(Handling.PAUSE_ACCOUNT)
PAUSE_CODES = AUTH_CODES | ACCOUNT_CODES
THROTTLE_CODES = _codes(Handling.THROTTLE)


def handling(code: int, http_status: int | None) -> Handling:
    """How to treat a non-zero code; a code not in the table goes by its HTTP status (5xx: retry, else reject)."""
    known = TABLE.get(code)
    if known is not None:
        return known.handling
    return Handling.RETRY if http_status is not None and http_status >= 500 else Handling.REJECT


def pause_reason(code: int | None) -> str:
    """`account` for balance/pack/permission codes (1100-1103), `auth` for the rest (credentials, IP allow-list)."""
    return "account" if code in ACCOUNT_CODES else "auth"
