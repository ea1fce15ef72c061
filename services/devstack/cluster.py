"""Several Kafka brokers and Cassandra nodes on one machine: the production shapes
(replication factor 3, ``min.insync.replicas`` 2, quorum reads and writes) for
``headwater stack up --nodes 3`` and the failure tests in tests/cluster/.

Shape and why:

- Node ``i`` (1..n) of each server listens on its own loopback address
  (``<network>.<first_host + i - 1>``, 127.0.0.2-4 by default) with the same ports
  on every node, as in a real cluster: clients find the peers from metadata
  (Kafka's advertised listeners, Cassandra's ``system.peers``) without any
  port mapping, and the single-node stack on 127.0.0.1 keeps its ports.
- Kafka brokers run in KRaft *combined* mode (broker and controller in one JVM,
  static ``controller.quorum.voters``): three JVMs instead of six, and the
  controller quorum (2 of 3) survives one node killed, like the partitions.
  Every broker is formatted with the cluster's one id, kept in the data folder.
- Cassandra nodes are all seeds and own fixed tokens (``initial_token``, one per
  node, evenly spread) with ``auto_bootstrap: false``: nothing streams and no
  node waits for another, so the three start in parallel. Serial GC and small
  heaps keep each JVM light on a small machine.
- The brokers' defaults match the topic declarations' production shape
  (services/common/topics.py): ``default.replication.factor`` min(3, n) and
  ``min.insync.replicas`` min(2, n), the same for the offsets and transaction
  logs.

Each node's pid, config, data and log live under ``<stack data>/cluster/<server>-<i>``,
so ``down`` then ``up`` keeps the data, as for the single-node stack.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.devstack import stack
from services.devstack.server import Server, StackError, rss_mib, wait_until
from services.devstack.stack import StackSettings

MURMUR3_MIN = -(2**63)


class ClusterSettings(BaseSettings):
    """The multi-node stack: how many nodes, where they listen, their heaps."""

    model_config = SettingsConfigDict(env_prefix="HEADWATER_CLUSTER_", frozen=True)

    nodes: int = Field(default=3, ge=1, le=9)
    # Node i listens on f"{network}.{first_host + i - 1}".
    network: str = "127.0.0"
    first_host: int = Field(default=2, ge=1, le=250)
    data_dir: Path | None = None  # default: <stack data>/cluster
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_partitions: int = 8
    kafka_heap: str = "384m"
    # Failure detection: a broker that misses heartbeats this long is fenced and its
    # partitions get new leaders (Kafka's default is 9 s; heartbeats every 2 s).
    kafka_session_timeout_ms: int = Field(default=6000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=1000, ge=100)
    cassandra_port: int = 9042
    cassandra_storage_port: int = 7000
    cassandra_heap: str = "512M"
    start_timeout_s: float = 420.0


@dataclass
class NodeServer(Server):
    """One node of a multi-node server: its own folder, the same jars."""

    node: int = 1

    @property
    def base(self) -> Path:
        return self.settings.data / f"{self.name}-{self.node}"

    @property
    def label(self) -> str:
        return f"{self.name}-{self.node}"


@dataclass(frozen=True)
class Cluster:
    """The nodes of one multi-node stack; ``stack`` gives the jars, the JVM and the data folder."""

    settings: ClusterSettings
    stack: StackSettings

    @classmethod
    def from_settings(cls, settings: ClusterSettings, stack_settings: StackSettings) -> Cluster:
        data = settings.data_dir or (stack_settings.data / "cluster")
        return cls(settings, stack_settings.model_copy(update={"data_dir": data}))

    @property
    def indexes(self) -> range:
        return range(1, self.settings.nodes + 1)

    def address(self, node: int) -> str:
        return f"{self.settings.network}.{self.settings.first_host + node - 1}"

    @property
    def replication(self) -> int:
        return min(3, self.settings.nodes)

    @property
    def min_insync(self) -> int:
        return min(2, self.settings.nodes)

    # -- addresses for clients ----------------------------------------------------------------

    def kafka_address(self, node: int) -> str:
        return f"{self.address(node)}:{self.settings.kafka_port}"

    @property
    def kafka_bootstrap(self) -> str:
        """Every broker, comma-separated: a client starts from whichever answers."""
        return ",".join(self.kafka_address(i) for i in self.indexes)

    @property
    def cassandra_hosts(self) -> tuple[str, ...]:
        return tuple(self.address(i) for i in self.indexes)

    # -- servers ------------------------------------------------------------------------------

    def kafka(self, node: int) -> NodeServer:
        return NodeServer("kafka", stack.KAFKA_VERSION, "kafka.Kafka", self.stack, node=node)

    def cassandra(self, node: int) -> NodeServer:
        return NodeServer(
            "cassandra", stack.CASSANDRA_VERSION, "org.apache.cassandra.service.CassandraDaemon", self.stack, node=node
        )

    def servers(self) -> list[NodeServer]:
        return [*(self.kafka(i) for i in self.indexes), *(self.cassandra(i) for i in self.indexes)]

    def existing(self) -> list[NodeServer]:
        """The nodes that have a folder (started once), whatever ``nodes`` says now."""
        data = self.stack.data
        found = []
        for make, name in ((self.kafka, "kafka"), (self.cassandra, "cassandra")):
            for folder in sorted(data.glob(f"{name}-*")) if data.is_dir() else []:
                suffix = folder.name.removeprefix(f"{name}-")
                if suffix.isdigit():
                    found.append(make(int(suffix)))
        return found

    # -- configuration ------------------------------------------------------------------------

    def cluster_id(self) -> str:
        """The KRaft cluster id every broker is formatted with, made once and kept."""
        path = self.stack.data / "kafka-cluster-id"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(stack.kafka_cluster_id())
        return path.read_text().strip()

    def kafka_properties(self, node: int) -> str:
        s = self.settings
        host = self.address(node)
        voters = ",".join(f"{i}@{self.address(i)}:{s.kafka_controller_port}" for i in self.indexes)
        rf, isr = self.replication, self.min_insync
        return "\n".join(
            [
                "process.roles=broker,controller",
                f"node.id={node}",
                f"controller.quorum.voters={voters}",
                f"listeners=PLAINTEXT://{host}:{s.kafka_port},CONTROLLER://{host}:{s.kafka_controller_port}",
                f"advertised.listeners=PLAINTEXT://{host}:{s.kafka_port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                f"log.dirs={self.kafka(node).base / 'logs'}",
                f"num.partitions={s.kafka_partitions}",
                f"default.replication.factor={rf}",
                f"min.insync.replicas={isr}",
                "unclean.leader.election.enable=false",
                "auto.create.topics.enable=false",
                f"offsets.topic.replication.factor={rf}",
                "offsets.topic.num.partitions=8",
                f"transaction.state.log.replication.factor={rf}",
                f"transaction.state.log.min.isr={isr}",
                "transaction.state.log.num.partitions=8",
                f"share.coordinator.state.topic.replication.factor={rf}",
                f"share.coordinator.state.topic.min.isr={isr}",
                f"broker.session.timeout.ms={s.kafka_session_timeout_ms}",
                f"broker.heartbeat.interval.ms={s.kafka_heartbeat_interval_ms}",
                "group.initial.rebalance.delay.ms=0",
                "transaction.abort.timed.out.transaction.cleanup.interval.ms=10000",
                # Two cores for the whole machine: fewer threads than Kafka's defaults.
                "num.network.threads=2",
                "num.io.threads=4",
                "num.replica.fetchers=1",
                "background.threads=4",
                "",
            ]
        )

    def initial_token(self, node: int) -> int:
        """Node i's token: the Murmur3 ring cut in ``nodes`` equal ranges."""
        return MURMUR3_MIN + (2**64 // self.settings.nodes) * (node - 1)

    def cassandra_yaml(self, node: int) -> str:
        s = self.settings
        base = self.cassandra(node).base
        host = self.address(node)
        seeds = ",".join(f"{self.address(i)}:{s.cassandra_storage_port}" for i in self.indexes)
        return f"""\
cluster_name: headwater-cluster
num_tokens: 1
initial_token: {self.initial_token(node)}
auto_bootstrap: false
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
data_file_directories:
  - {base / "data"}
commitlog_directory: {base / "commitlog"}
saved_caches_directory: {base / "saved_caches"}
hints_directory: {base / "hints"}
cdc_raw_directory: {base / "cdc_raw"}
commitlog_sync: periodic
commitlog_sync_period: 10000ms
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{seeds}"
listen_address: {host}
rpc_address: {host}
storage_port: {s.cassandra_storage_port}
native_transport_port: {s.cassandra_port}
start_native_transport: true
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
hinted_handoff_enabled: true
max_hint_window: 3h
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 4
concurrent_materialized_view_writes: 4
concurrent_compactors: 1
native_transport_max_threads: 32
memtable_heap_space: 64MiB
memtable_offheap_space: 64MiB
key_cache_size: 16MiB
file_cache_size: 64MiB
auto_snapshot: false
"""

    # -- lifecycle ----------------------------------------------------------------------------

    def resolve(self) -> None:
        self.kafka(1).resolve()
        self.cassandra(1).resolve()

    def start_kafka(self, node: int) -> NodeServer:
        server = self.kafka(node)
        if server.pid() is None:
            stack.launch_kafka(
                server, self.kafka_properties(node), self.settings.kafka_heap, cluster_id=self.cluster_id()
            )
        return server

    def start_cassandra(self, node: int) -> NodeServer:
        server = self.cassandra(node)
        if server.pid() is None:
            stack.launch_cassandra(
                server, self.cassandra_yaml(node), self.settings.cassandra_heap, gc="-XX:+UseSerialGC"
            )
        return server

    def kafka_probe(self, node: int) -> Callable[[], bool]:
        """Node ``node`` answers metadata and sees every broker of the cluster."""

        def probe() -> bool:
            return asyncio.run(brokers_seen(self.kafka_address(node))) >= self.settings.nodes

        return probe

    def cassandra_probe(self, node: int) -> Callable[[], bool]:
        """Node ``node`` answers CQL and knows every other node as a peer."""

        def probe() -> bool:
            return cassandra_peers(self.address(node), self.settings.cassandra_port) >= self.settings.nodes - 1

        return probe

    def up(self, *, kafka: bool = True, cassandra: bool = True) -> dict[str, float]:
        """Start every node that is not running, all at once; return when each answers
        and sees the others (seconds from the start, per node)."""
        self.resolve()
        t0 = time.monotonic()
        waiting: list[tuple[NodeServer, Callable[[], bool]]] = []
        # Cassandra first (the slowest to start, and launching is immediate); the brokers'
        # storage formats (a short JVM each) then run side by side.
        if cassandra:
            waiting += [(self.start_cassandra(i), self.cassandra_probe(i)) for i in self.indexes]
        if kafka:
            self.cluster_id()  # made once here, not by the brokers' threads at the same time
            with ThreadPoolExecutor(max_workers=self.settings.nodes) as pool:
                brokers = list(pool.map(self.start_kafka, self.indexes))
            waiting = [*((b, self.kafka_probe(b.node)) for b in brokers), *waiting]
        timings: dict[str, float] = {}
        deadline = t0 + self.settings.start_timeout_s
        for server, probe in waiting:
            wait_until(server, probe, max(1.0, deadline - time.monotonic()))
            timings[server.label] = time.monotonic() - t0
        return timings

    def wait_node(self, server: NodeServer, timeout_s: float | None = None) -> float:
        """Until a (re)started node answers and sees the others; seconds waited."""
        probe = self.kafka_probe(server.node) if server.name == "kafka" else self.cassandra_probe(server.node)
        return wait_until(server, probe, timeout_s or self.settings.start_timeout_s)

    def down(self) -> list[str]:
        """Stop every node that runs (each cleanly, then killed after the stop timeout)."""
        return [server.label for server in self.existing() if server.stop()]

    def kill(self) -> None:
        """SIGKILL every node (tests' clean-up)."""
        for server in self.existing():
            server.kill()

    def status(self) -> list[str]:
        lines = []
        for server in self.existing():
            pid = server.pid()
            state = f"running pid {pid}" if pid else "stopped"
            port = self.settings.kafka_port if server.name == "kafka" else self.settings.cassandra_port
            where = f"{self.address(server.node)}:{port}"
            lines.append(
                f"{server.label:<12} {server.version:<8} {state:<20} {where:<18} "
                f"rss {rss_mib(pid):>5} MiB  data {server.base}  log {server.log_file}"
            )
        return lines


async def brokers_seen(bootstrap: str, timeout_s: float = 5.0) -> int:
    """The brokers the cluster's metadata lists, asked of ``bootstrap``; 0 if it does not answer."""
    import logging

    from aiokafka.admin import AIOKafkaAdminClient

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        described = await asyncio.wait_for(admin.describe_cluster(), timeout_s)
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return 0
    finally:
        await admin.close()
    return len(described.get("brokers", []))


def cassandra_peers(host: str, port: int, timeout_s: float = 5.0) -> int:
    """The peers node ``host`` lists in system.peers_v2; -1 if it does not answer CQL."""
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, ExecutionProfile
    from cassandra.cluster import Cluster as CqlCluster
    from cassandra.policies import WhiteListRoundRobinPolicy

    only_this = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy([host]), request_timeout=timeout_s)
    cql = CqlCluster(
        [host],
        port=port,
        connect_timeout=timeout_s,
        protocol_version=5,
        control_connection_timeout=timeout_s,
        execution_profiles={EXEC_PROFILE_DEFAULT: only_this},
    )
    try:
        session = cql.connect()
        rows = list(session.execute("SELECT peer FROM system.peers_v2", timeout=timeout_s))
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return -1
    finally:
        cql.shutdown()
    return len(rows)


def default_cluster(nodes: int | None = None) -> Cluster:
    """The cluster of ``headwater stack up --nodes N``: settings from the environment."""
    settings = ClusterSettings() if nodes is None else ClusterSettings(nodes=nodes)
    return Cluster.from_settings(settings, StackSettings())


__all__ = ["Cluster", "ClusterSettings", "NodeServer", "StackError", "default_cluster"]
