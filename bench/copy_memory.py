"""Peak memory and throughput of the streaming copy (source URL → S3), against boto3's own upload.

    python bench/copy_memory.py [--size-mib 1024] [--naive-size-mib 128] [--reps 3]   # `make bench`

Starts moto's S3 server (deploy/stack.py) and the generated-bytes source server (deploy/copy_probe.py) as
subprocesses, then runs each copy in its OWN subprocess (a probe, deploy/copy_probe.py) so that its peak
resident memory (VmHWM) measures that copy alone:

* ``stream``   — this project's copy: `download_chunks` + `Storage.copy_stream` (8 MiB parts, 6 in flight);
* ``upload_fileobj`` — the baseline: boto3's managed transfer reading the response's raw stream (default
  TransferConfig: 8 MiB parts, up to 10 threads);
* ``naive``    — read the whole body into memory, then `put_object` (run at --naive-size-mib, smaller).

The memory test in tests/shared/test_storage.py runs the same probe; neither imports the other. Each copy's line
also gives the CPU seconds it cost: the probe's own (its process), moto's and the source server's, and the load;
the summary gives each side's median CPU seconds per GiB for each process (in the returned row too).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from _common import cpu_by_process, parser  # noqa: E402

from deploy.copy_probe import MIB, expected_digests, run_probe, serve_argv  # noqa: E402 - after the path
from deploy.procs import Process, free_port, wait_for_port  # noqa: E402
from deploy.stack import AWS_ENV, LocalStack  # noqa: E402

BUCKET = "bench"


def bench(size_mib: int, naive_size_mib: int, reps: int = 1) -> dict[str, float]:
    """Each rep copies `size_mib` with the relay's stream then with upload_fileobj (each in a fresh process);
    the naive copy runs once. Returns the medians and the median of the per-rep throughput ratios."""
    workdir = Path(os.environ.get("BENCH_DIR", ROOT / ".bench"))
    workdir.mkdir(exist_ok=True)
    stack = LocalStack(workdir)  # only its S3 (moto's server) is started
    port = free_port()
    source: Process | None = None
    try:
        stack.start_s3()
        source = Process("bench-source", serve_argv(port), log_dir=workdir)
        wait_for_port(port, proc=source.proc)
        stack.s3().create_bucket(Bucket=BUCKET)
        env = {**AWS_ENV, "S3_ENDPOINT_URL": stack.s3_endpoint}
        sha, _etag = expected_digests(size_mib * MIB)
        plan = [("stream", size_mib), ("upload_fileobj", size_mib)] * reps + [("naive", naive_size_mib)]
        results: dict[str, list[dict[str, object]]] = {"stream": [], "upload_fileobj": [], "naive": []}
        groups = {"moto": stack.processes["s3"].pid, "source": source.pid}
        for i, (mode, mib) in enumerate(plan):
            url = f"http://127.0.0.1:{port}/{mib * MIB}.mp4"
            before, children = cpu_by_process(groups), _children_cpu()
            result = run_probe(mode, url, stack.s3_endpoint, BUCKET, f"{mode}-{i}.mp4", env=env)
            after = cpu_by_process(groups)
            cpu = {"copy": _children_cpu() - children, **{k: after[k] - before[k] for k in groups}}
            results[mode].append({**result, "cpu": cpu})
            peak = int(str(result["peak_rss_bytes"])) / MIB
            base = int(str(result["rss_after_imports_bytes"])) / MIB
            rate = mib / float(str(result["seconds"]))
            print(f"copy  {mode:15s} {mib:5d} MiB  peak RSS {peak:7.1f} MiB (after imports {base:5.1f})  "
                  f"{float(str(result['seconds'])):6.1f} s  {rate:6.1f} MiB/s  CPU s: "
                  + "  ".join(f"{k} {v:.1f}" for k, v in cpu.items()) + f"  load {os.getloadavg()[0]:.1f}",
                  flush=True)
            if mode == "stream" and result["sha256"] != sha:
                raise RuntimeError("the stream copy's sha256 differs from the source's")
        speed = [float(str(m["seconds"])) / float(str(s["seconds"]))
                 for s, m in zip(results["stream"], results["upload_fileobj"], strict=True)]
        row = {"size_mib": float(size_mib),
               "stream_mibs": statistics.median(size_mib / float(str(r["seconds"])) for r in results["stream"]),
               "fileobj_mibs": statistics.median(size_mib / float(str(r["seconds"]))
                                                 for r in results["upload_fileobj"]),
               "ratio": statistics.median(speed), "lo": min(speed), "hi": max(speed),
               "stream_peak_mib": max(int(str(r["peak_rss_bytes"])) for r in results["stream"]) / MIB,
               "fileobj_peak_mib": max(int(str(r["peak_rss_bytes"])) for r in results["upload_fileobj"]) / MIB}
        for mode in ("stream", "upload_fileobj"):  # CPU seconds per GiB copied, medians over the reps
            for name in ("copy", *groups):
                row[f"{mode}_cpu_s_per_gib_{name}"] = statistics.median(
                    cast(dict[str, float], r["cpu"])[name] for r in results[mode]) * 1024 / size_mib
        print(f"copy  stream / upload_fileobj throughput x{row['ratio']:.2f} ({row['lo']:.2f}-{row['hi']:.2f}), "
              f"peak RSS {row['stream_peak_mib']:.0f} MiB vs {row['fileobj_peak_mib']:.0f} MiB; sha256 matches",
              flush=True)
        print("copy  CPU s per GiB (medians): " + ";  ".join(
            f"{mode} " + "  ".join(f"{name} {row[f'{mode}_cpu_s_per_gib_{name}']:.2f}" for name in ("copy", *groups))
            for mode in ("stream", "upload_fileobj")), flush=True)
        return row
    finally:
        if source is not None:
            source.stop()
        stack.stop()


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children: the probes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = parser(__doc__)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--naive-size-mib", type=int, default=128)
    args = p.parse_args(argv)
    return bench(args.size_mib, args.naive_size_mib, args.reps)


if __name__ == "__main__":
    main()
