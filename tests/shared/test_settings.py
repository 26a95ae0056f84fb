from __future__ import annotations

from pathlib import Path

import pytest

from kling_relay.shared.settings import Secret, SettingsError, load_settings

GOOD = {
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "KLING_BASE_URL": "https://api-singapore.klingai.com/",
    "KLING_ACCESS_KEY": "ak-123",
    "KLING_SECRET_KEY": "sk-very-secret-value",
    "PUBLIC_BASE_URL": "https://relay.example.com",
    "CALLBACK_SECRET": "callback-secret-0123456789",
    "API_TOKENS": "token-aaaaaaaaaaaaaaaa, token-bbbbbbbbbbbbbbbb",
    "S3_BUCKET": "videos",
}


def test_good_environment_loads_typed_values() -> None:
    s = load_settings({**GOOD, "PORT": "9000", "RECONCILE_INTERVAL_SECONDS": "5"})
    assert s.kling_base_url == "https://api-singapore.klingai.com"
    assert s.kling_auth_mode == "access_key"
    assert s.port == 9000 and s.reconcile_interval_seconds == 5.0
    assert [t.reveal() for t in s.api_tokens] == ["token-aaaaaaaaaaaaaaaa", "token-bbbbbbbbbbbbbbbb"]
    assert s.video_url_allowlist == "*.klingai.com,*.kwimgs.com,*.inkwai.com"  # Kling's CDNs (issue 9.1)


def test_settings_are_frozen() -> None:
    s = load_settings(GOOD)
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_secrets_never_in_repr() -> None:
    s = load_settings(GOOD)
    text = repr(s) + str(s)
    for secret in ("sk-very-secret-value", "callback-secret-0123456789", "token-aaaaaaaaaaaaaaaa"):
        assert secret not in text
    assert repr(Secret("x")) == "Secret('***')"


def test_every_problem_named_at_once() -> None:
    env = {"KLING_BASE_URL": "ftp://nope", "PORT": "eighty", "CALLBACK_SECRET": "short", "REDIS_URL": "http://x"}
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    problems = info.value.problems
    assert problems["KLING_BASE_URL"].startswith("must be an http(s) URL")
    assert problems["PORT"] == "must be a whole number, got 'eighty'"
    assert problems["CALLBACK_SECRET"] == "must be at least 16 characters"
    assert "REDIS_URL" in problems
    assert problems["S3_BUCKET"] == "is required"
    assert problems["API_TOKENS"].startswith("is required")
    assert "KLING_ACCESS_KEY" in problems and "KLING_SECRET_KEY" in problems
    assert "PORT: must be a whole number" in str(info.value)


def test_negative_numbers_refused() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({**GOOD, "SUBMIT_MAX_ATTEMPTS": "0", "RECONCILE_QUIET_SECONDS": "-1"})
    assert set(info.value.problems) == {"SUBMIT_MAX_ATTEMPTS", "RECONCILE_QUIET_SECONDS"}


def test_both_auth_modes_is_an_error() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({**GOOD, "KLING_API_KEY": "key"})
    assert "not both" in info.value.problems["KLING_API_KEY"]


def test_api_key_mode() -> None:
    env = {k: v for k, v in GOOD.items() if not k.startswith("KLING_") or k == "KLING_BASE_URL"}
    s = load_settings({**env, "KLING_API_KEY": "reseller-key"})
    assert s.kling_auth_mode == "api_key"
    assert s.kling_api_key is not None and s.kling_api_key.reveal() == "reseller-key"
    assert "reseller-key" not in repr(s)


def test_file_variants(tmp_path: Path) -> None:
    secret_file = tmp_path / "sk"
    secret_file.write_text("sk-from-file\n")
    env = {k: v for k, v in GOOD.items() if k != "KLING_SECRET_KEY"}
    s = load_settings({**env, "KLING_SECRET_KEY_FILE": str(secret_file)})
    assert s.kling_secret_key is not None and s.kling_secret_key.reveal() == "sk-from-file"


def test_file_variant_unreadable_and_double_set(tmp_path: Path) -> None:
    env = {k: v for k, v in GOOD.items() if k != "CALLBACK_SECRET"}
    with pytest.raises(SettingsError) as info:
        load_settings({**env, "CALLBACK_SECRET_FILE": str(tmp_path / "missing")})
    assert info.value.problems["CALLBACK_SECRET_FILE"].startswith("cannot read")
    with pytest.raises(SettingsError) as info:
        load_settings({**GOOD, "CALLBACK_SECRET_FILE": str(tmp_path / "missing")})
    assert "use one" in info.value.problems["CALLBACK_SECRET"]


def test_short_api_token_refused() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({**GOOD, "API_TOKENS": "short"})
    assert info.value.problems["API_TOKENS"] == "each token must be at least 16 characters"


