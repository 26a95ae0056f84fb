"""Pipeline jobs/s (API to stored, zero-delay simulator, 1 KiB videos) against a no-op 3-task Celery chain.

    python bench/pipeline.py [--reps 3] [--jobs 200] [--concurrency 4,1,2] [--no-beat] [--profile DIR]

Starts the whole stack (deploy/stack.py: redis-server, moto S3, the simulator with `--submitted-seconds 0
--processing-seconds 0 --video-bytes 1024`, gunicorn, one Celery worker with the given prefork concurrency; the
rate limit and in-flight cap set out of the way), posts `--jobs` jobs to the API and waits until every one is
`stored` (the count of the stored index). The baseline is bench/noop_chain.py: one Celery worker with the same
flags and concurrency on the same Redis, sent `--jobs` chains of three no-op tasks (submit, copy, done). Each
rep measures relay then baseline; the figure is the median of the per-rep ratios. Repeated per concurrency
(worker processes: the scaling curve).

Where the CPU goes: the CPU seconds (user + system, from /proc/<pid>/stat) each process group of the stack used
during the relay's runs and during the baseline's (moto, the simulator, gunicorn, the Celery worker with its
prefork children, beat, redis-server, the no-op worker), printed per job. On a small machine moto and the
simulator, which a deployment does not run, take a share of the CPU the relay would otherwise have.

`--profile DIR` runs the relay's worker under cProfile (bench/profile_worker.py: CPU time per function, every
process of the worker, prefork children included; profiles in DIR) and prints its costliest functions at the end.
The profiler's overhead slows the relay down: the throughput figures of such a run are not comparable.

`--no-beat` runs without the reconciler: a job the pipeline itself drops is then never stored, and the timeout
names the states of the jobs left and the last events of a few (which step dropped them).
"""

from __future__ import annotations

import base64
import os
import statistics
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import redis  # noqa: E402
import requests  # noqa: E402
from _common import cpu_by_process, cpu_delta, median_ratio, parser, stack_groups, stack_with  # noqa: E402

from deploy.procs import free_port  # noqa: E402
from deploy.stack import DEMO_API_TOKEN, LocalStack  # noqa: E402
from kling_relay.shared import keys  # noqa: E402

SIM_ARGS = ["--submitted-seconds", "0", "--processing-seconds", "0", "--video-bytes", "1024"]
ENV = {"KLING_RATE_LIMIT_PER_SECOND": "100000", "KLING_MAX_IN_FLIGHT": "100000"}


