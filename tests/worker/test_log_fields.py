"""Celery's own lines about a relay task (received, succeeded, retry) carry the task's job id (issue 10.6)."""

from __future__ import annotations

import json
import logging

import pytest

from kling_relay.shared.logs import JsonFormatter
from kling_relay.worker.log_fields import CeleryJobId, job_id_of


@pytest.mark.parametrize(("data", "job_id"), [
    ({"name": "kling_relay.submit_job", "args": "['job_01ABC']"}, "job_01ABC"),
    ({"name": "kling_relay.notify_job", "args": "['job_01ABC', 'stored']"}, "job_01ABC"),
    ({"name": "kling_relay.copy_video", "args": ["job_01ABC"]}, "job_01ABC"),
    ({"name": "kling_relay.reconcile", "args": "()"}, None),
    ({"name": "other.task", "args": "['job_01ABC']"}, None),
    ({"name": "kling_relay.submit_job", "args": "['job_01ABC:events']"}, None),
    ({"name": "kling_relay.submit_job", "args": "[__import__('os')]"}, None),
    ("not a dict", None),
])
def test_job_id_of(data: object, job_id: str | None) -> None:
    assert job_id_of(data) == job_id


def test_the_filter_adds_job_id_to_celerys_received_line() -> None:
    record = logging.LogRecord("celery.worker.strategy", logging.INFO, __file__, 1, "Task %(name)s[%(id)s] received",
                               None, None)
    record.data = {"id": "u-1", "name": "kling_relay.submit_job", "args": "['job_01ABC']", "kwargs": "{}"}
    assert CeleryJobId().filter(record)
    assert json.loads(JsonFormatter().format(record))["job_id"] == "job_01ABC"
