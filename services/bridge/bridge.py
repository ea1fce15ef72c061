"""Legacy Kinesis stream -> events.raw, for every source bridged from it.

The loop, as the KCL does it:

1. Every ``discovery_interval_s``: list each bridged stream's shards (new
   shards from a split or merge are found here), read the lease table, renew
   the leases held, and take free or expired leases of shards that are ready
   (every parent still listed is finished), up to this process's fair share;
   below it with nothing free, take one shard over from the busiest owner.
   Streams no source is bridged from any more are let go (leases released).
2. One reader task per held shard (steps 2 and 3: shard.py): GetRecords from
   the checkpoint, forward the batch (below), follow NextShardIterator, the
   next GetRecords already in flight while a batch is forwarded; when Kinesis
   returns no iterator the shard is closed and read to its end: it is marked
   finished, and its children become ready at the next discovery.
3. Forwarding one batch (``ShardWorker._forward``), in this order:
   1. decode every record (decoder.py): an Envelope, a bad row or a skip;
   2. send the Envelopes to events.raw and the bad rows to events.dlq and wait
      until Kafka acknowledged every one (acks=all, idempotent producer), and
   3. meanwhile record the parity messageIds (idempotent rows);
   4. checkpoint the batch's last sequence number, conditional on the lease
      (checkpoints.py); after a Cassandra failure the stored checkpoint is read
      back first, and the shard read again from it when a node lost newer ones.
   A crash anywhere before 4 means the batch is read again: at least once
   into events.raw; the processor's messageId dedupe makes it exactly once in
   events.enriched. A checkpoint refused (the lease went to another process)
   stops the reader: the other process goes on from the last checkpoint.
   Kafka or Cassandra away: the step is tried again with backoff, nothing
   moves past it.

Throughput errors (five reads or 2 MB per second per shard) and other
retriable Kinesis errors back off with jitter and try again; an expired
iterator is fetched again from the checkpoint. A reader that fails in a way
no retry helps (a bug) stops the bridge with a failure instead of hiding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.bridge.errors import CASSANDRA_ERRORS, error_code, retriable
from services.bridge.kinesis import KinesisClient, ShardInfo, list_shards, ready_shards
from services.bridge.metrics import BridgeMetrics
from services.bridge.settings import Settings
from services.bridge.shard import Reader, ReaderState, ShardWorker, either
from services.bridge.store import Lease, LeaseRow, Store, now_ms
from services.common.sources import SourceRegistry

log = structlog.get_logger(__name__)


def bridged_streams(registry: SourceRegistry) -> list[str]:
    return sorted({stream for s in registry.sources() for stream in s.legacy_streams("bridge")})


def fair_share(total: int, owners: int) -> int:
    return max(1, math.ceil(total / max(1, owners)))


class Bridge:
    def __init__(
        self,
        settings: Settings,
        registry: SourceRegistry,
        store: Store,
        kinesis: KinesisClient,
        producer: AIOKafkaProducer,
        metrics: BridgeMetrics,
        *,
        version: str,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.kinesis = kinesis
        self.metrics = metrics
        self.readers: dict[tuple[str, str], Reader] = {}
        self.failure: BaseException | None = None
        self._stop = asyncio.Event()
        self.shards = ShardWorker(settings, registry, store, kinesis, producer, metrics, self._stop, version=version)
        self._failed = asyncio.Event()
        self._duration_ms = int(settings.lease_duration_s * 1000)

    # -- the discovery loop -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: discover, balance, and watch the readers; then release the leases."""
        try:
            while not stop.is_set() and not self._failed.is_set():
                streams = bridged_streams(self.registry)
                await self._let_go(set(streams))
                for stream in streams:
                    try:
                        await self.balance(stream)
                    except Exception as exc:
                        # Kinesis, Cassandra or Kafka away, or a stream not made yet: next round.
                        if not (
                            retriable(exc)
                            or isinstance(exc, (KafkaError, OSError, *CASSANDRA_ERRORS))
                            or error_code(exc) == "ResourceNotFoundException"
                        ):
                            raise
                        log.warning(
                            "shard discovery failed; trying again", stream=stream, error=f"{type(exc).__name__}: {exc}"
                        )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(either(stop, self._failed), self.settings.discovery_interval_s)
        finally:
            await self.close()
        if self.failure is not None:
            raise self.failure

    async def balance(self, stream: str) -> None:
        """Step 1: renew what we hold, take what is free and ready, up to a fair share."""
        shards = await list_shards(self.kinesis, stream)
        rows = await self.store.leases(stream)
        await self._renew(stream)
        finished = {shard_id for shard_id, row in rows.items() if row.finished}
        ready = ready_shards(shards, finished)
        now = now_ms()
        owners = {row.owner for row in rows.values() if row.owner and row.expires_at_ms > now and not row.finished}
        owners.add(self.settings.owner_id)
        held = [key for key in self.readers if key[0] == stream]
        share = fair_share(len(ready), len(owners))
        for shard in ready:
            if len(held) >= share:
                break
            key = (stream, shard.shard_id)
            if key in self.readers:
                continue
            row = rows.get(shard.shard_id)
            if row is not None and (row.finished or (row.expires_at_ms > now and row.owner != self.settings.owner_id)):
                continue
            lease = await self.store.take(stream, shard.shard_id, row, self.settings.owner_id, self._duration_ms)
            if lease is None:
                continue
            log.info(
                "shard lease taken",
                stream=stream,
                shard=shard.shard_id,
                checkpoint=lease.checkpoint,
                counter=lease.counter,
            )
            self._start_reader(lease, shard)
            held.append(key)
        if len(held) < share:
            await self._steal(stream, ready, rows, share)
        self.metrics.shards_held.labels(stream).set(sum(1 for key in self.readers if key[0] == stream))

    async def _steal(self, stream: str, ready: list[ShardInfo], rows: dict[str, LeaseRow], share: int) -> None:
        """Below our share with nothing free: take one shard from the busiest owner if it
        holds more than its share (as the KCL does). Its next renewal or checkpoint is
        refused, so it stops; we go on from its last checkpoint (a batch may be sent twice)."""
        now = now_ms()
        by_owner: dict[str, list[LeaseRow]] = {}
        for shard in ready:
            row = rows.get(shard.shard_id)
            if row is not None and row.owner and row.owner != self.settings.owner_id and row.expires_at_ms > now:
                by_owner.setdefault(row.owner, []).append(row)
        if not by_owner:
            return
        victim, their = max(by_owner.items(), key=lambda item: len(item[1]))
        if len(their) <= share:
            return
        row = their[-1]
        lease = await self.store.take(stream, row.shard_id, row, self.settings.owner_id, self._duration_ms)
        if lease is None:
            return
        log.info(
            "shard lease taken over for balance",
            stream=stream,
            shard=row.shard_id,
            owner_before=victim,
            checkpoint=lease.checkpoint,
        )
        self._start_reader(lease, next(s for s in ready if s.shard_id == row.shard_id))

    async def _let_go(self, streams: set[str]) -> None:
        """Stop reading streams no source is bridged from any more (sources.json changed);
        their leases are released, so a later change back starts from the checkpoints."""
        for key, reader in list(self.readers.items()):
            if key[0] not in streams and not reader.lease.lost.is_set():
                log.info("stream no longer bridged; letting its shard go", stream=key[0], shard=key[1])
                reader.lease.lost.set()
                if reader.task is not None:
                    await asyncio.wait({reader.task}, timeout=self.settings.shutdown_timeout_s)
                with contextlib.suppress(*CASSANDRA_ERRORS):  # unreleased, it expires by itself
                    await self.store.release(reader.lease)

    async def _renew(self, stream: str) -> None:
        for key, reader in list(self.readers.items()):
            if key[0] != stream or reader.lease.lost.is_set():
                continue
            if not await self.store.renew(reader.lease, self._duration_ms):
                log.warning("shard lease lost", stream=stream, shard=key[1])
                self.metrics.leases_lost.labels(stream).inc()
                reader.lease.lost.set()

    def _start_reader(self, lease: Lease, shard: ShardInfo) -> None:
        reader = Reader(lease)
        reader.task = asyncio.create_task(self.shards.read(reader), name=f"bridge-{lease.stream}-{shard.shard_id}")
        reader.task.add_done_callback(functools.partial(self._reader_done, lease.key))
        self.readers[lease.key] = reader

    def _reader_done(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        self.readers.pop(key, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A failure no retry helps: the bridge stops and says why (no silent dead shard).
            log.error("shard reader failed", stream=key[0], shard=key[1], error=f"{type(exc).__name__}: {exc}")
            self.failure = exc
            self._failed.set()

    async def status(self) -> tuple[bool, str]:
        if self.failure is not None:
            return False, f"a shard reader failed: {type(self.failure).__name__}: {self.failure}"
        return True, f"{len(self.readers)} shards held"

    async def close(self) -> None:
        """Stop the readers (each finishes the batch it forwards) and release their leases; safe twice."""
        self._stop.set()
        readers = list(self.readers.values())
        tasks = [r.task for r in readers if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.shutdown_timeout_s)
        for reader in readers:
            if reader.task is not None and not reader.task.done():
                reader.task.cancel()
            if reader.state not in (ReaderState.FINISHED, ReaderState.LOST):
                with contextlib.suppress(Exception):
                    await self.store.release(reader.lease)
