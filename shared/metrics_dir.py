"""The directory prometheus_client's multiprocess mode keeps its counters in, one per group of processes.

The web process (gunicorn: a master and its worker processes) and the Celery worker (a main process and its
prefork children) each run several processes; each process writes its counters to small files in one shared
directory, and a scrape reads them all (`kling_relay.shared.metrics`). `prepare()` makes a fresh, empty
directory for one such group and names it in `PROMETHEUS_MULTIPROC_DIR` for the processes started from then on.
It must run before our metrics are defined (prometheus_client picks its value class from the variable at import;
`prepare` makes it pick again when something imported it earlier): the gunicorn master calls it in its
`on_starting` hook, the Celery worker's entry module before it imports the tasks.

A directory given from outside is never reused: two groups sharing one (the web and the worker, started with the
same environment) would report each other's counters. `TMPDIR` chooses where the directories go. This module uses
the standard library only, so calling it imports nothing else.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare(group: str, *, remove_at_exit: bool = True) -> str:
    """Create a fresh directory for `group` (`web`, `worker`), set `PROMETHEUS_MULTIPROC_DIR` to it and return it.

    With `remove_at_exit`, the process that called it removes the directory when it exits (processes forked from
    it inherit the exit hook but do not run it).
    """
    path = tempfile.mkdtemp(prefix=f"kling-relay-metrics-{group}-")
    os.environ[ENV] = path
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        # Imported already, before the directory was named: Celery's command line loads its plugins first, and
        # Flower's (the `flower` extra) imports prometheus_client. It chose its value class at import; choose again,
        # so the metrics our modules define from now on are multiprocess values.
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    if remove_at_exit:
        owner = os.getpid()
        atexit.register(_remove, path, owner)
    return path


def remove(path: str) -> None:
    """Remove a directory made by `prepare` (nothing if it is gone)."""
    shutil.rmtree(path, ignore_errors=True)


def _remove(path: str, owner: int) -> None:
    if os.getpid() == owner:
        remove(path)


def current() -> str | None:
    """The directory in use, when this process runs in multiprocess mode."""
    return os.environ.get(ENV) or None
