"""The one table of settings: each environment variable's name, default, parser and meaning, written once.

`kling_relay.shared.settings` builds `Settings` and `ClientSettings` by walking `SETTINGS`; the README's
configuration table is checked against it by a test (tests/shared/test_settings_spec.py), and
`kling-relay config --help` prints it (`settings_table()`).

A parser takes the variable's raw text (stripped, never empty) and its name and returns the typed value, or
raises ValueError whose text is the problem as `SettingsError` shows it after the name ("must be a whole number,
got 'eighty'"). A variable that is unset or blank takes its default without being parsed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kling_relay.shared.http_client import secret_bytes
from kling_relay.shared.redis_conn import is_sentinel, parse_sentinel
from kling_relay.shared.secret import NamedToken, Secret, without_password
from kling_relay.shared.urlguard import UrlAllowlist

Parser = Callable[[str, str], Any]

_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_HOST = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_MIN_SECRET_CHARS = 16
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Setting:
    """One environment variable. Its field in `Settings` is its name in lower case.

    `secret`: may be given as a file (`<env>_FILE`) instead, and is never shown. `required`: there is no default;
    load_settings() names it when missing (load_client_settings() reads only `client` settings, none required).
    `client`: also read by load_client_settings() for `ClientSettings`.
    """

    env: str
    default: Any
    parse: Parser
    help: str
    secret: bool = False
    required: bool = False
    client: bool = False

    @property
    def field(self) -> str:
        return self.env.lower()

    @property
    def shown_default(self) -> str:
        """The default as the README and `settings_table()` write it: `required`, `—` (none), `empty` or the value
        (a whole float without its `.0`)."""
        if self.required:
            return "required"
        value = self.default
        if value is None:
            return "—"
        if isinstance(value, bool):
            return "true" if value else "false"
        if value == "":
            return "empty"
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)


# -- parsers ---------------------------------------------------------------------------------------------------


def text(raw: str, env: str) -> str:
    return raw


def secret(raw: str, env: str) -> Secret:
    return Secret(raw)


def long_secret(raw: str, env: str) -> Secret:
    """A secret of at least 16 characters."""
    if len(raw) < _MIN_SECRET_CHARS:
        raise ValueError(f"must be at least {_MIN_SECRET_CHARS} characters")
    return Secret(raw)


def signing_secret(raw: str, env: str) -> Secret:
    """A Standard Webhooks secret: `whsec_<base64>` (checked to be base64) or any other string, used as is."""
    try:
        secret_bytes(raw)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return Secret(raw)


def names(raw: str, env: str) -> tuple[str, ...]:
    """Comma-separated names (letters, digits, `.`, `_`, `-`; at most 64 characters each), at least one, in the
    order given, each once."""
    found = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if not found:
        raise ValueError("must list at least one name (comma-separated)")
    bad = [n for n in found if not _MODEL_NAME.match(n)]
    if bad:
        raise ValueError(f"{bad[0][:70]!r} is not a name: use letters, digits, '.', '_' and '-' "
                         f"(at most 64 characters)")
    return found


def tokens(raw: str, env: str) -> tuple[Secret, ...]:
    """Comma-separated secrets, at least one, each of at least 16 characters."""
    found = tuple(Secret(t.strip()) for t in raw.split(",") if t.strip())
    if not found:
        raise ValueError("must list at least one token (comma-separated)")
    if any(len(t.reveal()) < _MIN_SECRET_CHARS for t in found):
        raise ValueError(f"each token must be at least {_MIN_SECRET_CHARS} characters")
    return found


TOKEN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def _named_tokens(raw: str, bare_prefix: str) -> tuple[NamedToken, ...]:
    """`name:token` entries, comma-separated; a bare `token` (no `:`) is named `<bare_prefix><position>`.

    Names: lowercase letters, digits, `_`, `-`, starting with a letter or digit, at most 32 characters, each
    once. A token containing `:` must be given with its name (the first `:` ends the name)."""
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    if not entries:
        raise ValueError("must list at least one token (comma-separated)")
    found: list[NamedToken] = []
    for position, entry in enumerate(entries, start=1):
        name, sep, value = entry.partition(":")
        if not sep:
            name, value = f"{bare_prefix}{position}", entry
        name, value = name.strip(), value.strip()
        if not TOKEN_NAME.match(name):
            raise ValueError(f"entry {position}: the name before ':' must be 1-32 of a-z, 0-9, '_', '-' "
                             f"(starting with a letter or digit)")
        if len(value) < _MIN_SECRET_CHARS:
            raise ValueError(f"each token must be at least {_MIN_SECRET_CHARS} characters")
        found.append(NamedToken(name, value))
    names = [t.name for t in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"names must differ: {', '.join(twice)} given twice")
    if len(set(found)) != len(found):
        raise ValueError("a token is given twice")
    return tuple(found)


def app_tokens(raw: str, env: str) -> tuple[NamedToken, ...]:
    """API_TOKENS: apps, `name:token` or a bare token (named app1, app2, ... by position)."""
    return _named_tokens(raw, "app")


def ops_tokens(raw: str, env: str) -> tuple[NamedToken, ...]:
    """OPS_TOKENS: operators, `name:token` or a bare token (named ops1, ops2, ... by position)."""
    return _named_tokens(raw, "ops")


def whole_number(raw: str, env: str) -> int:
    """A whole number greater than 0."""
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"must be a whole number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def _positive_number(raw: str, what: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be {what}, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"must be {what}, got {value}")
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def seconds(raw: str, env: str) -> float:
    """A finite number of seconds greater than 0."""
    return _positive_number(raw, "a number of seconds")


def per_second(raw: str, env: str) -> float:
    """A finite rate greater than 0."""
    return _positive_number(raw, "a number of requests per second")


def units(raw: str, env: str) -> float:
    """A finite number of Kling units greater than 0."""
    return _positive_number(raw, "a number of units")


def redis_url(raw: str, env: str) -> str:
    """One Redis (redis://, rediss://, unix://) or a Sentinel deployment (redis+sentinel://, shared/redis_conn.py)."""
    if is_sentinel(raw):
        try:
            parse_sentinel(raw)
        except ValueError as exc:
            raise ValueError(f"{exc}: redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db], "
                             f"got {without_password(raw)!r}") from None
        return raw
    if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"must be a redis://, rediss://, unix:// or redis+sentinel:// URL, "
                         f"got {without_password(raw)!r}")
    return raw


