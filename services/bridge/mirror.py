"""events.enriched -> legacy Kinesis streams, for every source mirrored to one.

A consumer group on events.enriched (read_committed: only events the
processor committed). Each poll is one batch, handled in this order:

1. turn each record into a legacy record (legacy.to_legacy): sources without
   a mirror direction are skipped (counted); a record over Kinesis's 1 MiB
   limit becomes a SIZE_VIOLATION bad row (its original is the enriched event,
   which carries no write key);
2. per stream, PutRecords in chunks within Kinesis's limits (500 records,
   5 MiB of data plus partition keys), partition key = messageId; the records
   a PutRecords refuses (throughput, internal errors) are sent again, alone,
   with backoff, until every one is accepted;
3. send the bad rows to events.dlq and wait for Kafka's acknowledgement;
4. commit the batch's offsets.

Offsets are committed only after step 2 accepted every record, so a kill
at any point sends the batch again: at least once, and the legacy consumers
dedupe on messageId as they did for the old API's retries. Every record the
mirror writes carries the marker (context.headwater.mirrored) that makes a
bridge on the same stream skip it. The mirror reads Kafka, not the request
path, so it can never slow ingest: a slow or absent Kinesis only grows its lag.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from services.bridge.errors import error_code, retriable
from services.bridge.kinesis import Backoff, KinesisClient
from services.bridge.legacy import (
    MAX_BAD_ROW_ORIGINAL,
    MAX_RECORD_BYTES,
    TRUNCATED_ORIGINAL,
    LegacyRecord,
    NotMirrored,
    to_legacy,
)
from services.bridge.metrics import MirrorMetrics
from services.bridge.settings import Settings
from services.common.badrow import BAD_ROW_SCHEMA, BadRow, FailureType
from services.common.sources import SourceRegistry

log = structlog.get_logger(__name__)

BAD_ROW_HEADERS = [("hw-schema", BAD_ROW_SCHEMA.encode())]


@dataclass
class MirrorBatch:
    by_stream: dict[str, list[LegacyRecord]] = field(default_factory=lambda: defaultdict(list))
    bad: list[BadRow] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    offsets: dict[TopicPartition, int] = field(default_factory=dict)


def chunks(records: Sequence[LegacyRecord], max_records: int, max_bytes: int) -> list[list[LegacyRecord]]:
    """Split into PutRecords calls within the count and size limits (a record's size
    is its data plus its partition key, as Kinesis counts it)."""
    out: list[list[LegacyRecord]] = []
    current: list[LegacyRecord] = []
    size = 0
    for record in records:
        record_size = len(record.data) + len(record.partition_key.encode())
        if current and (len(current) >= max_records or size + record_size > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(record)
        size += record_size
    if current:
        out.append(current)
    return out


class Mirror:
    def __init__(
        self,
        settings: Settings,
        registry: SourceRegistry,
        kinesis: KinesisClient,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        metrics: MirrorMetrics,
        *,
        version: str,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.kinesis = kinesis
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics
        self.version = version
        self._stop = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll, send, commit, until ``stop`` (the batch in flight is finished or left uncommitted)."""
        self._stop = stop
        while not stop.is_set():
            polled = await self.consumer.getmany(
                timeout_ms=self.settings.mirror_poll_ms, max_records=self.settings.mirror_batch_max_records * 4
            )
            records = [r for rs in polled.values() for r in rs]
            if not records:
                continue
            batch = self.prepare(records)
            if not await self.send(batch):
                return  # stopping mid-batch: nothing committed, the batch is sent again after a restart
            await self.commit(batch)

    def prepare(self, records: Sequence[Any]) -> MirrorBatch:
        """Step 1."""
        batch = MirrorBatch()
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            batch.offsets[tp] = max(batch.offsets.get(tp, -1), record.offset + 1)
            try:
                doc = orjson.loads(record.value)
            except orjson.JSONDecodeError:
                doc = None
            if not isinstance(doc, dict):
                batch.bad.append(
                    self._bad_row(
                        record, FailureType.INVALID_JSON, ["events.enriched value is not a JSON object"], None
                    )
                )
                continue
            converted = to_legacy(doc, self.registry)
            if isinstance(converted, NotMirrored):
                batch.skipped[converted.value] += 1
                continue
            for legacy in converted:
                if len(legacy.data) + len(legacy.partition_key.encode()) > MAX_RECORD_BYTES:
                    batch.bad.append(
                        self._bad_row(
                            record,
                            FailureType.SIZE_VIOLATION,
                            [
                                f"the legacy record is {len(legacy.data)} bytes; "
                                f"Kinesis takes at most {MAX_RECORD_BYTES}"
                            ],
                            legacy,
                        )
                    )
                else:
                    batch.by_stream[legacy.stream].append(legacy)
        return batch

    def _bad_row(self, record: Any, failure: FailureType, errors: list[str], legacy: LegacyRecord | None) -> BadRow:
        original: bytes = record.value or b""
        cut = {}
        if len(original) > MAX_BAD_ROW_ORIGINAL:
            # Base64 grows it by a third: a whole ~1 MB event would not fit a Kafka record.
            cut = {"original_bytes": len(original), "original_truncated_to": TRUNCATED_ORIGINAL}
            original = original[:TRUNCATED_ORIGINAL]
        return BadRow(
            failure_type=failure,
            errors=errors,
            original=original,
            service="mirror",
            version=self.version,
            source_id=legacy.source_id if legacy else None,
            message_id=legacy.message_id if legacy else None,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            extra={
                "reason": "too_large" if failure is FailureType.SIZE_VIOLATION else failure.value,
                "original_format": "enriched_event",
                **({"stream": legacy.stream} if legacy else {}),
                **cut,
            },
        )

    async def send(self, batch: MirrorBatch) -> bool:
        """Steps 2 and 3. False when asked to stop before every record was accepted."""
        for stream, records in batch.by_stream.items():
            for chunk in chunks(records, self.settings.mirror_batch_max_records, self.settings.mirror_batch_max_bytes):
                if not await self.put_chunk(stream, chunk):
                    return False
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        while batch.bad:
            try:
                futures = [
                    await self.producer.send(
                        self.settings.dlq_topic,
                        row.to_json(),
                        key=(row.source_id or "mirror").encode(),
                        headers=BAD_ROW_HEADERS,
                    )
                    for row in batch.bad
                ]
                await asyncio.gather(*futures)
                break
            except KafkaError as exc:
                log.warning("bad rows not acknowledged; trying again", error=repr(exc))
                if self._stop.is_set():
                    return False
                await backoff.wait(self._stop)
        return True

    async def put_chunk(self, stream: str, chunk: list[LegacyRecord]) -> bool:
        """One PutRecords, then only the refused records again, until all are accepted."""
        pending = chunk
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        while pending:
            try:
                answer = await self.kinesis.put_records(
                    StreamName=stream, Records=[{"Data": r.data, "PartitionKey": r.partition_key} for r in pending]
                )
            except Exception as exc:
                if not retriable(exc) and error_code(exc) != "ResourceNotFoundException":
                    raise
                # A missing stream may be being created; throughput errors pass.
                self.metrics.put_retries.labels(stream, error_code(exc) or type(exc).__name__).inc(len(pending))
                log.warning(
                    "PutRecords failed; trying again",
                    stream=stream,
                    records=len(pending),
                    error=error_code(exc) or repr(exc),
                )
                if self._stop.is_set():
                    return False
                await backoff.wait(self._stop)
                continue
            results = answer["Records"]
            refused = [(r, res) for r, res in zip(pending, results, strict=True) if res.get("ErrorCode")]
            self.metrics.records.labels(stream, "sent", "").inc(len(pending) - len(refused))
            if not refused:
                self.metrics.batches.labels(stream).inc()
                return True
            for _, res in refused:
                self.metrics.put_retries.labels(stream, str(res.get("ErrorCode"))).inc()
            pending = [r for r, _ in refused]
            if self._stop.is_set():
                return False
            await backoff.wait(self._stop)
        return True

    async def commit(self, batch: MirrorBatch) -> None:
        """Step 4. A failed commit (a rebalance) means the new owner sends the batch again."""
        for reason, count in batch.skipped.items():
            self.metrics.records.labels("", "skipped", reason).inc(count)
        for row in batch.bad:
            self.metrics.records.labels(str(row.extra.get("stream", "")), "dlq", str(row.extra["reason"])).inc()
        try:
            await self.consumer.commit(batch.offsets)
        except (CommitFailedError, KafkaError) as exc:
            log.warning("offset commit failed; the batch will be mirrored again", error=repr(exc))

    async def status(self) -> tuple[bool, str]:
        return True, f"{len(self.consumer.assignment())} partitions"

    async def close(self) -> None:
        with contextlib.suppress(KafkaError):
            await self.consumer.stop()
