"""Pipeline jobs/s with 1, 2 and 3 worker hosts, on the multi-host topology of deploy/hosts.py (network namespaces).

    python bench/hosts.py [--reps 2] [--jobs 200] [--hosts 1,2,3] [--concurrency 2] [--no-same-processes] [--quick]

For each count of worker hosts: a fresh network (Redis, S3, simulator, two web hosts behind the load balancer,
N worker hosts each with one Celery worker of `--concurrency` processes, beat), the zero-delay simulator with
1 KiB videos and the rate limit out of the way (as bench/pipeline.py), `--jobs` jobs posted to the load balancer,
timed until every one is `stored`. Nothing is cut. The figure per point is the median over `--reps`; the curve
is read against the 1-host point measured in the same run (its `scaling` column), since absolute figures move
with the machine's load. A last point runs one worker host with as many processes as the largest count of hosts
has in all (3 x 2 = 6): what more hosts bring beyond more processes. Every host is a namespace of this one
machine: its cores bound the curve, which shows what the relay's own coordination (Redis, locks, the broker)
costs as hosts are added, not a cluster's capacity. On a machine shared with other work, more processes also
take a larger share of the CPU, which flatters the curve. Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import redis  # noqa: E402
from pipeline import ENV, SIM_ARGS, png, relay_run  # noqa: E402

from deploy.hosts import HostsStack, Network, topology, unavailable_reason  # noqa: E402


def run(reps: int, jobs: int, points: list[tuple[int, int]]) -> list[dict[str, float]]:
    """One row per (worker hosts, processes per worker) point."""
    rows = []
    image = png()
    for count, concurrency in points:
        with tempfile.TemporaryDirectory() as tmp, Network.create(topology(count)) as net:
            stack = HostsStack(Path(tmp), net, sim_args=SIM_ARGS, env=ENV, worker_concurrency=concurrency,
                               web_workers=1)
            try:
                stack.start(workers=count, beat=True)
                client = redis.Redis.from_url(stack.redis.url, socket_timeout=10)
                relay_run(stack, client, 10, image)  # warm
                rates = [relay_run(stack, client, jobs, image) for _ in range(reps)]
                rows.append({"worker_hosts": count, "concurrency": concurrency, "jps": statistics.median(rates),
                             "lo": min(rates), "hi": max(rates)})
                client.close()
            finally:
                stack.stop()
    base = rows[0]["jps"] if rows and rows[0]["worker_hosts"] == 1 else None  # the first point: 1 host
    for r in rows:
        r["scaling"] = r["jps"] / base if base else float("nan")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--hosts", default="1,2,3", help="worker host counts (start with 1: the curve's base)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes per worker host")
    parser.add_argument("--quick", action="store_true", help="40 jobs, one rep: a smoke run")
    parser.add_argument("--same-processes", action=argparse.BooleanOptionalAction, default=True,
                        help="add a last point: one worker host with as many processes as the most hosts have in all "
                             "(more hosts against more processes)")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"hosts  skipped: {reason}", flush=True)
        return []
    reps, jobs = (1, 40) if args.quick else (args.reps, args.jobs)
    counts = [int(c) for c in args.hosts.split(",")]
    points = [(count, args.concurrency) for count in counts]
    if args.same_processes and max(counts) > 1:
        points.append((1, max(counts) * args.concurrency))
    rows = run(reps, jobs, points)
    for r in rows:
        print(f"hosts  worker_hosts={r['worker_hosts']}  concurrency={r['concurrency']}  {r['jps']:.1f} jobs/s "
              f"({r['lo']:.1f}-{r['hi']:.1f})  x{r['scaling']:.2f} of 1 host", flush=True)
    return rows


if __name__ == "__main__":
    main()
