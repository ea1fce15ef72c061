"""The alert rules: promtool checks them and runs their unit tests (tests/ops/rules_test.yml),
each alert firing on synthetic series. No servers; skipped only where promtool is not
installed (.ci/run installs Debian's prometheus package, which has it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.ops.rules import PROMTOOL, RULE_TESTS, RULES, alerting_rules, promtool, rule_tests_with_descriptions

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")

SEVERITIES = {"critical", "warning"}


def test_every_alert_has_for_severity_and_what_to_do() -> None:
    rules = alerting_rules()
    assert len(rules) >= 11
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no for: duration"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity not in {SEVERITIES}"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert len(annotations.get("description", "")) > 120, f"{name}: the description does not say what to do"
        assert "{{" not in annotations["description"], f"{name}: descriptions are static (rules_test.yml)"


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {r["alert"] for r in alerting_rules()}
    assert names - fired == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet (short of for: or the threshold)"


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerting_rules())} rules found" in done.stdout


@needs_promtool
def test_promtool_unit_tests_of_every_alert(tmp_path: Path) -> None:
    tests = rule_tests_with_descriptions(RULES, tmp_path / "rules_test.yml")
    done = promtool("test", "rules", str(tests))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
@pytest.mark.parametrize(
    ("alert", "change"),
    [
        ("IngestSpooling", ("headwater_ingest_spooling)", "headwater_ingest_spooling_renamed)")),
        ("ProcessorDeadLetters", ("> 0.2", "> 0.6")),
        ("ServiceNotReady", ("for: 2m", "for: 10m")),
    ],
)
def test_the_unit_tests_fail_on_a_broken_rule(tmp_path: Path, alert: str, change: tuple[str, str]) -> None:
    """A renamed metric, a moved threshold or a longer for: in the rules fails promtool's tests."""
    text = RULES.read_text()
    start = text.index(f"- alert: {alert}\n")
    end = text.find("- alert:", start + 1)
    end = len(text) if end < 0 else end
    old, new = change
    assert old in text[start:end]
    broken = tmp_path / "headwater.yml"
    broken.write_text(text[:start] + text[start:end].replace(old, new) + text[end:])
    done = promtool("test", "rules", str(rule_tests_with_descriptions(broken, tmp_path / "rules_test.yml")))
    assert done.returncode != 0
    assert f"alertname: {alert}" in done.stdout + done.stderr
