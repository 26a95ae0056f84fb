"""The callback endpoint over a real redis-server: who may move a job, and what bodies are refused."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from kling_relay.shared.jobs import JobState
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.settings import Secret
from kling_relay.shared.tokens import callback_token
from tests.webhook.conftest import CALLBACK_SECRET

REQUEST = {"model_name": "kling-v1-6", "image_list": [{"image": "https://img.example.com/a.png"}], "prompt": "p",
           "mode": "std", "duration": "5", "aspect_ratio": "16:9"}


def _task(task_id: str, status: str, external: str | None) -> dict[str, Any]:
    task: dict[str, Any] = {"task_id": task_id, "task_status": status, "task_status_msg": ""}
    if external is not None:
        task["task_info"] = {"external_task_id": external}
    return task


def _post(client: FlaskClient, job_id: str, body: Any, **kwargs: Any) -> Any:
    token = callback_token(Secret(CALLBACK_SECRET), job_id)
    return client.post(f"/callbacks/kling/{job_id}?token={token}", json=body, **kwargs)


def test_a_token_alone_cannot_bind_a_job_to_another_task(client: FlaskClient, runtime: Runtime) -> None:
    job, _ = runtime.store.create(dict(REQUEST))
    for body in (_task("task-of-another-job", "succeed", None),
                 _task("task-of-another-job", "processing", "job_someone_else")):
        answer = _post(client, job.id, body)
        assert answer.status_code == 409, answer.json
    after = runtime.store.require(job.id)
    assert after.state is JobState.QUEUED and after.kling_task_id is None


def test_a_task_naming_the_job_may_arrive_before_the_worker_records_it(client: FlaskClient,
                                                                      runtime: Runtime) -> None:
    job, _ = runtime.store.create(dict(REQUEST))
    answer = _post(client, job.id, _task("t-1", "processing", job.id))
    assert answer.status_code == 200 and answer.json["applied"] is True
    after = runtime.store.require(job.id)
    assert after.state is JobState.PROCESSING and after.kling_task_id == "t-1"
    assert _post(client, job.id, _task("t-2", "succeed", job.id)).status_code == 409


def test_bodies_that_are_not_task_objects(client: FlaskClient, runtime: Runtime) -> None:
    job, _ = runtime.store.create(dict(REQUEST))
    token = callback_token(Secret(CALLBACK_SECRET), job.id)
    url = f"/callbacks/kling/{job.id}?token={token}"
    deep = b"[" * 100_000 + b"]" * 100_000
    assert client.post(url, data=deep, content_type="application/json").status_code in (400, 413)
    assert client.post(url, data=b"[" * 200_000, content_type="application/json").status_code == 400
    infinite = b'{"task_id": "t", "task_status": "succeed", "created_at": Infinity}'
    assert client.post(url, data=infinite, content_type="application/json").status_code == 400
    assert runtime.store.require(job.id).state is JobState.QUEUED


def test_job_ids_are_matched_whole(client: FlaskClient, runtime: Runtime) -> None:
    job, _ = runtime.store.create(dict(REQUEST))
    job_id = job.id + "\n"
    token = callback_token(Secret(CALLBACK_SECRET), job_id)
    answer = client.post(f"/callbacks/kling/{job_id}?token={token}", json=_task("t", "succeed", job.id))
    assert answer.status_code == 403


def test_store_down_is_503_with_retry_after(client: FlaskClient, runtime: Runtime, redis_url: str) -> None:
    from tests.support.procs import free_port

    runtime.store._r.connection_pool.connection_kwargs["port"] = free_port()  # nothing listens there
    runtime.store._r.connection_pool.disconnect()
    answer = _post(client, "job_whatever", _task("t", "succeed", "job_whatever"))
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert "unavailable" in answer.json["error"]
