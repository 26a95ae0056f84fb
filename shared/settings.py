"""Typed, frozen settings read once from the environment.

`load_settings()` reads every variable, collects every problem, and raises `SettingsError` naming each variable
and what is wrong, so a misconfigured process fails at start-up rather than on its first job. Secrets can be
given inline (`CALLBACK_SECRET=...`) or as a file (`CALLBACK_SECRET_FILE=/run/secrets/cb`); they are wrapped in
`Secret`, whose repr and str never show the value.

`load_client_settings()` reads only what the in-process client (`kling_relay.shared.client.Relay`) needs on
the relay's own hosts: REDIS_URL and the optional limits that shape a job at intake. It requires no Kling key,
CALLBACK_SECRET, API_TOKENS or S3_BUCKET.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit

from kling_relay.shared.urlguard import UrlAllowlist

T = TypeVar("T")


class SettingsError(ValueError):
    """One or more environment variables are missing or invalid; `problems` maps name → reason."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {name}: {reason}" for name, reason in problems.items())
        super().__init__(f"invalid configuration:\n{lines}")


class Secret:
    """A string that never shows itself in repr(), str() or a log line; call .reveal() to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Settings:
    """Everything a process needs; built once by load_settings() and passed in, never read from os.environ later."""

    redis_url: str = field(repr=False)  # may carry a password: see redacted()
    kling_base_url: str
    kling_access_key: str | None = field(repr=False)
    kling_secret_key: Secret | None
    kling_api_key: Secret | None
    public_base_url: str
    callback_secret: Secret
    api_tokens: tuple[Secret, ...]
    s3_bucket: str
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    video_url_allowlist: str = "*.klingai.com"
    port: int = 8000
    kling_timeout_seconds: float = 30.0
    kling_connect_timeout_seconds: float = 5.0
    prompt_max_chars: int = 2500
    max_request_bytes: int = 60 * 1024 * 1024
    max_callback_bytes: int = 256 * 1024
    max_video_bytes: int = 4 * 1024 * 1024 * 1024
    job_ttl_seconds: int = 30 * 24 * 3600
    submit_max_attempts: int = 8
    copy_max_attempts: int = 8
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    job_deadline_seconds: float = 6 * 3600.0
    reconcile_interval_seconds: float = 30.0
    reconcile_quiet_seconds: float = 120.0
    reconcile_batch_size: int = 500
    kling_rate_limit_per_second: float = 5.0
    kling_max_in_flight: int = 20
    kling_pause_probe_seconds: float = 60.0
    job_lock_seconds: float = 20.0
    notify_secret: Secret | None = None
    notify_url_allowlist: str = "*"
    events_stream: str = "kling-relay:events"
    log_level: str = "INFO"
    extra: Mapping[str, str] = field(default_factory=dict, repr=False)

    def redacted(self) -> dict[str, Any]:
        """Every setting, printable: secrets as "***", URL passwords removed, the access key shortened."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                continue
            if isinstance(value, Secret):
                value = "***"
            elif isinstance(value, tuple):
                value = ["***" for _ in value]
            elif f.name == "kling_access_key" and value:
                value = value[:4] + "…"
            elif isinstance(value, str) and "@" in value and "://" in value:
                value = _without_password(value)
            out[f.name] = value
        return out

    @property
    def kling_auth_mode(self) -> str:
        return "api_key" if self.kling_api_key else "access_key"


@dataclass(frozen=True)
class ClientSettings:
    """What `Relay` needs to take jobs in and act on them in Redis: no Kling, S3 or API secrets.

    The names and meanings are those of `Settings` (which has every one of these fields too), so code that takes
    jobs in accepts either. `notify_secret` is read only to know whether a job may set `notify_url`.
    """

    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may carry a password
    prompt_max_chars: int = 2500
    job_ttl_seconds: int = 30 * 24 * 3600
    job_deadline_seconds: float = 6 * 3600.0
    reconcile_quiet_seconds: float = 120.0
    notify_secret: Secret | None = None
    notify_url_allowlist: str = "*"

    def redacted(self) -> dict[str, Any]:
        """Every setting, printable: the secret as "***", a Redis password removed."""
        return {"redis_url": _without_password(self.redis_url), "prompt_max_chars": self.prompt_max_chars,
                "job_ttl_seconds": self.job_ttl_seconds, "job_deadline_seconds": self.job_deadline_seconds,
                "reconcile_quiet_seconds": self.reconcile_quiet_seconds,
                "notify_secret": "***" if self.notify_secret else None,
                "notify_url_allowlist": self.notify_url_allowlist}


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


