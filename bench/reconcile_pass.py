"""One reconcile pass over 100 due jobs with 100k stored jobs beside them, against the same pass with 100 jobs in all.

    python bench/reconcile_pass.py [--reps 3] [--stored 100000] [--due 100] [--expired N]

Starts a throwaway redis-server, builds the worker's Runtime from the stack's settings (Celery publishing to that
Redis; nothing consumes it), and times `reconcile()` over `--due` queued jobs whose create was never answered
(each: the lock check, the callbacks-only check, a `send_task` of the submit, the due push and a note). First
with nothing else stored (the baseline), then after writing `--stored` stored jobs (hash, timeline, request and
index entries, task-id index included, written directly in pipelines: the pass never reads them, which is the
point) and the index entries of `--expired` jobs that expired long ago (their hashes gone; default: enough for
every timed pass's sweep to do its most work, `jobs.SWEEP_BATCH` removals in `all` and in `stored` and an HSCAN
step of `jobs.SWEEP_SCAN_COUNT` over the 100k task-id entries). The two sides run on two Redis servers, one pass
of each back to back per rep. Prints the median pass time of each, the median (min-max) of the per-rep ratios,
the time per due job and the index entries each pass's sweep removed.
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

from _common import median_ratio, parser  # noqa: E402

from deploy.procs import RedisServer  # noqa: E402
from deploy.stack import LocalStack  # noqa: E402
from kling_relay.shared import keys  # noqa: E402
from kling_relay.shared.jobs import SWEEP_BATCH, JobState  # noqa: E402
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
        pipe.hset(keys.JOBS_BY_TASK, f"8{i:017d}", job_id)
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def expired_many(rt: Runtime, n: int) -> None:
    """Index entries (`all`, `stored`, task-id) of n jobs that ended and expired long ago: no hash any more."""
    old = time.time() - rt.settings.job_ttl_seconds - 86_400
    pipe = rt.redis.pipeline(transaction=False)
    for i in range(n):
        at = old - n + i
        job_id = new_job_id(at)
        pipe.zadd(keys.JOBS_ALL, {job_id: at})
        pipe.zadd(keys.jobs_in_state("stored"), {job_id: at})
        pipe.hset(keys.JOBS_BY_TASK, f"9{i:017d}", job_id)
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def make_due(rt: Runtime, n: int) -> None:
    rt.redis.delete(keys.JOBS_DUE)
    for _ in range(n):
        job, _ = rt.store.create(REQUEST, due_in=0)
        rt.store.bump_attempt(job.id, "create_sent")
    time.sleep(0.01)


def timed_pass(rt: Runtime, n_due: int, swept: list[int] | None = None) -> float:
    make_due(rt, n_due)
    t0 = time.perf_counter()
    report = reconcile(rt, limit=n_due)
    seconds = time.perf_counter() - t0
    if report.due != n_due or len(report.resubmitted) != n_due:
        raise RuntimeError(f"the pass did not re-send every due job: {report.summary()}")
    if swept is not None:
        swept.append(report.swept)
    return seconds


def bench(reps: int, stored: int, due: int, expired: int | None = None) -> dict[str, float]:
    """Two throwaway Redis servers: the baseline's (nothing else stored) and the relay's (the stored and expired
    jobs); each rep times one pass on each, back to back, so the machine's load weighs on both alike."""
    with tempfile.TemporaryDirectory() as tmp:
        servers: list[RedisServer] = []
        runtimes: list[Runtime] = []
        try:
            for side in ("base", "relay"):
                stack = LocalStack(Path(tmp) / side)
                servers.append(stack.redis.start())
                rt = Runtime.from_settings(load_settings(stack.env))
                runtimes.append(rt)
                rt.store.create(REQUEST)  # warm: scripts loaded, connections open
                timed_pass(rt, 5)
            base_rt, relay_rt = runtimes
            store_many(relay_rt, stored)
            stored_now = relay_rt.redis.zcard(keys.jobs_in_state(JobState.STORED.value))
            expired_many(relay_rt, (reps + 1) * SWEEP_BATCH if expired is None else expired)
            base: list[float] = []
            relay: list[float] = []
            swept: list[int] = []
            for _ in range(reps):
                base.append(timed_pass(base_rt, due))
                relay.append(timed_pass(relay_rt, due, swept))
            ratio, lo, hi = median_ratio(relay, base)
            b, r = statistics.median(base), statistics.median(relay)
            return {"stored": float(stored_now), "due": float(due), "base_s": b, "relay_s": r, "ratio": ratio,
                    "lo": lo, "hi": hi, "ms_per_due": r / due * 1000, "swept": float(statistics.median(swept))}
        finally:
            for rt in runtimes:
                rt.redis.close()
            for server in servers:
                server.stop()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = parser(__doc__)
    p.add_argument("--stored", type=int, default=100_000)
    p.add_argument("--due", type=int, default=100)
    p.add_argument("--expired", type=int, default=None)
    args = p.parse_args(argv)
    row = bench(args.reps, args.stored, args.due, args.expired)
    print(f"reconcile  {int(row['stored'])} stored + {int(row['due'])} due: {row['relay_s'] * 1000:.0f} ms  "
          f"{int(row['due'])} in all: {row['base_s'] * 1000:.0f} ms  ratio {row['ratio']:.2f} "
          f"({row['lo']:.2f}-{row['hi']:.2f})  "
          f"{row['ms_per_due']:.2f} ms per due job  (sweep: {int(row['swept'])} entries removed a pass)", flush=True)
    return row


if __name__ == "__main__":
    main()
