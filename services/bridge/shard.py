"""The shards this process holds: steps 2 and 3 of the bridge loop (bridge.py's docstring
has the whole loop). One reader task per shard reads GetRecords from the checkpoint, with the
next call in flight while a batch is forwarded; a batch is decoded (decoder.py), sent to
events.raw and events.dlq and acknowledged by Kafka, its parity messageIds recorded, and only
then checkpointed under the lease: at least once into events.raw, never past a batch Kafka
did not take.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.bridge.checkpoints import Checkpoints, Step, while_held
from services.bridge.decoder import BadReason, Bridged, LegacyDecoder, Position, Rejected, Skip
from services.bridge.errors import CASSANDRA_ERRORS, THROUGHPUT_CODES, error_code, retriable
from services.bridge.kinesis import Backoff, KinesisClient, arrival_ms
from services.bridge.legacy import TRUNCATED_ORIGINAL
from services.bridge.metrics import BridgeMetrics
from services.bridge.settings import Settings
from services.bridge.store import Lease, ParityEntry, Store, now_ms
from services.common.badrow import BAD_ROW_SCHEMA, BadRow, FailureType
from services.common.kafka import key_hash
from services.common.sources import SourceRegistry

log = structlog.get_logger(__name__)

RAW_HEADERS = [("hw-schema", b"envelope/1"), ("hw-origin", b"legacy-kinesis")]
BAD_ROW_HEADERS = [("hw-schema", BAD_ROW_SCHEMA.encode())]


class ReaderState(enum.Enum):
    """A shard reader's life: STARTING -> READING -> (FINISHED | LOST | STOPPED)."""

    STARTING = "starting"  # getting an iterator from the checkpoint
    READING = "reading"  # GetRecords / forward / checkpoint
    FINISHED = "finished"  # a closed shard read to its end; children may start
    LOST = "lost"  # another process took the lease
    STOPPED = "stopped"  # this process is stopping; lease released


@dataclass
class Reader:
    """A shard this process holds: its lease, its reading task, where it is in its life."""

    lease: Lease
    task: asyncio.Task[None] | None = None
    state: ReaderState = ReaderState.STARTING


@dataclass
class Batch:
    """One GetRecords answer, decoded."""

    raw: list[Bridged] = field(default_factory=list)
    bad: list[Rejected] = field(default_factory=list)
    skipped: dict[Skip, int] = field(default_factory=dict)
    last_sequence: str | None = None