class _Reader:
    """Reads variables from an environment mapping, recording a problem per bad variable instead of raising."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: dict[str, str] = {}

    def raw(self, name: str, *, secret: bool = False) -> str | None:
        file_name = f"{name}_FILE"
        if secret and self.env.get(file_name):
            if self.env.get(name):
                self.problems[name] = f"set both {name} and {file_name}; use one"
                return None
            path = self.env[file_name]
            try:
                with open(path, encoding="utf-8") as fh:
                    return fh.read().strip() or None
            except OSError as exc:
                self.problems[file_name] = f"cannot read {path!r}: {exc.strerror}"
                return None
        value = self.env.get(name)
        return value.strip() if value is not None and value.strip() else None

    def required(self, name: str, *, secret: bool = False) -> str:
        value = self.raw(name, secret=secret)
        if value is None and name not in self.problems and f"{name}_FILE" not in self.problems:
            hint = f" (or {name}_FILE)" if secret else ""
            self.problems[name] = f"is required{hint}"
        return value or ""

    def parsed(self, name: str, default: T, parse: Callable[[str], T], what: str) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError:
            self.problems[name] = f"must be {what}, got {value!r}"
            return default

    def positive_int(self, name: str, default: int) -> int:
        value = self.parsed(name, default, int, "a whole number")
        if value <= 0:
            self.problems[name] = f"must be greater than 0, got {value}"
        return value

    def positive_float(self, name: str, default: float, what: str = "a number of seconds") -> float:
        value = self.parsed(name, default, float, what)
        if not math.isfinite(value):
            self.problems[name] = f"must be {what}, got {value}"
            return default
        if value <= 0:
            self.problems[name] = f"must be greater than 0, got {value}"
        return value

    def url(self, name: str, value: str, *, https: bool = False) -> str:
        """An http(s) URL with a host; with `https`, plain http only for a loopback host (a local simulator)."""
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problems[name] = f"must be an http(s) URL with a host, got {_without_password(value)!r}"
        elif https and parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            self.problems[name] = ("must be https (it carries credentials or tokens); plain http only for "
                                   "localhost, 127.0.0.1 or ::1")
        return value.rstrip("/")


def _redis_url(r: _Reader) -> str:
    redis_url = r.raw("REDIS_URL") or "redis://127.0.0.1:6379/0"
    if urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
        r.problems["REDIS_URL"] = f"must be a redis://, rediss:// or unix:// URL, got {_without_password(redis_url)!r}"
    return redis_url


def _notify_allowlist(r: _Reader) -> str:
    notify_allowlist = r.raw("NOTIFY_URL_ALLOWLIST") or "*"
    try:
        UrlAllowlist.parse(notify_allowlist, name="NOTIFY_URL_ALLOWLIST")
    except ValueError as exc:
        r.problems["NOTIFY_URL_ALLOWLIST"] = str(exc)
    return notify_allowlist


def load_client_settings(env: Mapping[str, str] | None = None) -> ClientSettings:
    """Build ClientSettings from `env` (default: os.environ): REDIS_URL (default local) and the optional
    PROMPT_MAX_CHARS, JOB_TTL_SECONDS, JOB_DEADLINE_SECONDS, RECONCILE_QUIET_SECONDS, NOTIFY_SECRET(_FILE) and
    NOTIFY_URL_ALLOWLIST, checked as load_settings() checks them; raise SettingsError listing every problem.
    Kling keys, CALLBACK_SECRET, API_TOKENS and S3_BUCKET are neither required nor read."""
    r = _Reader(os.environ if env is None else env)
    redis_url = _redis_url(r)
    notify_allowlist = _notify_allowlist(r)
    notify_secret = r.raw("NOTIFY_SECRET", secret=True)
    settings = ClientSettings(
        redis_url=redis_url,
        prompt_max_chars=r.positive_int("PROMPT_MAX_CHARS", 2500),
        job_ttl_seconds=r.positive_int("JOB_TTL_SECONDS", 30 * 24 * 3600),
        job_deadline_seconds=r.positive_float("JOB_DEADLINE_SECONDS", 6 * 3600.0),
        reconcile_quiet_seconds=r.positive_float("RECONCILE_QUIET_SECONDS", 120.0),
        notify_secret=Secret(notify_secret) if notify_secret else None,
        notify_url_allowlist=notify_allowlist,
    )
    if r.problems:
        raise SettingsError(r.problems)
    return settings


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from `env` (default: os.environ); raise SettingsError listing every problem."""
    r = _Reader(os.environ if env is None else env)

    redis_url = _redis_url(r)

    base_url = r.url("KLING_BASE_URL", r.required("KLING_BASE_URL"), https=True)
    access_key = r.raw("KLING_ACCESS_KEY", secret=True)
    secret_key = r.raw("KLING_SECRET_KEY", secret=True)
    api_key = r.raw("KLING_API_KEY", secret=True)
    if api_key and (access_key or secret_key):
        r.problems["KLING_API_KEY"] = "set either KLING_API_KEY or KLING_ACCESS_KEY/KLING_SECRET_KEY, not both"
    elif not api_key:
        if not access_key:
            r.problems.setdefault("KLING_ACCESS_KEY", "is required (with KLING_SECRET_KEY), or set KLING_API_KEY")
        if not secret_key:
            r.problems.setdefault("KLING_SECRET_KEY", "is required (with KLING_ACCESS_KEY), or set KLING_API_KEY")

    public_base_url = r.url("PUBLIC_BASE_URL", r.required("PUBLIC_BASE_URL"), https=True)
    callback_secret = r.required("CALLBACK_SECRET", secret=True)
    if callback_secret and len(callback_secret) < 16:
        r.problems["CALLBACK_SECRET"] = "must be at least 16 characters"

    tokens_raw = r.required("API_TOKENS", secret=True)
    tokens = tuple(Secret(t.strip()) for t in tokens_raw.split(",") if t.strip())
    if tokens_raw and not tokens:
        r.problems["API_TOKENS"] = "must list at least one token (comma-separated)"
    if any(len(t.reveal()) < 16 for t in tokens):
        r.problems["API_TOKENS"] = "each token must be at least 16 characters"

    bucket = r.required("S3_BUCKET")
    endpoint = r.raw("S3_ENDPOINT_URL")
    if endpoint:
        r.url("S3_ENDPOINT_URL", endpoint)

    allowlist = r.raw("VIDEO_URL_ALLOWLIST") or "*.klingai.com"
    try:
        UrlAllowlist.parse(allowlist, name="VIDEO_URL_ALLOWLIST")
    except ValueError as exc:
        r.problems["VIDEO_URL_ALLOWLIST"] = str(exc)
    notify_allowlist = _notify_allowlist(r)
    log_level = (r.raw("LOG_LEVEL") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        r.problems["LOG_LEVEL"] = f"must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}"
    notify_secret = r.raw("NOTIFY_SECRET", secret=True)

    settings = Settings(
        redis_url=redis_url,
        kling_base_url=base_url,
        kling_access_key=access_key,
        kling_secret_key=Secret(secret_key) if secret_key else None,
        kling_api_key=Secret(api_key) if api_key else None,
        public_base_url=public_base_url,
        callback_secret=Secret(callback_secret),
        api_tokens=tokens,
        s3_bucket=bucket,
        s3_prefix=r.raw("S3_PREFIX") or "",
        s3_endpoint_url=endpoint.rstrip("/") if endpoint else None,
        video_url_allowlist=allowlist,
        port=r.positive_int("PORT", 8000),
        kling_timeout_seconds=r.positive_float("KLING_TIMEOUT_SECONDS", 30.0),
        kling_connect_timeout_seconds=r.positive_float("KLING_CONNECT_TIMEOUT_SECONDS", 5.0),
        prompt_max_chars=r.positive_int("PROMPT_MAX_CHARS", 2500),
        max_request_bytes=r.positive_int("MAX_REQUEST_BYTES", 60 * 1024 * 1024),
        max_callback_bytes=r.positive_int("MAX_CALLBACK_BYTES", 256 * 1024),
        max_video_bytes=r.positive_int("MAX_VIDEO_BYTES", 4 * 1024 * 1024 * 1024),
        job_ttl_seconds=r.positive_int("JOB_TTL_SECONDS", 30 * 24 * 3600),
        submit_max_attempts=r.positive_int("SUBMIT_MAX_ATTEMPTS", 8),
        copy_max_attempts=r.positive_int("COPY_MAX_ATTEMPTS", 8),
        retry_base_seconds=r.positive_float("RETRY_BASE_SECONDS", 2.0),
        retry_max_seconds=r.positive_float("RETRY_MAX_SECONDS", 300.0),
        job_deadline_seconds=r.positive_float("JOB_DEADLINE_SECONDS", 6 * 3600.0),
        reconcile_interval_seconds=r.positive_float("RECONCILE_INTERVAL_SECONDS", 30.0),
        reconcile_quiet_seconds=r.positive_float("RECONCILE_QUIET_SECONDS", 120.0),
        reconcile_batch_size=r.positive_int("RECONCILE_BATCH_SIZE", 500),
        kling_rate_limit_per_second=r.positive_float("KLING_RATE_LIMIT_PER_SECOND", 5.0,
                                                       "a number of requests per second"),
        kling_max_in_flight=r.positive_int("KLING_MAX_IN_FLIGHT", 20),
        kling_pause_probe_seconds=r.positive_float("KLING_PAUSE_PROBE_SECONDS", 60.0),
        job_lock_seconds=r.positive_float("JOB_LOCK_SECONDS", 20.0),
        notify_secret=Secret(notify_secret) if notify_secret else None,
        notify_url_allowlist=notify_allowlist,
        events_stream=r.raw("EVENTS_STREAM") or "kling-relay:events",
        log_level=log_level,
    )
    if r.problems:
        raise SettingsError(r.problems)
    return settings
