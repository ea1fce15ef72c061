"""compose/'s Prometheus loads the alert rules, and Grafana provisions the dashboards on the
provisioned data sources, checked by reading the files (no container engine here). What the
dashboards' queries answer is tests/ops/test_prometheus.py's part."""

from __future__ import annotations

import copy
import fnmatch
import json
from pathlib import Path
from typing import Any

import yaml

from tests.ops.dashboards import DASHBOARDS_DIR, load_dashboards
from tests.test_compose import COMPOSE_DIR, Compose, bind_sources, load_compose


def mounts(compose: Compose, service: str) -> dict[str, Path]:
    """Container path -> repo path of a service's bind mounts from the repo."""
    return {
        target: (COMPOSE_DIR / source).resolve()
        for source, target, _ in bind_sources(compose["services"][service])
        if source.startswith(".")
    }


def check_prometheus_rules(compose: Compose, config: dict[str, Any]) -> list[str]:
    """Every rule_files pattern of the config matches a mounted rules file, and the repo's
    rules files are all loaded."""
    mounted = mounts(compose, "prometheus")
    loaded: set[Path] = set()
    for pattern in config.get("rule_files") or []:
        folder, _, name = str(pattern).rpartition("/")
        repo_dir = mounted.get(folder)
        found = sorted(p for p in repo_dir.iterdir() if fnmatch.fnmatch(p.name, name)) if repo_dir else []
        if not found:
            return [f"prometheus: rule_files {pattern} matches no mounted file"]
        loaded.update(found)
    shipped = set((COMPOSE_DIR / "prometheus" / "rules").glob("*.yml"))
    return [f"prometheus: {p.name} is not loaded" for p in sorted(shipped - loaded)]


def check_grafana_dashboards(
    compose: Compose,
    providers: dict[str, Any],
    datasources: list[dict[str, Any]],
    dashboards: dict[str, dict[str, Any]],
) -> list[str]:
    """The file provider's path is the mounted dashboards folder, and every panel's data source is
    one that provisioning creates (by uid and type)."""
    problems = []
    mounted = mounts(compose, "grafana")
    paths = [p["options"]["path"] for p in providers["providers"] if p.get("type") == "file"]
    if not paths or mounted.get(paths[0]) != DASHBOARDS_DIR:
        problems.append(f"grafana: the dashboards provider reads {paths}, not the mounted {DASHBOARDS_DIR.name}/")
    by_uid = {s.get("uid"): s["type"] for s in datasources}
    for name, dashboard in dashboards.items():
        for panel in dashboard["panels"]:
            for target in [panel, *panel["targets"]]:
                ds = target["datasource"]
                if by_uid.get(ds["uid"]) != ds["type"]:
                    problems.append(f"{name}: panel {panel['title']!r} uses data source {ds}, not provisioned")
    return problems


def _config() -> tuple[Compose, dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    provisioning = COMPOSE_DIR / "grafana" / "provisioning"
    return (
        load_compose(),
        yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text()),
        yaml.safe_load((provisioning / "dashboards" / "headwater.yml").read_text()),
        yaml.safe_load((provisioning / "datasources" / "datasources.yml").read_text())["datasources"],
    )


def test_compose_prometheus_loads_the_rules() -> None:
    compose, config, _, _ = _config()
    assert check_prometheus_rules(compose, config) == []
    broken = copy.deepcopy(config)
    broken["rule_files"] = ["/etc/prometheus/alerts/*.yml"]
    assert check_prometheus_rules(compose, broken) == [
        "prometheus: rule_files /etc/prometheus/alerts/*.yml matches no mounted file"
    ]


def test_compose_grafana_provisions_the_dashboards() -> None:
    compose, _, providers, datasources = _config()
    dashboards = load_dashboards()
    assert set(dashboards) == {"ingest", "processor", "metrics", "traffic"}
    assert check_grafana_dashboards(compose, providers, datasources, dashboards) == []
    # The checks catch an unmounted folder and a panel on a data source nobody provisions.
    unmounted = copy.deepcopy(compose)
    unmounted["services"]["grafana"]["volumes"] = ["./grafana/provisioning:/etc/grafana/provisioning:ro"]
    assert len(check_grafana_dashboards(unmounted, providers, datasources, dashboards)) == 1
    renamed = json.loads(json.dumps(dashboards))
    renamed["traffic"]["panels"][0]["targets"][0]["datasource"]["uid"] = "kairos"
    assert len(check_grafana_dashboards(compose, providers, datasources, renamed)) == 1


def test_dashboards_have_unique_uids_and_panel_ids() -> None:
    dashboards = load_dashboards()
    assert len({d["uid"] for d in dashboards.values()}) == len(dashboards)
    for name, dashboard in dashboards.items():
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), name
        assert all(p["targets"] for p in dashboard["panels"]), name
