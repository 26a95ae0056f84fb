"""`make demo`: three jobs end to end on this machine, then everything it started is stopped.

Starts redis-server, moto's S3 server, the Kling simulator, the web process and a Celery worker (deploy/stack.py),
submits three jobs made from the sample images in deploy/samples/ through the HTTP API, shows each state change,
prints where each video landed in S3 and writes the three MP4s to demo-output/. It prints the dashboard's address
and a token to sign in with; with `KEEP=1` (`make demo KEEP=1`) it keeps everything running until Ctrl-C, so the
dashboard can be looked at.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from deploy.stack import BUCKET, DEMO_API_TOKEN, LocalStack

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "deploy" / "samples"
OUTPUT = ROOT / "demo-output"
WORKDIR = ROOT / ".demo"
TERMINAL = {"stored", "failed", "canceled"}

JOBS = [
    {"name": "sunrise-over-the-ocean", "images": ["sunrise.jpg", "ocean.jpg"], "aspect_ratio": "16:9",
     "prompt": "A slow pan across a sunrise over the ocean, gentle waves, warm light"},
    {"name": "city-forest-desert", "images": ["city.jpg", "forest.jpg", "desert.jpg"], "aspect_ratio": "9:16",
     "prompt": "A journey from a glowing city through a forest into the desert at dusk"},
    {"name": "planet", "images": ["planet.jpg"], "aspect_ratio": "1:1",
     "prompt": "A planet turning slowly among bright moons", "duration": 5},
]


def _b64(name: str) -> str:
    return base64.b64encode((SAMPLES / name).read_bytes()).decode()


def _say(text: str) -> None:
    print(text, flush=True)


def _keep_up(stack: LocalStack) -> None:
    """Wait for Ctrl-C with the stack up (KEEP=1), so the dashboard can be looked at."""
    _say(f"\nKEEP=1: everything stays up. Dashboard: {stack.web_url}/dashboard  (sign in with {DEMO_API_TOKEN})")
    _say("press Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _say("")


def run(timeout: float = 240.0, *, keep: bool = False) -> int:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    OUTPUT.mkdir(exist_ok=True)
    _say("starting redis-server, S3 (moto), the Kling simulator, the web process and a worker ...")
    stack = LocalStack(WORKDIR, sim_args=["--submitted-seconds", "1", "--processing-seconds", "3"])
    with stack:
        stack.start()
        _say(f"  web API  {stack.web_url}   Kling simulator  {stack.sim_base}   S3  {stack.s3_endpoint}")
        _say(f"  dashboard  {stack.web_url}/dashboard  (sign in with the demo token {DEMO_API_TOKEN})")
        ids: dict[str, str] = {}
        for spec in JOBS:
            body: dict[str, Any] = {
                "model_name": "kling-v1-6",
                "image_list": [{"image": _b64(n)} for n in spec["images"]],
                "prompt": spec["prompt"],
                "aspect_ratio": spec["aspect_ratio"],
                "duration": spec.get("duration", "5"),
                "metadata": {"demo": spec["name"]},
            }
            response = stack.api("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": f"demo-{spec['name']}"})
            if response.status_code != 202:
                _say(f"submit failed: HTTP {response.status_code} {response.text}")
                return 1
            job = response.json()
            ids[job["id"]] = spec["name"]
            count = len(spec["images"])
            _say(f"submitted {spec['name']:<24} job {job['id']}  ({count} image{'s' if count > 1 else ''}, "
                 f"{spec['aspect_ratio']})")

        seen: dict[str, str] = {}
        jobs: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len([j for j in jobs.values() if j["state"] in TERMINAL]) < len(ids):
            for job_id, name in ids.items():
                job = stack.api("GET", f"/v1/jobs/{job_id}").json()
                jobs[job_id] = job
                if seen.get(job_id) != job["state"]:
                    seen[job_id] = job["state"]
                    _say(f"  {time.strftime('%H:%M:%S')}  {name:<24} → {job['state']}")
            time.sleep(0.5)

        failed = False
        s3 = stack.s3()
        _say("")
        for job_id, name in ids.items():
            job = jobs.get(job_id, {})
            if job.get("state") != "stored":
                failed = True
                _say(f"{name}: ended {job.get('state')!r} {json.dumps(job.get('error'))}")
                continue
            for i, video in enumerate(job["videos"]):
                data = s3.get_object(Bucket=video["bucket"], Key=video["key"])["Body"].read()
                if hashlib.sha256(data).hexdigest() != video["sha256"]:
                    failed = True
                    _say(f"{name}: sha256 of the stored object does not match the manifest")
                suffix = f"-{i + 1}" if len(job["videos"]) > 1 else ""
                target = OUTPUT / f"{name}{suffix}.mp4"
                target.write_bytes(data)
                _say(f"{name}: s3://{video['bucket']}/{video['key']}  ({video['bytes']} bytes, sha256 "
                     f"{video['sha256'][:12]}… matches the manifest)  →  {target.relative_to(ROOT)}")
        clean = not failed and len(jobs) == len(ids)
        if not clean:
            _say("\nthe demo did not finish cleanly; process logs:\n" + stack.logs_tail())
        else:
            _say(f"\nmanifests: s3://{BUCKET}/<yyyy>/<mm>/<dd>/<job_id>/manifest.json  ·  videos in {OUTPUT}/")
        if keep:
            _keep_up(stack)
        _say("stopping everything the demo started")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(run(keep=os.environ.get("KEEP", "") not in ("", "0")))
