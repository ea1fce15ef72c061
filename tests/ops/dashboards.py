"""The Grafana dashboards of compose/grafana/dashboards, read the way Grafana would send them:
each Prometheus panel's PromQL with Grafana's interval variables filled in, and each KairosDB
panel's target built into the /api/v1/datapoints/query body that grafana-kairosdb-datasource
writes (its KairosDBQueryBuilder: tags with values, aggregators from their parameters, tag
group-bys, the dashboard's range as absolute times)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.ops.rules import ROOT

DASHBOARDS_DIR = ROOT / "compose" / "grafana" / "dashboards"
# Grafana's variables in the dashboards' PromQL, and what the test gives them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m"}
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
# The trailing comparison of an alert expression: "<expr> > 0.05".
THRESHOLD = re.compile(r"^(?P<expr>.*?)\s*(?:==|!=|>=|<=|>|<)\s*[-+]?[0-9.]+\s*$", re.DOTALL)


def load_dashboards(folder: Path = DASHBOARDS_DIR) -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def promql_targets(dashboards: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(where, expression) of every Prometheus target, Grafana's variables filled in."""
    out = []
    for name, dashboard in dashboards.items():
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                if target["datasource"]["type"] != "prometheus":
                    continue
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, f"{name}: {panel['title']}: a variable the test does not fill: {expr}"
                out.append((f"{name}: {panel['title']} {target['refId']}", expr))
    return out


def kairos_targets(dashboards: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any], str]]:
    """(where, target query, the dashboard's time from, e.g. now-6h) of every KairosDB target."""
    return [
        (f"{name}: {panel['title']} {target['refId']}", target["query"], dashboard["time"]["from"])
        for name, dashboard in dashboards.items()
        for panel in dashboard["panels"]
        for target in panel["targets"]
        if target["datasource"]["type"] == "grafana-kairosdb-datasource"
    ]


def _relative_ms(text: str) -> int:
    """'1m' -> 60000, '6h' -> ...: Grafana's interval strings."""
    match = re.fullmatch(r"(\d+)([smhd])", text)
    assert match, text
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)] * 1000


def kairos_body(query: dict[str, Any], time_from: str, now_ms: int) -> dict[str, Any]:
    """The body the data source posts for one target over now-<range> .. now."""
    aggregators = []
    for aggregator in query["aggregators"]:
        built: dict[str, Any] = {"name": aggregator["name"]}
        for parameter in aggregator["parameters"]:
            kind, value = parameter["type"], parameter["value"]
            if kind == "alignment":
                built.update(
                    {"SAMPLING": {"align_sampling": True}, "START_TIME": {"align_start_time": True}, "NONE": {}}[value]
                )
            elif kind == "sampling":
                # SamplingParameterConverter: "1m" becomes value 1, unit minutes.
                number, unit = re.fullmatch(r"(\d+)([smhd])", value).groups()  # type: ignore[union-attr]
                built.setdefault("sampling", {}).update(value=number, unit=UNITS[unit])
            elif kind != "sampling_unit":
                built[parameter["name"]] = value
        aggregators.append(built)
    group_by = [{"name": "tag", "tags": query["groupBy"]["tags"]}] if query["groupBy"].get("tags") else []
    metric: dict[str, Any] = {
        "name": query["metricName"],
        "tags": {k: v for k, v in query["tags"].items() if v},
        "group_by": group_by,
    }
    if aggregators:
        metric["aggregators"] = aggregators
    assert time_from.startswith("now-"), time_from
    return {"start_absolute": now_ms - _relative_ms(time_from[4:]), "end_absolute": now_ms, "metrics": [metric]}


def without_threshold(expr: str) -> str:
    """An alert expression without its trailing comparison: the series it compares."""
    match = THRESHOLD.match(expr.strip())
    assert match, f"no trailing comparison in {expr!r}"
    return match.group("expr")
