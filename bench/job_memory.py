"""Redis memory per job, for the capacity guide (deploy/README.md, "Capacity").

    python bench/job_memory.py [--jobs 2000] [--redis-config hash-max-listpack-value=128 ...]

Starts a throwaway redis-server (deploy/procs.py), then creates N jobs through the job store as the API does
(image URLs, a 300-character prompt, metadata, a notify_url, an idempotency key) and walks each to `stored` as
the worker and the callbacks do (its Kling task id bound and indexed, submitted, processing, generated with a
note, its submit and copy attempts counted, stored with one video, its entry in the consumers' stream and its
outbox entry cleared, as `notify.announce` does), and prints the growth of `used_memory` (INFO memory) divided by
N, then what each of one job's keys holds (MEMORY USAGE, OBJECT ENCODING); then the same for jobs whose request
carries one 1 MB base64 image (dropped with the request when the job is stored). Redis runs with its default
config (`hash-max-listpack-value` 64: see `shared/jobs_model.py` on why that matters).
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from deploy.procs import RedisServer  # noqa: E402
from kling_relay.shared import keys  # noqa: E402
from kling_relay.shared.jobs import JobStore  # noqa: E402
from kling_relay.shared.jobs_model import CREATE_SENT, JobState, Transition  # noqa: E402
from kling_relay.shared.notify import publish  # noqa: E402

PROMPT = ("a slow aerial shot over a coastline at sunrise, waves rolling in, gulls crossing the frame, " * 4)[:300]


def request(image: str) -> dict[str, object]:
    return {"model_name": "kling-v1-6", "prompt": PROMPT, "mode": "std", "duration": "5", "aspect_ratio": "16:9",
            "image_list": [{"image": image}, {"image": "https://img.example.com/b.jpg"}]}


def run_jobs(client: redis.Redis, store: JobStore, n: int, image: str, tag: str) -> None:
    for i in range(n):
        job, _ = store.create(request(image), notify_url="https://app.example.com/hooks/kling",
                              metadata={"order": i, "customer": "c-12345"}, idempotency_key=f"{tag}-{i}")
        store.bump_attempt(job.id, "submit")
        store.bump_attempt(job.id, CREATE_SENT)
        task_id = f"8{i:017d}"
        store.set_kling_task_id(job.id, task_id, source="worker")
        store.step(job.id, JobState.SUBMITTED, source="worker", detail={"kling_task_id": task_id},
                   set_fields={"kling_task_id": task_id})
        store.step(job.id, JobState.PROCESSING, source="callback", detail={"kling_status": "processing"})
        store.step(job.id, JobState.GENERATED, source="callback", detail={"kling_status": "succeed"})
        store.bump_attempt(job.id, "copy")
        store.note(job.id, source="worker", detail={"copy": "started"})
        video = {"bucket": "kling-relay", "key": f"videos/2026/12/02/{job.id}/video.mp4", "sha256": "ab" * 32,
                 "bytes": 9_876_543, "duration": "5.1", "content_type": "video/mp4"}
        stored = store.step(job.id, JobState.STORED, source="worker", detail={"videos": 1},
                            set_fields={"videos": [video]}).job
        publish(client, "kling-relay:events", stored.public_dict(), maxlen=100_000)
        store.announced(Transition.of(stored))


def per_key(client: redis.Redis, job_id: str) -> None:
    """What one stored job's keys hold: its own keys, and the stream's and indexes' share (their size / jobs)."""
    jobs = max(1, int(client.zcard(keys.JOBS_ALL)))
    for name in (keys.job(job_id), keys.job_events(job_id), keys.job_request(job_id)):
        shown = name.replace(job_id, "<id>")
        if client.exists(name):
            print(f"  {shown:28} {client.object('encoding', name):10} {client.memory_usage(name, samples=0):6d} B")
        else:
            print(f"  {shown:28} {'(none)':10} {0:6d} B")
    for name in ("kling-relay:events", keys.JOBS_ALL, keys.jobs_in_state("stored"), keys.JOBS_BY_TASK):
        size = int(client.memory_usage(name, samples=0) or 0)
        print(f"  {name:28} {client.object('encoding', name):10} {size / jobs:6.0f} B per job")
    idem = next(iter(client.scan_iter(f"{keys.PREFIX}idem:*", count=1000)), None)
    if idem:
        size = client.memory_usage(idem, samples=0)
        print(f"  {'kr:idem:<sha256>':28} {client.object('encoding', idem):10} {size:6d} B")


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--redis-config", action="append", default=[], metavar="NAME=VALUE",
                        help="a Redis setting to change first (CONFIG SET), to compare with the defaults")
    args = parser.parse_args(argv)
    n = args.jobs
    row: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            client = redis.Redis.from_url(server.url, decode_responses=True)
            for setting in args.redis_config:
                name, _, value = setting.partition("=")
                client.config_set(name, value)
            store = JobStore(client, job_ttl_seconds=2_592_000)
            before = used(client)
            run_jobs(client, store, n, "https://img.example.com/a.jpg", "url")
            per_job = (used(client) - before) / n
            row["bytes_per_job"] = per_job
            print(f"memory  {n} jobs with image URLs: {per_job:.0f} B ({per_job / 1024:.2f} KiB) per stored job",
                  flush=True)
            per_key(client, str(client.zrange(keys.JOBS_ALL, 0, 0)[0]))
            m = max(1, n // 20)
            before = used(client)
            run_jobs(client, store, m, base64.b64encode(b"\xff" * 750_000).decode(), "b64")
            per_job = (used(client) - before) / m
            print(f"memory  {m} jobs with one 1 MB base64 image: {per_job / 1024:.1f} KiB per stored job")
            client.close()
        finally:
            server.stop()
    return row


if __name__ == "__main__":
    main()
