"""compose/docker-compose.cluster.yml, laid over docker-compose.yml as compose does:
three brokers and three Cassandra nodes in the production shape, and every check of
tests/test_compose.py still holds on the merged file."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import yaml
from cassandra import ConsistencyLevel

from services.common.cassandra import replication_factor
from services.common.settings import load_settings
from services.metrics.settings import Settings as MetricsSettings
from tests.test_compose import (
    COMPOSE_DIR,
    HEADWATER,
    Compose,
    check_every_service,
    check_headwater_service,
    depends_on,
    env_of,
    load_compose,
)

CLUSTER_FILE = COMPOSE_DIR / "docker-compose.cluster.yml"
BROKERS = ("kafka", "kafka-2", "kafka-3")
NODES = ("cassandra", "cassandra-2", "cassandra-3")
BOOTSTRAP_VARS = {
    "ingest": "HEADWATER_INGEST_KAFKA_BOOTSTRAP",
    "processor": "HEADWATER_PROCESSOR_KAFKA_BOOTSTRAP",
    "metrics": "HEADWATER_METRICS_KAFKA_BOOTSTRAP",
    "bridge": "HEADWATER_BRIDGE_KAFKA_BOOTSTRAP",
    "mirror": "HEADWATER_BRIDGE_KAFKA_BOOTSTRAP",
}


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of a later file: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def cluster_compose() -> Compose:
    merged = merge(load_compose(), yaml.safe_load(CLUSTER_FILE.read_text()))
    assert isinstance(merged, dict)
    return merged


def check_cluster(compose: Compose) -> list[str]:
    """Three combined brokers on one quorum with RF 3 / min ISR 2 everywhere; three Cassandra
    nodes; every service starts from every broker and waits for all of them."""
    return check_brokers(compose) + check_clients(compose)


def check_brokers(compose: Compose) -> list[str]:
    problems = []
    services = compose["services"]
    voters = {env_of(services[b]).get("KAFKA_CONTROLLER_QUORUM_VOTERS") for b in BROKERS if b in services}
    if len(voters) != 1 or len(next(iter(voters)) or "") == 0:
        problems.append(f"brokers disagree on the voters: {voters}")
    ids = set()
    for broker in BROKERS:
        if broker not in services:
            problems.append(f"no {broker}")
            continue
        env = env_of(services[broker])
        ids.add(env.get("KAFKA_NODE_ID"))
        if f"INTERNAL://{broker}:9092" not in env.get("KAFKA_ADVERTISED_LISTENERS", ""):
            problems.append(f"{broker} does not advertise itself")
        for var in (
            "KAFKA_DEFAULT_REPLICATION_FACTOR",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        ):
            if env.get(var) != "3":
                problems.append(f"{broker}: {var} is {env.get(var)}, not 3")
        for var in ("KAFKA_MIN_INSYNC_REPLICAS", "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
            if env.get(var) != "2":
                problems.append(f"{broker}: {var} is {env.get(var)}, not 2")
    if len(ids) != len(BROKERS):
        problems.append(f"broker node ids not distinct: {ids}")
    return problems


def check_clients(compose: Compose) -> list[str]:
    problems = []
    services = compose["services"]
    for node in NODES:
        if node not in services or set(env_of(services[node]).get("CASSANDRA_SEEDS", "").split(",")) != set(NODES):
            problems.append(f"{node} missing or without every node as a seed")
    for name, var in BOOTSTRAP_VARS.items():
        listed = set(env_of(services[name]).get(var, "").split(","))
        if listed != {f"{b}:9092" for b in BROKERS}:
            problems.append(f"{name}: {var} lists {sorted(listed)}")
        waits = {k for k, v in depends_on(services[name]).items() if v == "service_healthy"}
        if not set(BROKERS) <= waits:
            problems.append(f"{name} does not wait for every broker")
    metrics = env_of(services["metrics"])
    if replication_factor(metrics.get("HEADWATER_METRICS_CASSANDRA_REPLICATION", "{}x")) != 3:
        problems.append("the metrics keyspace is not at RF 3")
    if set(yaml.safe_load(metrics.get("HEADWATER_METRICS_CASSANDRA_HOSTS", "[]"))) != set(NODES):
        problems.append("metrics does not know every Cassandra node")
    declared = set(compose.get("volumes") or {})
    for name in (*BROKERS, *NODES):
        for vol in services.get(name, {}).get("volumes") or []:
            if str(vol).split(":")[0] not in declared:
                problems.append(f"{name}: volume {vol} not declared")
    return problems


@pytest.fixture(scope="module")
def compose() -> Compose:
    return cluster_compose()


def test_the_cluster_variant_has_the_production_shape(compose: Compose) -> None:
    assert check_cluster(compose) == []


def test_every_check_of_the_single_node_file_holds_on_the_cluster_variant(compose: Compose) -> None:
    assert check_every_service(compose) == []
    for name in HEADWATER:
        assert check_headwater_service(compose, name) == []


def test_the_cluster_settings_parse(compose: Compose, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("HEADWATER_METRICS_"):
            monkeypatch.delenv(var)
    for var, value in env_of(compose["services"]["metrics"]).items():
        monkeypatch.setenv(var, value)
    settings = load_settings(MetricsSettings)
    assert settings.kafka_bootstrap == "kafka:9092,kafka-2:9092,kafka-3:9092"
    assert settings.cassandra_hosts == NODES
    assert settings.read_consistency == settings.write_consistency == ConsistencyLevel.LOCAL_QUORUM


def test_the_check_catches_a_broken_cluster(compose: Compose) -> None:
    bad = copy.deepcopy(compose)
    bad["services"]["kafka-3"]["environment"]["KAFKA_MIN_INSYNC_REPLICAS"] = 1
    bad["services"]["kafka-2"]["environment"]["KAFKA_NODE_ID"] = 1
    bad["services"]["processor"]["environment"]["HEADWATER_PROCESSOR_KAFKA_BOOTSTRAP"] = "kafka:9092"
    bad["services"]["metrics"]["environment"]["HEADWATER_METRICS_CASSANDRA_REPLICATION"] = (
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    del bad["volumes"]["kafka-2-data"]
    problems = "\n".join(check_cluster(bad))
    for expected in (
        "kafka-3: KAFKA_MIN_INSYNC_REPLICAS",
        "node ids not distinct",
        "processor: HEADWATER_PROCESSOR",
        "RF 3",
        "kafka-2: volume",
    ):
        assert expected in problems, expected
