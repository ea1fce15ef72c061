"""The multi-node stack's configuration (services/devstack/cluster.py), without starting it;
tests/cluster/ starts it and kills its nodes."""

from __future__ import annotations

import itertools
from pathlib import Path

from services.devstack.cluster import MURMUR3_MIN, Cluster, ClusterSettings
from services.devstack.stack import StackSettings


def cluster(tmp_path: Path, nodes: int = 3) -> Cluster:
    return Cluster.from_settings(ClusterSettings(nodes=nodes, network="127.0.42"), StackSettings(data_dir=tmp_path))


def props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_every_node_has_its_own_address_and_folder(tmp_path: Path) -> None:
    c = cluster(tmp_path)
    assert c.kafka_bootstrap == "127.0.42.2:9092,127.0.42.3:9092,127.0.42.4:9092"
    assert c.cassandra_hosts == ("127.0.42.2", "127.0.42.3", "127.0.42.4")
    folders = {s.base for s in c.servers()}
    assert len(folders) == 6 and all(f.parent == tmp_path / "cluster" for f in folders)


def test_brokers_share_the_voters_and_have_the_production_defaults(tmp_path: Path) -> None:
    c = cluster(tmp_path)
    configs = [props(c.kafka_properties(i)) for i in c.indexes]
    assert {p["controller.quorum.voters"] for p in configs} == {"1@127.0.42.2:9093,2@127.0.42.3:9093,3@127.0.42.4:9093"}
    assert [p["node.id"] for p in configs] == ["1", "2", "3"]
    for p in configs:
        assert p["process.roles"] == "broker,controller"
        assert p["default.replication.factor"] == p["offsets.topic.replication.factor"] == "3"
        assert p["transaction.state.log.replication.factor"] == "3"
        assert p["min.insync.replicas"] == p["transaction.state.log.min.isr"] == "2"
        assert p["unclean.leader.election.enable"] == "false"
    # One node: a cluster of one, the single-node shape.
    single = props(cluster(tmp_path / "one", nodes=1).kafka_properties(1))
    assert single["default.replication.factor"] == single["min.insync.replicas"] == "1"


def test_cassandra_tokens_cut_the_ring_evenly_and_every_node_is_a_seed(tmp_path: Path) -> None:
    c = cluster(tmp_path)
    tokens = [c.initial_token(i) for i in c.indexes]
    assert tokens[0] == MURMUR3_MIN and tokens == sorted(tokens) and len(set(tokens)) == 3
    gaps = {b - a for a, b in itertools.pairwise(tokens)} | {2**63 - 1 - tokens[-1] + 1}
    assert max(gaps) - min(gaps) <= 2
    for i in c.indexes:
        yaml = c.cassandra_yaml(i)
        assert f"initial_token: {tokens[i - 1]}" in yaml and "auto_bootstrap: false" in yaml
        assert 'seeds: "127.0.42.2:7000,127.0.42.3:7000,127.0.42.4:7000"' in yaml
        assert f"listen_address: 127.0.42.{i + 1}" in yaml


def test_status_lists_nothing_before_the_first_up_and_the_cluster_id_is_kept(tmp_path: Path) -> None:
    c = cluster(tmp_path)
    assert c.status() == [] and c.down() == []
    assert c.cluster_id() == c.cluster_id()
    (tmp_path / "cluster" / "kafka-2").mkdir(parents=True)
    [line] = c.status()
    assert line.startswith("kafka-2") and "stopped" in line
