"""The Prometheus alert rules in deploy/prometheus (issue 10.4): valid for promtool, each one unit-tested with input
series (`promtool test rules`), and the Grafana dashboard is valid JSON whose panels query the relay's metrics.
That every name they use is in a real scrape is checked on the running stack (tests/e2e/test_metrics.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.support import promtool

PROMETHEUS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "kling-relay.json"


def test_the_alert_rules_are_valid() -> None:
    done = promtool.run("check", "rules", PROMETHEUS / "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    done = promtool.run("test", "rules", PROMETHEUS / "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test_that_makes_it_fire() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert alerts == fired
    required = {"KlingRelaySubmissionPaused", "KlingRelayJobsStuck", "KlingRelayFailureRateHigh",
                "KlingRelayQueueGrowing", "KlingRelayReconcilerNotRunning", "KlingRelayCallbacksRefused"}
    assert required <= alerts


def test_the_dashboard_is_grafana_json_on_the_relays_metrics(tmp_path: Path) -> None:
    """Valid JSON, unique panel ids, and every query valid PromQL (promtool checks each as a recording rule)."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    targets = [t for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert targets and all("kling_relay_" in t["expr"] for t in targets)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": t["expr"]}
                                                        for i, t in enumerate(targets)]}]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    done = promtool.run("check", "rules", tmp_path / "queries.yml")
    assert done.returncode == 0, done.stdout + done.stderr
