"""The local Prometheus's config and targets, as `headwater stack up --prometheus` and `headwater run`
write them (no server: tests/ops/test_prometheus.py runs one)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from services.devstack import stack
from services.devstack.prometheus import RULES_DIR, prometheus_server, remove_targets, write_targets
from services.fleet import TARGETS_NAME, Member, _announce_to_prometheus
from tests.helpers import free_port


def _settings(tmp_path: Path) -> stack.StackSettings:
    return stack.StackSettings(data_dir=tmp_path, prometheus_port=free_port())


def test_config_loads_the_repo_rules_and_discovers_the_targets_folder(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    server = prometheus_server(settings)
    rules = sorted(RULES_DIR.glob("*.yml"))
    assert [p.name for p in rules] == ["headwater.yml"]
    config = yaml.safe_load(server.config(rules, 5, 5))
    assert config["rule_files"] == [str(rules[0])]
    assert config["global"]["scrape_interval"] == "5s"
    (file_sd,) = config["scrape_configs"][0]["file_sd_configs"]
    assert file_sd["files"] == [str(tmp_path / "prometheus" / "targets" / "*.json")]


def test_the_fleet_announces_one_job_per_service_and_says_prometheus_is_not_running(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    members = [
        Member("ingest", "services.ingest", 8080, {}),
        Member("processor", "services.processor", 8081, {}),
        Member("metrics", "services.metrics", 8083, {}),
    ]
    line = _announce_to_prometheus(settings, members)
    assert "not running" in line and "stack up --prometheus" in line
    path = prometheus_server(settings).targets_dir / f"{TARGETS_NAME}.json"
    assert json.loads(path.read_text()) == [
        {"targets": ["127.0.0.1:8080"], "labels": {"job": "ingest"}},
        {"targets": ["127.0.0.1:8081"], "labels": {"job": "processor"}},
        {"targets": ["127.0.0.1:8083"], "labels": {"job": "metrics"}},
    ]
    write_targets(settings, TARGETS_NAME, {"ingest": ["127.0.0.1:9"]})
    assert len(json.loads(path.read_text())) == 1 and not list(path.parent.glob("*.partial"))
    remove_targets(settings, TARGETS_NAME)
    assert not path.exists()
