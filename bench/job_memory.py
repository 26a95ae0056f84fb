"""Redis memory per job, for the capacity guide (deploy/README.md, "Capacity").

    python bench/job_memory.py [--jobs 2000] [--redis-config hash-max-listpack-value=128 ...]

Starts a throwaway redis-server (deploy/procs.py), then creates N jobs through the job store as the API does
(image URLs, a 300-character prompt, metadata, a notify_url, an idempotency key) and walks each to `stored` as
the worker and the callbacks do (its Kling task id bound and indexed, submitted; a `processing` and a `succeed`
callback, each kept as the webhook keeps it (`shared/heard.py`, the succeed one with a Kling video URL) and its
bill recorded (`shared/usage.py`) before its step; generated with a note, its submit and copy attempts counted,
stored with one video, its entry in the consumers' stream and its outbox entry cleared, as `notify.announce`
does), and prints the growth of `used_memory` (INFO memory) divided by N, then what each of one job's keys holds
(MEMORY USAGE, OBJECT ENCODING); then the same for jobs whose request carries one 1 MB base64 image (dropped with
the request when the job is stored); then where the bytes go: each kind of key deleted in turn and the drop of
`used_memory` per job (`KINDS`). The growth is measured after `WARM_UP` jobs. Redis runs with its default
config (`hash-max-listpack-value` 64: see `shared/jobs_model.py` on why that matters).
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from deploy.procs import RedisServer  # noqa: E402
from kling_relay.shared import heard, keys, usage  # noqa: E402
from kling_relay.shared.jobs import JobStore  # noqa: E402
from kling_relay.shared.jobs_model import CREATE_SENT, JobState, Transition  # noqa: E402
from kling_relay.shared.kling import KlingTask, KlingVideo  # noqa: E402
from kling_relay.shared.notify import publish  # noqa: E402

STREAM = "kling-relay:events"
#: Jobs run before the measured ones: Redis allocates about 0.5 MB once, on the first job (whatever the job count
#: after; not in any key: it stays after a FLUSHALL), which is no job's own (it made 2,000 jobs look 270 B larger).
WARM_UP = 100
#: A Kling video URL as its callbacks carry it (a signed CDN link, a couple of hundred characters).
VIDEO_URL = ("https://v15-kling.klingai.com/bs2/upload-ylab-stunt-sgp/se/stream_lake_m2v_img2video_v16/"
             "8c8a2b1d-7c0f-4e7b-9f0e-1b2c3d4e5f60_raw_video_1.mp4?x-kcdn-pid=112372&Expires=1767225600&Signature=ab12")
PROMPT = ("a slow aerial shot over a coastline at sunrise, waves rolling in, gulls crossing the frame, " * 4)[:300]


def request(image: str) -> dict[str, object]:
    return {"model_name": "kling-v1-6", "prompt": PROMPT, "mode": "std", "duration": "5", "aspect_ratio": "16:9",
            "image_list": [{"image": image}, {"image": "https://img.example.com/b.jpg"}]}


class JobClock:
    """The store's clock: a job's steps as far apart as in production (its timeline keeps the times)."""

    def __init__(self) -> None:
        self.start = time.time()
        self.offset = 0.0

    def __call__(self) -> float:
        return self.start + self.offset

    def at(self, seconds: float) -> None:
        """The next steps happen `seconds` after the job's creation."""
        self.offset = seconds


#: When each step happens, in seconds after the job's creation: the submit, Kling's callbacks, the copy.
AT = {"submit": 1.5, "processing": 12.0, "succeed": 185.0, "copy": 185.3, "stored": 191.7}


def run_jobs(client: redis.Redis, store: JobStore, clock: JobClock, n: int, image: str, tag: str,
             app: str | None = None) -> None:
    """`app`: the jobs are made as the API makes them with API tokens: an app's, with a deadline
    (JOB_DEADLINE_SECONDS) and the request id of the POST in their first event."""
    for i in range(n):
        clock.start, clock.offset = time.time(), 0.0
        job, _ = store.create(request(image), notify_url="https://app.example.com/hooks/kling",
                              metadata={"order": i, "customer": "c-12345"}, idempotency_key=f"{tag}-{i}",
                              app=app, deadline_seconds=6 * 3600.0 if app else None,
                              request_id=uuid.uuid4().hex if app else None)
        clock.at(AT["submit"])
        store.bump_attempt(job.id, "submit")
        store.bump_attempt(job.id, CREATE_SENT)
        task_id = f"8{i:017d}"
        store.set_kling_task_id(job.id, task_id, source="worker")
        store.step(job.id, JobState.SUBMITTED, source="worker", detail={"kling_task_id": task_id},
                   set_fields={"kling_task_id": task_id})
        for status in ("processing", "succeed"):  # the callbacks: kept (`heard`), billed, then the step
            task = KlingTask(task_id, status, external_task_id=job.id, created_at_ms=1_764_324_000_000,
                             updated_at_ms=1_764_324_090_000, final_unit_deduction=1.0 if status == "succeed" else None,
                             videos=(KlingVideo("v-1", VIDEO_URL, "5.1"),) if status == "succeed" else ())
            clock.at(AT[status])
            heard.read_and_remember(client, job.id, task, ttl_seconds=2_592_000 + 86_400)
            usage.record_deduction(client, job.id, task)
            to = JobState.PROCESSING if status == "processing" else JobState.GENERATED
            store.step(job.id, to, source="callback", detail={"kling_status": status})
        clock.at(AT["copy"])
        store.bump_attempt(job.id, "copy")
        store.note(job.id, source="worker", detail={"copy": "started"})
        video = {"bucket": "kling-relay", "key": f"videos/2026/12/02/{job.id}/video.mp4", "sha256": "ab" * 32,
                 "bytes": 9_876_543, "duration": "5.1", "content_type": "video/mp4"}
        clock.at(AT["stored"])
        stored = store.step(job.id, JobState.STORED, source="worker", detail={"videos": 1},
                            set_fields={"videos": [video]}).job
        publish(client, STREAM, stored.public_dict(), maxlen=100_000)
        store.announced(Transition.of(stored))


