"""Shared helpers of the benchmarks: a keep-alive HTTP load generator (asyncio, no extra dependency), medians, the
scripts' parser and stack teardown, CPU seconds per process.

Not a test helper: bench/ never imports tests/. The scripts put the repository root on sys.path before importing it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from deploy.procs import Process, wait_for_port
from deploy.stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent


def median_ratio(relay: Sequence[float], base: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-run ratios relay/base (each run's pair measured back to back)."""
    ratios = [r / b for r, b in zip(relay, base, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


async def _client(host: str, port: int, next_request: Callable[[], bytes | None], latencies: list[float],
                  statuses: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (req := next_request()) is not None:
            t0 = time.perf_counter()
            for attempt in range(3):  # a recycled gunicorn worker closes its keep-alive connections: reconnect
                try:
                    writer.write(req)
                    await writer.drain()
                    head = await reader.readuntil(b"\r\n\r\n")
                    break
                except (ConnectionError, asyncio.IncompleteReadError):
                    writer.close()
                    if attempt == 2:
                        raise
                    reader, writer = await asyncio.open_connection(host, port)
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


def load(host: str, port: int, requests: Sequence[bytes], connections: int) -> tuple[float, list[float],
                                                                                      dict[int, int]]:
    """Send every request (raw HTTP/1.1 bytes, keep-alive) over `connections` connections; (seconds, latencies,
    status counts)."""
    it = iter(requests)
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    def next_request() -> bytes | None:
        return next(it, None)

    async def run() -> None:
        await asyncio.gather(*(_client(host, port, next_request, latencies, statuses) for _ in range(connections)))

    t0 = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - t0, latencies, statuses


def post(path: str, body: bytes, host: str = "127.0.0.1") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def table(rows: Sequence[Sequence[object]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


# --- the parts the scripts share: their parser, a stack with its baseline process, CPU use per process ----------

def parser(doc: str | None, reps: int = 3) -> argparse.ArgumentParser:
    """The script's parser, described by the first line of its docstring, with `--reps`."""
    out = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    out.add_argument("--reps", type=int, default=reps)
    return out


@contextmanager
def stack_with(stack: LocalStack, start: Callable[[LocalStack], object], name: str | None = None,
               argv: Sequence[str] = (), *, port: int | None = None, cwd: Path = ROOT) -> Iterator[Process | None]:
    """Start the stack (`start(stack)`), then the baseline process `name` (argv, on the stack's environment, its
    log beside the stack's; `port`: wait until it listens); yield the baseline; stop both, whatever happens."""
    baseline: Process | None = None
    try:
        start(stack)
        if name is not None:
            baseline = Process(name, list(argv), log_dir=stack.logs, env=stack.env, cwd=cwd)
            if port is not None:
                wait_for_port(port, proc=baseline.proc)
        yield baseline
    finally:
        if baseline is not None:
            baseline.stop()
        stack.stop()


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_of_group(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group and by the children they
    reaped (a gunicorn or prefork worker recycled meanwhile is counted by its parent's cutime/cstime; Linux /proc)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ..., utime (11) to cstime (14)
            total += sum(int(v) for v in fields[11:15])
    return total / _TICKS


def cpu_by_process(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process group (`name → pgid`; prefork children included)."""
    return {name: _cpu_of_group(pgid) for name, pgid in groups.items()}


def stack_groups(stack: LocalStack, **more: Process | None) -> dict[str, int]:
    """The process groups of a stack's processes (each started in its own session), Redis and `more` included."""
    groups = {name: proc.pid for name, proc in stack.processes.items()}
    if stack.redis.process is not None:
        groups["redis"] = stack.redis.process.pid
    groups.update({name: proc.pid for name, proc in more.items() if proc is not None})
    return groups


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}
