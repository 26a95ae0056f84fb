from __future__ import annotations

import json
import logging
import warnings

import pytest

from kling_relay.shared.logs import (
    JsonFormatter,
    add,
    bind,
    bound,
    bound_fields,
    configure_logging,
    is_request_id,
    json_line,
    unbind,
)


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
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(level)


def _record(msg: str, *args: object, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("kr", logging.WARNING, __file__, 1, msg, args or None, None)
    record.__dict__.update(fields)
    return record


def test_control_characters_are_escaped_in_one_line() -> None:
    """Issue: a path with %0a, %1b and %00 forged log lines; a record is one line whatever its values hold."""
    hostile = '/healthz\n{"level":"error"}\x1b[31m\x00\r\u2028é'
    line = JsonFormatter().format(_record("request", path=hostile))
    assert "\n" not in line and not any(ord(ch) < 0x20 or ord(ch) > 0x7E for ch in line)
    assert "\\n" in line and "\\u001b" in line and "\\u0000" in line
    assert json.loads(line)["path"] == hostile


def test_odd_records_still_make_one_json_line() -> None:
    nan = JsonFormatter().format(_record("ratio", value=float("nan"), nested={"x": float("inf")}))
    assert json.loads(nan)["value"] == "nan"
    mismatched = json.loads(JsonFormatter().format(_record("%s and %s", "only one")))
    assert "only one" in mismatched["msg"]
    obj = json.loads(JsonFormatter().format(_record("obj", thing=object())))
    assert obj["thing"].startswith("<object")


def test_bound_fields_join_every_record_until_unbound() -> None:
    token = bind(request_id="r-1")
    try:
        assert json.loads(JsonFormatter().format(_record("in")))["request_id"] == "r-1"
        assert json.loads(JsonFormatter().format(_record("own", request_id="r-2")))["request_id"] == "r-2"
    finally:
        unbind(token)
    assert "request_id" not in json.loads(JsonFormatter().format(_record("out")))


def test_warnings_become_records(capfd: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logging.captureWarnings(False)  # undo an earlier configure_logging(): capturing twice is a no-op in logging
    try:
        configure_logging("INFO")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("careful\nnow", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = [line for line in capfd.readouterr().err.splitlines() if line]
    assert len(lines) == 1 and json.loads(lines[0])["logger"] == "py.warnings"
    assert "careful\nnow" in json.loads(lines[0])["msg"]


def test_json_line_has_the_record_shape() -> None:
    line = json_line("worker: Warm shutdown", level="warning", logger="celery.worker", pid=1)
    record = json.loads(line)
    assert set(record) == {"ts", "level", "logger", "msg", "pid"} and record["ts"].endswith("Z")


def test_bound_fields_last_for_the_block_and_add_extends_the_innermost_block() -> None:
    """Issue 10.6: the worker binds `job_id` for a task and the pipeline adds `kling_task_id` once known; both
    end with the task, and `add` outside any block binds nothing (nothing would undo it)."""
    add(kling_task_id="leaked")
    assert bound_fields() == {}
    with bound(job_id="job_1", request_id=None):
        add(kling_task_id="task-1", other=None)
        record = _record("stored")
        line = json.loads(JsonFormatter().format(record))
        assert line["job_id"] == "job_1" and line["kling_task_id"] == "task-1" and "request_id" not in line
        with bound(job_id="job_2"):
            assert bound_fields() == {"job_id": "job_2", "kling_task_id": "task-1"}
        assert bound_fields() == {"job_id": "job_1", "kling_task_id": "task-1"}
        explicit = json.loads(JsonFormatter().format(_record("x", job_id="job_3")))
        assert explicit["job_id"] == "job_3"  # a field given in extra= wins
    assert bound_fields() == {}


@pytest.mark.parametrize(("value", "sane"), [("req-1.a_b:c", True), ("a" * 128, True), ("a" * 129, False),
                                             ("", False), ("two words", False), ("line\nbreak", False)])
def test_request_ids(value: str, sane: bool) -> None:
    assert is_request_id(value) is sane
