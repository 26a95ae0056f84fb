"""A Runtime for tests of the plain pipeline/reconcile functions: real Redis, the simulator, a real Celery broker.

Messages the functions enqueue land in Redis lists named after the queues (`submit`, `copy`); `queued_job_ids`
reads the job ids out of them. S3 is a port nobody listens on unless a test passes a moto endpoint.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from kling_relay.shared.jobs import Job, JobState
from kling_relay.shared.runtime import Runtime, limited_kling_client
from kling_relay.shared.settings import Settings, load_settings
from tests.support.images import image_b64
from tests.support.procs import free_port
from tests.support.settings_env import relay_env
from tests.support.sim import SimHandle

REQUEST: dict[str, Any] = {
    "model_name": "kling-v1-6",
    "image_list": [{"image": image_b64(400, 300, (30, 120, 200))}],
    "prompt": "a cat surfing",
    "mode": "std",
    "duration": "5",
    "aspect_ratio": "16:9",
}


def relay_settings(redis_url: str, sim: SimHandle, **env: str) -> Settings:
    """Settings pointing at the test Redis and simulator; callbacks go to a closed port (never delivered)."""
    assert sim.access_key is not None and sim.secret_key is not None
    base = relay_env(
        REDIS_URL=redis_url,
        KLING_BASE_URL=sim.base_url,
        KLING_ACCESS_KEY=sim.access_key,
        KLING_SECRET_KEY=sim.secret_key,
        PUBLIC_BASE_URL=f"http://127.0.0.1:{free_port()}",
        S3_BUCKET="videos",
        S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        VIDEO_URL_ALLOWLIST=sim.root_url,
        RETRY_BASE_SECONDS="0.5",
        RETRY_MAX_SECONDS="5",
        RECONCILE_QUIET_SECONDS="60",
        KLING_PAUSE_PROBE_SECONDS="30",
        KLING_QUERY="on",  # tests count Kling requests exactly: no `auto` probe unless a test asks for it
    )
    return load_settings({**base, **env})


def make_runtime(settings: Settings, *, limited: bool = True) -> Runtime:
    """`limited`: the Kling client takes every request through the shared rate limit, as in a worker."""
    rt = Runtime.from_settings(settings)
    if limited:
        rt.kling.close()
        rt.kling = limited_kling_client(settings, rt.redis)
    return rt


def close_runtime(rt: Runtime) -> None:
    rt.kling.close()
    rt.http.close()
    rt.enqueuer.app.close()
    rt.redis.close()
    rt.redis.connection_pool.disconnect()


def new_job(rt: Runtime, *, due_in: float | None = 60.0, deadline: float | None = None) -> Job:
    job, created = rt.store.create(dict(REQUEST), due_in=due_in, deadline_seconds=deadline)
    assert created
    return job


def queued_job_ids(client: redis.Redis, queue: str) -> list[str]:
    """Job ids of the task messages waiting in a Celery queue on Redis (oldest first)."""
    ids = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.append(args[0])
    return ids


def due_score(client: redis.Redis, job_id: str) -> float | None:
    score = client.zscore("kr:jobs:due", job_id)
    return None if score is None else float(score)


def sim_requests(sim: SimHandle) -> dict[str, int]:
    requests_seen: dict[str, int] = sim.stats()["requests"]
    return requests_seen


def states(rt: Runtime, ids: list[str]) -> list[JobState]:
    return [rt.store.require(i).state for i in ids]
