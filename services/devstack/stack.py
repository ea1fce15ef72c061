"""Real Kafka (KRaft) and Cassandra for development and tests, without Docker.

The jars come from Maven Central through the poms beside this module and are
cached under ``HEADWATER_STACK_HOME`` (default ``~/.cache/headwater``); a second
``up`` needs no network. Each server runs as a detached JVM whose pid, config,
data and log live under the stack's data folder, so ``down`` then ``up`` keeps
the data.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.devstack.server import Server, StackError, wait_until

KAFKA_VERSION = "4.1.1"
CASSANDRA_VERSION = "5.0.6"


def _default_java() -> str:
    # Cassandra 5.0 supports Java 11 and 17 only; prefer 17 when several JDKs exist.
    for candidate in ("/usr/lib/jvm/java-17-openjdk-amd64/bin/java",):
        if Path(candidate).exists():
            return candidate
    return shutil.which("java") or "java"


class StackSettings(BaseSettings):
    """Where the dev stack keeps its jars and data, and which ports it uses."""

    model_config = SettingsConfigDict(env_prefix="HEADWATER_STACK_", frozen=True)

    home: Path = Field(default_factory=lambda: Path.home() / ".cache" / "headwater")
    data_dir: Path | None = None
    java: str = Field(default_factory=_default_java)
    mvn: str = "mvn"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_partitions: int = 4
    kafka_heap: str = "768m"
    cassandra_port: int = 9042
    cassandra_storage_port: int = 7000
    cassandra_heap: str = "1G"
    # The optional Kinesis-compatible server (services/devstack/kinesis.py), for the bridge.
    kinesis_port: int = 4567
    node: str = "node"
    npm: str = "npm"
    # The optional Prometheus (services/devstack/prometheus.py), Debian's package.
    prometheus: str = "prometheus"
    prometheus_port: int = 9090
    start_timeout_s: float = 240.0
    stop_timeout_s: float = 90.0

    @property
    def data(self) -> Path:
        return self.data_dir or (self.home / "data")

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def kinesis_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.kinesis_port}"


# -- Kafka ----------------------------------------------------------------------


def kafka_server(settings: StackSettings) -> Server:
    return Server("kafka", KAFKA_VERSION, "kafka.Kafka", settings)


def _kafka_properties(settings: StackSettings, base: Path) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{settings.kafka_controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{settings.kafka_port},"
            f"CONTROLLER://127.0.0.1:{settings.kafka_controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{settings.kafka_port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={base / 'logs'}",
            f"num.partitions={settings.kafka_partitions}",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=8",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "transaction.abort.timed.out.transaction.cleanup.interval.ms=10000",
            "log.flush.interval.messages=9223372036854775807",
            "",
        ]
    )


def kafka_cluster_id() -> str:
    """A random KRaft cluster id: a UUID in URL-safe base64, as Kafka's own tool makes
    them. One in 64 such strings starts with "-", which the storage tool's argument
    parser takes for an option; Kafka draws again in that case, and so do we."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def start_kafka(settings: StackSettings) -> Server:
    server = kafka_server(settings)
    server.resolve()
    if server.pid() is not None:
        return server
    launch_kafka(server, _kafka_properties(settings, server.base), settings.kafka_heap)
    return server


def launch_kafka(server: Server, properties: str, heap: str, cluster_id: str | None = None) -> None:
    """Write the broker's config, format its storage once (under ``cluster_id``, or a new
    one), and start its JVM. The brokers of one cluster share a cluster id
    (services/devstack/cluster.py)."""
    settings = server.settings
    base = server.base
    base.mkdir(parents=True, exist_ok=True)
    props = base / "server.properties"
    props.write_text(properties)
    java_base = [f"-Xms{heap}", f"-Xmx{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]
    log_conf = resources.files("services.devstack").joinpath("conf", "kafka-log4j2.yaml")
    with resources.as_file(log_conf) as log_path:
        log_copy = base / "log4j2.yaml"
        shutil.copyfile(log_path, log_copy)
    if not (base / "logs" / "meta.properties").exists():
        cmd = [
            settings.java,
            *java_base[2:],
            f"-Dlog4j2.configurationFile={log_copy}",
            "-cp",
            f"{server.lib_dir}/*",
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id or kafka_cluster_id()}",
            "-c",
            str(props),
            "--ignore-formatted",
        ]
        # A full test run once saw this step fail and the next run pass; retry once,
        # and say what the tool printed if it fails again.
        for attempt in (1, 2):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                break
            if attempt == 2:
                raise StackError(f"kafka storage format failed:\n{done.stdout}{done.stderr}")
            time.sleep(1.0)
    server.launch(
        [*java_base, f"-Dlog4j2.configurationFile={log_copy}", f"-Dkafka.logs.dir={base}"],
        [str(props)],
    )


