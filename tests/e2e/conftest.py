"""End-to-end fixtures: one LocalStack (real redis-server, moto S3 server, simulator, gunicorn, celery) per session."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from deploy.stack import LocalStack

TERMINAL = {"stored", "failed", "canceled"}


def png_b64(color: tuple[int, int, int], size: tuple[int, int] = (400, 300)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def job_body(n: int = 0, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image_list": [{"image": png_b64(((n * 40) % 255, 90, 200))}, {"image": png_b64((250, (n * 17) % 255, 30))}],
        "prompt": f"test job {n}",
        "aspect_ratio": "16:9",
        "duration": 5,
    }
    body.update(overrides)
    return body


def wait_jobs(stack: LocalStack, ids: list[str], timeout: float = 120.0) -> dict[str, dict[str, Any]]:
    """Poll GET /v1/jobs/<id> until every job is terminal; fail with the process logs otherwise."""
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for job_id in ids:
            if jobs.get(job_id, {}).get("state") not in TERMINAL:
                jobs[job_id] = stack.api("GET", f"/v1/jobs/{job_id}").json()
        if all(j["state"] in TERMINAL for j in jobs.values()) and len(jobs) == len(ids):
            return jobs
        time.sleep(0.3)
    states = {k: v.get("state") for k, v in jobs.items()}
    pytest.fail(f"jobs not finished after {timeout}s: {states}\n{stack.logs_tail()}")


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
