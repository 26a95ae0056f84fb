"""Callback requests/s under gunicorn (the project's config) against a no-op Flask endpoint on the same settings.

    python bench/callbacks.py [--reps 3] [--jobs 1000] [--per-job 10] [--connections 32] [--workers 1,2,4]

Starts redis-server and the relay's web process (deploy/stack.py, gunicorn with deploy/gunicorn.conf.py), makes
`--jobs` jobs bound to a Kling task and `submitted`, then sends `--per-job` callbacks per job: the first says
`processing` (applied), the rest repeat it or report `submitted` (duplicate or stale: 90% by default). The
baseline is bench/noop_web.py under the same gunicorn config and worker count, fed the same requests. Each rep
measures both back to back, each side first in turn; the figure is the median of the per-rep ratios. A rep is
10,000 requests by default (a few seconds a side: a stall of a few hundred milliseconds, which either side
shows now and then, moves a rep's ratio by a few percent, not by 0.2 as in a 1.5 s rep); gunicorn's
replacement of a worker (`max_requests`, every ~50,000 requests) lands in a rep now and then, as in service.
Repeated for each web worker count (the scaling curve). Prints one line per worker count: relay req/s, baseline
req/s, ratio, relay p50/p99, and the CPU milliseconds per request of each side (gunicorn's master and workers,
recycled ones included), of Redis during the relay's run and of this load generator: on a loaded machine the CPU
split says more than the rates.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import redis  # noqa: E402
from _common import cpu_by_process, load, median_ratio, parser, pct, post, stack_with  # noqa: E402

from deploy.procs import free_port  # noqa: E402
from deploy.stack import DEMO_CALLBACK_SECRET, LocalStack  # noqa: E402
from kling_relay.shared.jobs import JobState, JobStore  # noqa: E402


def _token(job_id: str) -> str:
    return hmac.new(DEMO_CALLBACK_SECRET.encode(), job_id.encode(), hashlib.sha256).hexdigest()


def _body(job_id: str, task_id: str, status: str) -> bytes:
    return json.dumps({"task_id": task_id, "task_status": status, "task_info": {"external_task_id": job_id},
                       "created_at": 1700000000000, "updated_at": 1700000000000}).encode()


def make_requests(store: JobStore, n_jobs: int, per_job: int, seed: int) -> list[bytes]:
    """One applied `processing` per job, then duplicates (processing) and stale ones (submitted), interleaved."""
    rng = random.Random(seed)
    first: list[bytes] = []
    rest: list[bytes] = []
    for i in range(n_jobs):
        job, _ = store.create({"model_name": "kling-v1-6", "prompt": "bench"}, source="api")
        task_id = f"bench-{seed}-{i}"
        store.set_kling_task_id(job.id, task_id, source="worker")
        store.step(job.id, JobState.SUBMITTED, source="worker")
        path = f"/callbacks/kling/{job.id}?token={_token(job.id)}"
        first.append(post(path, _body(job.id, task_id, "processing")))
        for _ in range(per_job - 1):
            rest.append(post(path, _body(job.id, task_id, rng.choice(("processing", "submitted")))))
    rng.shuffle(rest)
    # the applied ones spread through the run, each before its job's duplicates
    out = first[: n_jobs // 2] + rest[: len(rest) // 2] + first[n_jobs // 2:] + rest[len(rest) // 2:]
    return out


def warm(port: int, reqs: list[bytes], connections: int) -> None:
    load("127.0.0.1", port, reqs[: 200], connections)


def measured(port: int, reqs: list[bytes], connections: int, server_pid: int,
             redis_pid: int) -> tuple[float, list[float], dict[int, int], dict[str, float]]:
    """`load`, plus the CPU milliseconds per request of the server (master and workers), Redis and this client."""
    groups = {"server": server_pid, "redis": redis_pid}  # each started in a session of its own: pgid = pid
    before = {**cpu_by_process(groups), "client": time.process_time()}
    seconds, latencies, statuses = load("127.0.0.1", port, reqs, connections)
    after = {**cpu_by_process(groups), "client": time.process_time()}
    cpu = {name: (after[name] - before[name]) * 1000 / len(reqs) for name in after}
    return seconds, latencies, statuses, cpu


def _redis_and_web(stack: LocalStack) -> None:
    stack.redis.start()
    stack.start_web()


def run(reps: int, jobs: int, per_job: int, connections: int, worker_counts: list[int]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for workers in worker_counts:
        nport = free_port()
        noop_argv = [sys.executable, "-m", "gunicorn", "--config", "deploy/gunicorn.conf.py", "--bind",
                     f"127.0.0.1:{nport}", "--workers", str(workers), "--pythonpath", "bench", "noop_web:app"]
        with tempfile.TemporaryDirectory() as tmp:
            stack = LocalStack(Path(tmp), web_workers=workers)
            with stack_with(stack, _redis_and_web, "noop-web", noop_argv, port=nport) as noop:
                assert noop is not None
                client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
                store = JobStore(client)
                web_pid, redis_pid = stack.processes["web"].pid, stack.redis.process.pid  # type: ignore[union-attr]
                cpu: dict[str, list[float]] = {"relay": [], "noop": [], "redis": [], "client": []}
                relay_rates: list[float] = []
                base_rates: list[float] = []
                lat: list[float] = []
                for rep in range(reps):
                    reqs = make_requests(store, jobs, per_job, seed=rep * 1000 + workers)
                    warm_reqs = make_requests(store, 20, 10, seed=rep * 1000 + workers + 500)
                    # the two sides back to back, in turn first (a drift of the machine's speed within a rep
                    # then favours neither side over the run)
                    for side in (("relay", "noop") if rep % 2 == 0 else ("noop", "relay")):
                        if side == "relay":
                            warm(stack.web_port, warm_reqs, connections)
                            seconds, latencies, statuses, rcpu = measured(stack.web_port, reqs, connections,
                                                                          web_pid, redis_pid)
                            bad = {s: c for s, c in statuses.items() if s >= 300}
                            if bad:
                                raise RuntimeError(f"relay answered {bad}: see {stack.logs}")
                        else:
                            warm(nport, warm_reqs, connections)
                            bseconds, _, _, bcpu = measured(nport, reqs, connections, noop.pid, redis_pid)
                    relay_rates.append(len(reqs) / seconds)
                    lat += latencies
                    cpu["relay"].append(rcpu["server"])
                    cpu["redis"].append(rcpu["redis"])
                    cpu["client"].append(rcpu["client"])
                    cpu["noop"].append(bcpu["server"])
                    base_rates.append(len(reqs) / bseconds)
                ratio, lo, hi = median_ratio(relay_rates, base_rates)
                rows.append({"web_workers": workers, "relay_rps": statistics.median(relay_rates),
                             "noop_rps": statistics.median(base_rates), "ratio": ratio, "lo": lo, "hi": hi,
                             "p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000,
                             **{f"cpu_{k}_ms": statistics.median(v) for k, v in cpu.items()}})
                client.close()
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    args_parser = parser(__doc__)
    args_parser.add_argument("--jobs", type=int, default=1000)
    args_parser.add_argument("--per-job", type=int, default=10)
    args_parser.add_argument("--connections", type=int, default=32)
    args_parser.add_argument("--workers", default="2,1,4", help="web worker counts (the first is the headline)")
    args = args_parser.parse_args(argv)
    rows = run(args.reps, args.jobs, args.per_job, args.connections, [int(w) for w in args.workers.split(",")])
    for r in rows:
        print(f"callbacks  web_workers={r['web_workers']}  relay {r['relay_rps']:.0f} req/s  "
              f"no-op {r['noop_rps']:.0f} req/s  ratio {r['ratio']:.2f} ({r['lo']:.2f}-{r['hi']:.2f})  "
              f"relay p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms  CPU ms/req: relay {r['cpu_relay_ms']:.2f} "
              f"(Redis {r['cpu_redis_ms']:.2f}) no-op {r['cpu_noop_ms']:.2f} client {r['cpu_client_ms']:.2f}",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