def png(width: int = 320, height: int = 320) -> str:
    """A small valid RGB PNG, base64."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + bytes(v for x in range(width) for v in (x * 4 % 256, y * 4 % 256, 120))
                   for y in range(height))
    body = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return base64.b64encode(body).decode()


def wait_count(read: Callable[[], int], target: int, timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while read() < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{read()} of {target}: {what()}")
        time.sleep(0.05)


def _not_stored(client: redis.Redis, ids: list[str]) -> str:
    """Where the jobs not stored are (state: count), and the last events of the first few: which step dropped them."""
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(keys.job(job_id), "state")
    states = pipe.execute()
    left = [(i, (s.decode() if isinstance(s, bytes) else s)) for i, s in zip(ids, states, strict=True)
            if s not in (b"stored", "stored")]
    counts: dict[str, int] = {}
    for _, state in left:
        counts[str(state)] = counts.get(str(state), 0) + 1
    tails = [f"{i}: {[e.decode() for e in client.lrange(keys.job_events(i), -4, -1)]}" for i, _ in left[:3]]
    return f"not stored by state {counts}; " + " | ".join(tails)


def relay_run(stack: LocalStack, client: redis.Redis, n: int, image: str, timeout: float = 300) -> float:
    stored_key = keys.jobs_in_state("stored")
    start_count = client.zcard(stored_key)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {DEMO_API_TOKEN}"
    body = {"image_list": [{"image": image}], "prompt": "bench", "aspect_ratio": "16:9", "duration": 5}
    ids: list[str] = []
    t0 = time.perf_counter()
    for _ in range(n):
        r = session.post(f"{stack.web_url}/v1/jobs", json=body, timeout=30)
        if r.status_code != 202:
            raise RuntimeError(f"submit answered {r.status_code}: {r.text}")
        ids.append(r.json()["id"])
    wait_count(lambda: int(client.zcard(stored_key)) - start_count, n, timeout, lambda: _not_stored(client, ids))
    return n / (time.perf_counter() - t0)


def noop_run(client: redis.Redis, n: int) -> float:
    import noop_chain
    from celery import chain

    client.delete("bench:noop:done")
    t0 = time.perf_counter()
    for i in range(n):
        chain(noop_chain.submit.si(i), noop_chain.copy.si(i), noop_chain.done.si(i)).apply_async()
    wait_count(lambda: int(client.get("bench:noop:done") or 0), n, 300, lambda: "no-op chains done")
    return n / (time.perf_counter() - t0)


def _cpu_line(label: str, used: dict[str, float], n: int, seconds: float) -> str:
    parts = "  ".join(f"{name} {cpu * 1000 / n:.1f}" for name, cpu in sorted(used.items(), key=lambda x: -x[1]))
    total = sum(used.values())
    return (f"cpu  {label}: {total * 1000 / n:.1f} ms CPU per job ({total / seconds:.2f} cores busy); "
            f"ms per job by process: {parts}")


def start_profiled_worker(stack: LocalStack, profile_dir: Path, name: str = "worker1") -> None:
    """The stack's worker as `start_worker` starts it, but from bench/profile_worker.py (cProfile in every process)."""
    argv = [stack.python, "-m", "celery", "--quiet", "-A", "profile_worker", "worker", "--queues",
            "submit,copy,notify,reconcile", "--concurrency", str(stack.worker_concurrency), "--prefetch-multiplier",
            "1", "--hostname", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    stack.workers.append(name)
    port = stack.worker_metrics_ports.setdefault(name, free_port())
    stack._spawn(name, argv, overrides={"WORKER_METRICS_PORT": str(port), "PROFILE_DIR": str(profile_dir),
                                        "PYTHONPATH": str(ROOT / "bench")})
    stack.wait_ready()


def run(reps: int, jobs: int, concurrencies: list[int], *, beat: bool = True,
        profile: Path | None = None) -> list[dict[str, float]]:
    rows = []
    image = png()
    for conc in concurrencies:
        with tempfile.TemporaryDirectory() as tmp:
            stack = LocalStack(Path(tmp), sim_args=SIM_ARGS, env=ENV, worker_concurrency=conc)
            argv = [stack.python, "-m", "celery", "--quiet", "-A", "noop_chain", "worker", "--concurrency", str(conc),
                    "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"]

            def start(s: LocalStack) -> None:
                s.start(workers=0 if profile else 1, beat=beat)  # as deployed: the reconciler finishes stragglers
                if profile:
                    profile.mkdir(parents=True, exist_ok=True)
                    start_profiled_worker(s, profile)
                os.environ["REDIS_URL"] = s.redis.url
                sys.modules.pop("noop_chain", None)

            with stack_with(stack, start, "noop-worker", argv, cwd=ROOT / "bench") as noop:
                client = redis.Redis.from_url(stack.redis.url)
                groups = stack_groups(stack, noop_worker=noop)
                relay_run(stack, client, 10, image)  # warm
                noop_run(client, 10)
                relay, base = [], []
                relay_cpu: dict[str, float] = {}
                base_cpu: dict[str, float] = {}
                for _ in range(reps):
                    before = cpu_by_process(groups)
                    relay.append(relay_run(stack, client, jobs, image, timeout=300 if beat else 90))
                    middle = cpu_by_process(groups)
                    base.append(noop_run(client, jobs))
                    after = cpu_by_process(groups)
                    for name, used in cpu_delta(before, middle).items():
                        relay_cpu[name] = relay_cpu.get(name, 0.0) + used
                    for name, used in cpu_delta(middle, after).items():
                        base_cpu[name] = base_cpu.get(name, 0.0) + used
                ratio, lo, hi = median_ratio(relay, base)
                n_all = jobs * reps
                print(_cpu_line(f"relay  worker_processes={conc}", relay_cpu, n_all, n_all / statistics.mean(relay)),
                      flush=True)
                print(_cpu_line(f"no-op  worker_processes={conc}", base_cpu, n_all, n_all / statistics.mean(base)),
                      flush=True)
                rows.append({"concurrency": conc, "relay_jps": statistics.median(relay),
                             "noop_jps": statistics.median(base), "ratio": ratio, "lo": lo, "hi": hi,
                             "relay_cpu_ms": sum(relay_cpu.values()) * 1000 / n_all,
                             "s3_sim_cpu_ms": (relay_cpu.get("s3", 0.0) + relay_cpu.get("simulator", 0.0))
                             * 1000 / n_all})
                client.close()
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--concurrency", default="4,1,2", help="worker processes (the first is the headline)")
    p.add_argument("--no-beat", action="store_true", help="no reconciler: a job the pipeline drops stays unstored")
    p.add_argument("--profile", type=Path, default=None, help="run the worker under cProfile, profiles in this dir")
    args = p.parse_args(argv)
    rows = run(args.reps, args.jobs, [int(c) for c in args.concurrency.split(",")], beat=not args.no_beat,
               profile=args.profile)
    for r in rows:
        print(f"pipeline  worker_processes={r['concurrency']}  relay {r['relay_jps']:.1f} jobs/s  "
              f"no-op chain {r['noop_jps']:.1f} jobs/s  ratio {r['ratio']:.2f} ({r['lo']:.2f}-{r['hi']:.2f})  "
              f"relay CPU {r['relay_cpu_ms']:.1f} ms/job, of which moto + simulator {r['s3_sim_cpu_ms']:.1f}",
              flush=True)
    if args.profile:
        import profile_worker
        print(profile_worker.report(args.profile, 40), flush=True)
    return rows


if __name__ == "__main__":
    main()
