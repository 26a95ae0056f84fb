"""Wiring: the clients one process needs, built once from Settings and handed to the plain functions."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import requests
from celery import Celery

from kling_relay.shared import flow, http_session
from kling_relay.shared.jobs import JobStore
from kling_relay.shared.kling import KlingClient
from kling_relay.shared.queue import Enqueuer, make_celery
from kling_relay.shared.redis_conn import redis_client
from kling_relay.shared.settings import Settings
from kling_relay.shared.storage import Storage
from kling_relay.shared.urlguard import UrlAllowlist


def make_s3_client(settings: Settings) -> Any:
    """boto3 S3 client; credentials from boto3's usual chain, timeouts and bounded retries on every call. (boto3 is
    imported here: a process that never reaches S3, such as the web process, does without it.)"""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"})
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def make_kling_client(settings: Settings, session: requests.Session | None = None) -> KlingClient:
    timeout = (settings.kling_connect_timeout_seconds, settings.kling_timeout_seconds)
    pages = settings.kling_lookup_max_pages
    if settings.kling_api_key:
        return KlingClient(settings.kling_base_url, api_key=settings.kling_api_key.reveal(), timeout=timeout,
                           session=session, lookup_max_pages=pages)
    assert settings.kling_secret_key is not None
    return KlingClient(settings.kling_base_url, access_key=settings.kling_access_key,
                       secret_key=settings.kling_secret_key.reveal(), timeout=timeout, session=session,
                       lookup_max_pages=pages)


def limited_kling_client(settings: Settings, client: redis.Redis, *, max_wait: float = 1.0) -> KlingClient:
    """A KlingClient whose every request first takes a slot of the shared rate limit (`flow.RateLimiter`)."""
    session = flow.rate_limited_session(client, settings.kling_rate_limit_per_second, max_wait=max_wait)
    return make_kling_client(settings, session=session)


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    kling: KlingClient
    storage: Storage
    allowlist: UrlAllowlist
    notify_allowlist: UrlAllowlist
    http: requests.Session
    enqueuer: Enqueuer
    #: The clock of the day-bound rules (units spent today, the daily budget); tests move it.
    clock: Callable[[], float] = field(default=time.time)

    @classmethod
    def from_settings(cls, settings: Settings, celery_app: Celery | None = None) -> Runtime:
        client = redis_client(settings.redis_url)
        http = http_session.Session()
        http.headers["user-agent"] = "kling-relay"
        return cls(
            settings=settings,
            redis=client,
            store=JobStore(client, job_ttl_seconds=settings.job_ttl_seconds),
            kling=make_kling_client(settings),
            storage=Storage.lazy(lambda: make_s3_client(settings), settings.s3_bucket, settings.s3_prefix),
            allowlist=UrlAllowlist.parse(settings.video_url_allowlist),
            notify_allowlist=UrlAllowlist.parse(settings.notify_url_allowlist, name="NOTIFY_URL_ALLOWLIST"),
            http=http,
            enqueuer=Enqueuer(celery_app or make_celery(settings.redis_url)),
        )
