"""The relay's Celery worker with every process under cProfile, counting CPU time: `bench/pipeline.py --profile DIR`.

Started as `celery -A profile_worker worker ...` (cwd bench/, the relay's environment plus PROFILE_DIR): the same
app as `kling_relay.worker.celery_app`, with a profiler started in the main process at import and in each prefork
child when it starts (`worker_process_init`). The timer is the calling thread's CPU time (`time.thread_time`), so
waiting on a socket costs nothing and the figures add up to CPU, not wall time; the profiler's own overhead
inflates them (about 2x for many small calls), so read shares, not absolute milliseconds.

Each process writes `<PROFILE_DIR>/worker-<pid>.prof` (pstats) every DUMP_EVERY tasks and when it exits cleanly;
`python bench/profile_worker.py DIR [N]` prints the N costliest functions of all of them together.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

DUMP_EVERY = 25

if __name__ != "__main__" and os.environ.get("PROFILE_DIR"):  # the worker, not the report
    from celery import signals

    from kling_relay.worker.celery_app import app  # noqa: F401 - the app celery -A finds here

    _out = Path(os.environ["PROFILE_DIR"])
    _state: dict[str, Any] = {"profile": None, "tasks": 0}

    def _start() -> None:
        prof = cProfile.Profile(time.thread_time)
        _state.update(profile=prof, tasks=0)
        prof.enable()

    def _dump() -> None:
        prof = _state["profile"]
        if prof is not None:
            prof.disable()
            prof.dump_stats(str(_out / f"worker-{os.getpid()}.prof"))
            prof.enable()

    @signals.worker_process_init.connect
    def _child_started(**kwargs: Any) -> None:
        _start()  # a fresh profile: the fork copied the parent's

    @signals.task_postrun.connect
    def _task_ran(**kwargs: Any) -> None:
        _state["tasks"] += 1
        if _state["tasks"] % DUMP_EVERY == 0:
            _dump()

    @signals.worker_process_shutdown.connect
    @signals.worker_shutdown.connect
    def _exiting(**kwargs: Any) -> None:
        _dump()

    @signals.task_received.connect
    def _received(**kwargs: Any) -> None:  # the main process: dump now and then too
        _state["tasks"] += 1
        if _state["tasks"] % (4 * DUMP_EVERY) == 0:
            _dump()

    _start()


def report(directory: Path, top: int = 40, *, sort: str = "tottime") -> str:
    """The `top` costliest functions of every profile in `directory` together (pstats text)."""
    files = sorted(str(p) for p in directory.glob("worker-*.prof"))
    if not files:
        return f"no profiles in {directory}"
    import io
    out = io.StringIO()
    stats = pstats.Stats(*files, stream=out)
    stats.strip_dirs().sort_stats(sort).print_stats(top)
    return out.getvalue()


if __name__ == "__main__":
    print(report(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 40,
                 sort=sys.argv[3] if len(sys.argv) > 3 else "tottime"))
