"""Typed, frozen settings read once from the environment.

Each variable's name, default, parser and meaning is written once, in `kling_relay.shared.settings_spec.SETTINGS`;
this module walks that table. `load_settings()` reads every variable, collects every problem, and raises
`SettingsError` naming each variable and what is wrong, so a misconfigured process fails at start-up rather than
on its first job. Secrets can be given inline (`CALLBACK_SECRET=...`) or as a file
(`CALLBACK_SECRET_FILE=/run/secrets/cb`); they are wrapped in `Secret`, whose repr and str never show the value.

`load_client_settings()` reads only what the in-process client (`kling_relay.shared.client.Relay`) needs on
the relay's own hosts: REDIS_URL, the optional limits that shape a job at intake and the events stream its
cancellations go to (the settings marked `client` in the table). It requires no Kling key, CALLBACK_SECRET,
API_TOKENS or S3_BUCKET.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kling_relay.shared.secret import NamedToken, Secret, without_password
from kling_relay.shared.settings_spec import CLIENT_SETTINGS, SETTINGS, Setting, https_problem

__all__ = ["ClientSettings", "Secret", "Settings", "SettingsError", "load_client_settings", "load_settings"]


class SettingsError(ValueError):
    """One or more environment variables are missing or invalid; `problems` maps name → reason."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {name}: {reason}" for name, reason in problems.items())
        super().__init__(f"invalid configuration:\n{lines}")


def _redacted(settings: Settings | ClientSettings) -> dict[str, Any]:
    """Every field of a settings dataclass, printable: secrets as "***", URL passwords removed, the access key
    shortened."""
    out: dict[str, Any] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name == "extra":
            continue
        if isinstance(value, Secret):
            value = "***"
        elif isinstance(value, tuple):
            value = ["***" if isinstance(v, Secret) else v for v in value]
        elif f.name == "kling_access_key" and value:
            value = value[:4] + "…"
        elif isinstance(value, str) and "@" in value and "://" in value:
            value = without_password(value)
        out[f.name] = value
    return out


@dataclass(frozen=True)
class Settings:
    """Everything a process needs; built once by load_settings() and passed in, never read from os.environ later.

    One field per entry of `SETTINGS` (named as the variable, in lower case); defaults live in that table only.
    """

    redis_url: str = field(repr=False)  # may carry a password: see redacted()
    kling_base_url: str
    kling_access_key: str | None = field(repr=False)
    kling_secret_key: Secret | None
    kling_api_key: Secret | None
    kling_models: tuple[str, ...]
    public_base_url: str
    plain_http_hosts: tuple[str, ...] | None
    callback_secret: Secret
    kling_webhook_secret: Secret | None
    api_tokens: tuple[NamedToken, ...]
    ops_tokens: tuple[NamedToken, ...] | None
    dashboard_tokens: tuple[Secret, ...] | None
    s3_bucket: str
    s3_prefix: str
    s3_endpoint_url: str | None
    video_url_allowlist: str
    port: int
    kling_timeout_seconds: float
    kling_connect_timeout_seconds: float
    prompt_max_chars: int
    max_request_bytes: int
    max_callback_bytes: int
    max_video_bytes: int
    job_ttl_seconds: int
    submit_max_attempts: int
    copy_max_attempts: int
    retry_base_seconds: float
    retry_max_seconds: float
    job_deadline_seconds: float
    reconcile_interval_seconds: float
    reconcile_quiet_seconds: float
    reconcile_batch_size: int
    kling_rate_limit_per_second: float
    kling_max_in_flight: int
    app_max_active_jobs: int | None
    kling_pause_probe_seconds: float
    kling_query: str
    kling_lookup_max_pages: int
    kling_daily_unit_budget: float | None
    kling_default_units_estimate: float
    job_lock_seconds: float
    notify_secret: Secret | None
    notify_url_allowlist: str
    events_stream: str
    events_stream_maxlen: int
    log_level: str
    metrics_tokens: tuple[Secret, ...] | None
    metrics_public: bool
    worker_metrics_port: int
    worker_metrics_host: str
    extra: Mapping[str, str] = field(default_factory=dict, repr=False)

    def redacted(self) -> dict[str, Any]:
        """Every setting, printable: secrets as "***", URL passwords removed, the access key shortened."""
        return _redacted(self)

    @property
    def kling_auth_mode(self) -> str:
        return "api_key" if self.kling_api_key else "access_key"


