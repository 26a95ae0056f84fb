"""A stolen callback token against the real stack (gunicorn, Celery worker, simulator, moto S3).

Issue 7 item 6: before the worker had recorded the job's Kling task, a callback carrying the job's token and
`external_task_id` = the job id bound whatever `task_id` it named. The job went on with the made-up task, the
real create's record only logged an error, the job ended `copy_exhausted` and the real, billed task was orphaned.
"""

from __future__ import annotations

import pytest
import requests

from deploy.stack import DEMO_CALLBACK_SECRET, LocalStack
from kling_relay.shared.settings import Secret
from kling_relay.shared.tokens import callback_token
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.e2e.faults_conftest import get_job, wait_until

pytestmark = pytest.mark.e2e

MADE_UP = "attacker-made-up"


def test_a_forged_callback_while_the_create_is_in_flight_changes_nothing(clean_sim: LocalStack) -> None:
    stack = clean_sim
    # The create makes its task at once but answers only after 6 s, so the job stays `queued` (its task not yet
    # recorded) while the forged callback arrives; Kling's own callbacks come after the answer.
    stack.sim_control(ambiguous_create_every_n=1, ambiguous_create_mode="delay", ambiguous_create_delay=6,
                      callback_delay=8)
    job_id = submit(stack, job_body(7001))
    real_ids = wait_until(lambda: stack.sim_stats()["tasks_by_external_id"].get(job_id), timeout=30,
                          what="the simulator to make the job's task", stack=stack)
    assert get_job(stack, job_id)["kling_task_id"] is None  # the create's answer is still on its way

    token = callback_token(Secret(DEMO_CALLBACK_SECRET), job_id)
    forged = {"task_id": MADE_UP, "task_status": "succeed", "task_status_msg": "",
              "task_info": {"external_task_id": job_id},
              "task_result": {"videos": [{"id": "v", "url": f"{stack.sim_root}/nothing.mp4", "duration": "5"}]}}
    answer = requests.post(f"{stack.web_url}/callbacks/kling/{job_id}", params={"token": token}, json=forged,
                           timeout=30)
    job = get_job(stack, job_id)
    assert (job["state"], job["kling_task_id"]) == ("queued", None), job
    assert answer.status_code == 202, answer.text  # 2xx: Kling must not send it again

    job = wait_jobs(stack, [job_id], timeout=120)[job_id]
    assert job["state"] == "stored", (job["state"], job["error"])
    assert job["kling_task_id"] == real_ids[0]
    assert stack.sim_stats()["tasks_by_external_id"][job_id] == real_ids and len(real_ids) == 1
    assert MADE_UP not in str(job["events"])
