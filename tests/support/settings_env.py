"""The environment a relay process reads (REDIS_URL, Kling, callbacks, API tokens, S3), for tests.

    load_settings(relay_env(REDIS_URL=redis_url))                        # every required setting, nothing reachable
    relay_env(KLING_ACCESS_KEY="ak", KLING_SECRET_KEY="sk", S3_BUCKET="videos")   # override any of them

What the base holds: a Redis and a Kling on closed ports (nothing answers), Kling auth by API key, a public URL
on 127.0.0.1, a callback secret and one API token long enough for the settings' checks, a bucket name. Passing
KLING_ACCESS_KEY switches Kling auth to access/secret keys (the API key is left out: the settings refuse both).
"""

from __future__ import annotations

CALLBACK_SECRET = "callback-secret-0123456789"
API_TOKEN = "token-aaaaaaaaaaaaaaaa"
KLING_API_KEY = "k" * 32

BASE: dict[str, str] = {
    "REDIS_URL": "redis://127.0.0.1:1/0",
    "KLING_BASE_URL": "http://127.0.0.1:9",
    "KLING_API_KEY": KLING_API_KEY,
    "PUBLIC_BASE_URL": "http://127.0.0.1:8000",
    "CALLBACK_SECRET": CALLBACK_SECRET,
    "API_TOKENS": API_TOKEN,
    "S3_BUCKET": "videos",
}


def relay_env(**overrides: str) -> dict[str, str]:
    """BASE with `overrides` on top: a complete environment that `load_settings` accepts as it is."""
    env = dict(BASE)
    if "KLING_ACCESS_KEY" in overrides:
        del env["KLING_API_KEY"]
    env.update(overrides)
    return env
