"""Credentials for the Kling API: a cached HS256 JWT from an access/secret key pair, or a static API key.

Both kinds expose the same two calls, so the client does not care which one it holds:
``token()`` gives the Bearer value to send now, ``renew(stale)`` replaces a token the server rejected
as expired. Neither object ever shows its secret in ``repr``/``str``.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from jwt import PyJWS

#: Lifetime Kling's docs prescribe for a token (``exp`` = now + 1800 s).
TOKEN_LIFETIME_S = 1800
#: ``nbf`` is set this far in the past to absorb small clock differences (``nbf`` = now - 5 s).
NOT_BEFORE_SKEW_S = 5
#: A cached token is replaced once fewer than this many seconds of its lifetime are left.
DEFAULT_RENEW_MARGIN_S = 300.0


@functools.cache
def _jws() -> PyJWS:
    """PyJWT's signer with HS256 only, made on the first signature: PyJWT imports `cryptography` (about 0.1 s of
    CPU), which a process that never signs (the web process, every time gunicorn replaces a worker) goes without."""
    from jwt import PyJWS
    from jwt.algorithms import HMACAlgorithm

    class IssuedKeyHS256(HMACAlgorithm):
        """HS256 without PyJWT's short-key warning: Kling issues the secret key, its length is not ours."""

        def check_key_length(self, key: Any) -> str | None:
            return None

    jws = PyJWS(algorithms=["HS256"])
    jws.unregister_algorithm("HS256")
    jws.register_algorithm("HS256", IssuedKeyHS256(HMACAlgorithm.SHA256))
    return jws


class TokenSource(Protocol):
    """What the client needs from a credential."""

    #: ``"jwt"`` or ``"api_key"``: shown in reprs and logs instead of the secret.
    mode: str

    def token(self) -> str:
        """The Bearer value to send now."""
        ...

    def renew(self, stale: str) -> str:
        """A fresh Bearer value after the server rejected ``stale`` as expired."""
        ...


class StaticApiKey:
    """A static API key, sent as ``Authorization: Bearer <key>``: the official host's API keys (Kling's newer docs
    issue these and call the AK/SK pair "legacy") or a reseller's key. Renewing it changes nothing."""

    mode = "api_key"

    def __init__(self, api_key: str) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self._key = api_key

    def token(self) -> str:
        return self._key

    def renew(self, stale: str) -> str:
        return self._key

    def __repr__(self) -> str:
        return "StaticApiKey(<redacted>)"


class JwtTokenSource:
    """Signs Kling JWTs (``iss`` = access key, HS256 with the secret key) and reuses them.

    A token is reused until fewer than ``renew_margin`` seconds of its lifetime remain, then replaced.
    The cache is guarded by a lock, so one instance can serve many threads. ``clock`` returns Unix
    seconds and is injectable so tests can move time.
    """

    mode = "jwt"

    def __init__(self, access_key: str, secret_key: str, *, clock: Callable[[], float] = time.time,
                 renew_margin: float = DEFAULT_RENEW_MARGIN_S, lifetime: int = TOKEN_LIFETIME_S) -> None:
        if not access_key or not secret_key:
            raise ValueError("access_key and secret_key must both be non-empty")
        if not 0 <= renew_margin < lifetime:
            raise ValueError("renew_margin must be at least 0 and shorter than the token lifetime")
        self._access_key = access_key
        self._secret_key = secret_key
        self._clock = clock
        self._renew_margin = renew_margin
        self._lifetime = lifetime
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0

    def token(self) -> str:
        """The cached token, or a new one if there is none or it is about to expire."""
        with self._lock:
            if self._token is None or self._expires_at - self._clock() < self._renew_margin:
                self._token = self._sign()
            return self._token

    def renew(self, stale: str) -> str:
        """Replace ``stale`` with a new token; if another thread already replaced it, use that one."""
        with self._lock:
            if self._token is None or self._token == stale:
                self._token = self._sign()
            return self._token

    def _sign(self) -> str:
        now = int(self._clock())
        self._expires_at = now + self._lifetime
        claims = {"iss": self._access_key, "exp": self._expires_at, "nbf": now - NOT_BEFORE_SKEW_S}
        payload = json.dumps(claims, separators=(",", ":")).encode()
        return _jws().encode(payload, self._secret_key, algorithm="HS256", headers={"typ": "JWT"})

    def __repr__(self) -> str:
        return "JwtTokenSource(<redacted>)"