def memory_usage(client: redis.Redis, name: str) -> int:
    return int(client.memory_usage(name, samples=0) or 0)


def per_key(client: redis.Redis, job_id: str, jobs: int) -> None:
    """What one stored job's keys hold (MEMORY USAGE: the value, its key's name and dict entry; not its expiry
    entry), and the stream's and indexes' share (their size / jobs)."""
    for name in (keys.job(job_id), keys.job_events(job_id), keys.job_request(job_id), keys.job_heard(job_id)):
        shown = name.replace(job_id, "<id>")
        if client.exists(name):
            print(f"  {shown:28} {client.object('encoding', name):10} {memory_usage(client, name):6d} B")
        else:
            print(f"  {shown:28} {'(none)':10} {0:6d} B")
    for name in (STREAM, keys.JOBS_ALL, keys.jobs_in_state("stored"), keys.JOBS_BY_TASK):
        encoding = client.object("encoding", name) if client.exists(name) else "(none)"
        print(f"  {name:28} {encoding:10} {memory_usage(client, name) / jobs:6.0f} B per job")
    idem = next(iter(client.scan_iter(f"{keys.PREFIX}idem:*", count=1000)), None)
    if idem:
        size = client.memory_usage(idem, samples=0)
        print(f"  {'kr:idem:<sha256>':28} {client.object('encoding', idem):10} {size:6d} B")


#: What a stored job leaves, by kind of key: each deleted in turn (for every job), and the drop of `used_memory`
#: divided by the job count; what is left after the last is Redis's own tables (its key and expiry dicts keep
#: their size when keys go) and the counters all jobs share.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("stream entry", (STREAM,)),
    ("idempotency record", (f"{keys.PREFIX}idem:*",)),
    ("task-id index", (keys.JOBS_BY_TASK,)),
    ("listing indexes (all, per state, per app)", (keys.JOBS_ALL, keys.jobs_in_state("*"), f"{keys.APP_PREFIX}*")),
    ("what callbacks said (heard)", (keys.job_heard("*"),)),
    ("timeline list", (keys.job_events("*"),)),
    ("request", (keys.job_request("*"),)),
    ("job hash", (keys.job("*"),)),
)


def breakdown(client: redis.Redis, jobs: int) -> dict[str, float]:
    """Delete each kind of key (KINDS) and print what it held per job; returns {kind: bytes per job}."""
    out: dict[str, float] = {}
    total = 0.0
    for kind, patterns in KINDS:
        before = used(client)
        for pattern in patterns:
            names = list(client.scan_iter(pattern, count=1000)) if "*" in pattern else [pattern]
            for start in range(0, len(names), 1000):
                client.delete(*names[start:start + 1000])
        out[kind] = (before - used(client)) / jobs
        total += out[kind]
        print(f"  {kind:44} {out[kind]:6.0f} B")
    return out


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--app", default=None,
                        help="create the jobs as this app's, with a deadline and a request id, as the API does "
                             "with API_TOKENS")
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
            clock = JobClock()
            store = JobStore(client, clock=clock, job_ttl_seconds=2_592_000)
            run_jobs(client, store, clock, WARM_UP, "https://img.example.com/a.jpg", "warm", args.app)
            before = used(client)
            run_jobs(client, store, clock, n, "https://img.example.com/a.jpg", "url", args.app)
            per_job = (used(client) - before) / n
            row["bytes_per_job"] = per_job
            print(f"memory  {n} jobs with image URLs: {per_job:.0f} B ({per_job / 1024:.2f} KiB) per stored job",
                  flush=True)
            per_key(client, str(client.zrange(keys.jobs_in_state("stored"), 0, 0)[0]), n + WARM_UP)
            print(f"where it goes, per stored job (each kind of key deleted in turn, used_memory's drop / "
                  f"{n + WARM_UP}):")
            kinds = breakdown(client, n + WARM_UP)
            rest = per_job - sum(kinds.values())
            print(f"  {'the rest (Redis key/expiry tables, shared)':44} {rest:6.0f} B")
            row["bytes_per_job_without_stream"] = per_job - kinds["stream entry"]
            print(f"memory  without the stream entry: {row['bytes_per_job_without_stream']:.0f} B per stored job")
            m = max(1, n // 20)
            before = used(client)
            run_jobs(client, store, clock, m, base64.b64encode(b"\xff" * 750_000).decode(), "b64", args.app)
            per_job = (used(client) - before) / m
            print(f"memory  {m} jobs with one 1 MB base64 image: {per_job / 1024:.1f} KiB per stored job")
            client.close()
        finally:
            server.stop()
    return row


if __name__ == "__main__":
    main()
