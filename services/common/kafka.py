"""Kafka helpers shared by the services: topic creation and client settings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from services.common.errors import DependencyUnavailable

log = structlog.get_logger(__name__)

# Kafka error codes that mean "the topic is there", which is what we wanted.
_TOPIC_ALREADY_EXISTS = 36


@lru_cache(maxsize=65_536)
def key_hash(key: bytes) -> int:
    """Kafka's default partitioner hash (positive murmur2), so a Java producer puts the
    same keys on the same partitions. Cached: keys are per user and repeat, and the
    pure-Python hash is not cheap."""
    return int(murmur2(key)) & 0x7FFFFFFF


@dataclass(frozen=True)
class TopicSpec:
    """A topic a service needs, with the configs it must have when created.
    ``min_insync_replicas``: the wanted value, capped by the topic's replication
    (services/common/topics.py ``ensure``); None: the broker's default."""

    name: str
    partitions: int
    replication: int = 1
    configs: dict[str, str] = field(default_factory=dict)
    min_insync_replicas: int | None = None


async def ensure_topics(bootstrap: str, specs: Iterable[TopicSpec], timeout_ms: int = 30_000) -> None:
    """Create the topics that do not exist yet, with no more replicas than the cluster has
    brokers (a one-broker development stack gets one, with a warning); existing ones are
    left as they are."""
    specs = list(specs)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    try:
        try:
            await admin.start()
        except Exception as exc:
            raise DependencyUnavailable(f"Kafka at {bootstrap} did not answer: {exc}") from exc
        try:
            existing = set(await admin.list_topics())
            missing = [s for s in specs if s.name not in existing]
            if not missing:
                return
            if max(s.replication for s in missing) > 1:
                missing = _fit_replication(missing, len((await admin.describe_cluster())["brokers"]))
            response = await admin.create_topics(
                [NewTopic(s.name, s.partitions, s.replication, topic_configs=s.configs) for s in missing],
                timeout_ms=timeout_ms,
            )
        except KafkaError as exc:
            raise DependencyUnavailable(f"Kafka at {bootstrap} could not list or create topics: {exc!r}") from exc
        for topic, code, *rest in response.topic_errors:
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                message = rest[0] if rest else ""
                raise DependencyUnavailable(f"could not create topic {topic}: error {code} {message}")
            if code == 0:
                log.info("topic created", **{"kafka.topic": topic})
    finally:
        await admin.close()


async def ensure_topic_configs(
    bootstrap: str, topic: str, configs: dict[str, str], timeout_ms: int = 30_000
) -> dict[str, str]:
    """Make an existing topic's configs match ``configs`` (a topic created by an
    older release may differ, e.g. compacted where records now have no key).
    Returns the settings that were changed, with their old values."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    try:
        await admin.start()
        resource = ConfigResource(ConfigResourceType.TOPIC, topic)
        [response] = await admin.describe_configs([resource])
        code, message, _type, _name, entries = response.resources[0][:5]
        if code != 0:
            raise DependencyUnavailable(f"could not read the configs of {topic}: error {code} {message}")
        current = {entry[0]: entry[1] for entry in entries}
        changed = {k: current.get(k, "") for k, v in configs.items() if current.get(k) != v}
        if changed:
            # AlterConfigs replaces the topic's whole set of overrides: send the ones it
            # has (an operator's, say) with ours, or they would fall back to defaults.
            overrides = {entry[0]: entry[1] for entry in entries if _is_topic_override(response.API_VERSION, entry[3])}
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, overrides | configs)])
            log.warning(
                "topic configs changed to what this release needs",
                **{"kafka.topic": topic},
                old=changed,
                new={k: configs[k] for k in changed},
            )
    except KafkaError as exc:
        raise DependencyUnavailable(f"Kafka at {bootstrap} could not read or change {topic}: {exc!r}") from exc
    finally:
        await admin.close()
    return changed


# DescribeConfigs v1+: an entry's source; 1 is DYNAMIC_TOPIC_CONFIG, set on this topic.
_DYNAMIC_TOPIC_CONFIG = 1


def _is_topic_override(api_version: int, source_or_default: object) -> bool:
    """Whether a DescribeConfigs entry is set on the topic itself: v0 answers ``is_default``
    (a bool), later versions the config's source."""
    if api_version == 0:
        return source_or_default is False
    return source_or_default == _DYNAMIC_TOPIC_CONFIG


def _fit_replication(specs: list[TopicSpec], brokers: int) -> list[TopicSpec]:
    fitted = []
    for spec in specs:
        if spec.replication > brokers:
            log.warning(
                "topic created with fewer replicas than declared: the cluster has fewer brokers",
                **{"kafka.topic": spec.name},
                declared=spec.replication,
                brokers=brokers,
            )
            spec = replace(spec, replication=max(1, brokers))
        fitted.append(spec)
    return fitted


async def replication_factors(bootstrap: str, topics: list[str], timeout_ms: int = 30_000) -> dict[str, int]:
    """Each existing topic's replication factor (its first partition's replica count)."""
    if not topics:
        return {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    try:
        try:
            await admin.start()
            described = await admin.describe_topics(topics)
        except Exception as exc:
            raise DependencyUnavailable(f"Kafka at {bootstrap} did not describe {topics}: {exc!r}") from exc
    finally:
        await admin.close()
    return {
        t["topic"]: len(t["partitions"][0]["replicas"]) for t in described if t["error_code"] == 0 and t["partitions"]
    }


async def kafka_ready(bootstrap: str) -> tuple[bool, str]:
    """Readiness probe: the cluster answers a metadata request."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await admin.start()
        await admin.list_topics()
    except Exception as exc:  # noqa: BLE001 - readiness reports, it does not raise
        return False, f"kafka: {type(exc).__name__}: {exc}"
    finally:
        await admin.close()
    return True, "ok"
