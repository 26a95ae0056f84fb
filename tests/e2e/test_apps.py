"""Issue 13 end to end: two app tokens and one ops token on a whole stack (gunicorn, Celery workers, Redis, moto,
the simulator). Every cross-app read, list, retry and cancel is 404 and changes nothing; ops sees both; app tokens
get 403 on status and resume; the same idempotency key from both apps makes two jobs; each app's jobs run through."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from deploy.stack import LocalStack
from tests.e2e.conftest import job_body
from tests.support.waiting import wait_until

WEB = "web-app-token-0123456789abcdef"
BATCH = "batch-app-token-0123456789abcdef"
ONCALL = "oncall-ops-token-0123456789abcdef"


@pytest.fixture(scope="module")
def apps_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = LocalStack(tmp_path_factory.mktemp("apps-stack"),
                   sim_args=["--submitted-seconds", "0.2", "--processing-seconds", "0.3"],
                   env={"API_TOKENS": f"web:{WEB},batch:{BATCH}", "OPS_TOKENS": f"oncall:{ONCALL}",
                        "KLING_MAX_IN_FLIGHT": "2"})
    s.start()
    yield s
    s.stop()


def _submit(stack: LocalStack, token: str, n: int, key: str) -> dict[str, Any]:
    response = stack.api("POST", "/v1/jobs", token=token, json=job_body(n), headers={"Idempotency-Key": key})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def test_two_apps_and_an_operator(apps_stack: LocalStack) -> None:
    web = _submit(apps_stack, WEB, 0, "order-1")
    batch = _submit(apps_stack, BATCH, 1, "order-1")  # the same key from another app: another job
    assert web["id"] != batch["id"] and (web["app"], batch["app"]) == ("web", "batch")

    def stored() -> bool:
        return all(apps_stack.api("GET", f"/v1/jobs/{j['id']}", token=ONCALL).json()["state"] == "stored"
                   for j in (web, batch))

    wait_until(stored, timeout=120, what="both apps' jobs stored", diagnostics=apps_stack.logs_tail, interval=0.3)
    before = apps_stack.api("GET", f"/v1/jobs/{batch['id']}", token=ONCALL).json()
    for method, path in (("GET", ""), ("POST", "/retry"), ("POST", "/cancel")):
        response = apps_stack.api(method, f"/v1/jobs/{batch['id']}{path}", token=WEB)
        assert response.status_code == 404 and response.json() == {"error": "no such job"}, (path, response.text)
    assert apps_stack.api("GET", f"/v1/jobs/{batch['id']}", token=ONCALL).json() == before  # nothing changed
    assert [j["id"] for j in apps_stack.api("GET", "/v1/jobs", token=WEB).json()["jobs"]] == [web["id"]]
    assert [j["id"] for j in apps_stack.api("GET", "/v1/jobs", token=BATCH).json()["jobs"]] == [batch["id"]]
    assert {j["id"] for j in apps_stack.api("GET", "/v1/jobs", token=ONCALL).json()["jobs"]} == \
        {web["id"], batch["id"]}
    for method, path in (("GET", "/v1/status"), ("POST", "/v1/submission/resume"), ("POST", "/v1/copy/resume")):
        for token in (WEB, BATCH):
            assert apps_stack.api(method, path, token=token).status_code == 403, path
        assert apps_stack.api(method, path, token=ONCALL).status_code == 200, path
