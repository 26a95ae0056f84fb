"""End-to-end fixtures: one LocalStack (real redis-server, moto S3 server, simulator, gunicorn, celery) per session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from deploy.stack import LocalStack
from tests.support.images import image_b64
from tests.support.waiting import wait_until

TERMINAL = {"stored", "failed", "canceled"}


def job_body(n: int = 0, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image_list": [{"image": image_b64(400, 300, ((n * 40) % 255, 90, 200))},
                       {"image": image_b64(400, 300, (250, (n * 17) % 255, 30))}],
        "prompt": f"test job {n}",
        "aspect_ratio": "16:9",
        "duration": 5,
    }
    body.update(overrides)
    return body


def wait_jobs(stack: LocalStack, ids: list[str], timeout: float = 120.0) -> dict[str, dict[str, Any]]:
    """Poll GET /v1/jobs/<id> until every job is terminal; fail with the process logs otherwise."""
    jobs: dict[str, dict[str, Any]] = {}

    def all_terminal() -> dict[str, dict[str, Any]] | None:
        for job_id in ids:
            if jobs.get(job_id, {}).get("state") not in TERMINAL:
                jobs[job_id] = stack.api("GET", f"/v1/jobs/{job_id}").json()
        if all(j["state"] in TERMINAL for j in jobs.values()) and len(jobs) == len(ids):
            return jobs
        return None

    def states_and_logs() -> str:
        return f"states: {({k: v.get('state') for k, v in jobs.items()})}\n{stack.logs_tail()}"

    return wait_until(all_terminal, timeout=timeout, what="every job finished", diagnostics=states_and_logs,
                      interval=0.3)


def submit(stack: LocalStack, body: dict[str, Any], **kwargs: Any) -> str:
    response = stack.api("POST", "/v1/jobs", json=body, **kwargs)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = LocalStack(tmp_path_factory.mktemp("stack"),
                   sim_args=["--submitted-seconds", "0.2", "--processing-seconds", "0.5"],
                   env={"MAX_REQUEST_BYTES": "2000000"})
    s.start()
    yield s
    s.stop()


@pytest.fixture()
def clean_sim(stack: LocalStack) -> LocalStack:
    """Knobs back to their startup values (the fast schedule above) and counters at zero for each test."""
    stack.sim_reset()
    return stack
