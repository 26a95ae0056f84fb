"""One reconcile pass over 100 due jobs with 100k stored jobs beside them, against the same pass with 100 jobs in all.

    python bench/reconcile_pass.py [--reps 3] [--passes 5] [--stored 100000] [--due 100] [--expired N]
                                   [--expired-relay-only]

Starts a throwaway redis-server, builds the worker's Runtime from the stack's settings (Celery publishing to that
Redis; nothing consumes it), and times `reconcile()` over `--due` queued jobs whose create was never answered (for
them all: the lock and callbacks-only checks read in one round trip, the submits published in one batch, the due
pushes and notes written in one round trip). First with nothing else stored (the baseline), then after writing
`--stored` stored jobs (hash, timeline, request and index entries, task-id index included, written directly in
pipelines: the pass never reads them, which is the point). Both sides also hold the index entries of `--expired`
jobs that expired long ago (their hashes gone; default: enough for every timed pass's sweep to do its most work,
`jobs.SWEEP_BATCH` removals in `all` and in `stored` and an HSCAN step of `jobs.SWEEP_SCAN_COUNT` over the task-id
entries, 100k of them beside the stored jobs): the sweep's bounded work is the same on both sides, so what the ratio
weighs is the 100k stored jobs; the sweep alone, at its most, is timed once after the passes and printed
(`--expired-relay-only` puts the expired entries on the 100k side only, as this bench did before: the ratio then
also carries the sweep's whole cost). The two sides run on two Redis servers. Each rep times `--passes` passes of
each side, the two sides back to back (which goes first alternates), each pass over `--due` fresh jobs (the previous
pass's are removed, so the baseline holds `--due` jobs in all); a rep's ratio is the median of its relay passes over
the median of its baseline passes. Prints the median pass time of each side over all passes, the median (min-max) of
the per-rep ratios, the time per due job; the same for the CPU a pass costs (this process's and the Redis server's:
the steadier figure on a shared machine, where a pass's wall time can double under others' load); and the index
entries each pass's sweep removed.
"""

from __future__ import annotations

import gc
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
from kling_relay.shared.queue import SUBMIT_QUEUE  # noqa: E402
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


def make_due(rt: Runtime, n: int) -> list[str]:
    rt.redis.delete(keys.JOBS_DUE)
    ids = []
    for _ in range(n):
        job, _ = rt.store.create(REQUEST, due_in=0)
        rt.store.bump_attempt(job.id, "create_sent")
        ids.append(job.id)
    time.sleep(0.01)
    return ids


def forget(rt: Runtime, ids: list[str]) -> None:
    """Remove the jobs a timed pass looked after (hash, request, index entries) and the messages it sent, so each
    pass starts from the same store: `--due` fresh jobs (beside the stored ones, on the relay's side)."""
    pipe = rt.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.delete(keys.job(job_id), keys.job_request(job_id), keys.job_events(job_id))
        for index in (keys.JOBS_ALL, keys.jobs_in_state("queued"), keys.app_jobs_in_state(keys.NO_APP_GROUP, "queued"),
                      keys.JOBS_DUE):
            pipe.zrem(index, job_id)
    pipe.delete(SUBMIT_QUEUE)
    pipe.execute()


