"""The topic declarations (services/common/topics.py): what every service
creates a topic with, what proto/topics/*.md say, and how a drifted topic is
brought back (real Kafka, own topics)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from pydantic_settings import BaseSettings

from services.bridge.settings import Settings as BridgeSettings
from services.common import topics
from services.common.kafka import _is_topic_override
from services.ingest.settings import Settings as IngestSettings
from services.metrics.settings import Settings as MetricsSettings
from services.processor.settings import Settings as ProcessorSettings
from tests.helpers import unique_name

PROTO = Path(__file__).resolve().parents[2] / "proto" / "topics"

# Per service: the topics it ensures -> its (name setting, partitions setting, retention setting).
WRITERS: dict[type[BaseSettings], dict[topics.Topic, tuple[str, str, str | None]]] = {
    IngestSettings: {
        topics.RAW: ("raw_topic", "raw_partitions", None),
        topics.DLQ: ("dlq_topic", "dlq_partitions", None),
    },
    ProcessorSettings: {
        topics.RAW: ("raw_topic", "raw_partitions", None),
        topics.ENRICHED: ("enriched_topic", "enriched_partitions", "enriched_retention_ms"),
        topics.DLQ: ("dlq_topic", "dlq_partitions", None),
        topics.DEST: ("dest_topic_prefix", "dest_partitions", "dest_retention_ms"),
    },
    MetricsSettings: {
        topics.LATE: ("late_topic", "late_topic_partitions", "late_topic_retention_ms"),
        topics.DLQ: ("dlq_topic", "dlq_partitions", None),
    },
    BridgeSettings: {
        topics.RAW: ("raw_topic", "raw_partitions", None),
        topics.DLQ: ("dlq_topic", "dlq_partitions", None),
    },
}


def test_every_topic_is_deleted_by_time_never_compacted() -> None:
    # The changelog's records have no key: a compacted topic would refuse them.
    for topic in topics.ALL:
        assert topic.configs()["cleanup.policy"] == "delete", topic.default_name
        assert int(topic.configs()["retention.ms"]) >= 3600 * 1000, topic.default_name


def test_the_dlq_takes_large_bad_rows_for_30_days() -> None:
    assert topics.DLQ.configs() == {
        "cleanup.policy": "delete",
        "retention.ms": str(30 * topics.DAY_MS),
        "max.message.bytes": str(8 * 1024 * 1024),
    }
    # The processor may send a bad row as large as its producer request: the topic must take it.
    assert ProcessorSettings().max_request_bytes <= (topics.DLQ.max_message_bytes or 0)


def test_a_topic_with_several_writers_has_one_retention() -> None:
    with pytest.raises(ValueError, match="several writers"):
        topics.DLQ.spec("events.dlq", 2, retention_ms=1000)
    with pytest.raises(ValueError, match="several writers"):
        topics.RAW.configs(retention_ms=1000)
    assert topics.RAW.spec("x", 3, retention_ms=topics.RAW.retention_ms).configs == topics.RAW.configs()
    # One writer: its setting decides.
    assert topics.LATE.spec("late", 1, retention_ms=120_000).configs["retention.ms"] == "120000"
    for topic in topics.ALL:
        assert (topic.retention_setting is None) == (len(topic.writers) > 1), topic.default_name


@pytest.mark.parametrize("settings_class", list(WRITERS), ids=lambda c: c.__module__.split(".")[1])
def test_every_writer_defaults_to_the_declaration(settings_class: type[BaseSettings]) -> None:
    """Whichever service starts first creates the same topic."""
    fields = settings_class.model_fields
    for topic, (name_field, partitions_field, retention_field) in WRITERS[settings_class].items():
        assert fields[name_field].default == topic.default_name, name_field
        assert topic.name_setting == name_field
        assert fields[partitions_field].default == topic.partitions, partitions_field
        if retention_field is None:
            assert topic.retention_setting is None
        else:
            assert fields[retention_field].default == topic.retention_ms, retention_field


def test_every_declared_writer_ensures_the_topic() -> None:
    services = {
        IngestSettings: "ingest",
        ProcessorSettings: "processor",
        MetricsSettings: "metrics",
        BridgeSettings: "bridge",
    }
    for topic in (topics.RAW, topics.ENRICHED, topics.DLQ, topics.LATE, topics.DEST):
        ensured_by = {services[c] for c, declared in WRITERS.items() if topic in declared}
        # The mirror is the bridge service in its other role; the processor also ensures
        # events.raw, which it reads, to size its changelog from it.
        writers = {"bridge" if w == "mirror" else w for w in topic.writers}
        assert writers <= ensured_by, topic.default_name
        assert ensured_by - writers <= {"processor"}, topic.default_name


def _after(marker: str, text: str) -> str:
    """What follows each ``marker`` up to the end of its table row, bullet or paragraph."""
    spans = [
        re.split(r"\n\||\n- |\n\n", text[m.end() :], maxsplit=1)[0]
        for m in re.finditer(marker, text, flags=re.IGNORECASE)
    ]
    return " ".join(" ".join(spans).split())


@pytest.mark.parametrize("topic", topics.ALL, ids=lambda t: t.default_name)
def test_the_contract_page_says_what_the_declaration_says(topic: topics.Topic) -> None:
    text = (PROTO / topic.doc).read_text()
    if topic is topics.DEDUPE_CHANGELOG:
        text = text[text.index("## Dedupe") :]
    assert topic.configs_doc() in " ".join(text.split()), topic.doc
    assert topic.replication_doc() in " ".join(text.split()), topic.doc
    written, read = _after("written by", text), _after("read by", text)
    for writer in topic.writers:
        assert writer in written, (topic.doc, writer)
    for reader in topic.readers:
        assert reader in read, (topic.doc, reader)


def test_only_a_topics_own_overrides_are_kept() -> None:
    # DescribeConfigs v0 answers is_default; later versions the source (1: set on the topic).
    assert _is_topic_override(0, False) and not _is_topic_override(0, True)
    assert _is_topic_override(2, 1)
    assert not _is_topic_override(2, 5) and not _is_topic_override(2, 4)


async def _configs(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    return {entry[0]: entry[1] for entry in response.resources[0][4]}


async def test_a_drifted_topic_is_brought_up_to_date(
    kafka_bootstrap: str, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """A DLQ made as an older ingest made it (compacted by hand, 1 h, 1 MiB), with an
    operator's override beside: ensure sets the declared configs and keeps the override."""
    drifted = await new_topic(
        "dlq",
        partitions=1,
        configs={
            "cleanup.policy": "compact",
            "retention.ms": "3600000",
            "max.message.bytes": "1048588",
            "segment.ms": "3600000",
        },
    )
    missing = unique_name("test.dlq-new")
    specs = [topics.DLQ.spec(drifted, 2), topics.DLQ.spec(missing, 2)]

    await topics.ensure(kafka_bootstrap, specs)

    for name in (drifted, missing):
        configs = await _configs(kafka_bootstrap, name)
        assert {k: configs[k] for k in topics.DLQ.configs()} == topics.DLQ.configs(), name
    assert (await _configs(kafka_bootstrap, drifted))["segment.ms"] == "3600000"  # the operator's stays
    # Up to date now: nothing left to change.
    assert await topics.ensure_configs(kafka_bootstrap, drifted, topics.DLQ.configs()) == {}


def test_every_topic_is_declared_with_three_replicas_and_two_in_sync() -> None:
    for topic in topics.ALL:
        spec = topic.spec("x", 1)
        assert (spec.replication, spec.min_insync_replicas) == (3, 2), topic.default_name
    # min.insync.replicas follows the topic's actual replication: one replica may always be away.
    assert [topics.min_insync(2, rf) for rf in (1, 2, 3, 5)] == [1, 1, 2, 2]


async def test_on_one_broker_a_topic_gets_one_replica_and_stays_writable(kafka_bootstrap: str) -> None:
    """The declaration asks for 3 replicas; the one-broker stack has one: the topic is made
    with one, and min.insync.replicas 1, so acks=all writes still succeed."""
    name = unique_name("test.rf")
    await topics.ensure(kafka_bootstrap, [topics.RAW.spec(name, 1)])
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([name])
    finally:
        await admin.close()
    assert [len(p["replicas"]) for p in described["partitions"]] == [1]
    assert (await _configs(kafka_bootstrap, name))["min.insync.replicas"] == "1"