async def kafka_answers(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """True when the broker answers a metadata request."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    # A broker that is still starting refuses connections; that is expected here.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        await asyncio.wait_for(admin.list_topics(), timeout_s)
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False
    finally:
        await admin.close()
    return True


# -- Cassandra ------------------------------------------------------------------


def cassandra_server(settings: StackSettings) -> Server:
    return Server("cassandra", CASSANDRA_VERSION, "org.apache.cassandra.service.CassandraDaemon", settings)


def _cassandra_yaml(settings: StackSettings, base: Path) -> str:
    return f"""\
cluster_name: headwater-dev
num_tokens: 1
allocate_tokens_for_local_replication_factor: 1
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
      - seeds: "127.0.0.1:{settings.cassandra_storage_port}"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: {settings.cassandra_storage_port}
native_transport_port: {settings.cassandra_port}
start_native_transport: true
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
concurrent_reads: 8
concurrent_writes: 8
concurrent_compactors: 1
auto_snapshot: false
"""


def start_cassandra(settings: StackSettings) -> Server:
    server = cassandra_server(settings)
    server.resolve()
    if server.pid() is not None:
        return server
    launch_cassandra(server, _cassandra_yaml(settings, server.base), settings.cassandra_heap)
    return server


def launch_cassandra(server: Server, config: str, heap: str, gc: str = "-XX:+UseG1GC") -> None:
    """Write the node's cassandra.yaml and start its JVM (``gc``: the collector's flag)."""
    base = server.base
    base.mkdir(parents=True, exist_ok=True)
    yaml_path = base / "cassandra.yaml"
    yaml_path.write_text(config)
    conf = resources.files("services.devstack").joinpath("conf")
    logback = base / "logback.xml"
    with resources.as_file(conf.joinpath("cassandra-logback.xml")) as src:
        shutil.copyfile(src, logback)
    options = conf.joinpath("cassandra-jvm17.options").read_text().split()
    server.launch(
        [
            f"-Xms{heap}",
            f"-Xmx{heap}",
            gc,
            "-Xss512k",
            *options,
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.config=file://{yaml_path}",
            f"-Dcassandra.storagedir={base}",
            f"-Dcassandra.logdir={base}",
            f"-Dlogback.configurationFile={logback}",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=100",
            "-Dcassandra.superuser_setup_delay_ms=0",
        ],
        [],
    )


def cassandra_answers(port: int, timeout_s: float = 5.0, host: str = "127.0.0.1") -> bool:
    """True when the node answers CQL ``SELECT release_version FROM system.local``."""
    from cassandra.cluster import Cluster

    cluster = Cluster(
        [host], port=port, connect_timeout=timeout_s, protocol_version=5, control_connection_timeout=timeout_s
    )
    try:
        session = cluster.connect()
        row = session.execute("SELECT release_version FROM system.local", timeout=timeout_s).one()
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False
    finally:
        cluster.shutdown()
    return row is not None


# -- the stack -----------------------------------------------------------------


def up(
    settings: StackSettings,
    *,
    kafka: bool = True,
    cassandra: bool = True,
    kinesis: bool = False,
    opensearch: bool = False,
) -> dict[str, float]:
    """Start what is not running and return once every server answers; the
    Kinesis server only when asked for (the bridge and its tests need it), and
    OpenSearch too (services/devstack/opensearch.py; the log search tests)."""
    timings: dict[str, float] = {}
    if kinesis:
        from services.devstack.kinesis import start_kinesis

        timings["kinesis"] = start_kinesis(settings)[1]
    started: list[tuple[Server, Callable[[], bool]]] = []
    t0 = time.monotonic()
    if opensearch:  # started first and awaited with the others: it is the slowest to answer
        from services.devstack.opensearch import launch_opensearch

        started.append(launch_opensearch(settings))
    if kafka:
        server = start_kafka(settings)
        started.append((server, lambda: asyncio.run(kafka_answers(settings.kafka_bootstrap))))
    if cassandra:
        server = start_cassandra(settings)
        started.append((server, lambda: cassandra_answers(settings.cassandra_port)))
    for server, probe in started:
        wait_until(server, probe, settings.start_timeout_s)
        timings[server.name] = time.monotonic() - t0
    return timings


def down(settings: StackSettings) -> list[str]:
    from services.devstack.kinesis import kinesis_server
    from services.devstack.opensearch import opensearch_server
    from services.devstack.prometheus import prometheus_server

    servers = (
        kafka_server(settings),
        cassandra_server(settings),
        kinesis_server(settings),
        prometheus_server(settings),
        opensearch_server(settings),
    )
    return [server.name for server in servers if server.stop()]


def status(settings: StackSettings) -> list[str]:
    from services.devstack.kinesis import kinesis_server
    from services.devstack.opensearch import OpenSearchSettings, opensearch_server
    from services.devstack.prometheus import prometheus_server

    lines = []
    servers: tuple[tuple[Server, str], ...] = (
        (kafka_server(settings), settings.kafka_bootstrap),
        (cassandra_server(settings), f"127.0.0.1:{settings.cassandra_port}"),
        (kinesis_server(settings), f"127.0.0.1:{settings.kinesis_port}"),
        (prometheus_server(settings), f"127.0.0.1:{settings.prometheus_port}"),
        (opensearch_server(settings), OpenSearchSettings().url.removeprefix("http://")),
    )
    for server, where in servers:
        pid = server.pid()
        state = f"running pid {pid}" if pid else "stopped"
        lines.append(
            f"{server.name:<10} {server.version:<8} {state:<20} {where:<18} data {server.base}  log {server.log_file}"
        )
    return lines
