"""The Python client for backend apps: submit a job, read it, wait for it — in-process, no HTTP needed.

    from shared.client import Relay
    relay = Relay.from_env()                      # the same environment variables as the relay's processes
    job = relay.submit(image_list=[{"image": "https://..."}], prompt="...", idempotency_key="order-42")
    job = relay.wait(job.id, timeout=900)         # returns when stored, failed or canceled
    job.videos                                    # [{"bucket", "key", "sha256", "bytes", "duration"}]

Bad input raises `ValidationFailed` (its `.problems` list every `{field, problem}`) and stores nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import redis

from shared.intake import accept_job
from shared.jobs import TERMINAL, Job, JobNotFound, JobStore
from shared.queue import Enqueuer, make_celery
from shared.settings import Settings, load_settings


class Relay:
    """Backend-app side of kling-relay: needs Redis (REDIS_URL) only; Kling and S3 are the workers' business."""

    def __init__(self, settings: Settings, *, store: JobStore | None = None,
                 enqueuer: Enqueuer | None = None) -> None:
        self.settings = settings
        self.store = store or JobStore(redis.Redis.from_url(settings.redis_url, decode_responses=True,
                                                            socket_timeout=10, socket_connect_timeout=5))
        self.enqueuer = enqueuer or Enqueuer(make_celery(settings.redis_url))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Relay:
        return cls(load_settings(env))

    def submit(self, *, idempotency_key: str | None = None, **fields: Any) -> Job:
        """Queue one job; `fields` are the POST /v1/jobs body (Kling's names plus notify_url and metadata)."""
        return accept_job(fields, store=self.store, enqueuer=self.enqueuer, settings=self.settings,
                          idempotency_key=idempotency_key).job

    def get(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def wait(self, job_id: str, *, timeout: float = 900.0, poll: float = 1.0,
             on_change: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job is stored, failed or canceled; TimeoutError with the last state otherwise."""
        deadline = time.monotonic() + timeout
        last_state = None
        while True:
            job = self.store.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.state != last_state:
                last_state = job.state
                if on_change:
                    on_change(job)
            if job.state in TERMINAL:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout}s")
            time.sleep(poll)
