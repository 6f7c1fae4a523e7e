"""deploy/prometheus: the rules pass ``promtool check rules`` and their unit tests (``promtool test rules``)."""

from __future__ import annotations

import subprocess

import yaml

from tests.fixtures.prometheus import (RULES, RULES_TEST, SCRAPE_CONFIG,  # noqa: F401 - fixtures
                                       prometheus_binaries, promtool)


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=RULES.parent)


def test_promtool_check_rules_accepts_the_rules(promtool):
    proc = _promtool(promtool, "check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_test_rules_passes_the_rule_unit_tests(promtool):
    proc = _promtool(promtool, "test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_rule_has_a_unit_test_and_every_alert_is_tested_firing_and_not_firing():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    recorded = {r["record"] for r in rules if "record" in r}
    alerts = {r["alert"] for r in rules if "alert" in r}
    exprs = " ".join(t["expr"] for case in tests for t in case.get("promql_expr_test", []))
    assert {name for name in recorded if name not in exprs} == set()
    firing = {a["alertname"] for case in tests for a in case.get("alert_rule_test", []) if a["exp_alerts"]}
    quiet = {a["alertname"] for case in tests for a in case.get("alert_rule_test", []) if not a["exp_alerts"]}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested not firing"


def test_the_example_scrape_config_is_valid_and_names_the_jobs_the_rules_select(promtool):
    proc = _promtool(promtool, "check", "config", str(SCRAPE_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = {j["job_name"] for j in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]}
    assert jobs == {"genimg-worker", "genimg-exporter", "genimg-reconciler", "triton"}
    text = RULES.read_text()
    for job in jobs:
        assert f'job="{job}"' in text
