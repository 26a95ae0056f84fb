"""Kling's two auth modes, answering with Kling's 100x codes.

AK/SK mode: `Authorization: Bearer <JWT>`, HS256-signed with the secret key, `iss` = access key,
`exp` required, `nbf` optional, both checked with a small leeway. API-key mode (resellers): the Bearer
value must equal the key. Both compare secrets in constant time; neither ever logs or echoes them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from kling_relay.simulator.errors import ApiError

DEMO_ACCESS_KEY = "demo-access-key"
DEMO_SECRET_KEY = "demo-secret-key"  # noqa: S105 - the documented demo credential


def _b64url_decode(part: str) -> bytes:
    padded = part + "=" * (-len(part) % 4)
    return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)


def _json_part(part: str) -> dict[str, Any]:
    value = json.loads(_b64url_decode(part))
    if not isinstance(value, dict):
        raise ValueError("JWT part is not a JSON object")
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class Authenticator:
    """Checks an Authorization header; `check` returns normally or raises ApiError(100x)."""

    def __init__(self, *, access_key: str | None = None, secret_key: str | None = None,
                 api_key: str | None = None, leeway: float = 5.0) -> None:
        if api_key is None and (access_key is None or secret_key is None):
            raise ValueError("give an API key, or both an access key and a secret key")
        self._access_key = access_key
        self._secret_key = secret_key
        self._api_key = api_key
        self._leeway = leeway

    @property
    def mode(self) -> str:
        return "api-key" if self._api_key is not None else "jwt"

    def __repr__(self) -> str:
        return f"Authenticator(mode={self.mode!r})"

    def check(self, header: str | None, now: float) -> None:
        if header is None or not header.strip():
            raise ApiError(1001)
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer":
            raise ApiError(1002, "Authorization must use the Bearer scheme")
        if not token:
            raise ApiError(1001)
        if self._api_key is not None:
            if not hmac.compare_digest(token.encode(), self._api_key.encode()):
                raise ApiError(1002)
            return
        self._check_jwt(token, now)

    def _check_jwt(self, token: str, now: float) -> None:
        assert self._access_key is not None and self._secret_key is not None
        parts = token.split(".")
        if len(parts) != 3:
            raise ApiError(1002, "Authorization token is not a JWT")
        try:
            header = _json_part(parts[0])
            claims = _json_part(parts[1])
            signature = _b64url_decode(parts[2])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ApiError(1002, "Authorization token is malformed") from None
        if header.get("alg") != "HS256":
            raise ApiError(1002, "Authorization token must be signed with HS256")
        expected = hmac.new(self._secret_key.encode(), f"{parts[0]}.{parts[1]}".encode("ascii"),
                            hashlib.sha256).digest()
        if not hmac.compare_digest(signature, expected):
            raise ApiError(1002, "Authorization token signature is invalid")
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or not hmac.compare_digest(issuer.encode(), self._access_key.encode()):
            raise ApiError(1002, "Authorization token issuer is not a known access key")
        exp = _number(claims.get("exp"))
        if exp is None:
            raise ApiError(1002, "Authorization token has no valid exp claim")
        if "nbf" in claims:
            nbf = _number(claims["nbf"])
            if nbf is None:
                raise ApiError(1002, "Authorization token has an invalid nbf claim")
            if now + self._leeway < nbf:
                raise ApiError(1003)
        if now - self._leeway >= exp:
            raise ApiError(1004)
