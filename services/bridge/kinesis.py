"""The Kinesis client (aiobotocore), shard listing, and the backoff both loops use.

The client retries nothing itself ("standard" mode with one attempt): the
bridge and the mirror decide, with errors.retriable, because a throttled
GetRecords must wait (five reads per second per shard) and a partly failed
PutRecords must send only the refused records again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from services.bridge.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_kinesis import KinesisClient
else:
    KinesisClient = Any

__all__ = ["Backoff", "KinesisClient", "ShardInfo", "arrival_ms", "kinesis_client", "list_shards", "ready_shards"]


@contextlib.asynccontextmanager
async def kinesis_client(settings: Settings) -> AsyncIterator[KinesisClient]:
    config = AioConfig(
        retries={"mode": "standard", "max_attempts": 1}, connect_timeout=5, read_timeout=30, max_pool_connections=64
    )
    session = get_session()
    # Timestamps (ApproximateArrivalTimestamp of every record) stay as Kinesis sent them,
    # epoch seconds: botocore's own parsing into datetimes was a fifth of the bridge's CPU.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_epoch_seconds)
    async with session.create_client(
        "kinesis", region_name=settings.aws_region, endpoint_url=settings.aws_endpoint_url, config=config
    ) as client:
        yield client


def _epoch_seconds(value: Any) -> float:
    """Kinesis's JSON protocol sends times as epoch seconds (a number)."""
    return float(value)


def arrival_ms(value: Any) -> int | None:
    """A record's ApproximateArrivalTimestamp (epoch seconds, or a datetime) in ms."""
    if value is None:
        return None
    if isinstance(value, int | float | str):
        return int(float(value) * 1000)
    return int(value.timestamp() * 1000)


@dataclass(frozen=True)
class ShardInfo:
    shard_id: str
    parents: tuple[str, ...]
    closed: bool


async def list_shards(client: KinesisClient, stream: str) -> list[ShardInfo]:
    """Every shard of the stream Kinesis still lists (open and closed), paged."""
    shards: list[ShardInfo] = []
    token: str | None = None
    while True:
        answer = await (client.list_shards(NextToken=token) if token else client.list_shards(StreamName=stream))
        for shard in answer["Shards"]:
            parents = tuple(p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p)
            closed = "EndingSequenceNumber" in shard.get("SequenceNumberRange", {})
            shards.append(ShardInfo(shard["ShardId"], parents, closed))
        token = answer.get("NextToken")
        if not token:
            return shards


def ready_shards(shards: list[ShardInfo], finished: set[str]) -> list[ShardInfo]:
    """The shards that may be read now, in the KCL's order: a child waits until
    every parent Kinesis still lists is read to its end. A parent that is no
    longer listed (past the retention period) does not hold its children back."""
    listed = {s.shard_id for s in shards}
    return [
        s for s in shards if s.shard_id not in finished and all(p in finished or p not in listed for p in s.parents)
    ]


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0

    async def wait(self, stop: asyncio.Event | None = None) -> None:
        delay = self.next_delay()
        if stop is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
