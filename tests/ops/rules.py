"""The shipped alert rules and their promtool unit tests, read and prepared for promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
RULES = ROOT / "compose" / "prometheus" / "rules" / "headwater.yml"
RULE_TESTS = Path(__file__).resolve().parent / "rules_test.yml"
PROMTOOL = shutil.which("promtool")


def alerting_rules(path: Path = RULES) -> list[dict[str, Any]]:
    """Every alerting rule of a rules file, in file order."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def rule_tests_with_descriptions(rules_path: Path, out: Path) -> Path:
    """rules_test.yml aimed at ``rules_path``, each expected alert given its rule's description
    (promtool compares annotations whole; the descriptions are static text)."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    descriptions = {r["alert"]: r["annotations"]["description"] for r in alerting_rules(rules_path)}
    tests["rule_files"] = [str(rules_path)]
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            for alert in check.get("exp_alerts", []):
                alert.setdefault("exp_annotations", {})["description"] = descriptions[check["alertname"]]
    out.write_text(yaml.safe_dump(tests, sort_keys=False, width=1000))
    return out


def promtool(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=timeout_s, check=False)
