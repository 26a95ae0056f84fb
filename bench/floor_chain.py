"""The pipeline benchmark's floor: the design's external work per job, done by a 3-task Celery chain, no relay logic.

Per job, on the relay's Redis, with the relay worker's flags (prefork, `--prefetch-multiplier 1`, late acks, the
same concurrency): `floor.submit` POSTs the create to the simulator (the body the relay sends: the request, a
`callback_url`, an `external_task_id`; a JWT made once per process), so the simulator sends its callbacks, to a
no-op endpoint under gunicorn (bench/noop_web.py, the relay's gunicorn config); `floor.copy` GETs the task back
(again after 20 ms while it is not `succeed` yet), downloads the video and PUTs it, then the manifest
(conditionally, `If-None-Match: *`), to S3 with boto3; `floor.done` adds one to `bench:floor:done`.

What it leaves out, being the relay's own work: the API (the job's intake and its Redis records), every Redis
script (state steps, locks, attempts, the rate limit, the in-flight cap, the events stream), the callbacks' checks
and bookkeeping, the URL guard, the logs and metrics. One client of each kind per process (requests session,
boto3 client), as the relay keeps them.

Environment: REDIS_URL, KLING_BASE_URL, KLING_ACCESS_KEY, KLING_SECRET_KEY, S3_ENDPOINT_URL, S3_BUCKET (the
stack's), FLOOR_CALLBACK_BASE (the no-op web's URL).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import boto3
import jwt
import redis
import requests
from celery import Celery

app = Celery("floor_chain", broker=os.environ["REDIS_URL"])
app.conf.update(task_acks_late=True, task_ignore_result=True, worker_hijack_root_logger=False,
                task_serializer="json", accept_content=["json"], task_default_queue="floor")  # not the no-op's
_clients: dict[str, Any] = {}


def _client(name: str) -> Any:
    """One client of each kind per worker process (made after the fork)."""
    if name not in _clients:
        if name == "http":
            session = requests.Session()
            session.trust_env = False
            _clients[name] = session
        elif name == "s3":
            _clients[name] = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
        elif name == "redis":
            _clients[name] = redis.Redis.from_url(os.environ["REDIS_URL"])
        elif name == "token":
            now = int(time.time())
            _clients[name] = jwt.encode({"iss": os.environ["KLING_ACCESS_KEY"], "exp": now + 3600, "nbf": now - 5},
                                        os.environ["KLING_SECRET_KEY"], algorithm="HS256")
    return _clients[name]


def _kling(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = os.environ["KLING_BASE_URL"].rstrip("/") + "/v1/videos/multi-image2video" + path
    r = _client("http").request(method, url, json=body, timeout=(5, 30),
                                headers={"Authorization": f"Bearer {_client('token')}"})
    r.raise_for_status()
    answer = r.json()
    if answer.get("code") != 0:
        raise RuntimeError(f"Kling answered {answer}")
    data: dict[str, Any] = answer["data"]
    return data


@app.task(name="floor.submit")
def submit(job: str, request: dict[str, Any]) -> str:
    callback = f"{os.environ['FLOOR_CALLBACK_BASE']}/callbacks/kling/{job}"
    task = _kling("POST", "", {**request, "callback_url": callback, "external_task_id": job})
    return str(task["task_id"])


@app.task(name="floor.copy")
def copy(task_id: str, job: str) -> str:
    for n in range(500):
        task = _kling("GET", f"/{task_id}")
        if task["task_status"] == "succeed":
            break
        if n == 0:
            _client("redis").incr("bench:floor:read_again")  # the bench reports how often (each costs a GET)
        time.sleep(0.02)
    else:
        raise RuntimeError(f"task {task_id} never succeeded")
    video = task["task_result"]["videos"][0]
    body = _client("http").get(video["url"], timeout=(5, 60)).content
    digest = hashlib.sha256(body).hexdigest()
    s3, bucket = _client("s3"), os.environ["S3_BUCKET"]
    key = f"floor/{job}/{video['id']}.mp4"
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="video/mp4", Metadata={"sha256": digest})
    manifest = {"job_id": job, "kling_task_id": task_id, "videos": [{"key": key, "bytes": len(body),
                                                                       "sha256": digest}]}
    s3.put_object(Bucket=bucket, Key=f"floor/{job}/manifest.json", Body=json.dumps(manifest).encode(),
                  ContentType="application/json", IfNoneMatch="*")
    return job


@app.task(name="floor.done")
def done(job: str) -> None:
    _client("redis").incr("bench:floor:done")
