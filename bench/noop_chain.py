"""The pipeline benchmark's baseline: a Celery app with three no-op tasks chained per job, on the relay's Redis.

The last task of each chain adds one to `bench:noop:done`, which the benchmark waits on. Run it with the same
worker flags as the relay's (prefork, `--prefetch-multiplier 1`, the same concurrency).
"""

import os

import redis
from celery import Celery

app = Celery("noop_chain", broker=os.environ["REDIS_URL"])
app.conf.update(task_acks_late=True, task_ignore_result=True, worker_hijack_root_logger=False)
_client: redis.Redis | None = None


@app.task(name="noop.submit")
def submit(job: int) -> int:
    return job


@app.task(name="noop.copy")
def copy(job: int) -> int:
    return job


@app.task(name="noop.done")
def done(job: int) -> None:
    global _client  # noqa: PLW0603 - one client per worker process
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"])
    _client.incr("bench:noop:done")
