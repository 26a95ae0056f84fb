"""What `WAIT 1 <timeout>` costs on a write, for the failover notes (README, "Redis that fails over").

    python bench/wait_cost.py [--writes 2000]

Starts a primary and one replica (deploy/procs.py) on loopback and times N small writes (a HSET as a job step
does) one after another: alone, then each followed by `WAIT 1 1000` (returns once the replica has the write).
Prints the median and p99 latency of each and the number of writes the replica had not acknowledged in time.
On loopback this is the floor: across hosts, each WAIT adds at least one network round trip to the replica.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from deploy.procs import SentinelCluster  # noqa: E402


def timed(client: redis.Redis, writes: int, *, wait: bool) -> tuple[list[float], int]:
    latencies, late = [], 0
    for n in range(writes):
        started = time.perf_counter()
        client.hset(f"bench:{n % 100}", mapping={"state": "processing", "n": str(n)})
        if wait and int(client.execute_command("WAIT", 1, 1000)) < 1:
            late += 1
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, late


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = SentinelCluster(Path(tmp), sentinels=0).start()
        try:
            client = redis.Redis(port=cluster.servers[0].port, socket_timeout=5)
            deadline = time.monotonic() + 30
            while client.info("replication").get("connected_slaves", 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            for wait in (False, True):
                timed(client, 200, wait=wait)  # warm-up
                latencies, late = timed(client, args.writes, wait=wait)
                q = statistics.quantiles(latencies, n=100)
                print(f"{'HSET + WAIT 1' if wait else 'HSET alone':14} median {statistics.median(latencies):.3f} ms"
                      f"  p99 {q[98]:.3f} ms  not replicated in time: {late}")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
