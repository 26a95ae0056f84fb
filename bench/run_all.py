"""`make bench`: run every benchmark and print one table of ratios against their baselines, and the scaling curve.

    python bench/run_all.py [--reps 3] [--quick]

`--quick` shrinks every size (a smoke run, not figures to quote). Each ratio is the median of per-rep ratios
whose two sides ran back to back on the same machine: on a shared or busy machine the absolute figures move,
the ratios much less. Targets are the ones of the issue that asked for this suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import callbacks  # noqa: E402
import copy_memory  # noqa: E402
import hosts  # noqa: E402
import job_memory  # noqa: E402
import pipeline  # noqa: E402
import reconcile_pass  # noqa: E402
from _common import table  # noqa: E402


def _ok(good: bool) -> str:
    return "met" if good else "MISSED"


def _reps(args: argparse.Namespace) -> list[str]:
    return ["--reps", str(args.reps)]


def _quick(args: argparse.Namespace, *smaller: str) -> list[str]:
    """The arguments of a smoke run (`--quick`), or none."""
    return list(smaller) if args.quick else []


def _callbacks(args: argparse.Namespace, rows: list[list[object]], curve: list[list[object]]) -> None:
    cb = callbacks.main([*_reps(args), "--workers", args.web_workers, *_quick(args, "--jobs", "60")])
    for r in cb:
        curve.append(["callbacks req/s", r["web_workers"], f"{r['relay_rps']:.0f}", f"{r['noop_rps']:.0f}",
                      f"{r['ratio']:.2f}"])
    for r in cb:  # CPU per callback, Redis's included: what a CPU-bound machine divides its cores by
        relay_cpu = float(str(r["cpu_relay_ms"])) + float(str(r["cpu_redis_ms"]))
        noop_cpu = float(str(r["cpu_noop_ms"]))
        curve.append(["callbacks CPU ms/req", r["web_workers"], f"{relay_cpu:.2f}", f"{noop_cpu:.2f}",
                      f"{noop_cpu / relay_cpu:.2f}"])
    h = cb[0]
    rows.append([f"callback req/s ({h['web_workers']} web workers, 90% dup/stale)", f"{h['relay_rps']:.0f}",
                 f"{h['noop_rps']:.0f}", f"{h['ratio']:.2f} ({h['lo']:.2f}-{h['hi']:.2f})", ">= 0.8",
                 _ok(float(str(h["ratio"])) >= 0.8)])


def _pipeline(args: argparse.Namespace, rows: list[list[object]], curve: list[list[object]]) -> None:
    pl = pipeline.main([*_reps(args), "--concurrency", args.concurrency, *_quick(args, "--jobs", "40")])
    for r in pl:
        curve.append(["pipeline jobs/s", int(r["concurrency"]), f"{r['relay_jps']:.1f}", f"{r['noop_jps']:.1f}",
                      f"{r['ratio']:.2f}"])
    h2 = pl[0]
    rows.append([f"pipeline jobs/s (concurrency {int(h2['concurrency'])})", f"{h2['relay_jps']:.1f}",
                 f"{h2['noop_jps']:.1f}", f"{h2['ratio']:.2f} ({h2['lo']:.2f}-{h2['hi']:.2f})", ">= 0.5",
                 _ok(h2["ratio"] >= 0.5)])
    rows.append(["pipeline floor jobs/s (external work only) vs no-op", f"{h2['floor_jps']:.1f}",
                 f"{h2['noop_jps']:.1f}", f"{h2['floor_ratio']:.2f} ({h2['floor_lo']:.2f}-{h2['floor_hi']:.2f})",
                 "(the most any relay gets here)", ""])
    rows.append(["pipeline jobs/s, relay vs floor", f"{h2['relay_jps']:.1f}", f"{h2['floor_jps']:.1f}",
                 f"{h2['relay_over_floor']:.2f} ({h2['relay_over_floor_lo']:.2f}-{h2['relay_over_floor_hi']:.2f})",
                 "-", ""])
    rows.append(["pipeline CPU ms per job, all processes (moto + simulator)",
                 f"{h2['relay_cpu_ms']:.1f} ({h2['s3_sim_cpu_ms']:.1f})", f"floor {h2['floor_cpu_ms']:.1f}", "-",
                 "-", ""])
    for r in pl:
        curve.append(["pipeline floor jobs/s", int(r["concurrency"]), f"{r['floor_jps']:.1f}",
                      f"{r['noop_jps']:.1f}", f"{r['floor_ratio']:.2f}"])


def _copy(args: argparse.Namespace, rows: list[list[object]], curve: list[list[object]]) -> None:
    cp = copy_memory.main([*_reps(args), *_quick(args, "--size-mib", "128", "--naive-size-mib", "32")])
    rows.append([f"copy MiB/s, {int(cp['size_mib'])} MiB (peak RSS MiB)",
                 f"{cp['stream_mibs']:.0f} ({cp['stream_peak_mib']:.0f})",
                 f"{cp['fileobj_mibs']:.0f} ({cp['fileobj_peak_mib']:.0f})",
                 f"{cp['ratio']:.2f} ({cp['lo']:.2f}-{cp['hi']:.2f})", ">= 0.9, RSS < 150",
                 _ok(cp["ratio"] >= 0.9 and cp["stream_peak_mib"] < 150)])


def _reconcile(args: argparse.Namespace, rows: list[list[object]], curve: list[list[object]]) -> None:
    rc = reconcile_pass.main([*_reps(args), *_quick(args, "--stored", "10000")])
    rows.append([f"reconcile pass ms ({int(rc['stored'])} stored + {int(rc['due'])} due vs {int(rc['due'])})",
                 f"{rc['relay_s'] * 1000:.0f} ({rc['ms_per_due']:.2f}/job)", f"{rc['base_s'] * 1000:.0f}",
                 f"{rc['ratio']:.2f} ({rc['lo']:.2f}-{rc['hi']:.2f})", "<= 1.2, <= 2 ms/job",
                 _ok(rc["ratio"] <= 1.2 and rc["ms_per_due"] <= 2)])
    rows.append([f"reconcile: the sweep of expired jobs' entries alone ({int(rc['sweep_removed'])} at its most)",
                 f"{rc['sweep_ms']:.1f} ms", "-", "-", "(in both sides' passes)", ""])


def _memory(args: argparse.Namespace, rows: list[list[object]], curve: list[list[object]]) -> None:
    mem = job_memory.main(["--jobs", "300" if args.quick else "2000"])
    rows.append(["Redis bytes per stored job", f"{mem['bytes_per_job']:.0f}", "-", "-", "<= 2048",
                 _ok(mem["bytes_per_job"] <= 2048)])
    rows.append(["Redis bytes per stored job past the stream's cap (no entry)",
                 f"{mem['bytes_per_job_without_stream']:.0f}", "-", "-", "<= 2048",
                 _ok(mem["bytes_per_job_without_stream"] <= 2048)])


def _hosts(args: argparse.Namespace, rows: list[list[object]], curve: list[list[object]]) -> None:
    hs = hosts.main([*_reps(args), *_quick(args, "--quick")])
    for r in hs:
        curve.append([f"worker hosts jobs/s (x{int(r['concurrency'])} processes)", int(r["worker_hosts"]),
                      f"{r['jps']:.1f}", f"{hs[0]['jps']:.1f}", f"{r['scaling']:.2f}"])
    spread = [r for r in hs if r["concurrency"] == hs[0]["concurrency"]]
    if len(spread) > 1:
        top = spread[-1]
        rows.append([f"jobs/s, {int(top['worker_hosts'])} worker hosts vs 1 (namespaces, one machine)",
                     f"{top['jps']:.1f}", f"{hs[0]['jps']:.1f}", f"{top['scaling']:.2f}", "-", ""])


MEASURES = {"callbacks": _callbacks, "pipeline": _pipeline, "copy": _copy, "reconcile": _reconcile,
            "memory": _memory, "hosts": _hosts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(MEASURES),
                        help="hosts needs root (network namespaces); it is skipped otherwise")
    parser.add_argument("--concurrency", default="4,1,2", help="pipeline worker processes (first: the headline)")
    parser.add_argument("--web-workers", default="2,1,4", help="callback web workers (first: the headline)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    rows: list[list[object]] = [["measure", "relay", "baseline", "ratio (min-max)", "target", ""]]
    curve: list[list[object]] = [["scaling", "processes", "relay", "baseline", "ratio"]]
    started = time.time()
    for name, measure in MEASURES.items():
        if name in only:
            measure(args, rows, curve)
    print()
    print(f"# make bench  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.node()}  "
          f"{platform.machine()}  cpus={os.cpu_count()}  reps={args.reps}{'  QUICK' if args.quick else ''}  "
          f"{time.time() - started:.0f} s")
    print(table(rows))
    if len(curve) > 1:
        print()
        print(table(curve))


if __name__ == "__main__":
    main()