class ShardWorker:
    """Reads, forwards and checkpoints each shard a Reader holds; one per Bridge, which
    takes the leases and starts a task on ``read`` for each."""

    def __init__(
        self,
        settings: Settings,
        registry: SourceRegistry,
        store: Store,
        kinesis: KinesisClient,
        producer: AIOKafkaProducer,
        metrics: BridgeMetrics,
        stop: asyncio.Event,
        *,
        version: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.kinesis = kinesis
        self.producer = producer
        self.metrics = metrics
        self.decoder = LegacyDecoder(
            registry, service="bridge", version=version, max_future_skew_ms=int(settings.max_future_skew_s * 1000)
        )
        self._partitions: dict[str, int] = {}
        self._stop = stop
        self._duration_ms = int(settings.lease_duration_s * 1000)
        self.checkpoints = Checkpoints(settings, store, metrics, stop)

    # -- step 2: one shard ------------------------------------------------------------

    async def _iterator(self, lease: Lease) -> str:
        """After the checkpoint, or from the oldest record the shard keeps. A checkpoint
        Kinesis refuses (older than the stream's retention, so those records are gone)
        is logged as the loss it is and the shard is read from its oldest record."""
        if lease.checkpoint:
            try:
                answer = await self.kinesis.get_shard_iterator(
                    StreamName=lease.stream,
                    ShardId=lease.shard_id,
                    ShardIteratorType="AFTER_SEQUENCE_NUMBER",
                    StartingSequenceNumber=lease.checkpoint,
                )
                return str(answer["ShardIterator"])
            except Exception as exc:
                if error_code(exc) != "InvalidArgumentException":
                    raise
                # An expected answer, not a bug: logged without a trace.
                log.error(  # noqa: TRY400
                    "checkpoint refused by Kinesis (past the retention?); reading from the oldest record",
                    stream=lease.stream,
                    shard=lease.shard_id,
                    checkpoint=lease.checkpoint,
                    error=str(exc),
                )
                self.metrics.checkpoints_refused.labels(lease.stream).inc()
        answer = await self.kinesis.get_shard_iterator(
            StreamName=lease.stream, ShardId=lease.shard_id, ShardIteratorType="TRIM_HORIZON"
        )
        return str(answer["ShardIterator"])

    async def read(self, reader: Reader) -> None:
        """Step 2: one shard, from its checkpoint to its end or until the lease is gone.

        The next GetRecords is in flight while a batch is forwarded (one call per
        shard at a time still, within Kinesis's five reads per second), so reading
        and writing overlap; it is cancelled when the reader stops."""
        lease = reader.lease
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        iterator: str | None = None
        prefetch: asyncio.Task[Any] | None = None
        try:
            while not self._stop.is_set():
                if lease.lost.is_set():
                    reader.state = ReaderState.LOST
                    return
                try:
                    if iterator is None:
                        reader.state = ReaderState.STARTING
                        iterator = await self._iterator(lease)
                        reader.state = ReaderState.READING
                    fetch, prefetch = prefetch or self._get_records(iterator), None
                    answer = await fetch
                except Exception as exc:
                    expired = error_code(exc) == "ExpiredIteratorException"
                    if not expired and not retriable(exc):
                        raise
                    if expired:
                        iterator = None  # fetched again from the checkpoint
                    else:
                        await self._back_off(lease, exc, backoff)
                    continue
                backoff.reset()
                records = answer.get("Records", [])
                following = answer.get("NextShardIterator")
                if records and following is not None:
                    prefetch = asyncio.ensure_future(self._get_records(following))
                step = await self._forward(lease, records) if records else Step.DONE
                if step is Step.LOST:
                    reader.state = ReaderState.LOST
                    return
                if step is Step.REWOUND:
                    await _drop(prefetch)
                    iterator = prefetch = None  # fetched again from the stored checkpoint
                    continue
                self.metrics.behind_ms.labels(lease.stream, lease.shard_id).set(answer.get("MillisBehindLatest", 0))
                iterator = following
                if iterator is None:
                    if await self._finish(reader) is Step.REWOUND:
                        continue
                    return
                if not records:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(either(self._stop, lease.lost), self.settings.idle_poll_s)
            reader.state = ReaderState.STOPPED
        finally:
            await _drop(prefetch)

    async def _back_off(self, lease: Lease, exc: Exception, backoff: Backoff) -> None:
        """A Kinesis read failed for a reason a retry can help (throughput, the service itself)."""
        code = error_code(exc)
        if code in THROUGHPUT_CODES:
            self.metrics.throttled.labels(lease.stream, code).inc()
        log.info("kinesis read backs off", stream=lease.stream, shard=lease.shard_id, error=code or str(exc))
        await backoff.wait(self._stop)

    def _get_records(self, iterator: str) -> asyncio.Future[Any]:
        return asyncio.ensure_future(
            self.kinesis.get_records(ShardIterator=iterator, Limit=self.settings.get_records_limit)
        )

    async def _finish(self, reader: Reader) -> Step:
        lease = reader.lease
        step = await self.checkpoints.write(lease, lease.checkpoint, finished=True, duration_ms=0)
        if step is Step.DONE:
            reader.state = ReaderState.FINISHED
            log.info("shard read to its end", stream=lease.stream, shard=lease.shard_id)
        elif step is Step.LOST:
            reader.state = ReaderState.LOST
        return step

    # -- step 3: one batch ------------------------------------------------------------

    def decode(self, lease: Lease, records: Sequence[Any]) -> Batch:
        """Step 3.1."""
        batch = Batch()
        for record in records:
            at = Position(
                lease.stream,
                lease.shard_id,
                record["SequenceNumber"],
                arrival_ms(record.get("ApproximateArrivalTimestamp")) or now_ms(),
            )
            data: bytes = record["Data"]
            outcome = self.decoder.decode(data, at)
            if isinstance(outcome, Bridged):
                if len(outcome.value) > self.settings.max_raw_bytes:
                    outcome = self._too_large(data, at, outcome)
                else:
                    batch.raw.append(outcome)
            if isinstance(outcome, Rejected):
                batch.bad.append(outcome)
            elif isinstance(outcome, Skip):
                batch.skipped[outcome] = batch.skipped.get(outcome, 0) + 1
            batch.last_sequence = at.sequence
        return batch

    def _too_large(self, data: bytes, at: Position, bridged: Bridged) -> Rejected:
        original = self.decoder.redact(data, None)[:TRUNCATED_ORIGINAL]
        row = BadRow(
            FailureType.SIZE_VIOLATION,
            [f"the Envelope would be {len(bridged.value)} bytes; the limit is {self.settings.max_raw_bytes}"],
            original,
            "bridge",
            self.decoder.version,
            source_id=bridged.source_id,
            message_id=bridged.message_id,
            extra={
                "reason": "too_large",
                "original_truncated_to": TRUNCATED_ORIGINAL,
                "kinesis": {"stream": at.stream, "shard_id": at.shard_id, "sequence": at.sequence},
            },
        )
        return Rejected(BadReason.TOO_LARGE, row)

    async def _forward(self, lease: Lease, records: Sequence[Any]) -> Step:
        """Step 3: decode, send and wait for Kafka, parity, checkpoint."""
        batch = self.decode(lease, records)
        entries = [ParityEntry(b.source_id, b.minute_ms, b.type, b.name, b.message_id) for b in batch.raw]
        # 3.2 and 3.3 together: both must be done before 3.4, in either order (parity rows are
        # idempotent, and a failed send means the whole batch again). Kafka or Cassandra away:
        # the same batch again (at least once), until they answer.
        sent = await while_held(
            lambda: asyncio.gather(self._send(batch), self.store.record_parity(entries)),
            lease,
            self._stop,
            self.settings,
            errors=(KafkaError, OSError, *CASSANDRA_ERRORS),
            failed="forwarding a batch failed; trying again",
        )
        if sent is None:
            return Step.LOST
        step = await self.checkpoints.write(
            lease, batch.last_sequence, finished=False, duration_ms=self._duration_ms, parity=entries
        )
        if step is Step.LOST:
            if self._stop.is_set() and not lease.lost.is_set():
                return step  # stopping while Cassandra is away: the next owner reads the batch again
            log.warning(
                "checkpoint refused: the lease is another process's now", stream=lease.stream, shard=lease.shard_id
            )
            self.metrics.leases_lost.labels(lease.stream).inc()
            lease.lost.set()
        elif step is Step.DONE:
            self.metrics.checkpoints.labels(lease.stream).inc()
            self._count(lease.stream, batch)
        return step

    async def _send(self, batch: Batch) -> None:
        """Step 3.2: every record sent, then every acknowledgement awaited."""
        acks = await self._send_many(self.settings.raw_topic, [(b.key, b.value) for b in batch.raw], RAW_HEADERS)
        acks += await self._send_many(
            self.settings.dlq_topic,
            [((r.row.source_id or "legacy").encode(), r.row.to_json()) for r in batch.bad],
            BAD_ROW_HEADERS,
        )
        await asyncio.gather(*acks)

    async def _send_many(
        self, topic: str, records: list[tuple[bytes, bytes]], headers: list[tuple[str, bytes]]
    ) -> list[asyncio.Future[Any]]:
        """One record batch per partition (send record by record costs a future and a
        partitioner call each, most of the bridge's Kafka CPU). Partitions by Kafka's
        murmur2 rule on the key, as ingest and any Java producer pick them."""
        if not records:
            return []
        count = self._partitions.get(topic)
        if count is None:
            count = self._partitions[topic] = len(await self.producer.partitions_for(topic))
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value in records:
            by_partition.setdefault(key_hash(key) % count, []).append((key, value))
        acks: list[asyncio.Future[Any]] = []
        for partition, group in by_partition.items():
            builder = self.producer.create_batch()
            for key, value in group:
                if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    if builder.record_count():
                        acks.append(await self.producer.send_batch(builder, topic, partition=partition))
                        builder = self.producer.create_batch()
                    if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                        # Larger than a whole batch: on its own.
                        acks.append(
                            await self.producer.send(topic, value, key=key, partition=partition, headers=headers)
                        )
            if builder.record_count():
                acks.append(await self.producer.send_batch(builder, topic, partition=partition))
        return acks

    def _count(self, stream: str, batch: Batch) -> None:
        records = self.metrics.records
        if batch.raw:
            records.labels(stream, "bridged", "").inc(len(batch.raw))
        for bad in batch.bad:
            records.labels(stream, "dlq", bad.reason.value).inc()
        for skip, count in batch.skipped.items():
            records.labels(stream, "skipped", skip.value).inc(count)


async def either(a: asyncio.Event, b: asyncio.Event) -> None:
    """Wait until either event is set."""
    waiters = [asyncio.create_task(a.wait()), asyncio.create_task(b.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def _drop(task: asyncio.Future[Any] | None) -> None:
    """Cancel a prefetched GetRecords: its answer, or its error, is of no use any more.
    Waited for, not awaited: a cancel of the reader itself is not swallowed here."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not report it
