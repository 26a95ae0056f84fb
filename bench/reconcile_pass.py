"""One reconcile pass over 100 due jobs with 100k stored jobs beside them, against the same pass with 100 jobs in all.

    python bench/reconcile_pass.py [--reps 3] [--stored 100000] [--due 100]

Starts a throwaway redis-server, builds the worker's Runtime from the stack's settings (Celery publishing to that
Redis; nothing consumes it), and times `reconcile()` over `--due` queued jobs whose create was never answered
(each: the lock check, the callbacks-only check, a `send_task` of the submit, the due push and a note). First
with nothing else stored (the baseline), then after writing `--stored` stored jobs (hash, timeline, request and
index entries, written directly in pipelines: the pass never reads them, which is the point). Prints the median
pass time of each, the ratio and the time per due job.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from _common import parser  # noqa: E402

from deploy.procs import RedisServer  # noqa: E402
from deploy.stack import LocalStack  # noqa: E402
from kling_relay.shared import keys  # noqa: E402
from kling_relay.shared.jobs import JobState  # noqa: E402
from kling_relay.shared.jobs_model import dumps, new_job_id  # noqa: E402
from kling_relay.shared.reconcile import reconcile  # noqa: E402
from kling_relay.shared.runtime import Runtime  # noqa: E402
from kling_relay.shared.settings import load_settings  # noqa: E402

REQUEST = {"model_name": "kling-v1-6", "prompt": "a coastline at sunrise " * 10, "duration": "5"}


def store_many(rt: Runtime, n: int) -> None:
    """Write n stored jobs as the store lays them out (hash, timeline, request, `all` and `stored` indexes)."""
    now = time.time()
    pipe = rt.redis.pipeline(transaction=False)
    for i in range(n):
        at = now - n + i
        job_id = new_job_id(at)
        pipe.hset(keys.job(job_id), mapping={
            "id": job_id, "state": "stored", "notify_url": "", "metadata": "{}", "kling_task_id": f"8{i:017d}",
            "notify_events": "", "created_at": repr(at), "updated_at": repr(at), "error": "null",
            "videos": dumps([{"bucket": "b", "key": f"videos/{job_id}/video.mp4", "bytes": 1024}]),
            "deadline_at": ""})
        pipe.set(keys.job_request(job_id), dumps(REQUEST))
        pipe.rpush(keys.job_events(job_id), *[dumps({"at": at, "from": a, "to": b, "source": "worker", "detail": {}})
                                              for a, b in ((None, "queued"), ("queued", "submitted"),
                                                           ("submitted", "processing"), ("processing", "generated"),
                                                           ("generated", "stored"))])
        pipe.zadd(keys.JOBS_ALL, {job_id: at})
        pipe.zadd(keys.jobs_in_state("stored"), {job_id: at})
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def make_due(rt: Runtime, n: int) -> None:
    rt.redis.delete(keys.JOBS_DUE)
    for _ in range(n):
        job, _ = rt.store.create(REQUEST, due_in=0)
        rt.store.bump_attempt(job.id, "create_sent")
    time.sleep(0.01)


def timed_pass(rt: Runtime, n_due: int) -> float:
    make_due(rt, n_due)
    t0 = time.perf_counter()
    report = reconcile(rt, limit=n_due)
    seconds = time.perf_counter() - t0
    if report.due != n_due or len(report.resubmitted) != n_due:
        raise RuntimeError(f"the pass did not re-send every due job: {report.summary()}")
    return seconds


def bench(reps: int, stored: int, due: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        stack = LocalStack(Path(tmp))
        server: RedisServer = stack.redis.start()
        try:
            rt = Runtime.from_settings(load_settings(stack.env))
            rt.store.create(REQUEST)  # warm: scripts loaded, connections open
            timed_pass(rt, 5)
            base = [timed_pass(rt, due) for _ in range(reps)]
            store_many(rt, stored)
            relay = [timed_pass(rt, due) for _ in range(reps)]
            stored_now = rt.redis.zcard(keys.jobs_in_state(JobState.STORED.value))
            b, r = statistics.median(base), statistics.median(relay)
            row = {"stored": float(stored_now), "due": float(due), "base_s": b, "relay_s": r, "ratio": r / b,
                   "ms_per_due": r / due * 1000}
            rt.redis.close()
            return row
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = parser(__doc__)
    p.add_argument("--stored", type=int, default=100_000)
    p.add_argument("--due", type=int, default=100)
    args = p.parse_args(argv)
    row = bench(args.reps, args.stored, args.due)
    print(f"reconcile  {int(row['stored'])} stored + {int(row['due'])} due: {row['relay_s'] * 1000:.0f} ms  "
          f"{int(row['due'])} in all: {row['base_s'] * 1000:.0f} ms  ratio {row['ratio']:.2f}  "
          f"{row['ms_per_due']:.2f} ms per due job", flush=True)
    return row


if __name__ == "__main__":
    main()
