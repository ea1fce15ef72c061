"""Fixtures shared by every test.

Integration tests use the real local Kafka and Cassandra (``headwater stack
up``; started here if they are not running). Every test gets its own topics,
consumer groups and keyspaces from the factory fixtures, so tests share the
servers but never state. A test that asks for ``kafka_bootstrap`` or
``cassandra`` (directly or through another fixture) is marked ``integration``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from services.common.cassandra import CassandraClient
from services.common.kafka import TopicSpec, ensure_topics
from services.devstack import stack
from tests.helpers import unique_name

INTEGRATION_FIXTURES = {"kafka_bootstrap", "cassandra", "cassandra_port", "stack_settings"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack_settings() -> stack.StackSettings:
    """The running dev stack's settings; starts Kafka and Cassandra if needed."""
    settings = stack.StackSettings()
    stack.up(settings)
    return settings


@pytest.fixture(scope="session")
def kafka_bootstrap(stack_settings: stack.StackSettings) -> str:
    return stack_settings.kafka_bootstrap


@pytest.fixture(scope="session")
def cassandra_port(stack_settings: stack.StackSettings) -> int:
    return stack_settings.cassandra_port


@pytest.fixture
def new_topic(kafka_bootstrap: str) -> Callable[..., Awaitable[str]]:
    """Factory: ``await new_topic("events.raw", partitions=4)`` makes a fresh topic."""

    async def make(prefix: str = "t", partitions: int = 1, configs: dict[str, str] | None = None) -> str:
        name = unique_name(f"test.{prefix}")
        await ensure_topics(kafka_bootstrap, [TopicSpec(name, partitions, configs=configs or {})])
        return name

    return make


@pytest.fixture
def new_group() -> Callable[[str], str]:
    """Factory for consumer group ids no other test uses."""

    def make(prefix: str = "g") -> str:
        return unique_name(f"test-{prefix}")

    return make


@pytest.fixture(scope="session")
async def cassandra(cassandra_port: int) -> AsyncIterator[CassandraClient]:
    client = CassandraClient(["127.0.0.1"], cassandra_port)
    await client.connect()
    yield client
    await client.close()


@pytest.fixture
async def new_keyspace(cassandra: CassandraClient) -> AsyncIterator[Callable[[], str]]:
    """Factory for keyspace names; each keyspace made through it is dropped after the test."""
    made: list[str] = []

    def make() -> str:
        name = unique_name("test")
        made.append(name)
        return name

    yield make
    session = cassandra.session
    for name in made:
        # A schema change waits for the node to settle: on a busy machine well past the
        # client's request timeout, which must not fail the test that used the keyspace.
        await asyncio.to_thread(session.execute, f"DROP KEYSPACE IF EXISTS {name}", timeout=120)


@pytest.fixture
def private_stack(
    tmp_path_factory: pytest.TempPathFactory, stack_settings: stack.StackSettings
) -> Iterator[stack.StackSettings]:
    """A second, private stack (own ports and data, nothing started yet) that a
    test may stop, kill and restart without disturbing the shared one."""
    base = tmp_path_factory.mktemp("private-stack")
    port = 19092 + (uuid.uuid4().int % 500) * 2
    settings = stack.StackSettings(
        home=stack_settings.home,
        data_dir=base,
        kafka_port=port,
        kafka_controller_port=port + 1,
        cassandra_port=port + 1000,
        cassandra_storage_port=port + 1001,
        cassandra_heap="512M",
    )
    yield settings
    stack.kafka_server(settings).kill()
    stack.cassandra_server(settings).kill()
