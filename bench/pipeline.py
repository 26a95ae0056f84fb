"""Pipeline jobs/s (API to stored, zero-delay simulator, 1 KiB videos) against a no-op chain and a floor chain.

    python bench/pipeline.py [--reps 3] [--jobs 200] [--concurrency 4,1,2] [--no-beat] [--profile DIR]

Starts the whole stack (deploy/stack.py: redis-server, moto S3, the simulator with `--submitted-seconds 0
--processing-seconds 0 --video-bytes 1024`, gunicorn, one Celery worker with the given prefork concurrency; the
rate limit and in-flight cap set out of the way), posts `--jobs` jobs to the API and waits until every one is
`stored` (the count of the stored index). Two baselines, each on the same Redis with one Celery worker of the same
flags and concurrency:

- the no-op chain (bench/noop_chain.py): `--jobs` chains of three no-op tasks (submit, copy, done): what Celery
  alone costs;
- the floor (bench/floor_chain.py): `--jobs` chains of three tasks doing the design's external work per job and
  nothing else: the create POSTed to the simulator (whose callbacks go to a no-op endpoint under gunicorn,
  bench/noop_web.py), the task read back, the video downloaded and PUT to moto with its manifest (conditional).

Each rep measures relay, no-op, floor back to back; each figure is the median of the per-rep ratios: relay/no-op
(the target's ratio), floor/no-op (how far the external work alone allows: when it is below the target, so is the
relay, whatever its own code does) and relay/floor (the relay's own overhead). Repeated per concurrency (worker
processes: the scaling curve).

Where the CPU goes: the CPU seconds (user + system, from /proc/<pid>/stat) each process group of the stack used
during each side's runs (moto, the simulator, gunicorn, the Celery worker with its prefork children, beat,
redis-server, the no-op worker, the floor's worker and web), printed per job. On a small machine moto and the
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
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import redis  # noqa: E402
import requests  # noqa: E402
from _common import cpu_by_process, cpu_delta, median_ratio, parser, stack_groups  # noqa: E402

from deploy.procs import Process, free_port, wait_for_port  # noqa: E402
from deploy.stack import DEMO_API_TOKEN, LocalStack  # noqa: E402
from kling_relay.shared import keys  # noqa: E402

SIM_ARGS = ["--submitted-seconds", "0", "--processing-seconds", "0", "--video-bytes", "1024"]
ENV = {"KLING_RATE_LIMIT_PER_SECOND": "100000", "KLING_MAX_IN_FLIGHT": "100000"}
BODY = {"prompt": "bench", "aspect_ratio": "16:9", "duration": 5}  # the job's request, beside its image_list


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
    body = {**BODY, "image_list": [{"image": image}]}
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


def floor_run(client: redis.Redis, n: int, image: str) -> float:
    import floor_chain
    from celery import chain

    client.delete("bench:floor:done", "bench:floor:read_again")
    start = int(client.incr("bench:floor:jobs", n)) - n  # job names unique across reps (the manifest is conditional)
    t0 = time.perf_counter()
    for i in range(start, start + n):
        job = f"floor{i}"
        chain(floor_chain.submit.si(job, {**BODY, "image_list": [{"image": image}]}), floor_chain.copy.s(job),
              floor_chain.done.s()).apply_async()
    wait_count(lambda: int(client.get("bench:floor:done") or 0), n, 300, lambda: "floor chains done")
    seconds = time.perf_counter() - t0
    again = int(client.get("bench:floor:read_again") or 0)
    if again:
        print(f"floor: {again} of {n} copies found the task not yet succeeded and read it again", flush=True)
    return n / seconds


def _baselines(stack: LocalStack, conc: int, exits: ExitStack) -> dict[str, Process]:
    """The no-op chain's worker, the floor chain's worker and the floor's no-op callback endpoint (gunicorn)."""
    flags = ["worker", "--concurrency", str(conc), "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
             "--loglevel", "WARNING"]
    web_port = free_port()
    specs = {
        "noop_worker": ([stack.python, "-m", "celery", "--quiet", "-A", "noop_chain", *flags], None, {}),
        "floor_web": ([stack.python, "-m", "gunicorn", "--config", "deploy/gunicorn.conf.py", "--bind",
                       f"127.0.0.1:{web_port}", "--workers", str(stack.web_workers), "--pythonpath", "bench",
                       "noop_web:app"], web_port, {}),
        "floor_worker": ([stack.python, "-m", "celery", "--quiet", "-A", "floor_chain", *flags], None,
                         {"FLOOR_CALLBACK_BASE": f"http://127.0.0.1:{web_port}"}),
    }
    out: dict[str, Process] = {}
    for name, (argv, port, env) in specs.items():
        proc = Process(name, argv, log_dir=stack.logs, env={**stack.env, **env},
                       cwd=ROOT if name == "floor_web" else ROOT / "bench")
        exits.callback(proc.stop)
        if port is not None:
            wait_for_port(port, proc=proc.proc)
        out[name] = proc
    return out