@dataclass(frozen=True)
class ClientSettings:
    """What `Relay` needs to take jobs in and act on them in Redis: no Kling, S3 or API secrets.

    The names and meanings are those of `Settings` (which has every one of these fields too), so code that takes
    jobs in accepts either: one field per `client` entry of `SETTINGS`. `notify_secret` is read only to know
    whether a job may set `notify_url`.
    """

    redis_url: str = field(repr=False)  # may carry a password
    kling_models: tuple[str, ...]
    prompt_max_chars: int
    job_ttl_seconds: int
    job_deadline_seconds: float
    reconcile_quiet_seconds: float
    notify_secret: Secret | None
    notify_url_allowlist: str
    events_stream: str
    events_stream_maxlen: int

    def redacted(self) -> dict[str, Any]:
        """Every setting, printable: the secret as "***", a Redis password removed."""
        return _redacted(self)


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

    def read(self, setting: Setting) -> Any:
        """The setting's parsed value, or its default when unset or when it has a problem (then recorded)."""
        name = setting.env
        value = self.raw(name, secret=setting.secret)
        if value is None:
            unreadable = name in self.problems or f"{name}_FILE" in self.problems
            if setting.required and not unreadable:
                self.problems[name] = "is required" + (f" (or {name}_FILE)" if setting.secret else "")
            return setting.default
        try:
            return setting.parse(value, name)
        except ValueError as exc:
            self.problems[name] = str(exc)
            return setting.default

    def read_all(self, settings: Iterable[Setting]) -> dict[str, Any]:
        return {s.field: self.read(s) for s in settings}


def _check_kling_auth(values: Mapping[str, Any], problems: dict[str, str]) -> None:
    """Exactly one auth mode: KLING_API_KEY, or both KLING_ACCESS_KEY and KLING_SECRET_KEY."""
    api_key, access_key, secret_key = (values["kling_api_key"], values["kling_access_key"],
                                       values["kling_secret_key"])
    if api_key and (access_key or secret_key):
        problems["KLING_API_KEY"] = "set either KLING_API_KEY or KLING_ACCESS_KEY/KLING_SECRET_KEY, not both"
    elif not api_key:
        if not access_key:
            problems.setdefault("KLING_ACCESS_KEY", "is required (with KLING_SECRET_KEY), or set KLING_API_KEY")
        if not secret_key:
            problems.setdefault("KLING_SECRET_KEY", "is required (with KLING_ACCESS_KEY), or set KLING_API_KEY")


def load_client_settings(env: Mapping[str, str] | None = None) -> ClientSettings:
    """Build ClientSettings from `env` (default: os.environ): REDIS_URL (default local) and the optional
    KLING_MODELS, PROMPT_MAX_CHARS, JOB_TTL_SECONDS, JOB_DEADLINE_SECONDS, RECONCILE_QUIET_SECONDS,
    NOTIFY_SECRET(_FILE), NOTIFY_URL_ALLOWLIST, EVENTS_STREAM and EVENTS_STREAM_MAXLEN (where a cancel is announced),
    checked as load_settings() checks them; raise SettingsError listing every problem.
    Kling keys, CALLBACK_SECRET, API_TOKENS and S3_BUCKET are neither required nor read."""
    r = _Reader(os.environ if env is None else env)
    values = r.read_all(CLIENT_SETTINGS)
    if r.problems:
        raise SettingsError(r.problems)
    return ClientSettings(**values)


def _check_token_names(values: dict[str, Any], problems: dict[str, str]) -> None:
    """API_TOKENS and OPS_TOKENS name different callers: no name and no token in both."""
    apps, ops = values.get("api_tokens") or (), values.get("ops_tokens") or ()
    shared_names = sorted({t.name for t in apps} & {t.name for t in ops})
    if shared_names:
        problems["OPS_TOKENS"] = f"names must differ from API_TOKENS' names: {', '.join(shared_names)} in both"
    elif set(apps) & set(ops):
        problems["OPS_TOKENS"] = "a token is in both API_TOKENS and OPS_TOKENS"


def _check_https(values: Mapping[str, Any], problems: dict[str, str]) -> None:
    """KLING_BASE_URL and PUBLIC_BASE_URL over https, or plain http to loopback or a host in PLAIN_HTTP_HOSTS."""
    for env, name in (("KLING_BASE_URL", "kling_base_url"), ("PUBLIC_BASE_URL", "public_base_url")):
        value = values.get(name)
        problem = https_problem(value, values.get("plain_http_hosts")) if value else None
        if problem and env not in problems:
            problems[env] = problem


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from `env` (default: os.environ); raise SettingsError listing every problem."""
    r = _Reader(os.environ if env is None else env)
    values = r.read_all(SETTINGS)
    _check_https(values, r.problems)
    _check_kling_auth(values, r.problems)
    _check_token_names(values, r.problems)
    if r.problems:
        raise SettingsError(r.problems)
    return Settings(**values)