def test_allowlists_are_checked_at_start_up() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({**GOOD, "VIDEO_URL_ALLOWLIST": "ftp://x", "NOTIFY_URL_ALLOWLIST": "*.*"})
    assert "VIDEO_URL_ALLOWLIST" in info.value.problems["VIDEO_URL_ALLOWLIST"]
    assert "NOTIFY_URL_ALLOWLIST" in info.value.problems["NOTIFY_URL_ALLOWLIST"]
    assert load_settings(GOOD).notify_url_allowlist == "*"


def test_flow_and_reconcile_settings_defaults() -> None:
    s = load_settings(GOOD)
    assert (s.reconcile_interval_seconds, s.reconcile_quiet_seconds, s.reconcile_batch_size) == (30.0, 120.0, 500)
    assert (s.kling_rate_limit_per_second, s.kling_max_in_flight) == (5.0, 20)
    assert (s.kling_pause_probe_seconds, s.job_lock_seconds) == (60.0, 20.0)


def test_flow_and_reconcile_settings_from_env() -> None:
    s = load_settings({**GOOD, "KLING_RATE_LIMIT_PER_SECOND": "0.5", "KLING_MAX_IN_FLIGHT": "3",
                       "KLING_PAUSE_PROBE_SECONDS": "15", "JOB_LOCK_SECONDS": "7.5", "RECONCILE_BATCH_SIZE": "50"})
    assert s.kling_rate_limit_per_second == 0.5 and s.kling_max_in_flight == 3
    assert s.kling_pause_probe_seconds == 15.0 and s.job_lock_seconds == 7.5 and s.reconcile_batch_size == 50


def test_flow_settings_refuse_bad_values() -> None:
    env = {**GOOD, "KLING_RATE_LIMIT_PER_SECOND": "fast", "KLING_MAX_IN_FLIGHT": "0", "JOB_LOCK_SECONDS": "nan",
           "KLING_PAUSE_PROBE_SECONDS": "-1", "RECONCILE_BATCH_SIZE": "1.5"}
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    problems = info.value.problems
    assert problems["KLING_RATE_LIMIT_PER_SECOND"] == "must be a number of requests per second, got 'fast'"
    assert problems["KLING_MAX_IN_FLIGHT"] == "must be greater than 0, got 0"
    assert problems["JOB_LOCK_SECONDS"] == "must be a number of seconds, got nan"
    assert problems["KLING_PAUSE_PROBE_SECONDS"] == "must be greater than 0, got -1.0"
    assert problems["RECONCILE_BATCH_SIZE"] == "must be a whole number, got '1.5'"


def test_redacted_view_and_repr_hide_passwords_and_keys() -> None:
    s = load_settings({**GOOD, "REDIS_URL": "redis://:s3cr3tpass@cache.internal:6379/0"})
    shown = repr(s) + str(s.redacted())
    for secret in ("s3cr3tpass", "ak-123", "sk-very-secret-value", "callback-secret-0123456789",
                   "token-aaaaaaaaaaaaaaaa"):
        assert secret not in shown
    assert s.redacted()["redis_url"] == "redis://:***@cache.internal:6379/0"
    assert s.redacted()["api_tokens"] == ["***", "***"]
    with pytest.raises(SettingsError) as info:
        load_settings({**GOOD, "REDIS_URL": "http://user:hunter2@x/"})
    assert "hunter2" not in str(info.value)


def test_kling_and_public_urls_must_be_https_except_on_loopback() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({**GOOD, "KLING_BASE_URL": "http://api.example.com/kling",
                       "PUBLIC_BASE_URL": "http://relay.example.com"})
    assert set(info.value.problems) == {"KLING_BASE_URL", "PUBLIC_BASE_URL"}
    assert "must be https" in info.value.problems["KLING_BASE_URL"]
    local = load_settings({**GOOD, "KLING_BASE_URL": "http://127.0.0.1:9000/kling",
                           "PUBLIC_BASE_URL": "http://localhost:8000"})
    assert local.kling_base_url == "http://127.0.0.1:9000/kling"


def test_video_size_cap_and_job_retention() -> None:
    s = load_settings({**GOOD, "MAX_VIDEO_BYTES": "1000", "JOB_TTL_SECONDS": "60"})
    assert (s.max_video_bytes, s.job_ttl_seconds) == (1000, 60)
    assert load_settings(GOOD).job_ttl_seconds == 30 * 24 * 3600


def test_kling_models_default_and_list() -> None:
    """Issue 9 item 5: the models accepted are a setting (resellers, newer Kling models); the first is the default."""
    assert load_settings(GOOD).kling_models == ("kling-v1-6",)
    s = load_settings({**GOOD, "KLING_MODELS": " kling-v2-1, kling-v1-6 ,kling-v2-1,"})
    assert s.kling_models == ("kling-v2-1", "kling-v1-6")
    assert s.redacted()["kling_models"] == ["kling-v2-1", "kling-v1-6"]  # not a secret: shown
    for bad in (",", "kling v1", "x" * 65):
        with pytest.raises(SettingsError) as info:
            load_settings({**GOOD, "KLING_MODELS": bad})
        assert "KLING_MODELS" in info.value.problems


