"""Pipeline jobs/s (API to stored, zero-delay simulator, 1 KiB videos) against a no-op 3-task Celery chain.

    python bench/pipeline.py [--reps 3] [--jobs 200] [--concurrency 4,1,2]

Starts the whole stack (deploy/stack.py: redis-server, moto S3, the simulator with `--submitted-seconds 0
--processing-seconds 0 --video-bytes 1024`, gunicorn, one Celery worker with the given prefork concurrency; the
rate limit and in-flight cap set out of the way), posts `--jobs` jobs to the API and waits until every one is
`stored` (the count of the stored index). The baseline is bench/noop_chain.py: one Celery worker with the same
flags and concurrency on the same Redis, sent `--jobs` chains of three no-op tasks (submit, copy, done). Each
rep measures relay then baseline; the figure is the median of the per-rep ratios. Repeated per concurrency
(worker processes: the scaling curve).
"""

from __future__ import annotations

import argparse
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
from _common import median_ratio  # noqa: E402

from deploy.procs import Process  # noqa: E402
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


def wait_count(read: Callable[[], int], target: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while read() < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {read()} of {target}")
        time.sleep(0.05)


def relay_run(stack: LocalStack, client: redis.Redis, n: int, image: str) -> float:
    stored_key = keys.jobs_in_state("stored")
    start_count = client.zcard(stored_key)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {DEMO_API_TOKEN}"
    body = {"image_list": [{"image": image}], "prompt": "bench", "aspect_ratio": "16:9", "duration": 5}
    t0 = time.perf_counter()
    for _ in range(n):
        r = session.post(f"{stack.web_url}/v1/jobs", json=body, timeout=30)
        if r.status_code != 202:
            raise RuntimeError(f"submit answered {r.status_code}: {r.text}")
    wait_count(lambda: int(client.zcard(stored_key)) - start_count, n, 300,
               f"jobs stored (failed: {client.zcard(keys.jobs_in_state('failed'))})")
    return n / (time.perf_counter() - t0)


def noop_run(client: redis.Redis, n: int) -> float:
    import noop_chain
    from celery import chain

    client.delete("bench:noop:done")
    t0 = time.perf_counter()
    for i in range(n):
        chain(noop_chain.submit.si(i), noop_chain.copy.si(i), noop_chain.done.si(i)).apply_async()
    wait_count(lambda: int(client.get("bench:noop:done") or 0), n, 300, "no-op chains done")
    return n / (time.perf_counter() - t0)


def run(reps: int, jobs: int, concurrencies: list[int]) -> list[dict[str, float]]:
    rows = []
    image = png()
    for conc in concurrencies:
        with tempfile.TemporaryDirectory() as tmp:
            stack = LocalStack(Path(tmp), sim_args=SIM_ARGS, env=ENV, worker_concurrency=conc)
            noop: Process | None = None
            try:
                stack.start(workers=1, beat=True)  # as deployed: the reconciler finishes stragglers
                client = redis.Redis.from_url(stack.redis.url)
                os.environ["REDIS_URL"] = stack.redis.url
                sys.modules.pop("noop_chain", None)
                noop = Process("noop-worker", [stack.python, "-m", "celery", "--quiet", "-A", "noop_chain", "worker",
                                               "--concurrency", str(conc), "--prefetch-multiplier", "1",
                                               "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
                               log_dir=stack.logs, env={**stack.env}, cwd=ROOT / "bench")
                relay_run(stack, client, 10, image)  # warm
                noop_run(client, 10)
                relay, base = [], []
                for _ in range(reps):
                    relay.append(relay_run(stack, client, jobs, image))
                    base.append(noop_run(client, jobs))
                ratio, lo, hi = median_ratio(relay, base)
                rows.append({"concurrency": conc, "relay_jps": statistics.median(relay),
                             "noop_jps": statistics.median(base), "ratio": ratio, "lo": lo, "hi": hi})
                client.close()
            finally:
                if noop is not None:
                    noop.stop()
                stack.stop()
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", default="4,1,2", help="worker processes (the first is the headline)")
    args = parser.parse_args(argv)
    rows = run(args.reps, args.jobs, [int(c) for c in args.concurrency.split(",")])
    for r in rows:
        print(f"pipeline  worker_processes={r['concurrency']}  relay {r['relay_jps']:.1f} jobs/s  "
              f"no-op chain {r['noop_jps']:.1f} jobs/s  ratio {r['ratio']:.2f} ({r['lo']:.2f}-{r['hi']:.2f})",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
