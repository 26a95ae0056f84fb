"""Celery's own lines about a task (`Task kling_relay.submit_job[…] received`, `… succeeded in …`, `… retry: …`)
carry the job id too.

Celery logs them outside the task body (the `received` line in the worker's main process, the outcome line after
the task returned), where no job id is bound. They do carry the task's name and arguments in their `data` field;
for the relay's own tasks the first argument is the job id, which this filter copies to `job_id`.
"""

from __future__ import annotations

import ast
import logging
from typing import Any

from kling_relay.shared.inputs import is_job_id

TASK_PREFIX = "kling_relay."


def job_id_of(data: Any) -> str | None:
    """The job id among a Celery log record's `data` (`{"name", "args": "['job_…']", …}`), or None."""
    if not isinstance(data, dict) or not str(data.get("name") or "").startswith(TASK_PREFIX):
        return None
    args = data.get("args")
    if isinstance(args, str):
        try:
            args = ast.literal_eval(args)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    if isinstance(args, (list, tuple)) and args and is_job_id(args[0]):
        return str(args[0])
    return None


class CeleryJobId(logging.Filter):
    """Adds `job_id` to Celery's records about a relay task (never replaces one already there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            job_id = job_id_of(getattr(record, "data", None))
            if job_id is not None:
                record.job_id = job_id
        return True


def install() -> None:
    """Put the filter on the root logger's handlers (those `configure_logging` set)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, CeleryJobId) for f in handler.filters):
            handler.addFilter(CeleryJobId())
