"""The shipped Prometheus alert rules and scrape configuration, and the Grafana dashboard.

``promtool check rules`` (Debian package ``prometheus``) accepts the rules when
it is installed; the files parse either way.  That they name only metrics
smtp-tracker serves is checked against a live scrape in ``test_metrics.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

CONF = Path(__file__).resolve().parents[2] / "conf"
RULES = CONF / "prometheus" / "smtp-tracker-rules.yml"
SCRAPE = CONF / "prometheus" / "scrape-config.yml"
DASHBOARD = CONF / "grafana" / "smtp-tracker-dashboard.json"

promtool = shutil.which("promtool")


def test_rules_cover_what_the_issue_asks() -> None:
    (group,) = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"]: rule for rule in group["rules"]}
    assert {
        "SmtpTrackerDeferredRateHigh",
        "SmtpTrackerRewritesFailing",
        "SmtpTrackerOpensDropped",
        "SmtpTrackerNoMailRelayedWhilePostfixQueues",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name


@pytest.mark.skipif(
    promtool is None, reason="promtool is not installed (Debian package prometheus)"
)
def test_promtool_accepts_the_rules() -> None:
    assert promtool is not None
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout + result.stderr


def test_scrape_config_targets_the_units_ports() -> None:
    (job,) = yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    assert job["job_name"] == "smtp-tracker"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9425", "127.0.0.1:9426"]
    units = "".join(path.read_text() for path in (CONF / "systemd").glob("*.service"))
    for target in job["static_configs"][0]["targets"]:
        assert f"--metrics-listen {target}" in units


def test_dashboard_is_grafana_json_with_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(target["expr"] for target in panel["targets"])