def url(raw: str, env: str) -> str:
    """An http(s) URL with a host, without a trailing slash."""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL with a host, got {without_password(raw)!r}")
    return raw.rstrip("/")


def https_problem(value: str, plain_http_hosts: tuple[str, ...] | None) -> str | None:
    """Why `value` (a URL that carries credentials or tokens: KLING_BASE_URL, PUBLIC_BASE_URL) may not be used, or
    None: it must be https, plain http only for a loopback host (a local simulator) or one in PLAIN_HTTP_HOSTS."""
    parts = urlsplit(value)
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK | set(plain_http_hosts or ()):
        return "must be https (it carries credentials or tokens); plain http only for localhost, 127.0.0.1 or ::1"
    return None


def plain_http_hosts(raw: str, env: str) -> tuple[str, ...]:
    """Comma-separated host names or IP literals (no scheme, port or path), at least one, each once, lower case."""
    found = tuple(dict.fromkeys(h.strip().lower() for h in raw.split(",") if h.strip()))
    if not found:
        raise ValueError("must list at least one host (comma-separated)")
    for host in found:
        if not _HOST.match(host):
            raise ValueError(f"{host[:70]!r} is not a host name or IP address (no scheme, port or path)")
    return found


def allowlist(raw: str, env: str) -> str:
    """A URL allow-list as `UrlAllowlist.parse` reads it; kept as text (each process parses it where used)."""
    UrlAllowlist.parse(raw, name=env)
    return raw


def query_mode(raw: str, env: str) -> str:
    """auto, on or off (KLING_QUERY: whether the relay reads tasks back from Kling)."""
    mode = raw.lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"must be auto, on or off, got {raw!r}")
    return mode


def _whole_number_to(raw: str, env: str, top: int, what: str) -> int:
    """A whole number from 1 to `top`; `what` says what is wanted when it is more."""
    value = whole_number(raw, env)
    if value > top:
        raise ValueError(f"must be {what}, got {value}")
    return value