def run(reps: int, jobs: int, concurrencies: list[int], *, beat: bool = True,
        profile: Path | None = None) -> list[dict[str, float]]:
    rows = []
    image = png()
    for conc in concurrencies:
        with tempfile.TemporaryDirectory() as tmp, ExitStack() as exits:
            stack = LocalStack(Path(tmp), sim_args=SIM_ARGS, env=ENV, worker_concurrency=conc)
            exits.callback(stack.stop)
            stack.start(workers=0 if profile else 1, beat=beat)  # as deployed: the reconciler finishes stragglers
            if profile:
                profile.mkdir(parents=True, exist_ok=True)
                start_profiled_worker(stack, profile)
            os.environ["REDIS_URL"] = stack.redis.url
            for name in ("noop_chain", "floor_chain"):
                sys.modules.pop(name, None)
            procs = _baselines(stack, conc, exits)
            client = redis.Redis.from_url(stack.redis.url)
            exits.callback(client.close)
            groups = stack_groups(stack, **procs)
            relay_run(stack, client, 10, image)  # warm
            noop_run(client, 10)
            floor_run(client, 10, image)
            relay, base, floor = [], [], []
            cpu: dict[str, dict[str, float]] = {"relay": {}, "no-op": {}, "floor": {}}
            runs: dict[str, list[float]] = {"relay": relay, "no-op": base, "floor": floor}
            for _ in range(reps):
                for side in ("relay", "no-op", "floor"):
                    before = cpu_by_process(groups)
                    if side == "relay":
                        relay.append(relay_run(stack, client, jobs, image, timeout=300 if beat else 90))
                    elif side == "no-op":
                        base.append(noop_run(client, jobs))
                    else:
                        floor.append(floor_run(client, jobs, image))
                    for name, used in cpu_delta(before, cpu_by_process(groups)).items():
                        cpu[side][name] = cpu[side].get(name, 0.0) + used
            ratio, lo, hi = median_ratio(relay, base)
            floor_ratio, floor_lo, floor_hi = median_ratio(floor, base)
            over_floor, over_floor_lo, over_floor_hi = median_ratio(relay, floor)
            n_all = jobs * reps
            for side, per_rep in runs.items():
                print(_cpu_line(f"{side:5}  worker_processes={conc}", cpu[side], n_all,
                                n_all / statistics.mean(per_rep)), flush=True)
            rows.append({"concurrency": conc, "relay_jps": statistics.median(relay),
                         "noop_jps": statistics.median(base), "ratio": ratio, "lo": lo, "hi": hi,
                         "floor_jps": statistics.median(floor), "floor_ratio": floor_ratio, "floor_lo": floor_lo,
                         "floor_hi": floor_hi, "relay_over_floor": over_floor, "relay_over_floor_lo": over_floor_lo,
                         "relay_over_floor_hi": over_floor_hi,
                         "relay_cpu_ms": sum(cpu["relay"].values()) * 1000 / n_all,
                         "floor_cpu_ms": sum(cpu["floor"].values()) * 1000 / n_all,
                         "noop_cpu_ms": sum(cpu["no-op"].values()) * 1000 / n_all,
                         "s3_sim_cpu_ms": (cpu["relay"].get("s3", 0.0) + cpu["relay"].get("simulator", 0.0))
                         * 1000 / n_all,
                         "floor_s3_sim_cpu_ms": (cpu["floor"].get("s3", 0.0) + cpu["floor"].get("simulator", 0.0))
                         * 1000 / n_all})
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
        print(f"floor     worker_processes={r['concurrency']}  floor chain {r['floor_jps']:.1f} jobs/s  "
              f"floor/no-op {r['floor_ratio']:.2f} ({r['floor_lo']:.2f}-{r['floor_hi']:.2f})  "
              f"relay/floor {r['relay_over_floor']:.2f} ({r['relay_over_floor_lo']:.2f}-{r['relay_over_floor_hi']:.2f})"
              f"  CPU ms/job: relay {r['relay_cpu_ms']:.1f}  floor {r['floor_cpu_ms']:.1f} (moto + simulator "
              f"{r['floor_s3_sim_cpu_ms']:.1f})  no-op {r['noop_cpu_ms']:.1f}", flush=True)
    if args.profile:
        import profile_worker
        print(profile_worker.report(args.profile, 40), flush=True)
    return rows


if __name__ == "__main__":
    main()
