"""The metrics interface (issue 10.3): what the domain code counts, in this process's memory (no
PROMETHEUS_MULTIPROC_DIR here), read back through the exposition a scrape gets, and the settings that guard it."""

from __future__ import annotations

import pytest
import redis

from kling_relay.shared import flow, metrics
from kling_relay.shared.kling import KlingFixAccount, KlingRetryLater, _code_label, _endpoint
from kling_relay.shared.settings_spec import SETTINGS, boolean, port
from tests.support import promtool


def scrape() -> str:
    return metrics.exposition().decode()


def test_kling_calls_are_labelled_by_endpoint_and_answer_code() -> None:
    assert _endpoint("POST", "/v1/videos/multi-image2video") == "create"
    assert _endpoint("GET", "/v1/videos/multi-image2video") == "list"
    assert _endpoint("GET", "/v1/videos/multi-image2video/task-1") == "query"
    assert _code_label(None) == "0"
    assert _code_label(KlingFixAccount("arrears", code=1102, http_status=429)) == "1102"
    assert _code_label(KlingRetryLater("bad gateway", http_status=502)) == "http_502"
    assert _code_label(KlingRetryLater("reset")) == "no_answer"


def test_rate_limit_waits_and_refusals_are_counted(redis_client: redis.Redis) -> None:
    now = [1000.0]
    limiter = flow.RateLimiter(redis_client, 1, clock=lambda: now[0])
    before = scrape()

    def sleep(seconds: float) -> None:
        now[0] += seconds

    limiter.acquire(max_wait=2.0, sleep=sleep)  # a free slot: no wait
    limiter.acquire(max_wait=2.0, sleep=sleep)  # waits about a second
    with pytest.raises(flow.RateLimited):
        limiter.acquire(max_wait=0.1, sleep=sleep)  # would wait too long: refused, nothing sent
    after = scrape()
    for outcome, expected in (("waited", 1), ("refused", 1)):
        delta = (promtool.value(after, "kling_relay_rate_limit_waits_total", outcome=outcome)
                 - promtool.value(before, "kling_relay_rate_limit_waits_total", outcome=outcome))
        assert delta == expected, outcome
    waited = (promtool.value(after, "kling_relay_rate_limit_wait_seconds_total")
              - promtool.value(before, "kling_relay_rate_limit_wait_seconds_total"))
    assert 0.9 <= waited <= 1.1


def test_a_reconcile_pass_is_counted_by_action() -> None:
    before = scrape()
    metrics.reconcile_pass({"ran": True, "due": 4, "resubmitted": 1, "polled": 2, "probe": "still_failing",
                            "copy_probe": None, "swept": 7}, seconds=0.2, ended_at=1234.0)
    metrics.reconcile_pass({"ran": False}, seconds=0.0, ended_at=1235.0)
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return promtool.value(after, name, **labels) - promtool.value(before, name, **labels)

    assert delta("kling_relay_reconcile_passes_total", result="ran") == 1
    assert delta("kling_relay_reconcile_passes_total", result="locked") == 1
    assert delta("kling_relay_reconcile_jobs_total", action="due") == 4
    assert delta("kling_relay_reconcile_jobs_total", action="polled") == 2
    assert delta("kling_relay_reconcile_jobs_total", action="swept") == 7
    assert delta("kling_relay_reconcile_probes_total", kind="submission", result="still_failing") == 1
    assert delta("kling_relay_reconcile_pass_duration_seconds_count") == 1
    assert promtool.value(after, "kling_relay_reconcile_last_pass_timestamp_seconds") == 1234.0  # ran passes only


def test_every_fixed_series_is_in_a_scrape_from_the_start_and_promtool_finds_it_clean() -> None:
    text = scrape()
    assert promtool.check_metrics(text) == ""
    for name, labels in (("kling_relay_throttles_total", {"step": "copy", "cause": "paused"}),
                         ("kling_relay_callbacks_refused_total", {"reason": "signature"}),
                         ("kling_relay_notifications_total", {"outcome": "gave_up"})):
        assert (name, tuple(sorted(labels.items()))) in promtool.samples(text)


def test_the_metrics_settings() -> None:
    assert boolean("TRUE", "X") is True and boolean("off", "X") is False
    with pytest.raises(ValueError, match="true or false"):
        boolean("maybe", "X")
    assert port("9808", "X") == 9808
    with pytest.raises(ValueError, match="port"):
        port("70000", "X")
    shown = {s.env: s.shown_default for s in SETTINGS}
    assert shown["METRICS_PUBLIC"] == "false" and shown["WORKER_METRICS_PORT"] == "9808"
    assert [s.secret for s in SETTINGS if s.env == "METRICS_TOKENS"] == [True]


def test_prepare_works_even_when_prometheus_client_was_imported_first() -> None:
    """Celery's command line loads its plugins before our app module, and Flower's imports prometheus_client: the
    worker's metrics must still be multiprocess values (the worker's endpoint was empty otherwise)."""
    import os
    import subprocess
    import sys

    probe = ("import os, prometheus_client\n"
             "from kling_relay.shared import metrics_dir\n"
             "path = metrics_dir.prepare('probe')\n"
             "c = prometheus_client.Counter('probe_total', 'p', registry=None)\n"
             "c.inc()\n"
             "print(sorted(os.listdir(path)))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
    assert out.returncode == 0, out.stderr
    assert "counter_" in out.stdout  # a file per process in the multiprocess directory: the value is shared
