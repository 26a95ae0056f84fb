"""Peak memory and throughput of the streaming copy (source URL → S3), against boto3's own upload.

    python bench/copy_memory.py [--size-mib 512] [--naive-size-mib 128]   # `make bench`

Starts moto's S3 server (deploy/stack.py) and the generated-bytes source server (deploy/copy_probe.py) as
subprocesses, then runs each copy in its OWN subprocess (a probe, deploy/copy_probe.py) so that its peak
resident memory (VmHWM) measures that copy alone:

* ``stream``   — this project's copy: `download_chunks` + `Storage.copy_stream` (8 MiB parts, one at a time);
* ``upload_fileobj`` — the baseline: boto3's managed transfer reading the response's raw stream (default
  TransferConfig: 8 MiB parts, up to 10 threads);
* ``naive``    — read the whole body into memory, then `put_object` (run at --naive-size-mib, smaller).

The memory test in tests/shared/test_storage.py runs the same probe; neither imports the other.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy.copy_probe import MIB, expected_digests, run_probe, serve_argv  # noqa: E402 - after the path
from deploy.procs import Process, free_port, wait_for_port  # noqa: E402
from deploy.stack import AWS_ENV, LocalStack  # noqa: E402

BUCKET = "bench"


def bench(size_mib: int, naive_size_mib: int) -> None:
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
        runs = []
        for mode, mib in (("stream", size_mib), ("upload_fileobj", size_mib), ("naive", naive_size_mib)):
            url = f"http://127.0.0.1:{port}/{mib * MIB}.mp4"
            result = run_probe(mode, url, stack.s3_endpoint, BUCKET, f"{mode}.mp4", env=env)
            runs.append(result)
            peak = int(str(result["peak_rss_bytes"])) / MIB
            base = int(str(result["rss_after_imports_bytes"])) / MIB
            rate = mib / float(str(result["seconds"]))
            print(f"{mode:15s} {mib:5d} MiB  peak RSS {peak:7.1f} MiB (after imports {base:5.1f})  "
                  f"{float(str(result['seconds'])):6.1f} s  {rate:6.1f} MiB/s", flush=True)
        sha, _etag = expected_digests(size_mib * MIB)
        print(f"stream sha256 {'matches' if runs[0]['sha256'] == sha else 'DIFFERS'}")
        stream, managed = runs[0], runs[1]
        mem_ratio = int(str(stream["peak_rss_bytes"])) / int(str(managed["peak_rss_bytes"]))
        speed_ratio = float(str(managed["seconds"])) / float(str(stream["seconds"]))
        print(f"stream / upload_fileobj: peak RSS x{mem_ratio:.2f}, throughput x{speed_ratio:.2f}")
    finally:
        if source is not None:
            source.stop()
        stack.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--naive-size-mib", type=int, default=128)
    args = parser.parse_args(argv)
    bench(args.size_mib, args.naive_size_mib)


if __name__ == "__main__":
    main()