def page_count(raw: str, env: str) -> int:
    """A whole number of list pages from 1 to 1000 (Kling's pageNum limit)."""
    return _whole_number_to(raw, env, 1000, "at most 1000 (Kling serves pageNum 1-1000)")


def boolean(raw: str, env: str) -> bool:
    """true/false (also 1/0, yes/no, on/off), any case."""
    value = raw.lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {raw[:70]!r}")


def port(raw: str, env: str) -> int:
    """A TCP port, 1-65535."""
    return _whole_number_to(raw, env, 65535, "a port (1-65535)")


def log_level(raw: str, env: str) -> str:
    level = raw.upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return level


# -- the table (in the README's order) -------------------------------------------------------------------------

SETTINGS: tuple[Setting, ...] = (
    Setting("REDIS_URL", "redis://127.0.0.1:6379/0", redis_url,
            "broker and job store: one Redis, or Sentinel (`redis+sentinel://`, see Redis that fails over)",
            client=True),
    Setting("KLING_BASE_URL", None, url, "Kling's API base (a reseller's with its prefix)", required=True),
    Setting("KLING_ACCESS_KEY", None, text, "legacy official auth: access key (with KLING_SECRET_KEY)",
            secret=True),
    Setting("KLING_SECRET_KEY", None, secret, "legacy official auth: secret key signing the JWT", secret=True),
    Setting("KLING_API_KEY", None, secret, "a Bearer API key: Kling's official host (its newer docs call AK/SK "
            "legacy) or a reseller's; instead of the pair", secret=True),
    Setting("KLING_MODELS", ("kling-v1-6",), names, "model_name values accepted, comma-separated; the first is "
            "the default", client=True),
    Setting("PUBLIC_BASE_URL", None, url, "where Kling reaches the web process (callbacks)", required=True),
    Setting("PLAIN_HTTP_HOSTS", None, plain_http_hosts, "hosts (names or IP addresses, comma-separated) that "
            "KLING_BASE_URL and PUBLIC_BASE_URL may name with plain http besides loopback: a private test network "
            "(the multi-host test), never a public host"),
    Setting("CALLBACK_SECRET", None, long_secret, "key of the per-job callback token, >= 16 chars", secret=True,
            required=True),
    Setting("KLING_WEBHOOK_SECRET", None, signing_secret, "Kling's callback signing secret (whsec_...); "
            "when set, callbacks must be signed", secret=True),
    Setting("API_TOKENS", None, app_tokens, "the apps' Bearer tokens for /v1/*: comma-separated `name:token` (or "
            "a bare token, named app1, app2, ... by position), each >= 16 chars; an app sees only its own jobs",
            secret=True, required=True),
    Setting("OPS_TOKENS", None, ops_tokens, "the operators' Bearer tokens (same syntax; bare: ops1, ...): all jobs, "
            "the ops routes, the dashboard; unset: every API token is also an operator", secret=True),
    Setting("DASHBOARD_TOKENS", None, tokens, "comma-separated tokens that sign in to /dashboard, each >= 16 "
            "chars; unset: OPS_TOKENS (or API_TOKENS when that is unset too)", secret=True),
    Setting("S3_BUCKET", None, text, "destination bucket", required=True),
    Setting("S3_PREFIX", "", text, "key prefix, e.g. videos/"),
    Setting("S3_ENDPOINT_URL", None, url, "another S3 endpoint (MinIO, moto); none: AWS"),
    Setting("VIDEO_URL_ALLOWLIST", "*.klingai.com,*.kwimgs.com,*.inkwai.com", allowlist,
            "hosts the copy may download from (Kling's CDNs by default)"),
    Setting("NOTIFY_URL_ALLOWLIST", "*", allowlist, "where notify_url may point", client=True),
    Setting("PORT", 8000, whole_number, "the web process's port"),
    Setting("NOTIFY_SECRET", None, secret, "Standard Webhooks signing secret; enables notify_url", secret=True,
            client=True),
    Setting("EVENTS_STREAM", "kling-relay:events", text, "Redis stream of finished jobs", client=True),
    Setting("EVENTS_STREAM_MAXLEN", 100_000, whole_number, "about how many entries the events stream keeps",
            client=True),
    Setting("KLING_TIMEOUT_SECONDS", 30.0, seconds, "read timeout of every Kling call"),
    Setting("KLING_CONNECT_TIMEOUT_SECONDS", 5.0, seconds, "connect timeout of every Kling call"),
    Setting("PROMPT_MAX_CHARS", 2500, whole_number, "longest prompt accepted", client=True),
    Setting("MAX_REQUEST_BYTES", 60 * 1024 * 1024, whole_number, "largest POST /v1/jobs body"),
    Setting("MAX_CALLBACK_BYTES", 256 * 1024, whole_number, "largest callback body"),
    Setting("MAX_VIDEO_BYTES", 4 * 1024 * 1024 * 1024, whole_number, "largest video the copy accepts"),
    Setting("JOB_TTL_SECONDS", 30 * 24 * 3600, whole_number, "how long a finished job is kept in Redis",
            client=True),
    Setting("SUBMIT_MAX_ATTEMPTS", 8, whole_number, "tries before a job fails submit_exhausted"),
    Setting("COPY_MAX_ATTEMPTS", 8, whole_number, "tries before a job fails copy_exhausted"),
    Setting("RETRY_BASE_SECONDS", 2.0, seconds, "first back-off between tries"),
    Setting("RETRY_MAX_SECONDS", 300.0, seconds, "longest back-off between tries"),
    Setting("JOB_DEADLINE_SECONDS", 6 * 3600.0, seconds, "a job older than this fails timed_out", client=True),
    Setting("RECONCILE_INTERVAL_SECONDS", 30.0, seconds, "how often the reconciler runs"),
    Setting("RECONCILE_QUIET_SECONDS", 120.0, seconds, "how long a job may stay quiet before it is polled",
            client=True),
    Setting("RECONCILE_BATCH_SIZE", 500, whole_number, "most due jobs one reconciler pass handles"),
    Setting("KLING_RATE_LIMIT_PER_SECOND", 5.0, per_second, "requests per second to Kling from all workers"),
    Setting("KLING_MAX_IN_FLIGHT", 20, whole_number, "most jobs submitted or processing at Kling at once"),
    Setting("APP_MAX_ACTIVE_JOBS", None, whole_number, "most jobs one app may have queued or in progress (not "
            "yet stored, failed or canceled); more are refused with 429; unset: no cap"),
    Setting("KLING_PAUSE_PROBE_SECONDS", 60.0, seconds,
            "how often paused submission probes Kling, paused copying probes S3, a refused host is re-checked"),
    Setting("KLING_QUERY", "auto", query_mode, "read tasks back from Kling: on, off (callbacks only) or auto "
                                               "(probe the read routes)"),
    Setting("KLING_LOOKUP_MAX_PAGES", 100, page_count, "most list pages of 500 a lookup by external_task_id reads"),
    Setting("KLING_DAILY_UNIT_BUDGET", None, units, "most Kling units to spend per UTC day; unset: no limit"),
    Setting("KLING_DEFAULT_UNITS_ESTIMATE", 1.0, units,
            "units a job is expected to cost before a deduction was seen for its model, mode and duration"),
    Setting("JOB_LOCK_SECONDS", 20.0, seconds, "expiry of a job's submit/copy lock, renewed while held"),
    Setting("LOG_LEVEL", "INFO", log_level, "DEBUG, INFO, WARNING or ERROR"),
    Setting("METRICS_TOKENS", None, tokens, "comma-separated Bearer tokens for the web's /metrics, each >= 16 "
            "chars; unset: one of API_TOKENS", secret=True),
    Setting("METRICS_PUBLIC", False, boolean, "true: the web's /metrics answers without a token"),
    Setting("WORKER_METRICS_PORT", 9808, port, "port of each Celery worker's metrics endpoint"),
    Setting("WORKER_METRICS_HOST", "127.0.0.1", text, "address the workers' metrics endpoint binds"),
)

CLIENT_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.client)


def settings_table() -> str:
    """Every setting as aligned text columns: variable (`[_FILE]` when a file may give it), default, meaning."""
    rows = [("variable", "default", "meaning")]
    rows += [(s.env + ("[_FILE]" if s.secret else ""), s.shown_default, s.help) for s in SETTINGS]
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows)
