"""The environment variable names a deployment file may set for the relay's processes: the settings of
shared/settings_spec.py (a secret one also as NAME_FILE) and the few read outside it."""

from __future__ import annotations

from kling_relay.shared.settings_spec import SETTINGS

# Read outside settings_spec: gunicorn's config, the Procfile's worker line, Flower's line, boto3, Python.
OUTSIDE_SETTINGS = {
    "WEB_CONCURRENCY", "WEB_CONNECTIONS", "HOST", "WORKER_CONCURRENCY", "WORKER_NAME", "FLOWER_ADDRESS", "FLOWER_PORT",
    "FLOWER_BASIC_AUTH", "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE",
}
# The metrics work (issue 10.3) declares these in settings_spec; listed here until both are on one branch.
METRICS_SETTINGS = {"METRICS_TOKENS_FILE", "WORKER_METRICS_HOST"}


def known_names() -> set[str]:
    names = {s.env for s in SETTINGS} | {f"{s.env}_FILE" for s in SETTINGS if s.secret}
    return names | OUTSIDE_SETTINGS | METRICS_SETTINGS


def secret_names() -> set[str]:
    return {s.env for s in SETTINGS if s.secret} | {"METRICS_TOKENS"}
