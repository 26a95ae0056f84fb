from __future__ import annotations

import json
import logging

import pytest

from kling_relay.shared.logs import JsonFormatter, configure_logging


def test_json_lines_with_fields() -> None:
    record = logging.LogRecord("kr", logging.INFO, __file__, 1, "stored", None, None)
    record.job_id = "job_1"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "stored" and line["job_id"] == "job_1" and line["level"] == "info"


def test_debug_level_keeps_url_and_signature_loggers_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("DEBUG")
        assert root.level == logging.DEBUG
        for name in ("urllib3", "botocore", "boto3", "s3transfer"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
