"""Fixtures for the bridge tests: the dev stack's Kinesis server (started here when
it is not running) and a factory of fresh streams, deleted after each test."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from services.bridge.kinesis import kinesis_client
from services.devstack import stack
from tests.bridge.helpers import AWS_ENV, bridge_settings
from tests.helpers import unique_name


@pytest.fixture(scope="session")
def kinesis_endpoint(stack_settings: stack.StackSettings) -> str:
    stack.up(stack_settings, kafka=False, cassandra=False, kinesis=True)
    for name, value in AWS_ENV.items():
        os.environ.setdefault(name, value)  # the client reads the standard AWS variables
    return stack_settings.kinesis_endpoint


@pytest.fixture
async def kinesis(kinesis_endpoint: str) -> AsyncIterator[Any]:
    async with kinesis_client(bridge_settings(aws_endpoint_url=kinesis_endpoint)) as client:
        yield client


async def wait_active(client: Any, stream: str) -> None:
    for _ in range(300):
        summary = await client.describe_stream_summary(StreamName=stream)
        if summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"stream {stream} did not become ACTIVE")


@pytest.fixture
async def new_stream(kinesis: Any) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Factory: ``await new_stream(shards=2)`` makes an ACTIVE stream; all are deleted afterwards."""
    made: list[str] = []

    async def make(shards: int = 2) -> str:
        name = unique_name("test-legacy")
        await kinesis.create_stream(StreamName=name, ShardCount=shards)
        made.append(name)
        await wait_active(kinesis, name)
        return name

    yield make
    for name in made:
        await kinesis.delete_stream(StreamName=name)
