"""The body real clients send, end to end (issue 9 item 5): the seed reseller's example body, `image_tail: ""`
included, through the HTTP API, the worker, the simulator and the copy; `watermark_info` reaches Kling and Kling's
`watermark_url` is kept with the stored video, in the job and in the manifest.

The simulator refuses a single-image field even when empty, so a relay that forwarded `"image_tail": ""` would see
its job fail `kling_rejected:1201` here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator

from deploy.stack import DEMO_ACCESS_KEY, DEMO_SECRET_KEY, LocalStack
from tests.e2e.conftest import png_b64, submit, wait_jobs
from tests.support.sim import make_jwt

pytestmark = pytest.mark.e2e
MANIFEST_SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "manifest.schema.json").read_text())


def sim_task(stack: LocalStack, task_id: str) -> dict[str, Any]:
    """The task as the simulator (Kling) has it, read through its own query route."""
    answer = requests.get(f"{stack.sim_base}/v1/videos/multi-image2video/{task_id}", timeout=10,
                          headers={"Authorization": f"Bearer {make_jwt(DEMO_ACCESS_KEY, DEMO_SECRET_KEY)}"})
    envelope: dict[str, Any] = answer.json()
    assert envelope["code"] == 0, envelope
    task: dict[str, Any] = envelope["data"]
    return task


def test_the_seed_example_body_is_stored_with_kling_s_watermark_url(clean_sim: LocalStack) -> None:
    stack = clean_sim
    body = {  # the shape of the seed reseller's own example
        "model_name": "kling-v1-6",
        "image_list": [{"image": png_b64((200, 40, 40))}, {"image": png_b64((40, 40, 200))}],
        "prompt": "a slow pan from red to blue",
        "negative_prompt": "",
        "mode": "std",
        "duration": "5",
        "aspect_ratio": "16:9",
        "image_tail": "",
        "watermark_info": {"enabled": True},
    }
    job_id = submit(stack, body)
    job = wait_jobs(stack, [job_id])[job_id]
    assert job["state"] == "stored", job

    task = sim_task(stack, job["kling_task_id"])
    assert task["watermark_info"] == {"enabled": True}  # the create body carried it
    [kling_video] = task["task_result"]["videos"]
    assert kling_video["watermark_url"]

    [video] = job["videos"]
    assert video["watermark_url"] == kling_video["watermark_url"]
    key = video["key"].rsplit("/", 1)[0] + "/manifest.json"
    manifest = json.loads(stack.s3().get_object(Bucket=video["bucket"], Key=key)["Body"].read())
    assert manifest["videos"] == job["videos"]
    assert [e.message for e in Draft202012Validator(MANIFEST_SCHEMA).iter_errors(manifest)] == []
    assert manifest["request"]["watermark_info"] == {"enabled": True}
    assert "image_tail" not in manifest["request"] and manifest["request"]["negative_prompt"] == ""
    downloads = stack.sim_stats()["downloads"][job["kling_task_id"]]
    assert downloads["completed"] == 1  # the video; the watermarked copy is recorded, not fetched