def test_kling_webhook_secret_is_optional_a_secret_and_checked(tmp_path: Path) -> None:
    assert load_settings(GOOD).kling_webhook_secret is None
    s = load_settings({**GOOD, "KLING_WEBHOOK_SECRET": "whsec_c2VjcmV0LWJ5dGVz"})
    assert s.kling_webhook_secret is not None and s.kling_webhook_secret.reveal() == "whsec_c2VjcmV0LWJ5dGVz"
    assert "c2VjcmV0LWJ5dGVz" not in repr(s) + str(s.redacted())
    secret_file = tmp_path / "whsec"
    secret_file.write_text("plain-webhook-secret\n")
    from_file = load_settings({**GOOD, "KLING_WEBHOOK_SECRET_FILE": str(secret_file)})
    assert from_file.kling_webhook_secret is not None
    assert from_file.kling_webhook_secret.reveal() == "plain-webhook-secret"
    with pytest.raises(SettingsError) as info:
        load_settings({**GOOD, "KLING_WEBHOOK_SECRET": "whsec_not*base64"})
    assert "base64" in info.value.problems["KLING_WEBHOOK_SECRET"]


def test_named_tokens_and_bare_tokens_named_by_position() -> None:
    """Issue 13: API_TOKENS entries are `name:token` or a bare token (app<position>); OPS_TOKENS likewise (ops<n>);
    names show, tokens never."""
    s = load_settings({**GOOD, "API_TOKENS": "web:token-aaaaaaaaaaaaaaaa, token-bbbbbbbbbbbbbbbb",
                       "OPS_TOKENS": "token-cccccccccccccccc"})
    assert [(t.name, t.reveal()) for t in s.api_tokens] == [("web", "token-aaaaaaaaaaaaaaaa"),
                                                            ("app2", "token-bbbbbbbbbbbbbbbb")]
    assert s.ops_tokens is not None and [t.name for t in s.ops_tokens] == ["ops1"]
    assert "token-aaaa" not in repr(s) and "web" in repr(s.api_tokens)
    assert s.app_max_active_jobs is None and load_settings(GOOD).ops_tokens is None


@pytest.mark.parametrize(("env", "variable", "problem"), [
    ({"API_TOKENS": "Web:token-aaaaaaaaaaaaaaaa"}, "API_TOKENS", "the name before ':'"),
    ({"API_TOKENS": "a:token-aaaaaaaaaaaaaaaa,a:token-bbbbbbbbbbbbbbbb"}, "API_TOKENS", "a given twice"),
    ({"OPS_TOKENS": "app1:token-cccccccccccccccc"}, "OPS_TOKENS", "app1 in both"),
    ({"OPS_TOKENS": "token-aaaaaaaaaaaaaaaa"}, "OPS_TOKENS", "in both"),
])
def test_bad_token_names_are_refused(env: dict[str, str], variable: str, problem: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({**GOOD, **env})
    assert problem in info.value.problems[variable]
    assert "token-" not in info.value.problems[variable]


def test_plain_http_only_for_the_hosts_named_in_plain_http_hosts() -> None:
    """Issue 12 item 6: hosts on a private test network reach Kling and the web process over plain http, by name."""
    private = {**GOOD, "KLING_BASE_URL": "http://10.77.0.4:9000", "PUBLIC_BASE_URL": "http://10.77.0.9:8000"}
    with pytest.raises(SettingsError) as info:
        load_settings(private)
    assert set(info.value.problems) == {"KLING_BASE_URL", "PUBLIC_BASE_URL"}
    s = load_settings({**private, "PLAIN_HTTP_HOSTS": " 10.77.0.4, 10.77.0.9 ,10.77.0.4"})
    assert (s.kling_base_url, s.public_base_url) == ("http://10.77.0.4:9000", "http://10.77.0.9:8000")
    assert s.plain_http_hosts == ("10.77.0.4", "10.77.0.9")
    with pytest.raises(SettingsError) as info:  # a host not named stays https-only
        load_settings({**private, "PLAIN_HTTP_HOSTS": "10.77.0.4"})
    assert set(info.value.problems) == {"PUBLIC_BASE_URL"}
    assert "must be https" in info.value.problems["PUBLIC_BASE_URL"]
    for bad in (",", "http://10.77.0.4", "10.77.0.4:9000", "host/path", "bad host"):
        with pytest.raises(SettingsError) as info:
            load_settings({**private, "PLAIN_HTTP_HOSTS": bad})
        assert "PLAIN_HTTP_HOSTS" in info.value.problems, bad