def redis_cpu(rt: Runtime) -> float:
    """CPU seconds (user + system) the Redis server has used so far."""
    info = rt.redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def timed_pass(rt: Runtime, n_due: int, swept: list[int] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and of Redis) of one pass over `n_due` fresh due jobs."""
    ids = make_due(rt, n_due)
    gc.collect()
    redis_before = redis_cpu(rt)
    cpu0, t0 = time.process_time(), time.perf_counter()
    report = reconcile(rt, limit=n_due)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    cpu += redis_cpu(rt) - redis_before
    if report.due != n_due or len(report.resubmitted) != n_due:
        raise RuntimeError(f"the pass did not re-send every due job: {report.summary()}")
    if swept is not None:
        swept.append(report.swept)
    forget(rt, ids)
    return seconds, cpu


def _medians(reps: list[list[tuple[float, float]]], which: int) -> list[float]:
    return [statistics.median(p[which] for p in rep) for rep in reps]


def bench(reps: int, stored: int, due: int, expired: int | None = None, passes: int = 5, *,
          expired_relay_only: bool = False) -> dict[str, float]:
    """Two throwaway Redis servers: the baseline's (nothing else stored but the expired jobs' entries) and the
    relay's (the stored and expired jobs); each rep times `passes` passes on each, back to back, so the machine's
    load weighs on both alike."""
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
            n_expired = (reps * passes + 2) * SWEEP_BATCH if expired is None else expired
            for rt in ([relay_rt] if expired_relay_only else runtimes):
                expired_many(rt, n_expired)
            base: list[list[tuple[float, float]]] = []
            relay: list[list[tuple[float, float]]] = []
            swept: list[int] = []
            for _ in range(reps):
                base.append([])
                relay.append([])
                for i in range(passes):
                    if i % 2:
                        relay[-1].append(timed_pass(relay_rt, due, swept))
                        base[-1].append(timed_pass(base_rt, due))
                    else:
                        base[-1].append(timed_pass(base_rt, due))
                        relay[-1].append(timed_pass(relay_rt, due, swept))
            t0 = time.perf_counter()
            alone = relay_rt.store.sweep()
            sweep_s = time.perf_counter() - t0
            ratio, lo, hi = median_ratio(_medians(relay, 0), _medians(base, 0))
            cpu_ratio, cpu_lo, cpu_hi = median_ratio(_medians(relay, 1), _medians(base, 1))
            b = statistics.median(p[0] for rep in base for p in rep)
            r = statistics.median(p[0] for rep in relay for p in rep)
            b_cpu = statistics.median(p[1] for rep in base for p in rep)
            r_cpu = statistics.median(p[1] for rep in relay for p in rep)
            return {"stored": float(stored_now), "due": float(due), "base_s": b, "relay_s": r, "ratio": ratio,
                    "lo": lo, "hi": hi, "ms_per_due": r / due * 1000, "base_ms_per_due": b / due * 1000,
                    "cpu_ms_per_due": r_cpu / due * 1000, "base_cpu_ms_per_due": b_cpu / due * 1000,
                    "cpu_ratio": cpu_ratio, "cpu_lo": cpu_lo, "cpu_hi": cpu_hi,
                    "swept": float(statistics.median(swept)), "sweep_ms": sweep_s * 1000,
                    "sweep_removed": float(alone["removed"]), "expired_relay_only": float(expired_relay_only)}
        finally:
            for rt in runtimes:
                rt.redis.close()
            for server in servers:
                server.stop()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = parser(__doc__)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--stored", type=int, default=100_000)
    p.add_argument("--due", type=int, default=100)
    p.add_argument("--expired", type=int, default=None)
    p.add_argument("--expired-relay-only", action="store_true")
    args = p.parse_args(argv)
    row = bench(args.reps, args.stored, args.due, args.expired, args.passes,
                expired_relay_only=args.expired_relay_only)
    print(f"reconcile  {int(row['stored'])} stored + {int(row['due'])} due: {row['relay_s'] * 1000:.0f} ms  "
          f"{int(row['due'])} in all: {row['base_s'] * 1000:.0f} ms  ratio {row['ratio']:.2f} "
          f"({row['lo']:.2f}-{row['hi']:.2f})  "
          f"{row['ms_per_due']:.2f} ms per due job ({row['base_ms_per_due']:.2f} with {int(row['due'])} in all)  "
          f"CPU (this process + Redis) {row['cpu_ms_per_due']:.2f} ms per due job ({row['base_cpu_ms_per_due']:.2f}), "
          f"ratio {row['cpu_ratio']:.2f} ({row['cpu_lo']:.2f}-{row['cpu_hi']:.2f})  "
          f"(sweep: {int(row['swept'])} entries removed a pass, "
          f"{'on the 100k side only' if args.expired_relay_only else 'on each side'}; "
          f"the sweep alone {row['sweep_ms']:.1f} ms for {int(row['sweep_removed'])})", flush=True)
    return row


if __name__ == "__main__":
    main()
